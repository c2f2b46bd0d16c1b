"""The node's settings: command-line flags over ``config.toml`` over defaults.

``config.toml`` in the data dir is optional and written by people, so unknown keys and
wrong types are refused with the key's name rather than ignored:

    mesh_key = "salala-mesh-…"
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    peers = ["/ip4/192.168.1.20/tcp/4001/p2p/12D3KooW…"]
    interfaces = ["wlan0"]
    mdns = true
    max_store_gb = 20          # the model store's quota [default: what it holds plus
                               # half the disk's free space at start]

    [http]                     # the OpenAI-compatible API (off without `listen`)
    listen = "127.0.0.1:8000"
    key = "…"                  # required for a non-loopback listen address

    [policy]                   # when and how much this device lends (flags override)
    only_while_charging = true
    min_battery_percent = 30   # not below this, unless charging
    max_battery_temperature = 40   # °C
    quiet_hours = "22:00-07:00"    # local time
    max_cpu_percent = 50       # of the cores: fewer threads, and a rest between runs
    max_memory_mb = 2048       # what stages and their caches may hold

The mesh key a node last used is kept in ``mesh.key`` (mode 0600), so a device that
joined a mesh stays in it across restarts; a node given no key starts a mesh of its own.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runtime
from ..mesh import MeshKey, MeshKeyError
from ._errors import ConfigError
from ._paths import DataDir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class FileConfig:
    mesh_key: str | None = None
    listen: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    mdns: bool | None = None
    max_store_gb: float | None = None
    http: dict[str, str] = field(default_factory=dict)  # listen, key
    policy: dict[str, Any] = field(default_factory=dict)  # see POLICY_KEYS


HTTP_KEYS = ("listen", "key")
POLICY_KEYS: dict[str, type | tuple[type, ...]] = {
    "only_while_charging": bool,
    "min_battery_percent": (int, float),
    "max_battery_temperature": (int, float),
    "quiet_hours": str,
    "max_cpu_percent": (int, float),
    "max_memory_mb": int,
}


def load_file_config(data_dir: DataDir) -> FileConfig:
    path = data_dir.root / "config.toml"
    if not path.exists():
        return FileConfig()
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    kinds: dict[str, type] = {
        "mesh_key": str,
        "listen": list,
        "peers": list,
        "interfaces": list,
        "mdns": bool,
        "max_store_gb": float,
        "http": dict,
        "policy": dict,
    }
    if isinstance(raw.get("max_store_gb"), int) and not isinstance(raw["max_store_gb"], bool):
        raw["max_store_gb"] = float(raw["max_store_gb"])
    for key, value in raw.items():
        if key not in kinds:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {sorted(kinds)}")
        strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not isinstance(value, kinds[key]) or (kinds[key] is list and not strings):
            what = "list of strings" if kinds[key] is list else kinds[key].__name__
            raise ConfigError(f"{path}: {key!r} must be a {what}")
    for key, value in raw.get("http", {}).items():
        if key not in HTTP_KEYS or not isinstance(value, str):
            raise ConfigError(f"{path}: [http] takes only strings {', '.join(HTTP_KEYS)}")
    for key, value in raw.get("policy", {}).items():
        kind = POLICY_KEYS.get(key)
        number_as_flag = isinstance(value, bool) and kind is not bool
        if kind is None or not isinstance(value, kind) or number_as_flag:
            raise ConfigError(
                f"{path}: [policy] {key!r} is unknown or of the wrong type; known: "
                f"{', '.join(POLICY_KEYS)}"
            )
    try:
        policy_from(raw.get("policy", {}))
        check_store_gb(raw.get("max_store_gb"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return FileConfig(**raw)


def policy_from(
    settings: dict[str, Any], flags: dict[str, Any] | None = None
) -> runtime.Policy:
    """The owner's policy: ``[policy]`` settings, each overridden by its flag if given
    (None: not given)."""
    given = {**settings, **{k: v for k, v in (flags or {}).items() if v is not None}}
    try:
        hours = given.pop("quiet_hours", None)
        quiet = None if hours is None else runtime.parse_quiet_hours(hours)
        return runtime.Policy(**given, quiet_hours=quiet)
    except runtime.PolicyError as exc:
        raise ConfigError(str(exc)) from exc


def check_store_gb(value: float | None) -> float | None:
    """A store quota in GB (10^9 bytes) must be a positive, finite number."""
    if value is not None and not 0 < value < float("inf"):
        raise ConfigError(f"max_store_gb must be a positive number of GB, not {value}")
    return value


def _key_file(data_dir: DataDir) -> Path:
    return data_dir.root / "mesh.key"


def _save_key(data_dir: DataDir, key: MeshKey) -> None:
    path = _key_file(data_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(f"{key}\n")
    tmp.replace(path)


def resolve_mesh_key(data_dir: DataDir, given: str | None, configured: str | None) -> MeshKey:
    """The key from the flag (remembered), else config.toml, else mesh.key, else a new one."""
    try:
        if given:
            key = MeshKey.parse(given)
            _save_key(data_dir, key)
            return key
        if configured:
            return MeshKey.parse(configured)
        if _key_file(data_dir).exists():
            return MeshKey.parse(_key_file(data_dir).read_text())
    except MeshKeyError as exc:
        raise ConfigError(f"mesh key: {exc}") from exc
    key = MeshKey.generate()
    _save_key(data_dir, key)
    return key
