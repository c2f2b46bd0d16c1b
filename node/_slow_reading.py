"""Readings too slow for the event loop, refreshed in a worker thread.

Capacity is probed every 2 s on the node's event loop for its advert, but some of what
it reads can take seconds: ``termux-battery-status`` asks an Android service, and NVML
initialises a GPU driver. So a task takes each such reading in a worker thread, within a
timeout, and everyone else reads the last value, which never blocks. A reading in
progress never hides the last one.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class SlowReading(Generic[T]):
    """The last value ``reading`` returned, refreshed every ``refresh_s``."""

    def __init__(self, reading: Callable[[], T], refresh_s: float, timeout_s: float) -> None:
        self._reading = reading
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self.value: T | None = None
        self.error: str | None = "not read yet"  # why the latest attempt failed
        self.read_at = float("-inf")  # trio time of the last good reading

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh forever; ready once the first reading arrived, failed or timed out."""
        while True:
            value: T | None = None
            error: str | None = f"no reading within {self._timeout_s:g} s"
            with trio.move_on_after(self._timeout_s):  # a stuck reading is abandoned
                value, error = await trio.to_thread.run_sync(
                    self._read_safely,
                    abandon_on_cancel=True,  # type: ignore[call-arg]  # stale trio-stubs
                )
            self.error = error
            if error is None:
                self.value, self.read_at = value, trio.current_time()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(self._refresh_s)

    def _read_safely(self) -> tuple[T | None, str | None]:
        try:
            return self._reading(), None
        except Exception as exc:  # a missing service, bad output, a driver error
            return None, str(exc) or type(exc).__name__


@asynccontextmanager
async def refreshing(*readings: SlowReading[Any]) -> AsyncIterator[None]:
    """Keep ``readings`` fresh for the duration of the block (each read once first)."""
    async with trio.open_nursery() as nursery:
        for reading in readings:
            await nursery.start(reading.run)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
