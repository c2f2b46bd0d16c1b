"""Meshes of real node processes on 127.0.0.1: joining, strangers, faults, garbage."""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import multiaddr
import pytest
import trio
from conftest import NodeProcess, start_node
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from mesh_helpers import identity, mesh_of, peer_ids, wait_until
from salala.mesh import AuthError, MeshKey, WireError
from salala.mesh.membership import _auth, _sync
from salala.mesh.wire._messages import read_message, write_message
from salala.node._launch import SALALA
from strangers import stranger

pytestmark = pytest.mark.slow

CAPACITY_FIELDS = {
    "logical_cores",
    "physical_cores",
    "memory_total",
    "memory_available",
    "load_1m",
    "battery_percent",
    "charging",
    "providers",
    "gflops",
}


def everyone_sees(nodes: list[NodeProcess], expected: set[str]) -> bool:
    return all(peer_ids(node) == expected for node in nodes)


def test_five_nodes_joined_through_one_peer_all_list_each_other(tmp_path: Path) -> None:
    with mesh_of(tmp_path, 5) as nodes:
        ids = {identity(node)[0] for node in nodes}
        wait_until(lambda: everyone_sees(nodes, ids), 10, "every node listing all 5")
        for node in nodes:
            with node.client() as client:
                peers = client.peers()
            assert len(peers) == 5 and sum(p["self"] for p in peers) == 1
            for peer in peers:
                assert CAPACITY_FIELDS <= set(peer["capacity"])
                assert peer["capacity"]["gflops"] > 0 and peer["capacity"]["logical_cores"] >= 1
                assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in peer["addrs"])
        # RTTs come from our own exchanges once they have run
        with nodes[4].client() as client:
            wait_until(lambda: all(p["rtt_ms"] for p in client.peers() if not p["self"]), 5, "RTTs")


async def test_a_node_with_the_wrong_key_is_never_listed_and_its_streams_are_refused(
    tmp_path: Path,
) -> None:
    with mesh_of(tmp_path, 3) as nodes:
        ids = {identity(node)[0] for node in nodes}
        _, bootstrap = identity(nodes[0])
        intruder = start_node(
            tmp_path / "intruder", "--mesh-key", str(MeshKey.generate()), "--peer", bootstrap
        )
        try:
            intruder_id, _ = identity(intruder)
            wait_until(lambda: everyone_sees(nodes, ids), 10, "the real members listing each other")
            late = start_node(
                tmp_path / "late", "--mesh-key", _key_of(nodes[0]), "--peer", bootstrap
            )
            nodes.append(late)
            ids.add(identity(late)[0])
            wait_until(lambda: everyone_sees(nodes, ids), 10, "a late member being listed")
            for node in nodes:
                assert intruder_id not in peer_ids(node)
            assert peer_ids(intruder) == {intruder_id}
            await _stranger_is_refused(bootstrap)
        finally:
            intruder.stop()


def _key_of(node: NodeProcess) -> str:
    return (node.data_dir / "mesh.key").read_text().strip()


async def _stranger_is_refused(bootstrap: str) -> None:
    """A libp2p peer without the key: every protocol refused, then disconnected."""
    target = info_from_p2p_addr(multiaddr.Multiaddr(bootstrap))
    async with stranger() as s:
        host = s.host
        with trio.fail_after(10):
            await host.connect(target)
        # membership without a handshake: refused before or after negotiation, never answered
        assert await _refused(host, target.peer_id, _sync.PROTOCOL)
        # the handshake with a wrong key
        stream = await host.new_stream(target.peer_id, [_auth.PROTOCOL])
        with pytest.raises(AuthError):
            await _auth.prove_as_dialer(stream, MeshKey.generate(), host.get_id(), target.peer_id)
        # a peer that never authenticates is dropped
        with trio.fail_after(15):
            while target.peer_id in host.get_connected_peers():
                await trio.sleep(0.2)
        # The stranger never learned anything but the node's id: py-libp2p ran identify
        # right after connecting, which would have filled in the node's protocols and
        # listen addresses, and the node never asked who we are.
        peerstore = host.get_peerstore()
        assert peerstore.get_protocols(target.peer_id) == []
        assert [str(a) for a in peerstore.addrs(target.peer_id)] == [str(target.addrs[0])]
        assert s.identified_by == []
        with trio.move_on_after(5):
            await host.disconnect(target.peer_id)  # close our socket before the host goes


async def _refused(host: IHost, peer: ID, protocol: TProtocol) -> bool:
    try:
        stream = await host.new_stream(peer, [protocol])
        await write_message(stream, _sync.sync_message({}, []))
        await read_message(stream, timeout=5)
    except (StreamFailure, WireError, StreamError, trio.TooSlowError):
        return True
    return False


def test_killed_and_frozen_nodes_are_evicted_and_a_restarted_one_returns(tmp_path: Path) -> None:
    with mesh_of(tmp_path, 4) as nodes:
        ids = [identity(node)[0] for node in nodes]
        wait_until(lambda: everyone_sees(nodes, set(ids)), 10, "the mesh forming")
        killed, frozen, watchers = nodes[3], nodes[2], nodes[:2]
        old_port = identity(killed)[1].split("/")[4]

        killed.process.kill()
        killed.process.wait(10)
        wait_until(
            lambda: all(ids[3] not in peer_ids(w) for w in [*watchers, frozen]),
            15,
            "SIGKILLed node evicted",
        )

        frozen.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: all(ids[2] not in peer_ids(w) for w in watchers),
                15,
                "SIGSTOPped node evicted",
            )
        finally:
            frozen.process.send_signal(signal.SIGCONT)

        _, bootstrap = identity(nodes[0])
        restarted = start_node(killed.data_dir, "--peer", bootstrap)
        nodes[3] = restarted
        new_id, new_addr = identity(restarted)
        assert new_id == ids[3] and new_addr.split("/")[4] != old_port
        wait_until(lambda: all(ids[3] in peer_ids(w) for w in watchers), 15, "restarted node back")
        # the frozen node, thawed, comes back too: nothing in the mesh is stuck
        wait_until(lambda: everyone_sees(nodes, set(ids)), 15, "everyone together again")


def _abuse(host: str, port: int, connections: int) -> list[socket.socket]:
    """Garbage, wrong protocols and silent connections against a libp2p listen port."""
    payloads = [
        b"\x00\xff" * 512,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x13/multistream/1.0.0\n\x10/no/such/proto\n",
        b"\x13/multistream/1.0.0\n\x0f/noise/garbage\n" + b"\x01" * 4000,
        b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\x00\x20" + b"\x42" * 32,
    ]
    idle = []
    for i in range(connections):
        conn = socket.create_connection((host, port), timeout=5)
        if i % 3 == 0:
            idle.append(conn)  # connects and says nothing
            continue
        try:
            conn.sendall(payloads[i % len(payloads)])
        except OSError:
            pass
        conn.close()
    return idle


def test_garbage_and_hundreds_of_abusive_connections_do_not_stop_the_node(tmp_path: Path) -> None:
    with mesh_of(tmp_path, 3) as nodes:
        ids = {identity(node)[0] for node in nodes}
        wait_until(lambda: everyone_sees(nodes, ids), 10, "the mesh forming")
        victim_id, victim_addr = identity(nodes[0])
        parts = victim_addr.split("/")
        idle = _abuse(parts[2], int(parts[4]), 300)
        try:
            with nodes[0].client() as client:
                assert client.status()["peer_id"] == victim_id
            time.sleep(3)
            for watcher in nodes[1:]:
                with watcher.client() as client:
                    victim = next(p for p in client.peers() if p["peer_id"] == victim_id)
                assert victim["last_seen_s"] < 3, victim
            assert nodes[0].process.poll() is None
            newcomer = start_node(
                tmp_path / "newcomer", "--mesh-key", _key_of(nodes[0]), "--peer", victim_addr
            )
            nodes.append(newcomer)
            ids.add(identity(newcomer)[0])
            wait_until(
                lambda: everyone_sees(nodes, ids), 15, "a newcomer joining through the abused node"
            )
        finally:
            for conn in idle:
                conn.close()


def test_the_cli_shows_the_mesh(tmp_path: Path) -> None:
    from test_cli import salala

    with mesh_of(tmp_path, 2) as nodes:
        ids = {identity(node)[0] for node in nodes}
        wait_until(lambda: everyone_sees(nodes, ids), 10, "the mesh forming")
        table = salala(nodes[0], "mesh", "peers")
        assert table.returncode == 0 and "GFLOP/s" in table.stdout and "(this)" in table.stdout
        status = salala(nodes[0], "mesh", "status", "--json")
        assert '"members": 2' in status.stdout
        invite = salala(nodes[0], "mesh", "invite").stdout.strip()
        assert invite.startswith("salala://join?") and _key_of(nodes[0]) in invite
        joiner = start_node(tmp_path / "joiner", "--join", invite)
        nodes.append(joiner)
        ids.add(identity(joiner)[0])
        wait_until(lambda: everyone_sees(nodes, ids), 10, "a node joining by invite")
        command = [
            SALALA,
            "mesh",
            "watch",
            "--json",
            "--interval",
            "0.2",
            "--data-dir",
            str(nodes[0].data_dir),
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as watch:
            assert watch.stdout is not None
            frames = [json.loads(watch.stdout.readline()) for _ in range(3)]
            assert all(len(frame) == 3 for frame in frames)
            watch.send_signal(signal.SIGINT)
            # drain what it printed meanwhile: a full pipe would block its exit's flush
            watch.communicate(timeout=10)
            assert watch.returncode == 0
