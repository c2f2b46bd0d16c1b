"""Optimisers in numpy, so a stage updates its own parameters without torch.

Their state is a flat dict of arrays (plus the step count), which is what a checkpoint
saves and what a re-planned stage is seeded with. The update rules are torch's
(``torch.optim.SGD`` with momentum and dampening 0, ``torch.optim.Adam`` without
weight decay), so a pipeline can be checked against torch step for step.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class OptimizerError(ValueError):
    """An optimiser spec that names an unknown kind or a bad hyper-parameter."""


@dataclass
class Optimizer:
    kind: str
    lr: float
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 0
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Apply one step in place."""
        self.steps += 1
        for name, grad in grads.items():
            if self.kind == "sgd":
                if self.momentum:
                    buffer = self.state.get(f"{name}.momentum")
                    buffer = grad.copy() if buffer is None else self.momentum * buffer + grad
                    self.state[f"{name}.momentum"] = buffer
                    grad = buffer
                params[name] -= self.lr * grad
            else:
                beta1, beta2 = self.betas
                m = self.state.get(f"{name}.m", np.zeros_like(grad))
                v = self.state.get(f"{name}.v", np.zeros_like(grad))
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad * grad
                self.state[f"{name}.m"], self.state[f"{name}.v"] = m, v
                m_hat = m / (1 - beta1**self.steps)
                v_hat = v / (1 - beta2**self.steps)
                params[name] -= (self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(grad.dtype)


def make_optimizer(spec: dict[str, Any]) -> Optimizer:
    """An optimiser from a job's ``[optimizer]`` table; OptimizerError names the bad key."""
    kind = spec.get("kind", "sgd")
    if kind not in ("sgd", "adam"):
        raise OptimizerError(f"optimizer kind {kind!r}: use 'sgd' or 'adam'")
    unknown = set(spec) - {"kind", "lr", "momentum", "betas", "eps"}
    if unknown:
        raise OptimizerError(f"unknown optimizer settings: {', '.join(sorted(unknown))}")
    try:
        lr = float(spec.get("lr", 0.01))
        momentum = float(spec.get("momentum", 0.0))
        beta1, beta2 = (float(b) for b in spec.get("betas", (0.9, 0.999)))
        eps = float(spec.get("eps", 1e-8))
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"optimizer settings must be numbers: {exc}") from exc
    if (
        not math.isfinite(lr)
        or not lr > 0
        or not 0 <= momentum < 1
        or not (0 <= beta1 < 1 and 0 <= beta2 < 1)
    ):
        raise OptimizerError("need lr > 0, 0 <= momentum < 1 and betas in [0, 1)")
    if kind == "adam" and momentum:
        raise OptimizerError("adam takes betas, not momentum")
    return Optimizer(kind, lr, momentum, (beta1, beta2), eps)
