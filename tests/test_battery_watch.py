"""The node reads the battery off its event loop: a stuck reading costs nothing."""

import threading
import time

import pytest
import trio
from salala import runtime
from salala.node._battery import BatteryUnreadable, BatteryWatch
from salala.node._policy import PolicyWatch


class _FirstReadingHangs:
    """Like termux-battery-status when Android's battery service is slow: the first
    reading hangs until released; later ones answer."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def read(self) -> runtime.BatteryState | None:
        self.calls += 1
        if self.calls == 1:
            self.release.wait(60)
        return runtime.BatteryState(42.0, False)


async def test_a_stuck_battery_reading_is_abandoned_and_the_next_one_taken() -> None:
    source = _FirstReadingHangs()
    watch = BatteryWatch(source, refresh_s=0.05, timeout_s=0.2)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(watch.run)  # ready once the first reading timed out
            with pytest.raises(BatteryUnreadable, match=r"no reading within 0\.2 s"):
                watch.read()  # unknown, and said so without waiting
            with trio.fail_after(10):
                while True:
                    try:
                        if watch.read() is not None:
                            break
                    except BatteryUnreadable:
                        await trio.sleep(0.02)
            assert watch.read() == runtime.BatteryState(42.0, False)
            nursery.cancel_scope.cancel()
    finally:
        source.release.set()


class _Broken:
    def read(self) -> runtime.BatteryState | None:
        raise OSError("no battery service")


async def test_a_battery_that_fails_is_unreadable_and_the_policy_holds_back() -> None:
    watch = BatteryWatch(_Broken(), refresh_s=0.05, timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(watch.run)
        with pytest.raises(BatteryUnreadable, match="no battery service"):
            watch.read()
        # Battery rules fail closed; a policy without them does not care.
        charging_only = PolicyWatch(runtime.Policy(only_while_charging=True), watch)
        assert charging_only.reason() == "battery unreadable (no battery service)"
        assert PolicyWatch(runtime.Policy(), watch).reason() is None
        nursery.cancel_scope.cancel()


class _ThenSlowAndFailing:
    """Answers once, then every reading takes a while and fails."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self) -> runtime.BatteryState | None:
        self.calls += 1
        if self.calls > 1:
            time.sleep(0.1)
            raise OSError("battery service busy")
        return runtime.BatteryState(30.0, False)


async def test_the_last_reading_holds_while_readings_run_or_fail_for_a_while() -> None:
    """No flapping: a policy on an unplugged phone must not see "unknown" (and so take
    work) every time a slow reading is under way."""
    source = _ThenSlowAndFailing()
    watch = BatteryWatch(source, refresh_s=0.01, timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(watch.run)
        seen = set()
        while source.calls < 6:
            seen.add(watch.read())
            await trio.sleep(0.005)
        assert seen == {runtime.BatteryState(30.0, False)}
        nursery.cancel_scope.cancel()
