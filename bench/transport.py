"""What one hop costs: the floors under it, py-libp2p, and the mesh's direct link.

One connection on 127.0.0.1, a payload sent, a one-byte answer read; median ms over
ROUNDS round trips after warm-up (the median of REPEATS such runs, interleaved), all in
one run so the columns compare. The answering
side runs in a child process, as the next node would, so the two ends never share a
GIL or an event loop:

- raw TCP and TLS 1.3 over blocking sockets in threads (the floor a Python program can
  reach: the kernel and OpenSSL do the work, with the GIL released);
- raw TCP and TLS 1.3 through trio's streams (framing in Python on the event loop);
- py-libp2p, two hosts built as nodes build them (Noise and Yamux);
- the mesh link: two ``DirectLinks`` as nodes run them, a frame of the payload one way
  and a frame of one byte back, through the channels and handlers inference frames take.
"""

import json
import multiprocessing
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from salala.mesh.membership._host import open_host, parse_multiaddrs
from salala.mesh.wire import (
    DirectLinks,
    FrameBudget,
    LinkAddress,
    LinkFrame,
    encode_frame,
    load_link_identity,
)
from salala.models import builtin_models
from salala.runtime import measure_throughput

from . import generation
from ._smollm2 import imported_smollm2
from .inference import _mesh_rows
from .local import minilm_inputs

PROTOCOL = TProtocol("/salala-bench/ping/1.0.0")
SIZES = {
    "16 B": 16,
    "2.3 KB (a token's hidden state)": 2304,
    "196 KB (a MiniLM activation)": 196_608,
    "1 MiB": 1 << 20,
}
ROUNDS = 400
WARMUP = 40
REPEATS = 3
TIMEOUT_S = 60.0
SECRET = b"salala bench mesh key, 32 bytes!"
FLOOR = "TLS 1.3, threads (the floor)"
LINK = "mesh direct link"
LIBP2P = "py-libp2p (Noise+Yamux)"


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples[WARMUP:]) * 1000, 3)


def _recv_exactly(sock: socket.socket, size: int) -> None:
    view = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n


def _context(root: Path, name: str, server: bool) -> ssl.SSLContext:
    """A context presenting a mesh link certificate, so the TLS floor pays the direct
    link's handshake and cipher."""
    identity = load_link_identity(root / name, SECRET, name)
    return identity.server if server else identity.client


# ---- the answering side, in a child process --------------------------------------------


def _answer_threaded(size: int, root: Path | None, pipe: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    pipe.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if root is not None:
        conn = _context(root, "answer", server=True).wrap_socket(conn, server_side=True)
    try:
        while True:
            _recv_exactly(conn, size)
            conn.sendall(b"k")
    except (ConnectionError, OSError):
        pass


async def _read_exactly(stream: trio.abc.ReceiveStream, count: int) -> None:
    while count:
        chunk = await stream.receive_some(count)
        if not chunk:
            raise ConnectionError("closed")
        count -= len(chunk)


async def _answer_trio(size: int, root: Path | None, pipe: Connection) -> None:
    context = _context(root, "answer", server=True) if root is not None else None

    async def answer(stream: trio.abc.Stream) -> None:
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True)
        try:
            while True:
                await _read_exactly(stream, size)
                await stream.send_all(b"k")
        except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), answer, 0)
        pipe.send(listeners[0].socket.getsockname()[1])


async def _answer_libp2p(size: int, root: Path | None, pipe: Connection) -> None:
    async with open_host(
        create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"], frozenset({PROTOCOL})
    ) as host:

        async def answer(stream: Any) -> None:
            while True:
                left = size
                while left:
                    left -= len(await stream.read(left))
                await stream.write(b"k")

        host.set_stream_handler(PROTOCOL, answer)
        pipe.send((host.get_id().to_base58(), [str(a) for a in host.get_addrs()]))
        await trio.sleep_forever()


async def _answer_link(size: int, root: Path | None, pipe: Connection) -> None:
    assert root is not None
    links = DirectLinks(load_link_identity(root / "b", SECRET, "peer-b"), [("127.0.0.1", 0)])
    pong = encode_frame({"kind": "pong"}, {"x": np.zeros(1, dtype=np.uint8)})

    async def answer(peer_id: str, frame: LinkFrame) -> None:
        if frame.lease is not None:
            frame.lease.release()
        await links.send("peer-a", PROTOCOL, *pong, TIMEOUT_S)

    links.handle(PROTOCOL, answer, 1 << 28, FrameBudget(1 << 30, 1 << 29))
    await links.listen()
    pipe.send((links.port, links.identity.pin))
    port, pin = await trio.to_thread.run_sync(pipe.recv)
    links.set_pins({"peer-a": LinkAddress(("127.0.0.1",), port, pin)})
    await links.run()


ANSWERERS: dict[str, Callable[[int, Path | None, Connection], Any]] = {
    "threaded": _answer_threaded,
    "trio": lambda size, root, pipe: trio.run(_answer_trio, size, root, pipe),
    "libp2p": lambda size, root, pipe: trio.run(_answer_libp2p, size, root, pipe),
    "link": lambda size, root, pipe: trio.run(_answer_link, size, root, pipe),
}


def _answering(kind: str, size: int, root: Path | None, pipe: Connection) -> None:
    ANSWERERS[kind](size, root, pipe)


@contextmanager
def _answerer(kind: str, size: int, root: Path | None) -> Iterator[Connection]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_answering, args=(kind, size, root, child), daemon=True)
    process.start()
    try:
        yield parent
    finally:
        process.kill()
        process.join(10)


# ---- the asking side, here ---------------------------------------------------------------


def _threaded(size: int, tls: bool) -> float:
    root = Path(tempfile.mkdtemp(prefix="salala-bench-tls-")) if tls else None
    with _answerer("threaded", size, root) as pipe:
        sock = socket.create_connection(("127.0.0.1", pipe.recv()))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if root is not None:
            sock = _context(root, "ask", server=False).wrap_socket(sock)
        payload = memoryview(b"x" * size)
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            sock.sendall(payload)
            _recv_exactly(sock, 1)
            samples.append(time.perf_counter() - started)
        sock.close()
    return _median_ms(samples)


async def _trio_streams(size: int, tls: bool) -> float:
    root = Path(tempfile.mkdtemp(prefix="salala-bench-tls-")) if tls else None
    with _answerer("trio", size, root) as pipe:
        port = await trio.to_thread.run_sync(pipe.recv)
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if root is not None:
            context = _context(root, "ask", server=False)
            stream = trio.SSLStream(stream, context, server_hostname=None)
        payload = b"x" * size
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            await stream.send_all(payload)
            await _read_exactly(stream, 1)
            samples.append(time.perf_counter() - started)
        await stream.aclose()
    return _median_ms(samples)


async def _libp2p(size: int) -> float:
    with _answerer("libp2p", size, None) as pipe:
        peer_id, addrs = await trio.to_thread.run_sync(pipe.recv)
        async with open_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
            with trio.fail_after(TIMEOUT_S):
                peer = ID.from_base58(peer_id)
                await host.connect(PeerInfo(peer, parse_multiaddrs(addrs)))
                stream = await host.new_stream(peer, [PROTOCOL])
                payload = b"x" * size
                samples = []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    await stream.write(payload)
                    left = 1
                    while left:
                        left -= len(await stream.read(left))
                    samples.append(time.perf_counter() - started)
                await stream.reset()
    return _median_ms(samples)


async def _mesh_link(size: int) -> float:
    """A frame of ``size`` payload bytes over this node's direct link, and a one-byte
    frame back over the other node's: what an inference hop and its answer take."""
    root = Path(tempfile.mkdtemp(prefix="salala-bench-link-"))
    links = DirectLinks(load_link_identity(root / "a", SECRET, "peer-a"), [("127.0.0.1", 0)])
    ping = encode_frame({"kind": "ping"}, {"x": np.zeros(size, dtype=np.uint8)})
    answered = trio.Event()

    async def on_answer(peer_id: str, frame: LinkFrame) -> None:
        if frame.lease is not None:
            frame.lease.release()
        answered.set()

    links.handle(PROTOCOL, on_answer, 1 << 28, FrameBudget(1 << 30, 1 << 29))
    await links.listen()
    with _answerer("link", size, root) as pipe:
        port, pin = await trio.to_thread.run_sync(pipe.recv)
        pipe.send((links.port, links.identity.pin))
        links.set_pins({"peer-b": LinkAddress(("127.0.0.1",), port, pin)})
        samples = []
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            with trio.fail_after(TIMEOUT_S):
                while links.describe("peer-b")["path"] != "direct":
                    await trio.sleep(0.01)
                for _ in range(ROUNDS):
                    answered = trio.Event()
                    started = time.perf_counter()
                    await links.send("peer-b", PROTOCOL, *ping, TIMEOUT_S)
                    await answered.wait()
                    samples.append(time.perf_counter() - started)
            nursery.cancel_scope.cancel()
    return _median_ms(samples)


PATHS: dict[str, Callable[[int], float]] = {
    "raw TCP, threads": lambda size: _threaded(size, tls=False),
    FLOOR: lambda size: _threaded(size, tls=True),
    "raw TCP, trio": lambda size: trio.run(_trio_streams, size, False),
    "TLS 1.3, trio SSLStream": lambda size: trio.run(_trio_streams, size, True),
    LIBP2P: lambda size: trio.run(_libp2p, size),
    LINK: lambda size: trio.run(_mesh_link, size),
}


# ---- through real nodes: the same requests on direct links and forced onto libp2p ----

FORCED = ("--no-link",)


def _minilm_rows() -> list[dict[str, Any]]:
    """MiniLM (int8) over 3 nodes on both paths, and 1 against 2 single-thread nodes
    with 8 requests in flight (on direct links)."""
    path, feeds = builtin_models()["minilm"], minilm_inputs()
    rows = []
    for node_args in ((), FORCED):
        rows.append(_mesh_rows("minilm", path, feeds, 100, 160, 3, node_args=node_args))
    for nodes in (1, 2):
        rows.append(_mesh_rows("minilm", path, feeds, 60, 240, nodes, threads=1))
    return [{"part": "MiniLM through nodes", **row} for row in rows]


def _smollm2_rows() -> list[dict[str, Any]]:
    """SmolLM2 (int4) in 3 stages on 3 single-thread nodes, on both paths, beside the
    whole model in one single-thread session: a token's time outside the sessions."""
    folder = imported_smollm2("int4")
    speed = json.dumps(asdict(measure_throughput(1)))
    rows = [generation._whole_rows("int4", folder, 1)]
    for node_args in ((), FORCED):
        rows += generation._mesh_rows("int4", folder, 3, speed, False, node_args)
    keep = ("model", "setup", "decode_tok_s", "cpu_ms_per_token")
    return [{"part": "SmolLM2 through nodes", **{k: r[k] for k in keep}} for r in rows]


def run() -> list[dict[str, Any]]:
    rows = []
    for label, size in SIZES.items():
        row: dict[str, Any] = {"part": "one hop", "payload": label, "bytes": size}
        # Each path REPEATS times, the paths interleaved: this VM's round trips drift
        # by 3x from one minute to the next, and a ratio of two lucky or unlucky runs
        # would say nothing.
        runs: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(REPEATS):
            for path, measure in PATHS.items():
                runs[path].append(measure(size))
        for path, values in runs.items():
            row[path] = statistics.median(values)
        row["link / TLS floor"] = round(row[LINK] / row[FLOOR], 2)
        row["libp2p / TLS floor"] = round(row[LIBP2P] / row[FLOOR], 2)
        rows.append(row)
    return rows + _minilm_rows() + _smollm2_rows()


def _verdict(value: float, target: float, at_most: bool) -> str:
    passed = value <= target if at_most else value >= target
    return f"{value:.2f} ({'PASS' if passed else 'MISS'})"


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's four targets, each a ratio within this one run."""
    hops = {r["bytes"]: r for r in rows if r["part"] == "one hop"}
    minilm = {r["setup"]: r for r in rows if r["part"] == "MiniLM through nodes"}
    smol = {r["setup"]: r for r in rows if r["part"] == "SmolLM2 through nodes"}
    forced = f" ({' '.join(FORCED)})"
    whole_ms = 1000 / smol["whole model, 1 session, 1 thread"]["decode_tok_s"]
    label = generation._mesh_label(3)
    outside = {
        path: 1000 / smol[label + suffix]["decode_tok_s"] - whole_ms
        for path, suffix in (("direct", ""), ("libp2p", forced))
    }
    budget = 2 * 3 * hops[2304][FLOOR]  # 3 hops a token, each one TLS round trip
    return {
        **{
            f"mesh link / TLS floor, {hops[size]['payload']} (target <= 1.5)": _verdict(
                hops[size]["link / TLS floor"], 1.5, at_most=True
            )
            for size in (16, 196_608)
        },
        "MiniLM 3 nodes, time outside the sessions: direct / libp2p (target <= 0.3)": (
            _verdict(
                minilm["mesh, 3 nodes"]["overhead_ms"]
                / minilm["mesh, 3 nodes" + forced]["overhead_ms"],
                0.3,
                at_most=True,
            )
        ),
        "MiniLM 3 nodes, ms outside the sessions: direct, libp2p": [
            minilm["mesh, 3 nodes"]["overhead_ms"],
            minilm["mesh, 3 nodes" + forced]["overhead_ms"],
        ],
        f"SmolLM2 3 stages, ms a token spends outside the sessions (target <= {budget:.2f}, "
        "2 x 3 hops x the TLS floor at 2.3 KB)": (
            f"direct {outside['direct']:.2f} "
            f"({'PASS' if outside['direct'] <= budget else 'MISS'}), "
            f"libp2p {outside['libp2p']:.2f}"
        ),
        "2 single-thread nodes / 1, MiniLM, 8 in flight (target >= 1.6)": _verdict(
            minilm["mesh, 2 nodes, 1 thread"]["req_per_s"]
            / minilm["mesh, 1 node, 1 thread"]["req_per_s"],
            1.6,
            at_most=False,
        ),
    }
