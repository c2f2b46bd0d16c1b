"""An onnxruntime session set up for a shared device, with input checking.

Every session turns spinning off (spinning threads burn the cores that other sessions
and the network need), uses BASIC graph optimisation so that a model cut into fragments
gives bit-identical results to the whole model, and checks the caller's tensors before
onnxruntime sees them so that a wrong input is reported by name.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._errors import InputMismatchError, ModelLoadError
from ._providers import choose_providers
from ._threads import fitted_thread_count

if TYPE_CHECKING:
    import onnxruntime as ort

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, numpy dtype and shape (str/None = free dim)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[Dim, ...]

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": None if self.dtype is None else self.dtype.name,
            "shape": [d if isinstance(d, int) else (d or "?") for d in self.shape],
        }


def _spec(arg: "ort.NodeArg") -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    shape = tuple(arg.shape) if arg.shape is not None else ()
    return TensorSpec(arg.name, None if dtype is None else np.dtype(dtype), shape)


class ModelSession:
    """A ready-to-run model on this device, from a file or from serialized bytes."""

    def __init__(
        self,
        model: Path | str | bytes,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort  # here: a node loads it only when it runs a model

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or fitted_thread_count()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model),
                sess_options=options,
                providers=choose_providers(providers),
            )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph
            what = "these model bytes" if isinstance(model, bytes) else model
            raise ModelLoadError(f"onnxruntime cannot load {what}: {exc}") from exc
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self.providers = tuple(self._session.get_providers())

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputMismatchError naming the first input that does not fit."""
        expected = {spec.name: spec for spec in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:
                parts.append(f"unexpected {unknown}")
            raise InputMismatchError(
                f"wrong input names: {'; '.join(parts)}; the model takes {sorted(expected)}"
            )
        for name, array in feeds.items():
            spec = expected[name]
            if spec.dtype is not None and array.dtype != spec.dtype:
                raise InputMismatchError(
                    f"input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}"
                )
            if len(array.shape) != len(spec.shape) or any(
                isinstance(want, int) and want >= 0 and want != got
                for want, got in zip(spec.shape, array.shape, strict=True)
            ):
                raise InputMismatchError(
                    f"input {name!r} has shape {list(array.shape)}, "
                    f"the model expects {spec.describe()['shape']}"
                )

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check the inputs, run the model and name its outputs.

        Blocking: callers on a trio loop run this in a worker thread.
        """
        self.check_inputs(feeds)
        try:
            values = self._session.run(None, dict(feeds))
        except Exception as exc:  # shape mismatches deep inside the graph surface here
            raise InputMismatchError(f"the model rejected these inputs: {exc}") from exc
        return {spec.name: value for spec, value in zip(self.outputs, values, strict=True)}
