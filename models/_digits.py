"""The built-in training task: scikit-learn's handwritten digits with a small MLP.

The data is the ``digits.csv.gz`` file the scikit-learn wheel ships, read with numpy
alone (scikit-learn itself is never imported), so the requesting node needs the wheel
installed but nothing is downloaded. Batches are a pure function of the step number,
which is what lets a job resume from a checkpoint and lets tests replay the exact
schedule in torch.
"""

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import ModelError

TEST_FRACTION = 0.2
HIDDEN = 128


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> Dataset:
    """8x8 digit images scaled to [0, 1], split 80/20 by a fixed permutation."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    with gzip.open(path, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test = int(len(y) * TEST_FRACTION)
    train_idx, test_idx = order[test:], order[:test]
    return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def batch_indices(samples: int, batch: int, step: int, seed: int = 0) -> np.ndarray:
    """The sample indices of ``step``: a fresh permutation each epoch, remainder dropped."""
    per_epoch = samples // batch
    if per_epoch < 1:
        raise ModelError(f"batch {batch} is larger than the {samples} training samples")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(samples)
    return order[index * batch : (index + 1) * batch]


def digits_mlp(fragments: int, seed: int = 0) -> list[Any]:
    """The digits MLP (64-128-128-10) as ``fragments`` torch blocks, 1 to 3 of them."""
    import torch
    from torch import nn

    if not 1 <= fragments <= 3:
        raise ModelError("the digits MLP splits into 1, 2 or 3 fragments")
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU()),
        nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU()),
        nn.Linear(HIDDEN, 10),
    ]
    groups = {1: [[0, 1, 2]], 2: [[0], [1, 2]], 3: [[0], [1], [2]]}[fragments]
    return [nn.Sequential(*(layers[i] for i in group)) for group in groups]


def cross_entropy(logits: Any, labels: Any) -> Any:
    """Mean cross-entropy written with gather: the ONNX exporter mistranslates the
    gradient of ``torch.nn.functional.cross_entropy`` (it drops the 1/batch)."""
    import torch

    log_probs = torch.log_softmax(logits, dim=1)
    return -torch.gather(log_probs, 1, labels[:, None]).mean()


def export_digits(folder: Path, fragments: int, seed: int = 0) -> Path:
    """Export the digits MLP as a training package; returns its folder."""
    import torch

    from ._export_training import export_training

    data = load_digits()
    export_training(
        digits_mlp(fragments, seed),
        cross_entropy,
        torch.from_numpy(data.x_train[:8]),
        torch.from_numpy(data.y_train[:8]),
        folder,
    )
    return Path(folder)
