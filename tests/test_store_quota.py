"""The store's quota: which objects make room (pure), and the store keeping to it."""

import json
from pathlib import Path

import pytest
from models_for_tests import linear_model, mlp_model
from salala.models import ModelStore, StoreFullError, plan_eviction, split_stored

MB = 10**6


# ---- the pure decision --------------------------------------------------------------


def test_nothing_is_evicted_while_the_object_fits() -> None:
    objects = {"a": (5 * MB, 1.0)}
    assert plan_eviction(objects, set(), 10 * MB, 5 * MB, 5 * MB) == []


def test_unprotected_objects_go_oldest_first_and_only_as_many_as_needed() -> None:
    objects = {"new": (3 * MB, 3.0), "old": (3 * MB, 1.0), "mid": (3 * MB, 2.0)}
    # 9 MB used of 10: 4 MB wanted needs 3 MB more, which the oldest frees
    assert plan_eviction(objects, set(), 10 * MB, 9 * MB, 4 * MB) == ["old"]
    assert plan_eviction(objects, set(), 10 * MB, 9 * MB, 7 * MB) == ["old", "mid"]


def test_protected_objects_are_never_chosen() -> None:
    objects = {"used": (3 * MB, 1.0), "free": (3 * MB, 2.0)}
    assert plan_eviction(objects, {"used"}, 10 * MB, 9 * MB, 4 * MB) == ["free"]


def test_when_eviction_cannot_make_room_nothing_is_evicted_and_the_error_says_why() -> None:
    objects = {"used": (6 * MB, 1.0), "free": (1 * MB, 2.0)}
    with pytest.raises(StoreFullError) as caught:
        plan_eviction(objects, {"used"}, 10 * MB, 8 * MB, 4 * MB, "fragment abc")
    error = caught.value
    assert (error.quota, error.wanted, error.free) == (10 * MB, 4 * MB, 2 * MB)
    message = str(error)
    for part in ("10.00 MB", "--max-store-gb", "fragment abc needs 4.00 MB", "2.00 MB is free"):
        assert part in message
    assert "hold only 1.00 MB" in message


def test_an_object_larger_than_the_whole_quota_is_refused() -> None:
    with pytest.raises(StoreFullError, match=r"needs 11\.00 MB"):
        plan_eviction({}, set(), 10 * MB, 0, 11 * MB)


# ---- the store keeping to it --------------------------------------------------------


def mlp(tmp_path: Path, seed: int) -> Path:
    """About 2.1 MB: two 1 MiB layers."""
    return mlp_model(tmp_path / f"mlp-{seed}" / "model.onnx", layers=2, width=512, seed=seed)


def test_an_import_that_does_not_fit_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", max_bytes=3 * MB)
    store.add(mlp(tmp_path, 1), "first")
    with pytest.raises(StoreFullError, match=r"3\.00 MB"):
        store.add(mlp(tmp_path, 2), "second")
    assert [m.name for m in store.list()] == ["first"]  # a named model is never evicted
    assert len(store.objects()) == 1 and store.used_bytes() <= 3 * MB


def test_unused_objects_are_evicted_to_make_room(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", max_bytes=5 * MB)
    old, _ = store.add_object(mlp(tmp_path, 1))
    kept, _ = store.add_object(mlp(tmp_path, 2))
    store.in_use = lambda: {kept}
    newest = store.add(mlp(tmp_path, 3), "newest")
    assert set(store.objects()) == {kept, newest.sha256}
    assert old not in store.objects() and store.used_bytes() <= 5 * MB


def test_pinned_objects_and_reserved_writes_are_kept(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", max_bytes=5 * MB)
    pinned, _ = store.add_object(mlp(tmp_path, 1))
    with store.pinned([pinned]):
        reservation = store.reserve(2 * MB, "a fetch")
        with pytest.raises(StoreFullError, match="a second fetch needs"):
            store.reserve(2 * MB, "a second fetch")  # 2.1 stored + 2 promised + 2 > 5
        store.release(reservation)
        store.reserve(2 * MB, "a second fetch")
    assert pinned in store.objects()


def test_a_moved_import_takes_the_files_and_counts_on_the_fetch_reservation(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "store", max_bytes=3 * MB)
    source = mlp(tmp_path, 1)
    size = source.stat().st_size
    with store.room(size, "a fetch"):
        _, stored = store.add_object(source, move=True)
    assert stored == size and not source.exists() and store.used_bytes() == size


def test_splitting_under_a_tight_quota_never_evicts_a_sibling_fragment(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "big" / "model.onnx", layers=4, width=512, seed=7)
    store = ModelStore(tmp_path / "store", max_bytes=7 * MB)
    stored = store.add(model, "big")  # 4.2 MB, named
    # Two 2.1 MB fragments need 4.2 MB; only 2.8 MB is free. Without pins the second
    # fragment would evict the first (unused, unnamed) and the plan would point at nothing.
    with pytest.raises(StoreFullError, match=r"needs 2\.10 MB"):
        split_stored(store, stored, 2)
    assert not list((store.root / "splits").glob("*.json"))


def test_gc_removes_what_nothing_uses_and_the_plans_that_pointed_at_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    model = mlp_model(tmp_path / "m" / "model.onnx", layers=4, width=64, seed=1)
    stored = store.add(model, "m")
    plan = split_stored(store, stored, 2)
    used = plan.fragments[0].sha256
    unused = plan.fragments[1].sha256
    (store.root / "incoming").mkdir()
    (store.root / "incoming" / f"{'ab' * 32}.part").write_bytes(b"x" * 100)
    store.in_use = lambda: {used}
    result = store.collect_garbage()
    assert [r["sha256"] for r in result["removed"]] == [unused]
    assert result["freed"] == result["removed"][0]["size"] + 100
    assert set(store.objects()) == {stored.sha256, used}
    assert result["plans"] and not list((store.root / "splits").glob("*.json"))
    assert not list((store.root / "incoming").iterdir())
    assert store.get("m") == stored
    again = store.collect_garbage()
    assert again["removed"] == [] and again["freed"] == 0 and again["kept"] == 2


def test_gc_keeps_a_partial_download_that_a_fetch_is_resuming(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    sha = "cd" * 32
    (store.root / "incoming").mkdir()
    part = store.root / "incoming" / f"{sha}.part"
    part.write_bytes(b"x" * 10)
    with store.room(100, "a fetch", sha):
        assert store.collect_garbage()["freed"] == 0
    assert part.exists()


def test_plans_of_models_still_stored_survive_gc_when_their_fragments_are_used(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "store")
    stored = store.add(linear_model(tmp_path / "lin" / "model.onnx"), "lin")
    store.in_use = lambda: set()
    plan_file = store.root / "splits" / "bogus.json"
    plan_file.parent.mkdir()
    plan_file.write_text(json.dumps({"sha256": stored.sha256, "fragments": []}))
    store.collect_garbage()
    assert plan_file.exists()  # it points at nothing that was removed


def test_partial_downloads_count_and_stale_ones_go_first_when_room_is_short(
    tmp_path: Path,
) -> None:
    """A peer that stops every transfer just short of its end leaves .part files; they
    count against the quota, and when room is short those no fetch resumes are dropped."""
    store = ModelStore(tmp_path, max_bytes=10_000)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    stale, resumed = incoming / f"{'aa' * 32}.part", incoming / f"{'bb' * 32}.part"
    stale.write_bytes(b"x" * 6000)
    resumed.write_bytes(b"y" * 1000)
    assert store.used_bytes() == 7000
    store.release(store.reserve(2000, "a small fetch", "cc" * 32))  # room enough: kept
    assert stale.exists()
    store.reserve(8000, "fragment bb", "bb" * 32)  # short of room: the stale part goes
    assert not stale.exists() and resumed.exists()
