"""Splitting real models into fragments that, chained, reproduce the whole model."""

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import minilm_inputs, minilm_path, ocr_inputs, ocr_model_path
from salala.models import ModelStore, SplitError, analyze, split_graph, split_stored
from salala.models._split import extract_fragments
from salala.runtime import ModelSession

MODELS: dict[str, tuple[Callable[[], Path], Callable[[], dict[str, np.ndarray]]]] = {
    "minilm": (minilm_path, minilm_inputs),
    "ppocr-rec": (ocr_model_path, ocr_inputs),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("split-store"))
    for name, (path, _) in MODELS.items():
        store.add(path(), name)
    return store


def run_chain(paths: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run fragments in order, each taking what it needs from everything computed so far."""
    values = dict(feeds)
    for path in paths:
        session = ModelSession(path)
        values.update(session.run({spec.name: values[spec.name] for spec in session.inputs}))
    return values


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_chained_fragments_reproduce_the_whole_model(
    store: ModelStore, model: str, parts: int
) -> None:
    stored = store.get(model)
    feeds = MODELS[model][1]()
    whole = ModelSession(stored.path).run(feeds)

    plan = split_stored(store, stored, parts)

    assert len(plan.fragments) == parts
    chained = run_chain([f.path for f in plan.fragments], feeds)
    for name, expected in whole.items():
        assert np.abs(chained[name] - expected).max() <= 1e-5


@pytest.mark.parametrize("model", sorted(MODELS))
def test_each_cut_carries_one_activation_and_forwards_graph_inputs(
    store: ModelStore, model: str
) -> None:
    stored = store.get(model)
    graph_inputs = {i.name for i in onnx.load(str(stored.path)).graph.input}
    plan = split_stored(store, stored, 4)
    for before, after in zip(plan.fragments, plan.fragments[1:], strict=False):
        assert len(before.outputs) == 1
        carried = [name for name in after.inputs if name not in graph_inputs]
        assert carried == before.outputs  # the activation, and nothing else from upstream
    assert plan.fragments[-1].outputs == [o.name for o in onnx.load(str(stored.path)).graph.output]


def test_minilm_fragments_forward_the_attention_mask(store: ModelStore) -> None:
    plan = split_stored(store, store.get("minilm"), 3)
    for fragment in plan.fragments:
        assert "attention_mask" in fragment.inputs


@pytest.mark.parametrize("model", sorted(MODELS))
def test_fragments_balance_estimated_cost(store: ModelStore, model: str) -> None:
    for parts in (2, 3, 4):
        plan = split_stored(store, store.get(model), parts)
        flops = [f.flops for f in plan.fragments]
        # Cuts fall between layers, so perfect balance is impossible; the costliest
        # fragment stays well under what an unbalanced split would give.
        assert max(flops) <= 1.35 * sum(flops) / parts, flops
        assert all(f.weight_bytes > 0 for f in plan.fragments)


def test_fragments_are_content_addressed_objects_in_the_store(store: ModelStore) -> None:
    plan = split_stored(store, store.get("minilm"), 2)
    for fragment in plan.fragments:
        assert Path(fragment.path) == store.object_path(fragment.sha256)
    again = split_stored(store, store.get("minilm"), 2)
    assert again == plan


def test_too_many_parts_is_a_clear_error() -> None:
    model = onnx.load(str(minilm_path()))
    with pytest.raises(SplitError, match="too few for 500 fragments"):
        split_graph(model, 500)
    with pytest.raises(SplitError, match="at least 1"):
        split_graph(model, 0)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_fragment_between_any_two_neighbouring_cuts_has_work(model: str) -> None:
    """The capacity planner may pick any two neighbouring cuts (a very slow peer gets
    the smallest stage), so no pair may enclose an empty graph."""
    analysis = analyze(onnx.load(str(MODELS[model][0]())))
    tensors = [cut.tensors for cut in analysis.cuts]
    assert all(a != b for a, b in pairwise(tensors))
    for fragment in extract_fragments(analysis, analysis.cuts):
        assert fragment.model.graph.node, f"fragment {fragment.index} is empty"
