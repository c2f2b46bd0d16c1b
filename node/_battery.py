"""The battery, read off the event loop.

On a phone the reading is a subprocess (``termux-battery-status`` asks an Android
service, and can take seconds), and capacity is probed every 2 s for the advert. So a
task refreshes the reading in a worker thread, within a timeout, and everyone else reads
the last value, which never blocks.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import runtime

REFRESH_S = 3.0  # the owner's policy (charging, battery level) acts within 5 s
TIMEOUT_S = 5.0


STALE_S = 30.0  # a reading outlives failed ones this long, then the battery is unknown


class BatteryUnreadable(Exception):
    """The battery could not be read lately (no termux-api, a hung service, bad JSON)."""


class BatteryWatch:
    """A ``runtime.BatterySource`` whose ``read`` returns the last reading taken off
    the event loop: None when the device has no battery, and BatteryUnreadable when
    readings have failed for STALE_S (a reading in progress never hides the last one)."""

    def __init__(
        self,
        source: runtime.BatterySource | None = None,
        refresh_s: float = REFRESH_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._source = source or runtime.default_battery_source()
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._state: runtime.BatteryState | None = None
        self._error: str | None = "not read yet"
        self._read_at = -STALE_S

    def read(self) -> runtime.BatteryState | None:
        if self._error is not None and trio.current_time() - self._read_at >= STALE_S:
            raise BatteryUnreadable(self._error)
        return self._state

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh forever; ready once the first reading arrived or timed out."""
        while True:
            state: runtime.BatteryState | None = None
            error: str | None = f"no reading within {self._timeout_s:g} s"
            with trio.move_on_after(self._timeout_s):  # a stuck reading is abandoned
                state, error = await trio.to_thread.run_sync(
                    self._read_safely,
                    abandon_on_cancel=True,  # type: ignore[call-arg]  # stale trio-stubs
                )
            self._error = error
            if error is None:
                self._state, self._read_at = state, trio.current_time()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(self._refresh_s)

    def _read_safely(self) -> tuple[runtime.BatteryState | None, str | None]:
        try:
            return self._source.read(), None
        except Exception as exc:  # no battery service, bad JSON, a timeout
            return None, str(exc) or type(exc).__name__


@asynccontextmanager
async def watching(watch: BatteryWatch) -> AsyncIterator[BatteryWatch]:
    """Run ``watch`` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        try:
            yield watch
        finally:
            nursery.cancel_scope.cancel()
