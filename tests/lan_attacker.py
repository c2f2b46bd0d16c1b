"""A hostile LAN host: publishes malformed and fake records of a mesh's mDNS service type.

Run inside a test's network namespace (``ip netns exec NS python lan_attacker.py ...``);
zeroconf is bound to the one address given, never to all interfaces. It prints
"published N" once every record is out, then answers queries until killed.

    python lan_attacker.py IP SERVICE_TYPE REAL_PEER_ID REAL_ADDR
"""

import asyncio
import socket
import sys

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

FLOOD = 300
NOWHERE = "10.77.0.250"  # on the LAN's subnet, but nobody is there: dials time out


def fake_id() -> str:
    return ID.from_pubkey(create_new_key_pair().public_key).to_base58()


def records(ip: str, real_id: str, real_addr: str) -> list[dict[bytes, bytes]]:
    bad_ids: list[bytes] = [b"0OIl", b"", b"z" * 200, b"12D3KooW!!!!", b"\xff\xfe", b"12D3KooW"]
    result = [{b"id": bad, b"a0": b"/ip4/" + ip.encode() + b"/tcp/1/p2p/" + bad} for bad in bad_ids]
    result.append({b"a0": f"/ip4/{ip}/tcp/1".encode()})  # no id at all
    fake = fake_id()
    result.append(  # garbage addresses
        {
            b"id": fake.encode(),
            b"a0": b"/ip4/garbage",
            b"a1": b"not a multiaddr",
            b"a2": f"/ip4/{ip}/udp/1/p2p/{fake}".encode(),
            b"a3": b"\xff" * 40,
        }
    )
    elsewhere = fake_id()  # the real node's address, claimed for another peer id
    host_port = real_addr.split("/p2p/")[0]
    result.append({b"id": elsewhere.encode(), b"a0": f"{host_port}/p2p/{elsewhere}".encode()})
    # the real node's id, pointing somewhere it is not
    result.append(
        {b"id": real_id.encode(), b"a0": f"/ip4/{NOWHERE}/tcp/4001/p2p/{real_id}".encode()}
    )
    oversized = fake_id()
    big = {b"id": oversized.encode(), b"a0": f"/ip4/{ip}/tcp/1/p2p/{oversized}".encode()}
    big |= {f"x{i}".encode(): b"y" * 240 for i in range(30)}
    result.append(big)
    for i in range(FLOOD):  # unreachable fake peers, some refused at once, most silent
        peer = fake_id()
        where = ip if i % 10 == 0 else NOWHERE
        result.append({b"id": peer.encode(), b"a0": f"/ip4/{where}/tcp/4001/p2p/{peer}".encode()})
    return result


async def main(ip: str, kind: str, real_id: str, real_addr: str) -> None:
    zc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    infos = [
        ServiceInfo(
            kind,
            f"evil-{i}.{kind}",
            addresses=[socket.inet_aton(ip)],
            port=1,
            properties=properties,
            server=f"evil-{i}.local.",
        )
        for i, properties in enumerate(records(ip, real_id, real_addr))
    ]
    broadcasts = [
        await zc.async_register_service(info, cooperating_responders=True, strict=False)
        for info in infos
    ]
    await asyncio.gather(*broadcasts)
    print(f"published {len(infos)}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
