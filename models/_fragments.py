"""Splitting a stored model and keeping its fragments in the store.

Each fragment is itself a content-addressed object, so peers can later fetch it by hash
and check it. The split plan is cached as JSON next to the objects; splitting the same
model into the same number of parts again costs nothing.
"""

import json
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from ._cuts import Cut, CutAnalysis
from ._onnx import require_onnx
from ._store import MODEL_FILE, ModelStore, StoredModel
from ._validate import side_files


@dataclass(frozen=True)
class Fragment:
    index: int
    sha256: str
    path: str
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    flops: int


@dataclass(frozen=True)
class SplitPlan:
    model: str
    sha256: str
    parts: int
    fragments: list[Fragment]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _load_plan(plan_file: Path, model: StoredModel) -> SplitPlan | None:
    try:
        cached = json.loads(plan_file.read_text())
        fragments = [Fragment(**f) for f in cached["fragments"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no usable cache: split again
    if not all(Path(f.path).is_file() for f in fragments):
        return None
    return SplitPlan(model.name, model.sha256, len(fragments), fragments)


def _store_plan(
    store: ModelStore, model: StoredModel, plan_file: Path, analysis: CutAnalysis, cuts: list[Cut]
) -> SplitPlan:
    # A model that keeps its weights beside the graph gets fragments that do too: a
    # fragment's graph stays small to parse, and none meets protobuf's 2 GB limit.
    onnx = require_onnx("splitting a model")
    from ._split import extract_fragments

    graphs = extract_fragments(analysis, cuts)
    external = store.object_size(model.sha256) > model.path.stat().st_size
    fragments = []
    with (
        tempfile.TemporaryDirectory(prefix=".split-", dir=store.root) as tmp,
        ExitStack() as pins,  # under a quota, a fragment must not evict its siblings
    ):
        for graph in graphs:
            folder = Path(tmp) / str(graph.index)
            folder.mkdir()
            file = folder / MODEL_FILE
            onnx.save(
                graph.model,
                str(file),
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                location=f"{MODEL_FILE}.data",
            )
            # A language model's card and tokenizer go with every fragment: any host
            # can then tell a requester how to talk to the model.
            for side in side_files(model.path, []):
                shutil.copyfile(side, folder / side.name)
            sha256, _ = store.add_object(file)
            pins.enter_context(store.pinned([sha256]))
            fragments.append(
                Fragment(
                    index=graph.index,
                    sha256=sha256,
                    path=str(store.object_path(sha256)),
                    inputs=list(graph.inputs),
                    outputs=list(graph.outputs),
                    weight_bytes=graph.weight_bytes,
                    flops=graph.flops,
                )
            )
    plan = SplitPlan(model.name, model.sha256, len(fragments), fragments)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = plan_file.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(plan.to_dict(), indent=1))
    tmp_file.replace(plan_file)
    return plan


def split_stored(store: ModelStore, model: StoredModel, parts: int) -> SplitPlan:
    """Split ``model`` into ``parts`` balanced fragments stored as objects (cached)."""
    plan_file = store.root / "splits" / f"{model.sha256}-{parts}.json"
    cached = _load_plan(plan_file, model)
    if cached is not None:
        return cached
    analysis = analyze_stored(model)
    from ._split import balanced_cuts

    return _store_plan(store, model, plan_file, analysis, balanced_cuts(analysis, parts))


def analyze_stored(model: StoredModel) -> CutAnalysis:
    """Where ``model`` can be cut and what each stretch costs (needs the onnx extra)."""
    onnx = require_onnx(f"planning how to split {model.name!r}")
    from ._split import analyze

    return analyze(onnx.load(str(model.path)))


def split_stored_at(
    store: ModelStore, model: StoredModel, analysis: CutAnalysis, cuts: list[Cut]
) -> SplitPlan:
    """Split ``model`` at chosen cuts (from a placement plan), stored as objects (cached)."""
    key = "-".join(str(c.position) for c in cuts) or "whole"
    plan_file = store.root / "splits" / f"{model.sha256}-at-{key}.json"
    cached = _load_plan(plan_file, model)
    if cached is not None:
        return cached
    return _store_plan(store, model, plan_file, analysis, cuts)


def held_fragments(store: ModelStore) -> list[str]:
    """Hashes of every fragment this store holds, for the node's capacity advert."""
    held: set[str] = set()
    for plan_file in (store.root / "splits").glob("*.json"):
        try:
            fragments = json.loads(plan_file.read_text())["fragments"]
            held.update(f["sha256"] for f in fragments if Path(f["path"]).is_file())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a plan being rewritten; the next advert will include it
    return sorted(held)
