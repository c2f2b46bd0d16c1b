"""Choosing the next token from a row of logits, on the last stage.

Sampling happens where the logits are, so only a token id travels back (never 49,152
floats). Each draw is seeded by ``(seed, step)``, not by a generator that advances: a
step replayed on another device after a failure draws exactly what it drew the first
time, so a seeded run survives failover unchanged.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` turn those off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def sample(logits: np.ndarray, sampling: Sampling, step: int) -> int:
    """The token drawn from ``logits`` (one row) at generation step ``step``."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    if sampling.temperature == 0.0:
        return int(np.argmax(row))
    order = np.argsort(-row, kind="stable")
    if sampling.top_k > 0:
        order = order[: sampling.top_k]
    scaled = row[order] / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    draw = np.random.default_rng([sampling.seed, step]).random()
    index = min(int(np.searchsorted(np.cumsum(probs), draw, side="right")), len(order) - 1)
    return int(order[index])
