"""A member that holds the key and attacks: every attack gets a clear refusal naming what
was wrong, the node writes nothing outside its data dir, keeps its memory, and keeps
answering correctly. Each test is an attack that crashed or fooled a node before."""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from conftest import NodeProcess, minilm_inputs
from libp2p.abc import INetStream
from member_attacks import member_of, rss, sha256_of
from mesh_helpers import formed, identity, serving_minilm
from salala.mesh.inference._card import PROTOCOL as CARD
from salala.mesh.inference._deploy import PROTOCOL as DEPLOY
from salala.mesh.inference._serving import PROTOCOL as INFER
from salala.mesh.training._server import PROTOCOL as TRAIN
from salala.mesh.wire import FETCH_PROTOCOL, write_message
from test_sharded import still_serving

pytestmark = pytest.mark.slow

RSS_GROWTH_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    with serving_minilm(tmp_path_factory.mktemp("hostile-members")) as nodes:
        yield nodes


@pytest.fixture
def node(target: list[NodeProcess]):
    """The attacked node; after each attack it must still answer right, and its memory
    must not have grown by more than RSS_GROWTH_LIMIT."""
    victim = target[1]
    before = rss(victim)
    yield victim
    assert victim.process.poll() is None, victim.log()
    still_serving(victim)
    still_serving(target[0])
    assert rss(victim) - before < RSS_GROWTH_LIMIT


def entry(node: NodeProcess, **changes: Any) -> dict[str, Any]:
    """A valid serving entry of the node's own deployment, with ``changes``."""
    with node.client() as client:
        (found,) = [d for d in client.deployments() if d["model"] == "minilm"]
    plan = [
        {
            "fragment": s["fragment"],
            "bytes": 1000,
            "inputs": ["input_ids"],
            "outputs": ["h"],
        }
        for s in found["stages"]
    ]
    base = {
        "deployment": "evil@1-abcdefgh",
        "created": 1,
        "model": "evil",
        "stage": 0,
        "codec": "raw",
        "plan": plan,
    }
    return {**base, **changes}


async def test_an_unknown_codec_is_refused_at_deploy_naming_it(node: NodeProcess) -> None:
    async with member_of(node) as member:
        reply = await member.ask(
            DEPLOY, {"entry": entry(node, codec="zip"), "sources": [member.peer_id]}
        )
    assert reply["ok"] is False and reply["field"] == "entry.codec"
    assert "'zip'" in reply["error"] and all(c in reply["error"] for c in ("raw", "fp16", "int8"))


GEN_STEP = {
    "sid": "0" * 32,
    "past": 0,
    "step": 0,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": 0,
}


def infer_header(member_id: str, node_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "kind": "infer",
        "rid": uuid.uuid4().hex,
        "attempt": 0,
        "dep": "minilm@1-abcdefgh",
        "stage": 0,
        "route": [node_id],
        "reply": member_id,
        "downstream": [["input_ids"]],
        "trace": [],
        **changes,
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"route": [["a list", "not a peer"]]}, "route[0]"),
        ({"stage": 5}, ""),  # outside its route
        ({"downstream": "x"}, "downstream"),
        ({"trace": [[0, "p", "slow"]]}, "trace[0][1]"),
        ({"attempt": -1}, "attempt"),
        ({"extra": {"deep": [1] * 10}}, "extra"),
        ({"gen": {**GEN_STEP, "sid": "../../x"}}, "gen.sid"),
        ({"gen": {**GEN_STEP, "past": -1}}, "gen.past"),
        ({"gen": {**GEN_STEP, "temperature": float("nan")}}, "gen.temperature"),
        ({"gen": {**GEN_STEP, "top_p": 0.0}}, "gen"),
    ],
)
async def test_malformed_routes_and_fields_are_refused_naming_the_field(
    node: NodeProcess, changes: dict[str, Any], field: str
) -> None:
    node_id, _ = identity(node)
    async with member_of(node) as member:
        header = infer_header(member.peer_id, node_id, **changes)
        await member.send_frame(INFER, header, minilm_inputs(batch=1, tokens=4))
        refusal = await member.refusal(header["rid"])
    assert refusal["code"] == "bad_request"
    assert refusal["field"] == field, refusal["message"]


async def test_a_generation_step_for_a_stage_that_is_no_decoder_is_refused(
    target: list[NodeProcess], node: NodeProcess
) -> None:
    """A well-formed generation step aimed at a MiniLM stage: refused by name, and the
    stage keeps serving."""
    current, _, hosts = real_plan(target)
    node_id, _ = identity(node)
    stage = next(i for i, peers in enumerate(hosts) if node_id in peers)
    async with member_of(node) as member:
        header = infer_header(
            member.peer_id,
            node_id,
            dep=current,
            stage=stage,
            route=[node_id] * len(hosts),
            downstream=[["input_ids"]] * len(hosts),
            gen=GEN_STEP,
        )
        await member.send_frame(INFER, header, minilm_inputs(batch=1, tokens=4))
        refusal = await member.refusal(header["rid"])
    assert refusal["code"] == "invalid_input"
    assert "not part of a language model" in refusal["message"]
    still_serving(node)


async def test_a_frame_missing_its_request_fields_resets_only_its_stream(
    node: NodeProcess,
) -> None:
    node_id, _ = identity(node)
    async with member_of(node) as member:
        header = infer_header(member.peer_id, node_id)
        del header["rid"]
        stream = await member.send_frame(INFER, header)
        with trio.fail_after(10):
            answer = await stream.read(4096)  # the field at fault, then the reset
        assert b"rid" in answer


def setup_header(member_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "kind": "setup",
        "job": "job1",
        "attempt": 0,
        "driver": member_id,
        "stage": 0,
        "stages": 1,
        "replica": 0,
        "forward": "ab" * 32,
        "forward_bytes": 100,
        "backward": "cd" * 32,
        "backward_bytes": 100,
        "optimizer": {"kind": "sgd", "lr": 0.1},
        "optimizer_steps": 0,
        "next": None,
        "prev": None,
        "replicas": [member_id],
        **changes,
    }


async def refused_field(member: Any, protocol: str, header: dict[str, Any]) -> str:
    stream: INetStream = await member.send_frame(protocol, header)
    with trio.fail_after(10):
        answer = await stream.read(4096)
    return str(msgpack.unpackb(answer[4:], raw=False)["field"])


async def test_a_training_setup_without_an_attempt_is_refused(node: NodeProcess) -> None:
    async with member_of(node) as member:
        header = setup_header(member.peer_id)
        del header["attempt"]
        assert await refused_field(member, TRAIN, header) == "attempt"


@pytest.mark.parametrize("job", ["../../escape", "/tmp/salala-escape", "..", "a/b", ".hidden"])
async def test_job_ids_that_are_paths_are_refused_and_write_nothing(
    node: NodeProcess, job: str, tmp_path: Path
) -> None:
    before = {p for p in node.data_dir.parent.rglob("*") if node.data_dir not in p.parents}
    async with member_of(node) as member:
        header = setup_header(member.peer_id, job=job)
        assert await refused_field(member, TRAIN, header) == "job"
        for kind in ("end", "step"):
            frame = {"kind": kind, "job": job}
            assert await refused_field(member, TRAIN, frame) == "job"
    after = {p for p in node.data_dir.parent.rglob("*") if node.data_dir not in p.parents}
    assert after == before
    assert not Path("/tmp/salala-escape").exists()


async def test_a_fetch_that_lies_about_its_size_writes_no_more_than_the_plan_names(
    node: NodeProcess,
) -> None:
    """We offer a fragment the plan says is 1000 bytes: first announcing a gigabyte, then
    announcing 1000 and sending ten megabytes. The node keeps at most 1000 bytes."""
    blob = b"x" * 1000
    lies = iter([(1 << 30, 1 << 23), (1000, 10 << 20)])

    async def lying_source(stream: INetStream) -> None:
        announced, sent = next(lies)
        try:
            await write_message(stream, {"size": announced})
            with trio.move_on_after(20):
                for _ in range(sent // (1 << 20)):
                    await stream.write(b"y" * (1 << 20))
        except Exception:  # the node hung up on the lie, as it should
            pass

    incoming = node.data_dir / "store" / "incoming"
    async with member_of(node, {FETCH_PROTOCOL: lying_source}) as member:
        lied = entry(node)
        lied["plan"][0]["fragment"] = sha256_of(blob)
        request = {"entry": lied, "sources": [member.peer_id, member.peer_id]}
        reply = await member.ask(DEPLOY, request, timeout=120)
    assert reply["ok"] is False
    assert "offers 1073741824 bytes" in reply["error"], reply["error"]
    assert "do not hash" in reply["error"], reply["error"]
    sizes = [p.stat().st_size for p in incoming.rglob("*") if p.is_file()]
    assert all(size <= 1000 for size in sizes), sizes


async def test_a_fetch_manifest_that_escapes_or_lies_writes_nothing_outside_the_plan(
    node: NodeProcess,
) -> None:
    """A multi-file object's manifest names a path out of the object folder, files that
    do not add up to the size announced, then more files than a manifest may hold. Each
    is refused by name, and nothing beyond the plan's 1000 bytes is written anywhere."""
    size = 1000
    lies = iter(
        [
            {"size": size, "files": [["model.onnx", 10], ["../../../escape.bin", size - 10]]},
            {"size": size, "files": [["model.onnx", 10], ["model.onnx.data", size]]},
            {"size": size, "files": [["model.onnx", size]] + [[f"f{i}", 0] for i in range(2048)]},
        ]
    )

    async def lying_source(stream: INetStream) -> None:
        try:
            await write_message(stream, next(lies))
            with trio.move_on_after(20):
                await stream.write(b"z" * size)
        except Exception:  # the node hung up on the lie, as it should
            pass

    outside = {p for p in node.data_dir.parent.rglob("*") if node.data_dir not in p.parents}
    incoming = node.data_dir / "store" / "incoming"
    async with member_of(node, {FETCH_PROTOCOL: lying_source}) as member:
        lied = entry(node)
        lied["plan"][0].update(fragment=sha256_of(b"multi-file lie"), bytes=size)
        request = {"entry": lied, "sources": [member.peer_id] * 3}
        reply = await member.ask(DEPLOY, request, timeout=120)
    assert reply["ok"] is False
    error = reply["error"]
    assert "files[1][0]" in error and "'..'" in error, error  # the escaping name
    assert error.count("adds up to that size") == 1, error  # sizes that do not add up
    assert "files: must hold 1..2048 items, has 2049" in error, error
    after = {p for p in node.data_dir.parent.rglob("*") if node.data_dir not in p.parents}
    assert after == outside
    assert not any(p.name == "escape.bin" for p in node.data_dir.rglob("*"))
    sizes = [p.stat().st_size for p in incoming.rglob("*") if p.is_file()]
    assert all(s <= size for s in sizes), sizes


async def test_control_messages_that_fail_their_schema_get_the_field_named(
    node: NodeProcess,
) -> None:
    async with member_of(node) as member:
        reply = await member.ask(FETCH_PROTOCOL, {"sha256": "../../etc/passwd", "offset": 0})
        assert reply["field"] == "sha256"
        reply = await member.ask(FETCH_PROTOCOL, {"sha256": "ab" * 32, "offset": -5})
        assert reply["field"] == "offset"
        reply = await member.ask(DEPLOY, {"entry": entry(node, model="../x"), "sources": []})
        assert reply["field"] == "entry.model"
        reply = await member.ask(CARD, {"fragment": "../../identity.key"})
        assert reply["field"] == "fragment"
        reply = await member.ask(CARD, {"fragment": "ab" * 32})  # not a stage it hosts
        assert "no card" in reply["error"] and "card" not in reply


def real_plan(nodes: list[NodeProcess]) -> tuple[str, list[dict[str, Any]], list[list[str]]]:
    """The live MiniLM deployment's id, plan (sizes read from a holder's store) and hosts."""
    with nodes[0].client() as client:
        (found,) = [d for d in client.deployments() if d["model"] == "minilm"]
    plan = []
    for stage in found["stages"]:
        held = [n.data_dir / "store" / "objects" / stage["fragment"] / "model.onnx" for n in nodes]
        size = next(p.stat().st_size for p in held if p.is_file())
        plan.append({"fragment": stage["fragment"], "bytes": size, "inputs": [], "outputs": ["h"]})
    return found["deployment"], plan, [stage["hosts"] for stage in found["stages"]]


async def test_a_name_hijack_leaves_the_model_served(
    target: list[NodeProcess], node: NodeProcess
) -> None:
    """A member tries to take `minilm` over: with an absurd logical time (refused), then
    with a newer deployment of which it gets only one stage hosted. Every node keeps
    answering through the deployment that is whole."""
    current, plan, hosts = real_plan(target)
    now = int(current.split("@")[1].split("-")[0])
    sources = [identity(n)[0] for n in target]
    mine = next(i for i, peers in enumerate(hosts) if identity(node)[0] in peers)
    hijack = {"model": "minilm", "stage": mine, "codec": "raw"}
    async with member_of(node) as member:
        absurd = entry(node, **hijack, deployment=f"minilm@{1 << 52}-attacker", created=1 << 52)
        reply = await member.ask(DEPLOY, {"entry": absurd, "sources": sources})
        assert reply["ok"] is False and "implausibly far ahead" in reply["error"]
        # the stage the node already runs, in a plan whose other stage exists nowhere
        bogus = [s if i == mine else {**s, "fragment": "ee" * 32} for i, s in enumerate(plan)]
        newer = entry(
            node, **hijack, deployment=f"minilm@{now + 5}-attacker", created=now + 5, plan=bogus
        )
        reply = await member.ask(DEPLOY, {"entry": newer, "sources": sources}, timeout=120)
        assert reply["ok"] is True  # the node hosts its stage of it
    await trio.sleep(5)  # adverts travel, and the retire loop runs twice
    for each in target:
        with each.client() as client:
            (found,) = [d for d in client.deployments() if d["model"] == "minilm"]
        assert found["deployment"] == current


async def test_a_stage_larger_than_free_memory_is_refused_before_any_fetch(
    node: NodeProcess,
) -> None:
    huge = entry(node)
    # a fragment the node does not run yet (one it runs needs no more memory), a terabyte
    huge["plan"][0].update(fragment="dd" * 32, bytes=1 << 40)
    async with member_of(node) as member:
        reply = await member.ask(DEPLOY, {"entry": huge, "sources": [member.peer_id]})
    assert reply["ok"] is False and "MiB free" in reply["error"], reply
    incoming = node.data_dir / "store" / "incoming"
    assert not any(p.name.startswith(huge["plan"][0]["fragment"]) for p in incoming.glob("*"))


async def test_a_thousand_deploys_leave_the_node_listed_and_serving(
    target: list[NodeProcess], node: NodeProcess
) -> None:
    """A member asks the node to host stages of 1,000 deployments of the fragment it
    already runs: it hosts what its adverts can list, refuses the rest by name, and
    stays a member everyone can see."""
    _, plan, hosts = real_plan(target)
    mine = next(i for i, peers in enumerate(hosts) if identity(node)[0] in peers)
    refused: list[str] = []
    async with member_of(node) as member:
        for i in range(1000):
            spam = entry(
                node,
                model=f"spam-{i}",
                deployment=f"spam-{i}@1-attacker",
                stage=mine,
                plan=plan,
            )
            try:
                reply = await member.ask(DEPLOY, {"entry": spam, "sources": [member.peer_id]})
            except trio.TooSlowError:
                raise AssertionError(f"deploy {i} got no answer") from None
            if not reply["ok"]:
                refused.append(reply["error"])
    assert refused and all("already hosts 256 stages" in why for why in refused), refused[:3]
    formed(target)  # the node's adverts (at most 256 entries) still reach everyone


async def test_many_streams_of_maximal_frames_are_held_to_the_frame_budget(
    target: list[NodeProcess], node: NodeProcess
) -> None:
    """200 streams at once, each a 1 MiB frame (the node's --max-tensor-mb): the node
    reads two of a peer's frames at a time and the rest wait, so its memory holds."""
    node_id, _ = identity(node)
    current, _, _ = real_plan(target)
    junk = {"junk": np.zeros((1, 262_000), dtype=np.float32)}  # just under 1 MiB

    async def flood(member: Any) -> None:
        header = infer_header(member.peer_id, node_id, dep=current)
        try:
            await member.send_frame(INFER, header, junk)
        except Exception:  # held back past Yamux's 5 s window: the stream is reset
            pass

    async with member_of(node) as member:
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(flood, member)
