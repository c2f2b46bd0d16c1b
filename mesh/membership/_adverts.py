"""Capacity adverts: what each member tells the mesh about itself.

An advert is signed with the member's libp2p key, so it can be relayed by anyone (peer
exchange) without anyone being able to forge or alter it; the peer id itself carries
the public key that checks the signature. ``(incarnation, seq)`` orders adverts: the
incarnation changes when a node restarts, the sequence number on every refresh.

``v`` is the mesh protocol version the member speaks. What every version keeps, so that
members of different versions still see each other, is the *core*: ``v``, ``peer_id``,
``incarnation``, ``seq``, ``name``, ``addrs`` and ``sig``, and the signature rule (the
member's key signs the msgpack of the whole advert without ``sig``, map keys sorted at
every level). An advert of another version is checked on its core and signature,
listed, and flagged incompatible; the rest of it is kept only to relay it unchanged. It
lends no capacity, fragments or serving entries to this node, so it is given no work.
"""

from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from .._errors import WireError
from ..wire import (
    CODECS,
    NAME,
    SHA256,
    TENSOR_NAME,
    array,
    choice,
    integer,
    nullable,
    number,
    record,
    text,
    where,
)
from ._discovered import MalformedPeerError, check_addrs, check_peer_id

# 2: canonical signatures, undeploy markers; 3: direct links; 4: accelerators, battery
# temperature, and the owner's policy (available, and why not)
VERSION = 4
MAX_FRAGMENTS = 4096
MAX_NAME = 64
MAX_FOREIGN_BYTES = 64 << 10  # what we keep of an advert of another version, to relay it
_CORE = {"v", "peer_id", "incarnation", "seq", "name", "addrs", "sig"}
_BODY = {"capacity", "fragments", "serving", "undeployed", "link"}

MAX_SERVING = 256
MAX_STAGES = 64
# One stage of a deployment that the member hosts (see inference._serving.ServingEntry),
# carrying the deployment's whole plan: each stage's fragment, its size, inputs, outputs.
# "<model>@<logical time>-<deployer's short id>": unique even when two members deploy
# the same model at the same logical time.
DEPLOYMENT = text(96, r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}@[0-9]{1,16}-[1-9A-HJ-NP-Za-km-z]{1,16}")
MAX_CREATED = 1 << 53
SERVING_ENTRY = where(
    record(
        {
            "deployment": DEPLOYMENT,
            "created": integer(0, MAX_CREATED),
            "model": NAME,
            "stage": integer(0, MAX_STAGES - 1),
            "codec": choice(CODECS),
            "plan": array(
                record(
                    {
                        "fragment": SHA256,
                        "bytes": integer(1, 1 << 40),
                        "inputs": array(TENSOR_NAME, 256),
                        "outputs": array(TENSOR_NAME, 256, 1),
                    }
                ),
                MAX_STAGES,
                1,
            ),
        }
    ),
    lambda entry: entry["stage"] < len(entry["plan"]),
    "the stage must lie inside the plan",
)
# Undeploy markers (see inference._undeployed): every deployment of ``model`` made at
# a logical time up to ``upto`` is gone. Each node merges and re-advertises them.
MAX_UNDEPLOYED = 256
UNDEPLOY_MARKER = record({"model": NAME, "upto": integer(0, MAX_CREATED)})
# The member's direct link (see wire._direct): its port on the advert's hosts, the
# SHA-256 pin of the certificate it presents there, and the median bandwidth its own
# links measured (bytes/s), for placement. None: frames to it go over libp2p.
LINK = nullable(
    record(
        {
            "port": integer(1, 65535),
            "pin": SHA256,
            "bandwidth": nullable(number(0.0, 1e12)),
        }
    )
)
# A device a provider runs on (see runtime._accelerators), with its memory when known.
MAX_ACCELERATORS = 16
ACCELERATOR = record(
    {
        "provider": text(64),
        "name": text(128),
        "memory_total": nullable(integer(0, 1 << 50)),
        "memory_free": nullable(integer(0, 1 << 50)),
    }
)
# Why the owner's policy keeps the member from taking work ("unplugged", "quiet hours").
UNAVAILABLE_REASON = nullable(text(160))
BATTERY_TEMPERATURE = nullable(number(-50.0, 150.0))  # °C; no NaN
_CAPACITY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "platform": str,
    "logical_cores": (int, type(None)),
    "physical_cores": (int, type(None)),
    "memory_total": (int, type(None)),
    "memory_available": (int, type(None)),
    "load_1m": (float, int, type(None)),
    "battery_percent": (float, int, type(None)),
    "charging": (bool, type(None)),
    "providers": list,
    "gflops": (float, int, type(None)),
    "gflops_measured_at": (float, int, type(None)),
    "battery_temperature": (float, int, type(None)),
    "accelerators": list,
    "available": bool,
    "unavailable_reason": (str, type(None)),
}


def unknown_capacity() -> dict[str, Any]:
    """What we show for a member whose advert we cannot read the capacity of."""
    empty: dict[str, Any] = {"providers": [], "accelerators": []}
    return {name: empty.get(name) for name in _CAPACITY_FIELDS} | {
        "platform": "?",
        "available": False,
    }


def _canonical(value: Any) -> Any:
    """The same bytes for the same content, whatever order a map's keys arrived in."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: msgpack.packb(kv[0], use_bin_type=True))
        return {k: _canonical(v) for k, v in items}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


@dataclass(frozen=True)
class Advert:
    peer_id: str
    incarnation: int
    seq: int
    name: str
    addrs: tuple[str, ...]
    capacity: dict[str, Any]
    fragments: tuple[str, ...]
    serving: tuple[dict[str, Any], ...] = ()
    undeployed: tuple[dict[str, Any], ...] = ()
    link: dict[str, Any] | None = None
    sig: bytes = b""
    protocol: int = VERSION  # the wire's "v"
    # An advert of another protocol version: everything but its core, kept to relay it.
    foreign: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)

    @property
    def compatible(self) -> bool:
        """Whether this member speaks our protocol version (and may be given work)."""
        return self.protocol == VERSION

    def _signed_bytes(self) -> bytes:
        body = self.to_wire()
        del body["sig"]
        return msgpack.packb(_canonical(body), use_bin_type=True)

    def signed(self, key: PrivateKey) -> "Advert":
        unsigned = replace(self, sig=b"")
        return replace(unsigned, sig=key.sign(unsigned._signed_bytes()))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": self.protocol,
            "peer_id": self.peer_id,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "name": self.name,
            "addrs": list(self.addrs),
        }
        if self.compatible:
            wire["capacity"] = self.capacity
            wire["fragments"] = list(self.fragments)
            wire["serving"] = list(self.serving)
            wire["undeployed"] = list(self.undeployed)
            wire["link"] = self.link
        else:
            wire.update(self.foreign)
        wire["sig"] = self.sig
        return wire


def _check(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError(f"advert field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _capacity(value: Any) -> dict[str, Any]:
    _check(value, dict, "capacity")
    if set(value) != set(_CAPACITY_FIELDS):
        raise WireError(
            f"advert capacity fields differ: {sorted(set(value) ^ set(_CAPACITY_FIELDS))}"
        )
    for name, kind in _CAPACITY_FIELDS.items():
        _check(value[name], kind, f"capacity.{name}")
    if not all(isinstance(p, str) for p in value["providers"]):
        raise WireError("advert capacity.providers must be strings")
    array(ACCELERATOR, MAX_ACCELERATORS)(value["accelerators"], "capacity.accelerators")
    BATTERY_TEMPERATURE(value["battery_temperature"], "capacity.battery_temperature")
    UNAVAILABLE_REASON(value["unavailable_reason"], "capacity.unavailable_reason")
    return value


def check_serving(value: Any) -> tuple[dict[str, Any], ...]:
    """Serving entries as SERVING_ENTRY admits them; SchemaError names a bad field."""
    return tuple(array(SERVING_ENTRY, MAX_SERVING)(value, "serving"))


def check_undeployed(value: Any) -> tuple[dict[str, Any], ...]:
    """Undeploy markers as UNDEPLOY_MARKER admits them; SchemaError names a bad field."""
    return tuple(array(UNDEPLOY_MARKER, MAX_UNDEPLOYED)(value, "undeployed"))


def _body(wire: dict[str, Any]) -> dict[str, Any]:
    """Capacity, fragments and serving entries of an advert of our own version."""
    if set(wire) != _CORE | _BODY:
        raise WireError(f"advert fields differ: {sorted(set(wire) ^ (_CORE | _BODY))}")
    fragments = _check(wire["fragments"], list, "fragments")
    if len(fragments) > MAX_FRAGMENTS or not all(isinstance(f, str) for f in fragments):
        raise WireError("advert fragments must be hash strings")
    return {
        "capacity": _capacity(wire["capacity"]),
        "fragments": tuple(fragments),
        "serving": check_serving(wire["serving"]),
        "undeployed": check_undeployed(wire["undeployed"]),
        "link": LINK(wire["link"], "link"),
    }


def _foreign(wire: dict[str, Any]) -> dict[str, Any]:
    """An advert of another version: its capacity if we can read it, and its rest kept."""
    if not _CORE <= set(wire):
        raise WireError(f"advert lacks {sorted(_CORE - set(wire))}")
    rest = {k: v for k, v in wire.items() if k not in _CORE}
    try:
        size = len(msgpack.packb(rest, use_bin_type=True))
    except (TypeError, ValueError) as exc:
        raise WireError(f"advert body cannot be re-encoded: {exc}") from exc
    if size > MAX_FOREIGN_BYTES:
        raise WireError(f"an advert of another version is kept up to {MAX_FOREIGN_BYTES} bytes")
    try:
        capacity = _capacity(rest.get("capacity"))
    except WireError:
        capacity = unknown_capacity()
    return {
        "capacity": capacity,
        "fragments": (),
        "serving": (),
        "undeployed": (),
        "link": None,
        "foreign": rest,
    }


def advert_from_wire(wire: Any) -> Advert:
    """Validate a received advert, including its signature; WireError says what is wrong.

    An advert of another protocol version passes on its core and signature alone, and
    comes back with ``compatible`` False.
    """
    _check(wire, dict, "advert")
    protocol = _check(wire.get("v"), int, "v")
    if not 0 < protocol < 1 << 16:
        raise WireError(f"advert version {protocol} is out of range")
    body = _body(wire) if protocol == VERSION else _foreign(wire)
    try:
        peer_id = check_peer_id(wire["peer_id"])
        addrs = check_addrs(wire["addrs"], peer_id)
    except MalformedPeerError as exc:
        raise WireError(f"advert peer: {exc}") from exc
    name = _check(wire["name"], str, "name")
    if len(name) > MAX_NAME:
        raise WireError(f"an advert's name is at most {MAX_NAME} characters")
    advert = Advert(
        peer_id=peer_id,
        incarnation=_check(wire["incarnation"], int, "incarnation"),
        seq=_check(wire["seq"], int, "seq"),
        name=name,
        addrs=tuple(addrs),
        sig=_check(wire["sig"], bytes, "sig"),
        protocol=protocol,
        **body,
    )
    public_key = ID.from_base58(peer_id).extract_public_key()
    if public_key is None or not public_key.verify(advert._signed_bytes(), advert.sig):
        raise WireError(f"advert for {advert.peer_id} has a bad signature")
    return advert


def _moved_by(a: float | None, b: float | None, threshold: float) -> bool:
    """Whether a reading appeared, vanished, or moved by at least ``threshold``."""
    if (a is None) != (b is None):
        return True
    return a is not None and b is not None and abs(a - b) >= threshold


def capacity_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a new capacity reading is worth a new advert.

    Load, free memory and battery drift all the time; re-advertising every wobble would
    make every heartbeat carry every member's advert. Placement only cares about moves
    this large.
    """
    fixed = (
        "platform",
        "logical_cores",
        "physical_cores",
        "memory_total",
        "providers",
        "gflops",
        "charging",
        "available",
        "unavailable_reason",
    )
    if any(old.get(k) != new.get(k) for k in fixed):
        return True

    def moved(name: str, threshold: float) -> bool:
        return _moved_by(old.get(name), new.get(name), threshold)

    memory_step = 0.05 * (new.get("memory_total") or 0) or 256 * 2**20
    def memory_step_of(device: dict[str, Any]) -> float:
        return 0.05 * (device.get("memory_total") or 0) or 256 * 2**20

    devices = ("provider", "name", "memory_total")
    old_devices = old.get("accelerators") or []
    new_devices = new.get("accelerators") or []
    if [[d.get(k) for k in devices] for d in old_devices] != [
        [d.get(k) for k in devices] for d in new_devices
    ]:
        return True
    if any(
        _moved_by(a.get("memory_free"), b.get("memory_free"), memory_step_of(b))
        for a, b in zip(old_devices, new_devices, strict=True)
    ):
        return True
    return (
        moved("memory_available", memory_step)
        or moved("load_1m", 0.5)
        or moved("battery_percent", 2)
        or moved("battery_temperature", 2)
    )
