"""A measured compute figure for this device: GFLOP/s of a matmul through onnxruntime.

Core counts say little about speed (a phone's eight cores can lose to a laptop's two),
so placement uses this measurement. It runs on the provider that sessions pick first
(a GPU's figure, where fragments will run on the GPU), and is recorded with it. It takes
about half a second, so the result is cached on disk with the time it was taken and
re-measured when it is old or when the session setup it was measured with has changed:
threads, onnxruntime's version, or the provider (a GPU that appeared or went away).

The probe graph ships as ``matmul.onnx`` beside this module, so measuring needs no
``onnx`` package: nodes run with onnxruntime and numpy alone.
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._providers import choose_providers
from ._session import ModelSession
from ._threads import fitted_thread_count

MATRIX = 512  # matmul.onnx multiplies two float32 [MATRIX, MATRIX] inputs "a" and "b"
ROUNDS = 12
MAX_AGE_S = 7 * 24 * 3600
PROBE_MODEL = "matmul.onnx"


@dataclass(frozen=True)
class Throughput:
    gflops: float
    measured_at: float  # unix time; a persisted timestamp, not a deadline
    threads: int
    ort_version: str
    provider: str  # the execution provider the figure was measured on


def probe_model() -> bytes:
    """The serialized probe graph: c = MatMul(a, b), opset 17, IR version 8."""
    return resources.files(__package__).joinpath(PROBE_MODEL).read_bytes()


def measure_throughput(threads: int | None = None) -> Throughput:
    """Run the matmul benchmark now on the sessions' first provider (blocking, ~0.5 s)."""
    threads = threads or fitted_thread_count()
    session = ModelSession(probe_model(), threads=threads)
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
        provider=session.providers[0],
    )


def cached_throughput(cache_file: Path, threads: int | None = None) -> Throughput:
    """The cached measurement if it is fresh and comparable, else a new one (saved)."""
    threads = threads or fitted_thread_count()
    try:
        cached = Throughput(**json.loads(cache_file.read_text()))
        fresh = time.time() - cached.measured_at < MAX_AGE_S
        same_setup = (cached.threads, cached.ort_version, cached.provider) == (
            threads,
            ort.__version__,
            choose_providers()[0],
        )
        if fresh and same_setup:
            return cached
    except (OSError, ValueError, TypeError):
        pass  # missing, unreadable or older-format cache: measure again
    result = measure_throughput(threads)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(cache_file)
    return result
