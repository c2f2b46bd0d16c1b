"""Direct links in one process, over real TLS sockets on loopback: who gets in, what
crosses, and what a hostile peer can do to a link.

Each test runs real ``DirectLinks`` with certificates under a mesh authority; strangers
and impostors are real TLS clients and servers.
"""

import datetime
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from salala.mesh.wire import (
    DirectLinks,
    FrameBudget,
    LinkAddress,
    LinkFrame,
    decode_payload,
    encode_frame,
    load_link_identity,
    parse_header,
)
from salala.mesh.wire._direct import INLINE_MAX, PIN_WAIT_S, LinkDown, channel_of
from salala.mesh.wire._linkio import PONG, PREFIX

SECRET = b"a mesh key for the link tests.!!"
PROTOCOL = "/salala-test/frames/1.0.0"
WELCOME = PREFIX.pack(PONG, 0, 0)  # what an admitted member hears first
UNKNOWN = next(c for c in range(2, 256) if c != channel_of(PROTOCOL))
TIMEOUT_S = 20.0


class Node:
    """One side: its links and the frames its handler received."""

    def __init__(self, root: Path, name: str, max_payload: int = 8 << 20) -> None:
        self.name = name
        self.links = DirectLinks(load_link_identity(root / name, SECRET, name), [("127.0.0.1", 0)])
        self.frames: list[tuple[str, dict, dict[str, np.ndarray] | None]] = []
        self.arrived = trio.Event()
        self.links.handle(PROTOCOL, self._on_frame, max_payload, FrameBudget(1 << 30, 1 << 29))

    async def _on_frame(self, peer_id: str, frame: LinkFrame) -> None:
        header, _ = parse_header(frame.body, lambda value, path: value)
        tensors = None if frame.payload is None else decode_payload(header, frame.payload)
        if frame.lease is not None:
            frame.lease.release()
        self.frames.append((peer_id, header, tensors))
        self.arrived.set()

    def address(self) -> LinkAddress:
        assert self.links.port is not None
        return LinkAddress(("127.0.0.1",), self.links.port, self.links.identity.pin)


@asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[None]:
    for node in nodes:
        await node.links.listen()
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.links.run)
        yield
        nursery.cancel_scope.cancel()


async def linked(a: Node, b: Node) -> None:
    """Pin each to the other and wait until a's link to b is open."""
    a.links.set_pins({b.name: b.address()})
    b.links.set_pins({a.name: a.address()})
    with trio.fail_after(TIMEOUT_S):
        while a.links.describe(b.name)["path"] != "direct":
            await trio.sleep(0.02)


async def send(a: Node, b: Node, header: dict, tensors: dict[str, np.ndarray]) -> None:
    head, views = encode_frame(header, tensors)
    await a.links.send(b.name, PROTOCOL, head, views, TIMEOUT_S)


async def test_frames_of_every_size_arrive_whole_and_in_order(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    rng = np.random.default_rng(0)
    sizes = [0, 1, 16, 2304, 70_000, INLINE_MAX, INLINE_MAX + 1, 3 << 20]  # both paths
    sent = [
        {"x": rng.random(n // 4, dtype=np.float32), "ids": np.arange(3, dtype=np.int64)}
        for n in sizes
    ]
    async with running(a, b):
        await linked(a, b)
        for i, tensors in enumerate(sent):
            await send(a, b, {"i": i}, tensors)
        with trio.fail_after(TIMEOUT_S):
            while len(b.frames) < len(sent):
                await trio.sleep(0.01)
        row = a.links.describe("b")
    assert row["path"] == "direct" and row["rtt_ms"] > 0 and row["bandwidth"] > 0
    assert row["frames"] == {"direct": len(sent), "libp2p": 0}
    assert [h["i"] for _, h, _ in b.frames] == list(range(len(sent)))
    for (peer, _, got), tensors in zip(b.frames, sent, strict=True):
        assert peer == "a" and got is not None
        for name, value in tensors.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value)


async def test_an_over_limit_frame_is_skipped_and_the_link_goes_on(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b", max_payload=1 << 20)
    async with running(a, b):
        await linked(a, b)
        await send(a, b, {"i": 0}, {"x": np.zeros(2 << 20, dtype=np.uint8)})
        await send(a, b, {"i": 1}, {"x": np.ones(8, dtype=np.uint8)})
        with trio.fail_after(TIMEOUT_S):
            while len(b.frames) < 2:
                await trio.sleep(0.01)
    (_, first, skipped), (_, second, kept) = b.frames
    assert first["i"] == 0 and skipped is None  # its header arrives, so it can be refused
    assert second["i"] == 1 and kept is not None and kept["x"].tolist() == [1] * 8


def _self_signed(name: str) -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, cert.public_bytes(serialization.Encoding.PEM)


def _client_context(root: Path, key_pem: bytes, cert_pem: bytes) -> ssl.SSLContext:
    (root / "k.pem").write_bytes(key_pem)
    (root / "c.pem").write_bytes(cert_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the intruder trusts anyone: it wants in
    context.load_cert_chain(root / "c.pem", root / "k.pem")
    return context


def _intrude(port: int, context: ssl.SSLContext, frame: bytes) -> bytes:
    """Connect, handshake, send a whole well-formed frame, and return every byte the
    listener ever sends back (b"" when it closes, however it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(frame)
                received = b""
                while chunk := tls.recv(4096):
                    received += chunk
                return received
        except (ssl.SSLError, OSError):
            return b""


def _frame_bytes(channel_protocol: str) -> bytes:
    head, views = encode_frame({"i": 99}, {"x": np.ones(4, dtype=np.float32)})
    body = head[4:]
    payload = b"".join(bytes(v) for v in views)
    return PREFIX.pack(channel_of(channel_protocol), len(payload), len(body)) + body + payload


@pytest.mark.parametrize(
    "who",
    ["a stranger's self-signed certificate", "another key under member a's name"],
)
async def test_an_unpinned_certificate_is_closed_before_any_frame(tmp_path: Path, who: str) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    if who.startswith("a stranger"):
        key_pem, cert_pem = _self_signed("a")
    else:  # issued under the mesh authority (a member can), but not a's pinned one
        impostor = load_link_identity(tmp_path / "impostor", SECRET, "a")
        key_pem = (tmp_path / "impostor" / "link.key").read_bytes()
        cert_pem = (tmp_path / "impostor" / "link.crt").read_bytes()
        assert impostor.pin != a.links.identity.pin
    context = _client_context(tmp_path, key_pem, cert_pem)
    async with running(a, b):
        await linked(a, b)
        assert b.links.port is not None
        started = trio.current_time()
        echoed = await trio.to_thread.run_sync(
            _intrude, b.links.port, context, _frame_bytes(PROTOCOL)
        )
        assert trio.current_time() - started < PIN_WAIT_S  # at once: a's pin is known
        await send(a, b, {"i": 1}, {"x": np.ones(1, dtype=np.float32)})  # a still gets in
        with trio.fail_after(TIMEOUT_S):
            await b.arrived.wait()
    assert echoed == b""
    assert [(peer, h["i"]) for peer, h, _ in b.frames] == [("a", 1)]


async def test_a_listener_presenting_another_members_certificate_gets_no_frame(
    tmp_path: Path,
) -> None:
    """a dials where b's advert says b listens, but c answers there: a refuses to send
    it anything and falls back (LinkDown), and c receives nothing."""
    a, b, c = Node(tmp_path, "a"), Node(tmp_path, "b"), Node(tmp_path, "c")
    async with running(a, b, c):
        c.links.set_pins({"a": a.address()})  # c would accept a, were a fooled
        assert c.links.port is not None
        a.links.set_pins({"b": LinkAddress(("127.0.0.1",), c.links.port, b.links.identity.pin)})
        with trio.fail_after(TIMEOUT_S):
            while a.links.describe("b")["path"] != "libp2p":
                await trio.sleep(0.02)
        assert "another certificate" in a.links.describe("b")["reason"]
        with pytest.raises(LinkDown):
            await send(a, b, {"i": 1}, {"x": np.ones(1, dtype=np.float32)})
        await trio.sleep(0.2)
    assert c.frames == [] and b.frames == []


@pytest.mark.parametrize(
    "garbage",
    [
        PREFIX.pack(UNKNOWN, 0, 1) + b"\x80",  # a channel nobody serves
        PREFIX.pack(2, 0, 1 << 30),  # a header of a gigabyte
        PREFIX.pack(0, 1 << 40, 0),  # a ping of a terabyte
    ],
    ids=["unknown channel", "huge header", "huge ping"],
)
async def test_a_member_sending_garbage_loses_its_link_and_nothing_else(
    tmp_path: Path, garbage: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("salala.mesh.wire._direct.REGISTER_WAIT_S", 0.2)
    a, b, m = Node(tmp_path, "a"), Node(tmp_path, "b"), Node(tmp_path, "m")
    context = _client_context(
        tmp_path,
        (tmp_path / "m" / "link.key").read_bytes(),
        (tmp_path / "m" / "link.crt").read_bytes(),
    )
    async with running(a, b):
        await linked(a, b)
        m_address = LinkAddress(("127.0.0.1",), 1, m.links.identity.pin)  # m: a member
        b.links.set_pins({"a": a.address(), "m": m_address})
        assert b.links.port is not None
        echoed = await trio.to_thread.run_sync(_intrude, b.links.port, context, garbage)
        await send(a, b, {"i": 1}, {"x": np.ones(1, dtype=np.float32)})
        with trio.fail_after(TIMEOUT_S):
            await b.arrived.wait()
    assert echoed == WELCOME  # m was admitted (a member), then cut off for its garbage
    assert [(peer, h["i"]) for peer, h, _ in b.frames] == [("a", 1)]


async def test_a_peer_that_goes_away_ends_the_link_and_nothing_else(tmp_path: Path) -> None:
    """b stops: a's link sees the close at once (its reader), a keeps running, and
    frames to b find no link (LinkDown: the caller takes libp2p)."""
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    await a.links.listen()
    await b.links.listen()
    async with trio.open_nursery() as outer:
        await outer.start(a.links.run)
        async with trio.open_nursery() as inner:
            await inner.start(b.links.run)
            await linked(a, b)
            inner.cancel_scope.cancel()
        with trio.fail_after(TIMEOUT_S):
            while a.links.describe("b")["path"] == "direct":
                await trio.sleep(0.02)
        with pytest.raises(LinkDown):
            await send(a, b, {"i": 1}, {"x": np.ones(1, dtype=np.float32)})
        assert a.links.port is not None  # a's links still run: it can link with c
        c = Node(tmp_path, "c")
        async with running(c):
            await linked(a, c)
            await send(a, c, {"i": 2}, {"x": np.ones(1, dtype=np.float32)})
            with trio.fail_after(TIMEOUT_S):
                await c.arrived.wait()
        outer.cancel_scope.cancel()


def _connect_and_reset(port: int, times: int) -> None:
    for _ in range(times):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, before any handshake


async def test_strangers_that_connect_and_reset_do_not_stop_the_links(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    async with running(a, b):
        assert b.links.port is not None
        await trio.to_thread.run_sync(_connect_and_reset, b.links.port, 20)
        await trio.sleep(0.5)
        await linked(a, b)
        await send(a, b, {"i": 1}, {"x": np.ones(1, dtype=np.float32)})
        with trio.fail_after(TIMEOUT_S):
            await b.arrived.wait()
    assert [(peer, h["i"]) for peer, h, _ in b.frames] == [("a", 1)]
