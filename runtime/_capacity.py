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

from ._accelerators import Accelerator
from ._battery import BatterySource, BatteryState, default_battery_source
from ._providers import Hardware, probe_hardware
from ._throughput import Throughput

T = TypeVar("T")
MAX_ACCELERATORS = 16  # what an advert admits


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
    battery_temperature: float | None  # degrees Celsius: a phone's only thermal signal
    providers: tuple[str, ...]
    gflops: float | None
    gflops_measured_at: float | None
    # Devices the providers run on, with their memory: placement puts a stage on a peer
    # whose first provider is an accelerator only if that device's free memory holds it.
    accelerators: tuple[Accelerator, ...]
    # Whether the owner's policy lets the device take work now, and why not; the node
    # fills these in from its policy (see runtime._policy), a bare probe cannot know.
    available: bool = True
    unavailable_reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain lists, dicts, str, int, float, bool and None: an advert's msgpack."""
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["accelerators"] = [a.to_dict() for a in self.accelerators[:MAX_ACCELERATORS]]
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
    throughput: Throughput | None = None,
    battery: BatterySource | None = None,
    hardware: Hardware | None = None,
) -> Capacity:
    """Read the device now. ``throughput`` comes from :func:`cached_throughput`;
    ``battery`` and ``hardware`` may be readings taken earlier (both can be slow)."""
    source = battery or default_battery_source()
    state: BatteryState | None = _read(source.read)
    memory = _read(psutil.virtual_memory)
    hardware = hardware or _read(probe_hardware) or Hardware(("CPUExecutionProvider",), ())
    return Capacity(
        platform=sys.platform,
        logical_cores=_read(lambda: psutil.cpu_count(logical=True)),
        physical_cores=_read(lambda: psutil.cpu_count(logical=False)),
        memory_total=None if memory is None else int(memory.total),
        memory_available=None if memory is None else int(memory.available),
        load_1m=_read(_load_1m),
        battery_percent=None if state is None else state.percent,
        charging=None if state is None else state.charging,
        battery_temperature=None if state is None else state.temperature,
        providers=hardware.providers,
        gflops=None if throughput is None else throughput.gflops,
        gflops_measured_at=None if throughput is None else throughput.measured_at,
        accelerators=hardware.accelerators,
    )
