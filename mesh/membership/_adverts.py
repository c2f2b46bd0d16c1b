"""Capacity adverts: what each member tells the mesh about itself.

An advert is signed with the member's libp2p key, so it can be relayed by anyone (peer
exchange) without anyone being able to forge or alter it; the peer id itself carries
the public key that checks the signature. ``(incarnation, seq)`` orders adverts: the
incarnation changes when a node restarts, the sequence number on every refresh.
"""

from dataclasses import asdict, dataclass
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
    record,
    text,
    where,
)

VERSION = 2  # 2: adverts carry undeploy markers
MAX_ADDRS = 16
MAX_FRAGMENTS = 4096
_FIELDS = {
    "v",
    "peer_id",
    "incarnation",
    "seq",
    "name",
    "addrs",
    "capacity",
    "fragments",
    "serving",
    "undeployed",
    "sig",
}
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
}


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
    sig: bytes = b""

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)

    def _signed_bytes(self) -> bytes:
        body = asdict(self)
        del body["sig"]
        body["v"] = VERSION
        return msgpack.packb(body, use_bin_type=True)

    def signed(self, key: PrivateKey) -> "Advert":
        unsigned = Advert(**{**asdict(self), "sig": b""})
        return Advert(**{**asdict(unsigned), "sig": key.sign(unsigned._signed_bytes())})

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["v"] = VERSION
        wire["addrs"] = list(self.addrs)
        wire["fragments"] = list(self.fragments)
        wire["serving"] = list(self.serving)
        wire["undeployed"] = list(self.undeployed)
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
    return value


def check_serving(value: Any) -> tuple[dict[str, Any], ...]:
    """Serving entries as SERVING_ENTRY admits them; SchemaError names a bad field."""
    return tuple(array(SERVING_ENTRY, MAX_SERVING)(value, "serving"))


def check_undeployed(value: Any) -> tuple[dict[str, Any], ...]:
    """Undeploy markers as UNDEPLOY_MARKER admits them; SchemaError names a bad field."""
    return tuple(array(UNDEPLOY_MARKER, MAX_UNDEPLOYED)(value, "undeployed"))


def advert_from_wire(wire: Any) -> Advert:
    """Validate a received advert, including its signature; WireError says what is wrong."""
    _check(wire, dict, "advert")
    if set(wire) != _FIELDS:
        raise WireError(f"advert fields differ: {sorted(set(wire) ^ _FIELDS)}")
    if wire["v"] != VERSION:
        raise WireError(f"advert version {wire['v']!r} is not {VERSION}")
    addrs = _check(wire["addrs"], list, "addrs")
    fragments = _check(wire["fragments"], list, "fragments")
    if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and len(a) < 256 for a in addrs):
        raise WireError("advert addrs must be at most 16 short strings")
    if len(fragments) > MAX_FRAGMENTS or not all(isinstance(f, str) for f in fragments):
        raise WireError("advert fragments must be hash strings")
    advert = Advert(
        peer_id=_check(wire["peer_id"], str, "peer_id"),
        incarnation=_check(wire["incarnation"], int, "incarnation"),
        seq=_check(wire["seq"], int, "seq"),
        name=_check(wire["name"], str, "name")[:64],
        addrs=tuple(addrs),
        capacity=_capacity(wire["capacity"]),
        fragments=tuple(fragments),
        serving=check_serving(wire["serving"]),
        undeployed=check_undeployed(wire["undeployed"]),
        sig=_check(wire["sig"], bytes, "sig"),
    )
    try:
        public_key = ID.from_base58(advert.peer_id).extract_public_key()
    except Exception as exc:  # base58/multihash decoding errors
        raise WireError(f"advert peer id {advert.peer_id!r} is invalid") from exc
    if public_key is None or not public_key.verify(advert._signed_bytes(), advert.sig):
        raise WireError(f"advert for {advert.peer_id} has a bad signature")
    return advert


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
    )
    if any(old.get(k) != new.get(k) for k in fixed):
        return True

    def moved(name: str, threshold: float) -> bool:
        a, b = old.get(name), new.get(name)
        if (a is None) != (b is None):
            return True
        return a is not None and b is not None and abs(a - b) >= threshold

    memory_step = 0.05 * (new.get("memory_total") or 0) or 256 * 2**20
    return (
        moved("memory_available", memory_step)
        or moved("load_1m", 0.5)
        or moved("battery_percent", 2)
    )
