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
        reading is the watch's last one. Battery rules and a battery that cannot be read
        hold the node back: the owner asked for them."""
        try:
            battery = self._battery.read()
        except Exception as exc:
            if self.policy.watches_battery:
                return f"battery unreadable ({exc})"[:160]
            battery = None
        return runtime.refusal(self.policy, battery, datetime.now().time())

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


MAX_REST_S = 5.0  # a long run (a warm-up, a split) must not hold frames past their timeout


def compute_limiter(share: float) -> trio.CapacityLimiter:
    """One model run at a time (each uses every thread it has); under a CPU cap, also a
    rest after each run so that under load the node computes ``share`` of the time."""
    if share >= 1:
        return trio.CapacityLimiter(1)
    # trio takes any object with these two methods as a thread limiter (its documented
    # protocol); its type hints name only CapacityLimiter.
    return cast(trio.CapacityLimiter, DutyCycle(share))


class DutyCycle:
    """A one-at-a-time limiter that rests ``busy * (1 / share - 1)`` after each run, at
    most MAX_REST_S."""

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
        self._ready_at = trio.current_time() + min(busy * (1 / self._share - 1), MAX_REST_S)
        self._limiter.release_on_behalf_of(borrower)
