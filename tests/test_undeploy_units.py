"""Undeploy markers: the merge every node runs, without a network."""

from pathlib import Path

from salala.mesh.inference._clock import MAX_JUMP, DeploymentClock
from salala.mesh.inference._undeployed import MAX_MARKERS, Undeployed


def test_a_marker_covers_deployments_up_to_its_time_and_no_later() -> None:
    table = Undeployed()
    assert table.add("m", 5)
    assert table.covers("m", 5) and table.covers("m", 1)
    assert not table.covers("m", 6) and not table.covers("other", 1)


def test_merging_is_order_free_and_idempotent() -> None:
    markers = [{"model": "a", "upto": 3}, {"model": "a", "upto": 7}, {"model": "b", "upto": 2}]
    one, two = Undeployed(), Undeployed()
    one.learn(markers, DeploymentClock())
    two.learn(list(reversed(markers)) * 2, DeploymentClock())
    assert (
        one.markers()
        == two.markers()
        == [
            {"model": "a", "upto": 7},
            {"model": "b", "upto": 2},
        ]
    )
    changes = one.changes
    one.learn(markers, DeploymentClock())
    assert one.changes == changes  # nothing new: nothing to save or re-advertise


def test_learning_a_marker_moves_the_clock_past_it() -> None:
    clock = DeploymentClock()
    Undeployed().learn([{"model": "m", "upto": 41}], clock)
    assert clock.tick() == 42  # so a redeploy after the undeploy is not covered by it


def test_a_marker_implausibly_far_ahead_is_ignored() -> None:
    clock, table = DeploymentClock(), Undeployed()
    table.learn([{"model": "m", "upto": MAX_JUMP + 1}], clock)
    assert table.markers() == [] and clock.value == 0


def test_the_table_is_bounded_and_drops_the_oldest_marker() -> None:
    table = Undeployed()
    for i in range(MAX_MARKERS + 1):
        table.add(f"m{i}", i + 1)
    assert len(table.markers()) == MAX_MARKERS
    assert not table.covers("m0", 1) and table.covers(f"m{MAX_MARKERS}", MAX_MARKERS + 1)


def test_markers_survive_a_restart_and_a_bad_file_means_none(tmp_path: Path) -> None:
    path = tmp_path / "undeployed.json"
    table = Undeployed()
    table.add("m", 9)
    table.save(path)
    assert Undeployed.load(path).markers() == [{"model": "m", "upto": 9}]
    path.write_text("[not, json")
    assert Undeployed.load(path).markers() == []
    path.write_text('{"m": true, "n": 3.5, "o": 4}')
    assert Undeployed.load(path).markers() == [{"model": "o", "upto": 4}]
    assert Undeployed.load(tmp_path / "missing.json").markers() == []
