"""The mesh's pure parts: keys, invites, adverts, membership, interface choice."""

import dataclasses
import math

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from salala.mesh import InviteError, MeshKey, MeshKeyError, WireError, make_invite, parse_invite
from salala.mesh.membership import _interfaces as interfaces
from salala.mesh.membership._adverts import VERSION, Advert, advert_from_wire
from salala.mesh.membership._sync import SYNC, parse_sync, sync_message
from salala.mesh.membership._table import Change, Membership
from salala.mesh.wire import validate
from salala.runtime import probe_capacity

PEER = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"


def test_mesh_keys_round_trip_and_hide_their_secret() -> None:
    key = MeshKey.generate()
    assert MeshKey.parse(str(key)) == key
    assert str(key).startswith("salala-mesh-") and len(key.mesh_id) == 8
    assert str(key) not in repr(key) and key.mesh_id in repr(key)
    assert MeshKey.generate().mesh_id != key.mesh_id


@pytest.mark.parametrize(
    "text", ["", "hunter2", "salala-mesh-", "salala-mesh-abc", "salala-mesh-!!!!"]
)
def test_malformed_mesh_keys_are_refused(text: str) -> None:
    with pytest.raises(MeshKeyError):
        MeshKey.parse(text)


def test_proofs_depend_on_key_role_and_every_part() -> None:
    key, other = MeshKey.generate(), MeshKey.generate()
    proof = key.proof(b"dialer", b"a", b"b")
    assert proof == key.proof(b"dialer", b"a", b"b")
    assert proof != other.proof(b"dialer", b"a", b"b")
    assert proof != key.proof(b"responder", b"a", b"b")
    assert key.proof(b"dialer", b"ab", b"") != key.proof(b"dialer", b"a", b"b")  # no splicing


def a_peer_id() -> str:
    return ID.from_pubkey(create_new_key_pair().public_key).to_base58()


def test_invites_round_trip() -> None:
    key, peer = MeshKey.generate(), a_peer_id()
    addrs = [f"/ip4/192.168.1.20/tcp/4001/p2p/{peer}", f"/ip4/10.0.0.2/tcp/4001/p2p/{peer}"]
    assert parse_invite(make_invite(key, addrs)) == (key, addrs)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://join?key=x", "starts with salala://join"),
        ("salala://join?peer=/ip4/1.2.3.4/tcp/1/p2p/x", "no mesh key"),
        (f"salala://join?key={MeshKey.generate()}", "names no peer"),
        (
            f"salala://join?mesh=00000000&key={MeshKey.generate()}&peer=/ip4/1.2.3.4/tcp/1/p2p/x",
            "does not match",
        ),
    ],
)
def test_bad_invites_say_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(InviteError, match=message):
        parse_invite(uri)


def make_advert(seq: int = 1, incarnation: int = 100, key_pair=None) -> tuple[Advert, object]:
    key_pair = key_pair or create_new_key_pair()
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
    advert = Advert(
        peer_id=peer_id,
        incarnation=incarnation,
        seq=seq,
        name="laptop",
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",),
        capacity=probe_capacity().to_dict(),
        fragments=("ab" * 32,),
    ).signed(key_pair.private_key)
    return advert, key_pair


def test_signed_adverts_survive_the_wire() -> None:
    advert, _ = make_advert()
    assert advert_from_wire(advert.to_wire()) == advert


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda w: w.update(seq=w["seq"] + 1), "bad signature"),
        (lambda w: w["addrs"].append(w["addrs"][0].replace("127.", "6.")), "bad signature"),
        (lambda w: w.update(extra=1), "fields differ"),
        (lambda w: w.pop("capacity"), "fields differ"),
        (lambda w: w.update(seq="1"), "'seq' has the wrong type"),
        (lambda w: w.update(seq=True), "'seq' has the wrong type"),
        (lambda w: w["capacity"].update(gflops="fast"), "capacity.gflops"),
        (lambda w: w["capacity"].update(battery_temperature=math.nan), "battery_temperature"),
        (lambda w: w["capacity"].update(battery_temperature=True), "battery_temperature"),
        (lambda w: w["capacity"].update(unavailable_reason="x" * 161), "unavailable_reason"),
        (lambda w: w["capacity"].update(available="no"), "capacity.available"),
        (
            lambda w: w["capacity"].update(
                accelerators=[
                    {"provider": "CUDA", "name": "g", "memory_total": -1, "memory_free": 0}
                ]
            ),
            "accelerators",
        ),
        (lambda w: w.update(addrs=["x"] * 17), "at most 16"),
        (lambda w: w.update(addrs=["/ip4/6.6.6.6/tcp/1"]), "needs a /p2p/"),
        (lambda w: w.update(peer_id="not-a-peer-id"), "not a peer id"),
        (lambda w: w.update(name="n" * 65), "at most 64"),
        (lambda w: w.update(v=0), "version 0 is out of range"),
        (lambda w: w.update(v="2"), "'v' has the wrong type"),
        (lambda w: w.pop("incarnation") and w.update(v=VERSION + 1), "lacks"),
        (lambda w: w.update(link={"port": 0, "pin": "0" * 64, "bandwidth": None}), "link.port"),
        (lambda w: w.update(link={"port": 9, "pin": "x"}), "link"),
        (lambda w: w.update(undeployed=[{"model": "x"}]), "undeployed"),
        (lambda w: w.update(undeployed=[{"model": "../x", "upto": 1}]), "undeployed"),
        (lambda w: w.update(undeployed=[{"model": "x", "upto": -1}]), "undeployed"),
        (lambda w: w.update(undeployed=[{"model": "x", "upto": 1}] * 257), "undeployed"),
    ],
)
def test_forged_or_malformed_adverts_are_refused(tamper, message: str) -> None:
    advert, _ = make_advert()
    wire = advert.to_wire()
    tamper(wire)
    with pytest.raises(WireError, match=message):
        advert_from_wire(wire)


def test_serving_entries_carry_a_whole_plan() -> None:
    stage = {"fragment": "ab" * 32, "bytes": 1000, "inputs": ["x", "mask"], "outputs": ["h"]}
    entry = {
        "deployment": "m@1-abcdefgh",
        "created": 1,
        "model": "m",
        "stage": 1,
        "codec": "raw",
        "plan": [stage, {**stage, "outputs": ["y"]}],
    }
    advert, key_pair = make_advert()
    signed = dataclasses.replace(advert, serving=(entry,), sig=b"").signed(key_pair.private_key)
    assert advert_from_wire(signed.to_wire()).serving == (entry,)
    for broken in (
        {**entry, "stage": 2},
        {**entry, "plan": []},
        {**entry, "plan": [{"fragment": 1}]},
        {**entry, "stages": 2},
        {**entry, "codec": "zip"},
        {**entry, "model": "../m"},
        {**entry, "plan": [{**stage, "bytes": -1}, stage]},
    ):
        bad = dataclasses.replace(advert, serving=(broken,), sig=b"").signed(key_pair.private_key)
        with pytest.raises(WireError, match=r"serving\[0\]"):
            advert_from_wire(bad.to_wire())


def test_an_advert_signed_by_someone_else_is_refused() -> None:
    advert, _ = make_advert()
    impostor = dataclasses.replace(advert, sig=b"").signed(create_new_key_pair().private_key)
    with pytest.raises(WireError, match="bad signature"):
        advert_from_wire(impostor.to_wire())


def test_membership_keeps_the_newest_advert_and_tracks_liveness() -> None:
    own, _ = make_advert()
    table = Membership(own, now=0.0)
    peer_v1, key_pair = make_advert(seq=1)
    peer_v2, _ = make_advert(seq=2, key_pair=key_pair)
    assert table.apply(peer_v1, now=1.0) is Change.NEW
    assert table.apply(peer_v2, now=2.0) is Change.UPDATED
    assert table.apply(peer_v1, now=3.0) is Change.STALE  # an old copy relayed late
    assert table.get(peer_v1.peer_id).advert == peer_v2
    assert table.get(peer_v1.peer_id).last_seen == 2.0
    table.heard_from(peer_v1.peer_id, now=5.0, rtt_ms=0.7)
    assert table.get(peer_v1.peer_id).rtt_ms == 0.7
    assert table.evict_silent(now=10.0, silent_for=6.0) == []
    assert table.evict_silent(now=11.5, silent_for=6.0) == [peer_v1.peer_id]
    assert peer_v1.peer_id not in table and own.peer_id in table


def test_an_evicted_member_returns_only_with_a_newer_advert() -> None:
    own, _ = make_advert()
    table = Membership(own, now=0.0)
    peer, key_pair = make_advert(seq=5)
    table.apply(peer, now=0.0)
    table.evict_silent(now=10.0, silent_for=6.0)
    assert table.apply(peer, now=11.0) is Change.STALE  # gossip of its last advert
    assert (
        table.apply(make_advert(seq=6, key_pair=key_pair)[0], now=12.0) is Change.NEW
    )  # it woke up
    table.evict_silent(now=30.0, silent_for=6.0)
    restarted, _ = make_advert(seq=1, incarnation=200, key_pair=key_pair)
    assert table.apply(restarted, now=31.0) is Change.NEW


def test_an_evicted_member_that_speaks_to_us_directly_is_back() -> None:
    """A frozen peer that thaws keeps its old seq; its own word over a live exchange counts."""
    own, _ = make_advert()
    table = Membership(own, now=0.0)
    peer, _ = make_advert(seq=5)
    table.apply(peer, now=0.0)
    table.evict_silent(now=10.0, silent_for=6.0)
    assert table.apply(peer, now=11.0) is Change.STALE  # relayed by someone else
    assert table.apply(peer, now=12.0, direct=True) is Change.NEW


def test_a_restart_is_a_new_incarnation() -> None:
    own, _ = make_advert()
    table = Membership(own, now=0.0)
    peer, key_pair = make_advert(seq=40, incarnation=100)
    table.apply(peer, now=0.0)
    table.heard_from(peer.peer_id, now=1.0, rtt_ms=3.0)
    assert (
        table.apply(make_advert(seq=1, incarnation=101, key_pair=key_pair)[0], now=2.0)
        is Change.RESTARTED
    )
    assert table.get(peer.peer_id).rtt_ms is None


def test_digests_select_only_what_the_other_side_lacks() -> None:
    own, _ = make_advert()
    table = Membership(own, now=0.0)
    peer, _key_pair = make_advert(seq=3)
    table.apply(peer, now=0.0)
    assert set(a.peer_id for a in table.newer_than({})) == {own.peer_id, peer.peer_id}
    assert table.newer_than(table.digest()) == []
    assert table.newer_than({**table.digest(), peer.peer_id: (100, 2)}) == [peer]
    digest, adverts = parse_sync(validate(sync_message(table.digest(), [peer]), SYNC))
    assert digest == table.digest() and advert_from_wire(adverts[0]) == peer


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"digest": [], "adverts": []},
        {"digest": {"p": [1, 2]}, "adverts": []},
        {"digest": {PEER: [1]}, "adverts": []},
        {"digest": {PEER: [1, "2"]}, "adverts": []},
        {"digest": {PEER: [1, 2]}, "adverts": [[]]},
        {"digest": {}, "adverts": [{}] * 2000},
        {"digest": {}, "adverts": [], "extra": 1},
    ],
)
def test_malformed_sync_messages_are_refused(message: dict) -> None:
    with pytest.raises(WireError):
        validate(message, SYNC)


def test_default_interfaces_skip_loopback_and_container_bridges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        interfaces,
        "_ipv4_by_interface",
        lambda: {
            "lo": ("127.0.0.1",),
            "docker0": ("172.17.0.1",),
            "br-1a2b": ("172.18.0.1",),
            "veth12": ("169.254.1.1",),
            "wlan0": ("192.168.1.20",),
            "eth0": ("10.0.0.5",),
        },
    )
    assert [i.name for i in interfaces.select_interfaces(None)] == ["eth0", "wlan0"]
    assert [i.name for i in interfaces.select_interfaces(["lo"])] == ["lo"]
    with pytest.raises(interfaces.InterfaceError, match="no usable IPv4 interface named"):
        interfaces.select_interfaces(["wlan9"])


def test_wildcard_listen_addresses_become_one_per_interface() -> None:
    lan = [
        interfaces.Interface("eth0", ("10.0.0.5",)),
        interfaces.Interface("wlan0", ("192.168.1.20",)),
    ]
    assert interfaces.advertised_addrs(["/ip4/0.0.0.0/tcp/4001/p2p/P"], "P", lan) == [
        "/ip4/10.0.0.5/tcp/4001/p2p/P",
        "/ip4/192.168.1.20/tcp/4001/p2p/P",
    ]
    assert interfaces.advertised_addrs(["/ip4/127.0.0.1/tcp/9"], "P", lan) == [
        "/ip4/127.0.0.1/tcp/9/p2p/P"
    ]
