"""What this device can offer the mesh right now.

Every reading is optional: phones forbid /proc/stat and /proc/loadavg, desktops have no
battery, containers hide physical cores. A reading that fails is reported as unknown
(None); probing never raises.
"""

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import psutil

from ._battery import BatterySource, BatteryState, default_battery_source
from ._providers import available_providers
from ._throughput import Throughput

T = TypeVar("T")


@dataclass(frozen=True)
class Capacity:
    platform: str
    logical_cores: int | None
    physical_cores: int | None
    memory_total: int | None
    memory_available: int | None
    load_1m: float | None
    battery_percent: float | None
    charging: bool | None
    providers: tuple[str, ...]
    gflops: float | None
    gflops_measured_at: float | None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data


def _read(reading: Callable[[], T]) -> T | None:
    try:
        return reading()
    except Exception:  # any platform refusal (PermissionError, OSError, ...) means unknown
        return None


def _load_1m() -> float:
    if hasattr(os, "getloadavg"):
        return os.getloadavg()[0]
    return psutil.getloadavg()[0]


def probe_capacity(
    throughput: Throughput | None = None, battery: BatterySource | None = None
) -> Capacity:
    """Read the device now. ``throughput`` comes from :func:`cached_throughput`."""
    source = battery or default_battery_source()
    state: BatteryState | None = _read(source.read)
    memory = _read(psutil.virtual_memory)
    return Capacity(
        platform=sys.platform,
        logical_cores=_read(lambda: psutil.cpu_count(logical=True)),
        physical_cores=_read(lambda: psutil.cpu_count(logical=False)),
        memory_total=None if memory is None else int(memory.total),
        memory_available=None if memory is None else int(memory.available),
        load_1m=_read(_load_1m),
        battery_percent=None if state is None else state.percent,
        charging=None if state is None else state.charging,
        providers=_read(available_providers) or (),
        gflops=None if throughput is None else throughput.gflops,
        gflops_measured_at=None if throughput is None else throughput.measured_at,
    )
