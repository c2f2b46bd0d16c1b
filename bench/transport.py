"""What one hop costs below Salala: py-libp2p (Noise + Yamux) ping-pong on loopback.

Two hosts built exactly as nodes build them, in one process, one stream: write a
payload, wait for a one-byte answer. This is the floor under every inference hop and
training frame; it is the number that decides whether the latency targets can be met.
"""

import statistics
import time
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from salala.mesh.membership._host import open_host

PROTOCOL = TProtocol("/salala-bench/ping/1.0.0")
SIZES = (16, 64 << 10, 196 << 10, 1 << 20)
ROUNDS = 200
TIMEOUT_S = 60.0


async def _round_trips(size: int) -> list[float]:
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        open_host(create_new_key_pair(), loopback) as client,
        open_host(create_new_key_pair(), loopback, frozenset({PROTOCOL})) as server,
    ):

        async def answer(stream: Any) -> None:
            while True:
                left = size
                while left:
                    left -= len(await stream.read(left))
                await stream.write(b"k")

        server.set_stream_handler(PROTOCOL, answer)
        with trio.fail_after(TIMEOUT_S):
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
            stream = await client.new_stream(server.get_id(), [PROTOCOL])
            payload = b"x" * size
            samples = []
            for _ in range(ROUNDS):
                started = time.perf_counter()
                await stream.write(payload)
                await stream.read(1)
                samples.append((time.perf_counter() - started) * 1000)
            await stream.reset()
    return samples[ROUNDS // 10 :]  # the first rounds grow Yamux's window


def run() -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        samples = trio.run(_round_trips, size)
        median = statistics.median(samples)
        rows.append(
            {
                "payload_bytes": size,
                "round_trip_ms": round(median, 3),
                "MB_per_s": round(size / (median / 1000) / 1e6, 1),
            }
        )
    return rows
