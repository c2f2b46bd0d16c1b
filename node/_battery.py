"""The battery, read off the event loop (see ``_slow_reading``), and the owner's rules'
view of it: no battery is no battery, but one that cannot be read for a while is said so.
"""

from typing import Any

import trio

from .. import runtime
from ._slow_reading import SlowReading

REFRESH_S = 3.0  # the owner's policy (charging, battery level) acts within 5 s
TIMEOUT_S = 5.0
STALE_S = 30.0  # a reading outlives failed ones this long, then the battery is unknown


class BatteryUnreadable(Exception):
    """The battery could not be read lately (no termux-api, a hung service, bad JSON)."""


class BatteryWatch:
    """A ``runtime.BatterySource`` whose ``read`` returns the last reading taken off
    the event loop: None when the device has no battery, and BatteryUnreadable when
    readings have failed for STALE_S."""

    def __init__(
        self,
        source: runtime.BatterySource | None = None,
        refresh_s: float = REFRESH_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        source = source or runtime.default_battery_source()
        self.reading = SlowReading(source.read, refresh_s, timeout_s)

    def read(self) -> runtime.BatteryState | None:
        reading = self.reading
        if reading.error is not None and trio.current_time() - reading.read_at >= STALE_S:
            raise BatteryUnreadable(reading.error)
        return reading.value

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.reading.run(task_status=task_status)
