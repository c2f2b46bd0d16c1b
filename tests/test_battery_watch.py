"""The node reads the battery off its event loop: a stuck reading costs nothing."""

import threading

import trio
from salala import runtime
from salala.node._battery import BatteryWatch


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
            assert watch.read() is None  # unknown, and read without waiting
            with trio.fail_after(10):
                while watch.read() is None:
                    await trio.sleep(0.02)
            assert watch.read() == runtime.BatteryState(42.0, False)
            nursery.cancel_scope.cancel()
    finally:
        source.release.set()


async def test_a_battery_that_fails_is_unknown() -> None:
    class Broken:
        def read(self) -> runtime.BatteryState | None:
            raise OSError("no battery service")

    watch = BatteryWatch(Broken(), refresh_s=0.05, timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(watch.run)
        assert watch.read() is None
        nursery.cancel_scope.cancel()
