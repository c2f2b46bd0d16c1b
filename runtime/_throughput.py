"""A measured compute figure for this device: GFLOP/s of a matmul through onnxruntime.

Core counts say little about speed (a phone's eight cores can lose to a laptop's two),
so placement uses this measurement. It takes about half a second, so the result is
cached on disk with the time it was taken and re-measured when it is old or when the
session setup it was measured with has changed.
"""

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ._session import ModelSession
from ._threads import fitted_thread_count

MATRIX = 512
ROUNDS = 12
MAX_AGE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Throughput:
    gflops: float
    measured_at: float  # unix time; a persisted timestamp, not a deadline
    threads: int
    ort_version: str


def _matmul_model(path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [MATRIX, MATRIX])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [MATRIX, MATRIX])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [MATRIX, MATRIX])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def measure_throughput(threads: int | None = None) -> Throughput:
    """Run the matmul benchmark now (blocking, about 0.5 s)."""
    threads = threads or fitted_thread_count()
    with tempfile.TemporaryDirectory(prefix="salala-probe-") as tmp:
        path = Path(tmp) / "matmul.onnx"
        _matmul_model(path)
        session = ModelSession(path, threads=threads, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.standard_normal((MATRIX, MATRIX), dtype=np.float32),
        "b": rng.standard_normal((MATRIX, MATRIX), dtype=np.float32),
    }
    session.run(feeds)  # warm-up
    seconds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        session.run(feeds)
        seconds.append(time.perf_counter() - start)
    flops = 2.0 * MATRIX**3
    return Throughput(
        gflops=round(flops / statistics.median(seconds) / 1e9, 2),
        measured_at=time.time(),
        threads=threads,
        ort_version=ort.__version__,
    )


def cached_throughput(cache_file: Path, threads: int | None = None) -> Throughput:
    """The cached measurement if it is fresh and comparable, else a new one (saved)."""
    threads = threads or fitted_thread_count()
    try:
        cached = Throughput(**json.loads(cache_file.read_text()))
        fresh = time.time() - cached.measured_at < MAX_AGE_S
        if fresh and cached.threads == threads and cached.ort_version == ort.__version__:
            return cached
    except (OSError, ValueError, TypeError):
        pass  # missing or unreadable cache: measure again
    result = measure_throughput(threads)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(cache_file)
    return result
