"""The owner's policy as a rule (battery, temperature, hours), and the duty cycle that
caps a node's share of the CPU under load (on trio's virtual clock)."""

from datetime import time

import pytest
import trio
import trio.testing
from salala.node._policy import DutyCycle
from salala.runtime import BatteryState, Policy, PolicyError, parse_quiet_hours, refusal

NOON = time(12, 0)
CHARGING = BatteryState(50.0, True, 30.0)
ON_BATTERY = BatteryState(50.0, False, 30.0)


def test_a_policy_with_no_settings_never_holds_the_device_back() -> None:
    for battery in (None, CHARGING, ON_BATTERY, BatteryState(1.0, False, 60.0)):
        assert refusal(Policy(), battery, NOON) is None


def test_only_while_charging() -> None:
    policy = Policy(only_while_charging=True)
    assert refusal(policy, CHARGING, NOON) is None
    assert refusal(policy, ON_BATTERY, NOON) == "on battery: the owner lends it only while charging"
    assert refusal(policy, None, NOON) is None  # a desktop has no battery


def test_a_minimum_battery_holds_unless_charging() -> None:
    policy = Policy(min_battery_percent=60)
    assert refusal(policy, ON_BATTERY, NOON) == "battery below the owner's 60%"
    assert refusal(policy, CHARGING, NOON) is None
    assert refusal(Policy(min_battery_percent=50), ON_BATTERY, NOON) is None


def test_a_hot_battery_holds_even_while_charging() -> None:
    policy = Policy(max_battery_temperature=29.5)
    assert refusal(policy, CHARGING, NOON) == "battery hotter than the owner's 29.5 °C"
    assert refusal(Policy(max_battery_temperature=30), CHARGING, NOON) is None
    assert refusal(policy, BatteryState(50.0, True, None), NOON) is None  # no thermal signal


@pytest.mark.parametrize(
    ("hours", "inside", "outside"),
    [
        ("22:00-07:00", [time(22, 0), time(23, 59), time(0, 0), time(6, 59)], [time(7, 0), NOON]),
        ("9:30-17:00", [time(9, 30), NOON, time(16, 59)], [time(9, 29), time(17, 0)]),
    ],
)
def test_quiet_hours_hold_inside_and_wrap_midnight(
    hours: str, inside: list[time], outside: list[time]
) -> None:
    policy = Policy(quiet_hours=parse_quiet_hours(hours))
    for now in inside:
        assert refusal(policy, CHARGING, now) is not None, now
        assert refusal(policy, None, now) is not None, now  # battery or not
    for now in outside:
        assert refusal(policy, CHARGING, now) is None, now


@pytest.mark.parametrize("text", ["22:00", "25:00-07:00", "22:00-07:60", "7-8", "10:00-10:00"])
def test_quiet_hours_that_mean_nothing_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_quiet_hours(text)


def test_the_cpu_cap_sets_threads_and_the_duty_cycle_makes_up_the_rest() -> None:
    assert Policy().threads(8) is None and Policy().duty_cycle(8, 8) == 1.0
    half = Policy(max_cpu_percent=50)
    assert half.threads(8) == 4 and half.duty_cycle(8, 4) == 1.0  # 4 of 8 cores: enough
    tenth = Policy(max_cpu_percent=10)
    assert tenth.threads(4) == 1  # never zero threads...
    assert tenth.duty_cycle(4, 1) == pytest.approx(0.4)  # ...so 1 thread computes 40 %
    assert half.duty_cycle(2, 2) == 0.5  # --threads 2 given on 2 cores: half the time
    assert half.threads(None) is None  # cores unknown: onnxruntime's default


async def test_under_a_half_share_the_duty_cycle_rests_as_long_as_each_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Runs of 2 s, 1 s and 1 s queued at once start at 0, 4 (2 s run, 2 s rest) and 6."""
    duty = DutyCycle(0.5)
    starts: list[float] = []

    async def run(name: str, seconds: float) -> None:
        await duty.acquire_on_behalf_of(name)
        starts.append(trio.current_time())
        await trio.sleep(seconds)
        duty.release_on_behalf_of(name)

    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, seconds in enumerate((2.0, 1.0, 1.0)):
            nursery.start_soon(run, f"run{i}", seconds)
            await trio.sleep(0)  # queue them in order
    assert [round(t - begin, 6) for t in starts] == [0.0, 4.0, 6.0]


async def test_a_run_cancelled_while_resting_frees_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    duty = DutyCycle(0.5)
    await duty.acquire_on_behalf_of("first")
    await trio.sleep(1.0)
    duty.release_on_behalf_of("first")  # rests until 2 s after the start
    with trio.move_on_after(0.5):
        await duty.acquire_on_behalf_of("impatient")
    begin = trio.current_time()
    await duty.acquire_on_behalf_of("next")  # not blocked by the cancelled one
    assert trio.current_time() - begin == pytest.approx(0.5)


def test_a_members_reason_is_shown_as_text_never_as_markup_or_terminal_codes() -> None:
    """The reason comes from another member's advert: `mesh peers` must print it, not
    crash on it (rich markup) or pass it to the terminal (escape sequences)."""
    from rich.console import Console
    from salala.mesh.membership._adverts import unknown_capacity
    from salala.node._cli import _peers_table

    hostile = "[/][/] \x1b]0;owned\x07 [red]x"
    capacity = {**unknown_capacity(), "available": False, "unavailable_reason": hostile}
    row = {
        "short_id": "abc",
        "self": False,
        "compatible": True,
        "protocol": 4,
        "name": "phone",
        "addrs": [],
        "capacity": capacity,
        "rtt_ms": None,
        "link": None,
        "last_seen_s": 1.0,
    }
    console = Console(record=True, width=400, color_system=None)
    console.print(_peers_table([row]))
    shown = console.export_text()
    assert "no: [/][/] ?]0;owned? [red]x" in shown
    assert "\x1b" not in shown and "\x07" not in shown
