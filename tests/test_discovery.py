"""Discovery input is untrusted: the one validator, the bounded tables, protocol versions."""

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair
from libp2p.peer.id import ID
from salala.mesh import InviteError, MeshKey, WireError, make_invite, parse_invite
from salala.mesh.inference._clock import DeploymentClock
from salala.mesh.inference._deploy import Deployer
from salala.mesh.inference._router import Router
from salala.mesh.inference._undeployed import Undeployed
from salala.mesh.membership import _mesh
from salala.mesh.membership._adverts import VERSION, Advert, advert_from_wire
from salala.mesh.membership._discovered import (
    MalformedPeerError,
    check_addr,
    check_peer_id,
    from_mdns,
    settings_targets,
)
from salala.mesh.membership._mesh import LocalState, MeshConfig, open_mesh
from salala.mesh.membership._table import MAX_MEMBERS, Change, Membership
from salala.mesh.training._driver import Driver
from salala.runtime import probe_capacity

CAPACITY = probe_capacity().to_dict()


def new_peer() -> tuple[str, KeyPair]:
    key_pair = create_new_key_pair()
    return ID.from_pubkey(key_pair.public_key).to_base58(), key_pair


def addr(peer_id: str, host: str = "10.77.0.9") -> str:
    return f"/ip4/{host}/tcp/4001/p2p/{peer_id}"


# ---- the validator ----------------------------------------------------------------


def test_a_real_peer_id_passes() -> None:
    peer_id, _ = new_peer()
    assert check_peer_id(peer_id) == peer_id
    assert check_addr(addr(peer_id), peer_id) == addr(peer_id)
    assert check_addr(f"/dns4/laptop.local/tcp/1/p2p/{peer_id}", peer_id)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0OIl",  # not base58: today's mDNS crash
        "not-a-peer-id",
        "12D3KooW",  # base58, but no multihash
        "1" * 20,
        "12D3KooW" + "z" * 200,  # too long to even decode
        ID.from_pubkey(create_rsa_key_pair().public_key).to_base58(),  # no key inside
        None,
        42,
        b"12D3KooW",
    ],
)
def test_anything_but_a_peer_id_carrying_its_key_is_refused(value: object) -> None:
    with pytest.raises(MalformedPeerError):
        check_peer_id(value)


def test_a_non_canonical_spelling_of_a_peer_id_is_refused() -> None:
    """Ids key every table: two spellings of one id must not become two members."""
    peer_id, _ = new_peer()
    with pytest.raises(MalformedPeerError):
        check_peer_id("1" + peer_id)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, other: "/ip4/10.0.0.1/tcp/1",  # no /p2p/
        lambda p, other: addr(other),  # another peer's address
        lambda p, other: f"/ip4/10.0.0.1/udp/1/p2p/{p}",  # not TCP
        lambda p, other: f"/ip4/10.0.0.1/tcp/1/ws/p2p/{p}",  # not a shape we dial
        lambda p, other: f"/ip4/999.1.1.1/tcp/1/p2p/{p}",  # not an address
        lambda p, other: f"/ip4/10.0.0.1/tcp/99999/p2p/{p}",
        lambda p, other: f"garbage/p2p/{p}",
        lambda p, other: f"/ip4/10.0.0.1/tcp/1/p2p/{p}/" + "x" * 300,
        lambda p, other: 7,
    ],
)
def test_addresses_we_cannot_dial_or_that_name_another_peer_are_refused(make: Any) -> None:
    peer_id, _ = new_peer()
    other, _ = new_peer()
    with pytest.raises(MalformedPeerError):
        check_addr(make(peer_id, other), peer_id)


def test_an_mdns_record_yields_its_peer_and_only_its_good_addresses() -> None:
    peer_id, _ = new_peer()
    other, _ = new_peer()
    record = {
        b"id": peer_id.encode(),
        b"a0": addr(peer_id).encode(),
        b"a1": b"/ip4/nonsense",
        b"a2": addr(other).encode(),  # points elsewhere
        b"a10": addr(peer_id, "10.77.0.10").encode(),
        b"x": None,
    }
    assert from_mdns(record) == (peer_id, [addr(peer_id), addr(peer_id, "10.77.0.10")])


@pytest.mark.parametrize(
    "record",
    [
        {b"id": b"0OIl", b"a0": b"/ip4/10.0.0.1/tcp/1/p2p/0OIl"},
        {b"a0": b"/ip4/10.0.0.1/tcp/1"},
        {b"id": b"\xff\xfe"},
        {b"id": None},
        "PEER",
    ],
)
def test_an_mdns_record_with_a_bad_id_is_dropped_with_a_line_naming_mdns(
    record: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="salala.mesh.membership._discovered"):
        assert from_mdns(record) is None
    assert "dropped from mdns" in caplog.text


def test_an_oversized_or_addressless_mdns_record_is_dropped() -> None:
    peer_id, _ = new_peer()
    big = {b"id": peer_id.encode(), b"a0": addr(peer_id).encode(), b"pad": b"x" * 5000}
    assert from_mdns(big) is None
    assert from_mdns({b"id": peer_id.encode(), b"a0": b"/ip4/10.0.0.1/tcp/1"}) is None


def test_more_than_sixteen_addresses_are_cut_to_sixteen() -> None:
    peer_id, _ = new_peer()
    record = {b"id": peer_id.encode()}
    record |= {f"a{i}".encode(): addr(peer_id, f"10.77.1.{i}").encode() for i in range(40)}
    found = from_mdns(record)
    assert found is not None and len(found[1]) == 16


def test_settings_addresses_fail_with_one_clear_message() -> None:
    peer_id, _ = new_peer()
    assert settings_targets([addr(peer_id), addr(peer_id, "10.0.0.2")]) == {
        peer_id: [addr(peer_id), addr(peer_id, "10.0.0.2")]
    }
    with pytest.raises(MalformedPeerError, match="needs a /p2p/<peer id> part"):
        settings_targets(["/ip4/127.0.0.1/tcp/1"])
    with pytest.raises(MalformedPeerError, match=r"invalid peer address.*not a peer id"):
        settings_targets(["/ip4/127.0.0.1/tcp/1/p2p/0OIl"])


def test_a_join_uri_naming_a_bad_peer_is_refused() -> None:
    key = MeshKey.generate()
    with pytest.raises(InviteError, match="not a peer id"):
        parse_invite(make_invite(key, ["/ip4/10.0.0.1/tcp/1/p2p/0OIl"]))


# ---- the member table is bounded ------------------------------------------------------


def an_advert(seq: int = 1, key_pair: KeyPair | None = None, **changes: Any) -> Advert:
    key_pair = key_pair or create_new_key_pair()
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
    advert = Advert(
        peer_id=peer_id,
        incarnation=100,
        seq=seq,
        name="laptop",
        addrs=(addr(peer_id),),
        capacity=CAPACITY,
        fragments=(),
    )
    return dataclasses.replace(advert, **changes).signed(key_pair.private_key)


def test_a_flood_of_relayed_members_never_grows_the_table_past_its_bound() -> None:
    own = an_advert()
    table = Membership(own, now=0.0)
    friend = an_advert()
    assert table.apply(friend, now=0.0, direct=True) is Change.NEW
    for i in range(MAX_MEMBERS + 50):
        table.apply(an_advert(), now=1.0 + i)
    assert len(table.members()) == MAX_MEMBERS
    assert own.peer_id in table and friend.peer_id in table  # relays push out relays


def test_members_only_heard_of_go_first_and_our_own_entry_never_goes() -> None:
    own = an_advert()
    table = Membership(own, now=0.0, max_members=3)
    direct, relayed = an_advert(), an_advert()
    table.apply(direct, now=1.0, direct=True)
    table.apply(relayed, now=2.0)
    newcomer = an_advert()
    assert table.apply(newcomer, now=3.0) is Change.NEW  # pushes out `relayed`
    assert relayed.peer_id not in table and direct.peer_id in table
    table.heard_from(newcomer.peer_id, now=4.0)  # now verified directly too
    assert table.apply(an_advert(), now=5.0) is Change.FULL  # nothing unverified to drop
    speaking = an_advert()
    assert table.apply(speaking, now=6.0, direct=True) is Change.NEW  # most silent goes
    assert direct.peer_id not in table
    assert {m.advert.peer_id for m in table.members()} == {
        own.peer_id,
        newcomer.peer_id,
        speaking.peer_id,
    }


# ---- protocol versions ------------------------------------------------------------------


def test_an_advert_of_another_version_is_listed_as_incompatible_and_relayed_unchanged() -> None:
    key_pair = create_new_key_pair()
    future = {"capacity": {"cores": 8}, "gpus": ["x"], "lamport": 7}
    advert = an_advert(key_pair=key_pair, protocol=VERSION + 1, foreign=future)
    wire = advert.to_wire()
    assert wire["v"] == VERSION + 1 and wire["gpus"] == ["x"] and "fragments" not in wire
    received = advert_from_wire(wire)
    assert not received.compatible and received.protocol == VERSION + 1
    assert received.fragments == () and received.serving == ()  # lends us nothing
    assert received.capacity["gflops"] is None and received.capacity["platform"] == "?"
    assert received.to_wire() == wire  # a relay forwards what it got
    assert advert_from_wire(received.to_wire()) == received
    assert advert_from_wire(an_advert(key_pair=key_pair).to_wire()).compatible


@pytest.mark.parametrize(
    "tamper",
    [
        lambda w: w.update(v=w["v"] + 1),  # the version is signed
        lambda w: w.update(gpus=["y"]),  # and so is what we do not understand
        lambda w: w["capacity"].update(cores=9),
    ],
)
def test_the_signature_covers_the_version_and_the_unknown_fields(tamper: Any) -> None:
    advert = an_advert(protocol=VERSION + 1, foreign={"capacity": {"cores": 8}, "gpus": ["x"]})
    wire = advert.to_wire()
    tamper(wire)
    with pytest.raises(WireError, match="bad signature"):
        advert_from_wire(wire)


def test_a_version_change_of_our_own_advert_breaks_its_signature() -> None:
    wire = an_advert().to_wire()
    wire["v"] = VERSION + 1
    with pytest.raises(WireError, match="bad signature"):
        advert_from_wire(wire)


def test_a_foreign_advert_keeps_its_capacity_when_it_still_reads_and_is_bounded() -> None:
    readable = an_advert(protocol=VERSION + 1, foreign={"capacity": CAPACITY})
    assert advert_from_wire(readable.to_wire()).capacity == CAPACITY
    huge = an_advert(protocol=VERSION + 1, foreign={"blob": b"x" * (65 << 10)})
    with pytest.raises(WireError, match="kept up to"):
        advert_from_wire(huge.to_wire())


class _Mesh:
    """Just what the three places that hand out work read of a mesh."""

    def __init__(self, adverts: list[Advert]) -> None:
        self.peer_id = adverts[0].peer_id
        self.membership = Membership(adverts[0], now=0.0)
        for advert in adverts[1:]:
            self.membership.apply(advert, now=0.0, direct=True)

    def is_live(self, peer_id: str) -> bool:
        return True

    def unavailable_reason(self, peer_id: str) -> str | None:
        return None

    def takes_work(self, peer_id: str) -> bool:
        return True


def test_an_incompatible_peer_is_given_no_work(tmp_path: Path) -> None:
    serving = {
        "deployment": "m@1-abc",
        "created": 1,
        "model": "m",
        "stage": 0,
        "codec": "raw",
        "plan": [{"fragment": "ab" * 32, "bytes": 1, "inputs": ["x"], "outputs": ["y"]}],
    }
    own, good = an_advert(), an_advert(serving=(serving,))
    # An incompatible advert that even reads like ours: still no work for it.
    odd = an_advert(protocol=VERSION + 1, capacity={**CAPACITY, "gflops": 1e6})
    odd = dataclasses.replace(odd, serving=(serving,))
    mesh: Any = _Mesh([own, good, odd])
    placed = Deployer(mesh, None, None, None)._capacities()  # type: ignore[arg-type]
    assert {p.peer_id for p in placed} == {own.peer_id, good.peer_id}
    server = SimpleNamespace(clock=DeploymentClock(), undeployed=Undeployed())
    router = Router(mesh, server)  # type: ignore[arg-type]
    assert router.deployments()["m"].hosts == [[good.peer_id]]
    driver = Driver(mesh, None, None, tmp_path)  # type: ignore[arg-type]
    assert set(driver._peers(set())) == {own.peer_id, good.peer_id}


# ---- a running mesh survives what discovery hands it -------------------------------------


def _state() -> LocalState:
    return LocalState(capacity=CAPACITY, fragments=[])


async def test_a_peer_task_with_an_id_that_is_not_a_peer_id_cannot_kill_the_mesh() -> None:
    """Defence in depth: even an id that slipped past the validator ends only its task."""
    config = MeshConfig(key=MeshKey.generate(), listen=["/ip4/127.0.0.1/tcp/0"], mdns=False)
    async with open_mesh(create_new_key_pair(), config, _state) as mesh:
        mesh._targets["0OIl"] = ["/ip4/127.0.0.1/tcp/1/p2p/0OIl"]
        await trio.sleep(3 * _mesh.MAINTAIN_S)  # a crashed task would cancel this sleep
        assert "0OIl" not in mesh._sessions and mesh.peers()[0]["self"]


async def test_a_flood_of_mdns_finds_keeps_a_bounded_number_of_targets_and_dials() -> None:
    config = MeshConfig(key=MeshKey.generate(), listen=["/ip4/127.0.0.1/tcp/0"], mdns=False)
    async with open_mesh(create_new_key_pair(), config, _state) as mesh:
        flood = [new_peer()[0] for _ in range(300)]
        for peer_id in flood:
            mesh.found_by_mdns(peer_id, [f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"])
            await trio.sleep(0)
        await trio.sleep(2 * _mesh.MAINTAIN_S)
        assert len(mesh._targets) == _mesh.MAX_MDNS_TARGETS
        assert set(mesh._targets) == set(flood[-_mesh.MAX_MDNS_TARGETS :])  # newest kept
        assert len(mesh._sessions) <= _mesh.MAX_MDNS_TARGETS
        assert len(mesh._retry_at) <= _mesh.MAX_MDNS_TARGETS
        peerstore = mesh._host.get_peerstore()
        assert not peerstore.addrs(ID.from_base58(flood[0]))  # forgotten addresses
