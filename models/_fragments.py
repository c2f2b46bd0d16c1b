"""Splitting a stored model and keeping its fragments in the store.

Each fragment is itself a content-addressed object, so peers can later fetch it by hash
and check it. The split plan is cached as JSON next to the objects; splitting the same
model into the same number of parts again costs nothing.
"""

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from ._split import split_graph
from ._store import ModelStore, StoredModel


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


def _plan_file(store: ModelStore, sha256: str, parts: int) -> Path:
    return store.root / "splits" / f"{sha256}-{parts}.json"


def split_stored(store: ModelStore, model: StoredModel, parts: int) -> SplitPlan:
    """Split ``model`` into ``parts`` fragments stored as objects (cached by hash)."""
    plan_file = _plan_file(store, model.sha256, parts)
    try:
        cached = json.loads(plan_file.read_text())
        fragments = [Fragment(**f) for f in cached["fragments"]]
        if all(Path(f.path).is_file() for f in fragments):
            return SplitPlan(model.name, model.sha256, parts, fragments)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no usable cache: split again
    graphs = split_graph(onnx.load(str(model.path)), parts)
    fragments = []
    with tempfile.TemporaryDirectory(prefix=".split-", dir=store.root) as tmp:
        for graph in graphs:
            file = Path(tmp) / f"fragment-{graph.index}.onnx"
            onnx.save(graph.model, str(file))
            sha256, _ = store.add_object(file)
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
    plan = SplitPlan(model.name, model.sha256, parts, fragments)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = plan_file.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(plan.to_dict(), indent=1))
    tmp_file.replace(plan_file)
    return plan


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
