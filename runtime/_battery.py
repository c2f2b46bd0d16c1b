"""Reading a device's battery, behind one small interface.

Laptops answer through psutil; Android phones under Termux do not (psutil's
``sensors_battery()`` is None there) but ship the ``termux-battery-status`` command, whose
JSON also carries the battery's temperature: the only thermal signal Android gives an app
(``/sys/class/thermal`` is usually closed by SELinux). ``SALALA_BATTERY_FILE`` names a
file holding that same JSON instead: a battery for devices and tests that have none.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

import psutil

BATTERY_FILE_ENV = "SALALA_BATTERY_FILE"


@dataclass(frozen=True)
class BatteryState:
    percent: float
    charging: bool
    temperature: float | None = None  # degrees Celsius


def from_termux_json(text: str) -> BatteryState:
    """``{"percentage": 81, "plugged": "UNPLUGGED", "temperature": 31.2, ...}``"""
    data = json.loads(text)
    plugged = str(data.get("plugged", "UNPLUGGED")).upper()
    temperature = data.get("temperature")
    return BatteryState(
        float(data["percentage"]),
        plugged != "UNPLUGGED",
        None if temperature is None else float(temperature),
    )


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
        return from_termux_json(done.stdout)


class FileBattery:
    """A file holding ``termux-battery-status``'s JSON, re-read on every reading."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> BatteryState | None:
        with open(self.path, encoding="utf-8") as file:
            return from_termux_json(file.read())


def default_battery_source() -> BatterySource:
    if os.environ.get(BATTERY_FILE_ENV):
        return FileBattery(os.environ[BATTERY_FILE_ENV])
    return TermuxBattery() if sys.platform == "android" else PsutilBattery()
