"""Declared schemas for what peers send, checked before any other code reads it.

Every header on every protocol is a peer's word, and peers include members that hold
the key but misbehave. Each protocol declares the exact shape of each message (types,
lengths, enums, id patterns, bounds); ``validate`` refuses anything else with a
``SchemaError`` naming the first bad field, so code behind the boundary indexes
headers without ``.get`` and defaults, and nothing a peer sends can raise past it.

A schema is a plain function ``(value, path) -> value`` built from the combinators
below; records refuse fields they do not declare.
"""

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import WireError
from ._codecs import CODECS, WIRE_DTYPES

Check = Callable[[Any, str], Any]


class SchemaError(WireError):
    """A message that does not match its schema; ``field`` names the first bad part."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field or 'message'}: {problem}")
        self.field = field
        self.partial: Any = None  # the whole message that failed, unchecked


def _join(path: str, name: object) -> str:
    return f"{path}[{name}]" if isinstance(name, int) else f"{path}.{name}" if path else str(name)


def text(max_len: int = 256, pattern: str | None = None) -> Check:
    matcher = re.compile(pattern) if pattern is not None else None

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(path, f"must be a string, got {type(value).__name__}")
        if len(value) > max_len:
            raise SchemaError(path, f"longer than {max_len} characters")
        if matcher is not None and not matcher.fullmatch(value):
            raise SchemaError(path, f"{value[:80]!r} is not of the form {pattern}")
        return value

    return check


def integer(lo: int, hi: int) -> Check:
    def check(value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(path, f"must be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise SchemaError(path, f"{value} is outside {lo}..{hi}")
        return value

    return check


def number(lo: float, hi: float) -> Check:
    def check(value: Any, path: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SchemaError(path, f"must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise SchemaError(path, f"{value} is outside {lo}..{hi}")
        return value

    return check


def flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(path, f"must be true or false, got {type(value).__name__}")
    return value


def choice(values: Iterable[str]) -> Check:
    allowed = frozenset(values)

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise SchemaError(path, f"{value!r} is not one of {', '.join(sorted(allowed))}")
        return str(value)

    return check


def blob(size: int) -> Check:
    def check(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes) or len(value) != size:
            raise SchemaError(path, f"must be {size} bytes")
        return value

    return check


def opaque(kind: type) -> Check:
    """A value of this type whose contents the layer that owns it validates later
    (an advert is checked, signature and all, when it is applied)."""

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, kind):
            raise SchemaError(path, f"must be a {kind.__name__}, got {type(value).__name__}")
        return value

    return check


def nullable(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def array(item: Check, max_len: int, min_len: int = 0) -> Check:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise SchemaError(path, f"must be a list, got {type(value).__name__}")
        if not min_len <= len(value) <= max_len:
            raise SchemaError(path, f"must hold {min_len}..{max_len} items, has {len(value)}")
        return [item(v, _join(path, i)) for i, v in enumerate(value)]

    return check


def row(*items: Check) -> Check:
    """A list of fixed length whose items each have their own schema."""

    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list) or len(value) != len(items):
            raise SchemaError(path, f"must be a list of {len(items)} items")
        return [
            item(v, _join(path, i)) for i, (item, v) in enumerate(zip(items, value, strict=True))
        ]

    return check


def mapping(key: Check, item: Check, max_len: int) -> Check:
    """A map of any keys ``key`` admits to values ``item`` admits."""

    def check(value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be a map, got {type(value).__name__}")
        if len(value) > max_len:
            raise SchemaError(path, f"holds more than {max_len} entries")
        return {key(k, path): item(v, _join(path, str(k)[:40])) for k, v in value.items()}

    return check


def record(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """A map with exactly these fields (``optional`` ones may be missing)."""
    optional = optional or {}
    known = set(required) | set(optional)

    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be a map, got {type(value).__name__}")
        unknown = [k for k in value if k not in known]
        if unknown:
            raise SchemaError(_join(path, str(unknown[0])[:40]), "is not a field of this message")
        out = {}
        for name, inner in required.items():
            if name not in value:
                raise SchemaError(_join(path, name), "is missing")
            out[name] = inner(value[name], _join(path, name))
        for name, inner in optional.items():
            if name in value:
                out[name] = inner(value[name], _join(path, name))
        return out

    return check


def tagged(tag: str, by_tag: dict[str, Check]) -> Check:
    """A map whose ``tag`` field picks its schema (frames of several kinds on one stream)."""

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be a map, got {type(value).__name__}")
        kind = value.get(tag)
        if not isinstance(kind, str) or kind not in by_tag:
            raise SchemaError(_join(path, tag), f"{kind!r} is not one of {', '.join(by_tag)}")
        return by_tag[kind](value, path)

    return check


def where(inner: Check, holds: Callable[[Any], bool], problem: str) -> Check:
    """``inner``, then a rule across its fields (a stage inside its route, ...)."""

    def check(value: Any, path: str) -> Any:
        value = inner(value, path)
        if not holds(value):
            raise SchemaError(path, problem)
        return value

    return check


def validate(message: Any, schema: Check) -> Any:
    """``message`` as the schema admits it; SchemaError names what is wrong and keeps the
    unchecked message (a server may still find whom to tell in it)."""
    try:
        return schema(message, "")
    except SchemaError as exc:
        exc.partial = message
        raise


# ---- the vocabulary every protocol shares --------------------------------------------

PEER_ID = text(64, r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # base58 multihash
SHA256 = text(64, r"[0-9a-f]{64}")
# Anything that may become a file or folder name on a peer: one path component, never
# "." or "..", no separators.
NAME = text(64, r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENSOR_NAME = text(256)
MAX_TENSORS = 256
MAX_RANK = 8
TENSOR = record(
    {
        "name": TENSOR_NAME,
        "dtype": choice(WIRE_DTYPES),
        "shape": array(integer(0, 1 << 31), MAX_RANK),
        "codec": choice(CODECS),
        "sizes": array(integer(0, 1 << 40), 4, 1),
    }
)
TENSORS = array(TENSOR, MAX_TENSORS)
