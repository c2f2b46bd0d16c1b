"""Property-based fuzzing of every protocol a member may speak.

Hypothesis generates 10,000 frames per protocol: valid ones, valid ones with a field
dropped, retyped or added, and arbitrary msgpack. Each is checked in-process against
its schema (only success or a SchemaError naming a field may come out), then they are
sent to a live node as a member would. The node must survive them all, keep its
memory, and still answer correctly.

Each frame sent costs a py-libp2p stream (a refused frame resets its stream), about
10 ms on this 2-core machine under load, so the suite sends an even sample of
SALALA_FUZZ_LIVE frames per protocol (default 2,000); `SALALA_FUZZ_LIVE=10000` sends all.
"""

import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
from conftest import NodeProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from member_attacks import Member, member_of, rss
from mesh_helpers import identity, serving_minilm
from salala.mesh.inference._card import CARD_REQUEST
from salala.mesh.inference._card import PROTOCOL as CARD
from salala.mesh.inference._deploy import PROTOCOL as DEPLOY
from salala.mesh.inference._headers import HOST_REQUEST, INFER_FRAME
from salala.mesh.inference._serving import PROTOCOL as INFER
from salala.mesh.membership._sync import PROTOCOL as SYNC_PROTOCOL
from salala.mesh.membership._sync import SYNC
from salala.mesh.training._headers import TRAIN_FRAME
from salala.mesh.training._server import PROTOCOL as TRAIN
from salala.mesh.wire import FETCH_PROTOCOL, Check, SchemaError, validate
from salala.mesh.wire._transfer import FETCH_REQUEST
from test_hostile_members import setup_header
from test_sharded import still_serving

pytestmark = pytest.mark.slow

FRAMES_PER_PROTOCOL = 10_000
LIVE_PER_PROTOCOL = int(os.environ.get("SALALA_FUZZ_LIVE", "2000"))
IN_FLIGHT = 16
PEER = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
TENSOR = {"name": "x", "dtype": "float32", "shape": [1, 4], "codec": "raw", "sizes": [16]}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=80),
    st.binary(max_size=80),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


def valid_messages() -> dict[str, tuple[Check, dict[str, Any], bool]]:
    """Per protocol: its schema, one valid message, and whether it is a tensor frame."""
    return {
        INFER: (
            INFER_FRAME,
            {
                "kind": "infer",
                "rid": uuid.uuid4().hex,
                "attempt": 0,
                "dep": "minilm@1-abcdefgh",
                "stage": 0,
                "route": [PEER],
                "reply": PEER,
                "downstream": [["x"]],
                "trace": [],
                "tensors": [TENSOR],
                "gen": {
                    "sid": "0" * 32,
                    "past": 0,
                    "step": 0,
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "top_k": 40,
                    "seed": 1,
                },
            },
            True,
        ),
        CARD: (CARD_REQUEST, {"fragment": "ab" * 32}, False),
        TRAIN: (TRAIN_FRAME, {**setup_header(PEER), "tensors": [TENSOR]}, True),
        FETCH_PROTOCOL: (FETCH_REQUEST, {"sha256": "ab" * 32, "offset": 0}, False),
        SYNC_PROTOCOL: (SYNC, {"digest": {PEER: [1, 2]}, "adverts": []}, False),
        DEPLOY: (
            HOST_REQUEST,
            {
                "entry": {
                    "deployment": "fuzz@1-abcdefgh",
                    "created": 1,
                    "model": "fuzz",
                    "stage": 0,
                    "codec": "raw",
                    "plan": [{"fragment": "ab" * 32, "bytes": 9, "inputs": [], "outputs": ["y"]}],
                },
                "sources": [PEER],
            },
            False,
        ),
    }


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    how = draw(st.sampled_from(["valid", "drop", "retype", "add", "nested", "anything"]))
    message = dict(valid)
    if how == "drop":
        del message[draw(st.sampled_from(sorted(message)))]
    elif how == "retype":
        message[draw(st.sampled_from(sorted(message)))] = draw(values)
    elif how == "add":
        message[draw(st.text(min_size=1, max_size=12))] = draw(values)
    elif how == "nested":
        key = draw(st.sampled_from(sorted(message)))
        if isinstance(message[key], list) and message[key]:
            message[key] = [draw(values), *message[key][1:]]
        elif isinstance(message[key], dict) and message[key]:
            inner = dict(message[key])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(values)
            message[key] = inner
    elif how == "anything":
        return draw(values)
    return message


def generate(schema: Check, valid: dict[str, Any]) -> list[bytes]:
    """FRAMES_PER_PROTOCOL frames from Hypothesis, each checked in-process first."""
    frames: list[bytes] = []

    @settings(
        max_examples=FRAMES_PER_PROTOCOL,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated(valid))
    def check(message: Any) -> None:
        try:
            validate(message, schema)
        except SchemaError as exc:
            assert isinstance(exc.field, str)  # nothing but a SchemaError naming a field
        body = msgpack.packb(message, use_bin_type=True)
        frames.append(struct.pack(">I", len(body)) + body)

    check()
    return frames


async def send_all(member: Member, protocol: str, frames: list[bytes], payload: bool) -> None:
    async def one(frame: bytes) -> None:
        try:
            stream = await member.open(protocol)
        except Exception:  # the node may refuse a stream under load: that is allowed
            return
        try:
            with trio.move_on_after(5):
                await stream.write(frame + (b"\0" * 16 if payload else b""))
                await stream.read(1 << 16)  # its answer or refusal, if any
        except Exception:  # a reset is the expected answer to most of these
            pass
        finally:
            with trio.move_on_after(2):
                try:
                    await stream.reset()
                except Exception:
                    pass

    limiter = trio.CapacityLimiter(IN_FLIGHT)

    async def bounded(frame: bytes) -> None:
        async with limiter:
            await one(frame)

    async with trio.open_nursery() as nursery:
        for frame in frames:
            nursery.start_soon(bounded, frame)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    with serving_minilm(tmp_path_factory.mktemp("fuzzed")) as nodes:
        yield nodes


async def test_generated_frames_on_every_protocol_leave_the_node_serving(
    target: list[NodeProcess],
) -> None:
    node = target[1]
    before = rss(node)
    for protocol, (schema, valid, payload) in valid_messages().items():
        frames = generate(schema, valid)
        assert len(frames) >= FRAMES_PER_PROTOCOL // 2, protocol  # hypothesis really ran
        sample = frames[:: max(1, len(frames) // LIVE_PER_PROTOCOL)]
        async with member_of(node) as member:
            await send_all(member, protocol, sample, payload)
        assert node.process.poll() is None, node.log()
        identity(node)  # the API still answers
    still_serving(node)
    still_serving(target[0])
    assert rss(node) - before < 64 << 20
