"""A hostile LAN: strangers that speak libp2p, and hosts that publish bad mDNS records.

Nothing anyone can do without the mesh key stops a node, teaches it anything, or makes
it list anyone who is not a member. And a member that speaks another protocol version
is listed as such, not trusted with work.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from conftest import NodeProcess, start_node
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from mesh_helpers import identity, peer_ids, wait_until
from netns import private_lan
from salala.mesh import AuthError, MeshKey
from salala.mesh.membership import _auth
from salala.mesh.membership._adverts import VERSION, Advert
from salala.mesh.membership._mdns import service_type
from salala.mesh.membership._mesh import LocalState, Mesh, MeshConfig, open_mesh
from salala.node._launch import SALALA
from salala.runtime import probe_capacity
from strangers import LIBP2P_DEFAULTS, salala_protocols, stranger

pytestmark = pytest.mark.slow

ATTACKER = Path(__file__).resolve().parent / "lan_attacker.py"
RSS_GROWTH_BOUND = 64 << 20


async def _negotiated(host: IHost, peer: ID, protocol: str) -> bytes | None:
    """None if the node refused to speak ``protocol``; else the bytes it volunteered."""
    try:
        with trio.fail_after(5):
            stream = await host.new_stream(peer, [protocol])  # type: ignore[list-item]
    except Exception:  # negotiation refused ("na"): the protocol does not exist for us
        return None
    answer = b""
    with trio.move_on_after(2):
        try:
            answer = await stream.read(1024)
        except Exception:  # reset by the node: nothing answered
            pass
    return answer


async def test_a_stranger_gets_nothing_but_the_mesh_key_handshake(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node")
    try:
        _, address = identity(node)
        target = info_from_p2p_addr(multiaddr.Multiaddr(address))
        probes = [p for p in [*LIBP2P_DEFAULTS, *salala_protocols()] if p != _auth.PROTOCOL]
        assert len(probes) >= 7 and _auth.PROTOCOL in salala_protocols()
        async with stranger() as s:
            with trio.fail_after(10):
                await s.host.connect(target)
            # Everything before the node drops us for not authenticating (5 s):
            with trio.fail_after(4):
                listed = await s.host.send_command(target.peer_id, "ls")
            assert listed == [_auth.PROTOCOL]
            for protocol in probes:
                assert await _negotiated(s.host, target.peer_id, protocol) is None, protocol
            # the refusals were per protocol: the connection stands and the handshake opens
            assert target.peer_id in s.host.get_connected_peers()
            stream = await s.host.new_stream(target.peer_id, [_auth.PROTOCOL])
            with pytest.raises(AuthError):
                await _auth.prove_as_dialer(
                    stream, MeshKey.generate(), s.host.get_id(), target.peer_id
                )
            # py-libp2p identified the node right after connecting, and learned nothing;
            # the node never ran identify towards us either.
            assert s.host.get_peerstore().get_protocols(target.peer_id) == []
            assert s.identified_by == []
            with trio.fail_after(15):  # and a stranger is not kept connected
                while target.peer_id in s.host.get_connected_peers():
                    await trio.sleep(0.2)
        assert node.process.poll() is None
    finally:
        assert node.stop() == 0, node.log()


def _rss(node: NodeProcess) -> int:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def _cli_peers(node: NodeProcess, *flags: str) -> str:
    done = subprocess.run(
        [SALALA, "mesh", "peers", "--data-dir", str(node.data_dir), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_malformed_fake_and_flooding_mdns_records_do_not_stop_a_node(tmp_path: Path) -> None:
    """Two members on a bridge, and a third host publishing ~320 hostile records of
    their service type: bad ids, unreachable fake peers, garbage and misdirected
    addresses, an oversized TXT record, a flood."""
    key = MeshKey.generate()
    with private_lan(3) as lan:
        nodes: list[NodeProcess] = []
        attacker = None
        try:
            for namespace, _ in lan[:2]:
                nodes.append(
                    start_node(
                        tmp_path / namespace,
                        "--mesh-key",
                        str(key),
                        prefix=("ip", "netns", "exec", namespace),
                        listen="/ip4/0.0.0.0/tcp/0",
                        mdns=True,
                    )
                )
            ids = {identity(node)[0] for node in nodes}
            wait_until(lambda: all(peer_ids(n) == ids for n in nodes), 30, "the mesh forming")
            before = [_rss(node) for node in nodes]
            real_id, real_addr = identity(nodes[1])
            namespace, ip = lan[2]
            attacker = subprocess.Popen(
                [
                    *("ip", "netns", "exec", namespace, sys.executable, str(ATTACKER)),
                    *(ip, service_type(key.mesh_id), real_id, real_addr),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert attacker.stdout is not None
            published = attacker.stdout.readline()
            assert published.startswith("published "), (
                attacker.stderr.read() if attacker.stderr else ""
            )
            assert int(published.split()[1]) >= 300
            # The nodes resolve and dial what they found for a while; they must keep
            # serving and listing exactly the real members all along.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                for node in nodes:
                    assert node.process.poll() is None, node.log()[-3000:]
                    assert peer_ids(node) == ids
                time.sleep(1)
            for node in nodes:
                table = _cli_peers(node)
                assert "Mesh: 2 members" in table
                assert all(peer_id[-8:] in table for peer_id in ids)
            for node, rss in zip(nodes, before, strict=True):
                assert _rss(node) - rss < RSS_GROWTH_BOUND
                assert "mDNS: more than 64 peers found" in node.log()  # the flood arrived
        finally:
            if attacker is not None:
                attacker.kill()
                attacker.communicate(timeout=10)  # reaps it and closes its pipes
            for node in nodes:
                node.stop()


async def test_a_member_of_another_protocol_version_is_listed_as_incompatible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member (in this process) whose adverts say v2 and carry fields v1 never heard of."""
    key = MeshKey.generate()
    node = start_node(tmp_path / "node", "--mesh-key", str(key))
    ours = Mesh._make_advert

    def future_advert(self: Mesh, state: LocalState | None = None) -> Advert:
        advert = ours(self, state)
        rest = {"capacity": advert.capacity, "accelerators": ["npu"], "lamport": 3}
        future = dataclasses.replace(advert, protocol=VERSION + 1, foreign=rest)
        return future.signed(self._key_pair.private_key)

    monkeypatch.setattr(Mesh, "_make_advert", future_advert)
    capacity = probe_capacity().to_dict()
    try:
        node_id, address = identity(node)
        config = MeshConfig(key=key, listen=["/ip4/127.0.0.1/tcp/0"], peers=[address], mdns=False)
        async with open_mesh(
            create_new_key_pair(), config, lambda: LocalState(capacity, [])
        ) as mesh:

            def listed() -> dict[str, Any] | None:
                rows = json.loads(_cli_peers(node, "--json"))
                return next((r for r in rows if r["peer_id"] == mesh.peer_id), None)

            row = await trio.to_thread.run_sync(
                lambda: wait_until(listed, 20, "the node listing the v2 member")
            )
            assert row["compatible"] is False and row["protocol"] == VERSION + 1
            assert row["connected"] and row["fragments"] == [] and row["serving"] == []
            assert row["capacity"] == capacity  # still readable, so still shown
            table = await trio.to_thread.run_sync(_cli_peers, node)
            assert f"incompatible (v{VERSION + 1})" in table
            # it stays a member: its adverts keep verifying, and it sees the node too
            assert node_id in mesh.membership
            # the node goes first (it would redial us), then our socket before our host
            assert await trio.to_thread.run_sync(node.stop) == 0, node.log()
            with trio.move_on_after(5):
                await mesh._host.disconnect(ID.from_base58(node_id))
    finally:
        assert node.stop() == 0, node.log()
