"""The owner's policy, followed live.

The verdict (see ``runtime.refusal``) is re-taken every second from the battery watch's
last reading and the local clock. When it changes, the node re-advertises at once: the
planner and requesters stop sending it work, and its stage server refuses new frames
itself, so unplugging a phone moves its work elsewhere within seconds.
"""

import logging
from collections.abc import Callable
from datetime import datetime
from typing import cast

import trio

from .. import runtime

log = logging.getLogger(__name__)

CHECK_S = 1.0


class PolicyWatch:
    def __init__(self, policy: runtime.Policy, battery: runtime.BatterySource) -> None:
        self.policy = policy
        self._battery = battery

    def reason(self) -> str | None:
        """Why the policy holds the node back now (None: it may work). Cheap: the battery
        reading is the watch's last one."""
        return runtime.refusal(self.policy, self._battery.read(), datetime.now().time())

    async def run(self, on_change: Callable[[], None]) -> None:
        """Re-take the verdict forever; call ``on_change`` (re-advertise) when it flips."""
        last = self.reason()
        while True:
            await trio.sleep(CHECK_S)
            reason = self.reason()
            if reason != last:
                log.info("owner's policy: %s", f"no new work ({reason})" if reason else "working")
                last = reason
                on_change()


def compute_limiter(share: float) -> trio.CapacityLimiter:
    """One model run at a time (each uses every thread it has); under a CPU cap, also a
    rest after each run so that under load the node computes ``share`` of the time."""
    if share >= 1:
        return trio.CapacityLimiter(1)
    # trio takes any object with these two methods as a thread limiter (its documented
    # protocol); its type hints name only CapacityLimiter.
    return cast(trio.CapacityLimiter, DutyCycle(share))


class DutyCycle:
    """A one-at-a-time limiter that rests ``busy * (1 / share - 1)`` after each run."""

    def __init__(self, share: float) -> None:
        self._share = share
        self._limiter = trio.CapacityLimiter(1)
        self._ready_at = 0.0
        self._started: dict[object, float] = {}

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._limiter.acquire_on_behalf_of(borrower)
        try:
            await trio.sleep_until(self._ready_at)
        except BaseException:
            self._limiter.release_on_behalf_of(borrower)
            raise
        self._started[borrower] = trio.current_time()

    def release_on_behalf_of(self, borrower: object) -> None:
        busy = trio.current_time() - self._started.pop(borrower)
        self._ready_at = trio.current_time() + busy * (1 / self._share - 1)
        self._limiter.release_on_behalf_of(borrower)
