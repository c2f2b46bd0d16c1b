"""The owner's policy: when this device lends compute, and how much.

A phone's owner wants it to help only while it charges, never below some battery level
or above some temperature, and never at night; a laptop's owner may cap the share of its
cores. This module is the pure rule; the node reads the battery and the clock, asks
:func:`refusal` every time either changes, and advertises the answer.
"""

import math
import re
from dataclasses import dataclass
from datetime import time

from ._battery import BatteryState

_CLOCK = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])$")


class PolicyError(ValueError):
    """A policy setting that cannot mean anything (a minimum battery of 140%)."""


def parse_quiet_hours(text: str) -> tuple[time, time]:
    """``"22:00-07:00"``: local start and end; an end before the start wraps midnight."""
    parts = text.split("-")
    matches = [_CLOCK.match(p.strip()) for p in parts]
    if len(parts) != 2 or not all(matches):
        raise PolicyError(f"quiet hours must look like 22:00-07:00, not {text!r}")
    start, end = (time(int(m[1]), int(m[2])) for m in matches if m)
    if start == end:
        raise PolicyError(f"quiet hours {text!r} start and end at the same minute")
    return start, end


@dataclass(frozen=True)
class Policy:
    only_while_charging: bool = False
    min_battery_percent: float | None = None  # not below this, unless charging
    max_battery_temperature: float | None = None  # degrees Celsius
    quiet_hours: tuple[time, time] | None = None  # local time
    max_cpu_percent: float | None = None  # of the cores: threads, and a duty cycle
    max_memory_mb: int | None = None  # what stages and caches may hold

    def __post_init__(self) -> None:
        if self.min_battery_percent is not None and not 0 <= self.min_battery_percent <= 100:
            raise PolicyError(f"min battery must be 0-100%, not {self.min_battery_percent}")
        if self.max_cpu_percent is not None and not 0 < self.max_cpu_percent <= 100:
            raise PolicyError(
                f"max CPU must be above 0% and at most 100%, not {self.max_cpu_percent}"
            )
        if self.max_battery_temperature is not None and not 0 < self.max_battery_temperature < 100:
            raise PolicyError(
                f"max battery temperature must be 0-100 °C, not {self.max_battery_temperature}"
            )
        if self.max_memory_mb is not None and self.max_memory_mb < 1:
            raise PolicyError(f"max memory must be at least 1 MB, not {self.max_memory_mb}")

    def threads(self, cores: int | None) -> int | None:
        """Threads per session under the CPU cap (None: no cap, onnxruntime's default)."""
        if self.max_cpu_percent is None or cores is None:
            return None
        return max(1, math.floor(cores * self.max_cpu_percent / 100))

    def duty_cycle(self, cores: int | None, threads: int | None) -> float:
        """The share of wall time the node may compute while work queues (1: always),
        so that ``threads`` busy threads use the CPU share of ``cores``."""
        if self.max_cpu_percent is None:
            return 1.0
        if cores is None or threads is None:
            return self.max_cpu_percent / 100
        return min(1.0, cores * self.max_cpu_percent / 100 / threads)

    @property
    def watches_battery(self) -> bool:
        """Whether a rule reads the battery."""
        return (
            self.only_while_charging
            or self.min_battery_percent is not None
            or self.max_battery_temperature is not None
        )


def _quiet(hours: tuple[time, time], now: time) -> bool:
    start, end = hours
    return start <= now < end if start < end else now >= start or now < end


def refusal(policy: Policy, battery: BatteryState | None, now: time) -> str | None:
    """Why the policy keeps the device from new work now, or None when it may work.

    The reason names the rule, not the reading (the reading is advertised beside it),
    so it changes only when the verdict does. No battery (a desktop) holds nothing back.
    """
    if policy.quiet_hours is not None and _quiet(policy.quiet_hours, now):
        start, end = policy.quiet_hours
        return f"quiet hours ({start:%H:%M}-{end:%H:%M})"
    if battery is None:
        return None
    if policy.only_while_charging and not battery.charging:
        return "on battery: the owner lends it only while charging"
    minimum = policy.min_battery_percent
    if minimum is not None and not battery.charging and battery.percent < minimum:
        return f"battery below the owner's {minimum:g}%"
    hottest = policy.max_battery_temperature
    if hottest is not None and battery.temperature is not None and battery.temperature > hottest:
        return f"battery hotter than the owner's {hottest:g} °C"
    return None
