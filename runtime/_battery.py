"""Reading a device's battery, behind one small interface.

Laptops answer through psutil; Android phones under Termux do not (psutil's
``sensors_battery()`` is None there) but ship the ``termux-battery-status`` command.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

import psutil


@dataclass(frozen=True)
class BatteryState:
    percent: float
    charging: bool


class BatterySource(Protocol):
    def read(self) -> BatteryState | None:
        """The battery now, or None when the device has none or it cannot be read."""


class PsutilBattery:
    def read(self) -> BatteryState | None:
        battery = psutil.sensors_battery()
        if battery is None:
            return None
        return BatteryState(float(battery.percent), bool(battery.power_plugged))


class TermuxBattery:
    """``termux-battery-status`` prints JSON such as {"percentage": 81, "plugged": "UNPLUGGED"}."""

    TIMEOUT_S = 5.0

    def read(self) -> BatteryState | None:
        command = shutil.which("termux-battery-status")
        if command is None:
            return None
        done = subprocess.run(
            [command], capture_output=True, timeout=self.TIMEOUT_S, check=True, text=True
        )
        data = json.loads(done.stdout)
        plugged = str(data.get("plugged", "UNPLUGGED")).upper()
        return BatteryState(float(data["percentage"]), plugged != "UNPLUGGED")


def default_battery_source() -> BatterySource:
    return TermuxBattery() if sys.platform == "android" else PsutilBattery()
