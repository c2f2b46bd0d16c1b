"""One stage of a training job on one node: two sessions, parameters, optimiser, stash.

No I/O here; the protocol in ``_training`` feeds it. Gradients are kept as sums of
(micro-batch mean gradient x micro-batch size), so micro-batches of any size, and the
sums of data-parallel replicas, divide by the total sample count into exactly the
full batch's mean gradient.
"""

from dataclasses import dataclass, field

import numpy as np

from ...runtime import ModelSession, Optimizer

PARAM = "p."
OPTIM = "o."


@dataclass
class StageWork:
    forward: ModelSession
    backward: ModelSession
    params: dict[str, np.ndarray]
    optimizer: Optimizer
    first: bool
    last: bool
    stash: dict[int, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0

    def run_forward(self, micro_batch: int, x: np.ndarray) -> np.ndarray:
        self.stash[micro_batch] = x
        return self.forward.run({**self.params, "x": x})["y"]

    def run_backward(self, micro_batch: int, grad_y: np.ndarray) -> np.ndarray | None:
        x = self.stash.pop(micro_batch)
        outputs = self.backward.run({**self.params, "x": x, "grad_y": grad_y})
        self._accumulate(outputs, len(x))
        return outputs.get("grad_x")

    def run_loss(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray | None]:
        """The last stage: loss and gradients straight from its input and the labels."""
        outputs = self.backward.run({**self.params, "x": x, "labels": labels})
        self._accumulate(outputs, len(x))
        return float(outputs["loss"]), outputs.get("grad_x")

    def _accumulate(self, outputs: dict[str, np.ndarray], count: int) -> None:
        for name in self.params:
            grad = outputs[f"grad.{name}"] * np.float32(count)
            self.sums[name] = self.sums[name] + grad if name in self.sums else grad
        self.samples += count

    def take_gradients(self) -> tuple[dict[str, np.ndarray], int]:
        sums, samples = self.sums, self.samples
        self.sums, self.samples = {}, 0
        return sums, samples

    def apply(self, sums: dict[str, np.ndarray], samples: int) -> None:
        """One optimiser step with the mean gradient over ``samples``."""
        if samples:
            self.optimizer.update(
                self.params, {n: s / np.float32(samples) for n, s in sums.items()}
            )
        self.stash.clear()

    def snapshot(self) -> dict[str, np.ndarray]:
        """Parameters and optimiser state as one flat tensor map (a checkpoint).

        Copies: the optimiser updates parameters in place, and a snapshot handed to a
        driver on this same node must not move with them.
        """
        return {
            **{PARAM + n: v.copy() for n, v in self.params.items()},
            **{OPTIM + n: v.copy() for n, v in self.optimizer.state.items()},
        }


def split_snapshot(
    tensors: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {n[len(PARAM) :]: v for n, v in tensors.items() if n.startswith(PARAM)}
    state = {n[len(OPTIM) :]: v for n, v in tensors.items() if n.startswith(OPTIM)}
    return params, state
