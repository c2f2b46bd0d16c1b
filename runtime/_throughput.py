"""A measured compute figure for this device: GFLOP/s of a matmul through onnxruntime.

Core counts say little about speed (a phone's eight cores can lose to a laptop's two),
so placement uses this measurement. It runs on the provider that sessions pick first
(a GPU's figure, where fragments will run on the GPU), and is recorded with it. It takes
about half a second, so the result is cached on disk with the time it was taken and
re-measured when it is old or when the session setup it was measured with has changed:
threads, the onnxruntime installation, or the provider (a GPU that appeared or went
away).

A node measures in a child process and records which providers the onnxruntime build
offers beside the figure: then a node that is only waiting for work (a phone in the
background) never loads onnxruntime, 30 MiB it would otherwise keep, until it runs a
model. The cache is checked without importing onnxruntime either.

The probe graph ships as ``matmul.onnx`` beside this module, so measuring needs no
``onnx`` package: nodes run with onnxruntime and numpy alone.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ._providers import probe_hardware
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
    offered: tuple[str, ...] = ()  # what the onnxruntime build offers (any hardware)
    build: str = ""  # which onnxruntime installation (see onnxruntime_build)


MEASURE_TIMEOUT_S = 300.0  # a slow phone, a GPU driver's first initialisation


def onnxruntime_build() -> str:
    """The installed onnxruntime, found without importing it: its path and mtime change
    when another build or version is installed."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return ""
    return f"{spec.origin}@{os.stat(spec.origin).st_mtime_ns}"


def probe_model() -> bytes:
    """The serialized probe graph: c = MatMul(a, b), opset 17, IR version 8."""
    return resources.files(__package__).joinpath(PROBE_MODEL).read_bytes()


def measure_throughput(threads: int | None = None) -> Throughput:
    """Run the matmul benchmark now on the sessions' first provider (blocking, ~0.5 s)."""
    threads = threads or fitted_thread_count()
    import onnxruntime as ort

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
        offered=tuple(ort.get_available_providers()),
        build=onnxruntime_build(),
    )


def measure_in_a_child(threads: int) -> Throughput:
    """:func:`measure_throughput` in a child process, so this one never loads onnxruntime."""
    code = (
        "import json, sys, dataclasses\n"
        "from salala.runtime._throughput import measure_throughput\n"
        "print(json.dumps(dataclasses.asdict(measure_throughput(int(sys.argv[1])))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(threads)],
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT_S,
        check=True,
    )
    return _from_json(done.stdout)


def _from_json(text: str) -> Throughput:
    data = json.loads(text)
    return Throughput(**{**data, "offered": tuple(data.get("offered", ()))})


def cached_throughput(cache_file: Path, threads: int | None = None) -> Throughput:
    """The cached measurement if it is fresh and comparable, else a new one (saved),
    taken in a child process."""
    threads = threads or fitted_thread_count()
    try:
        cached = _from_json(cache_file.read_text())
        fresh = time.time() - cached.measured_at < MAX_AGE_S
        today = probe_hardware(offered=cached.offered).providers[0]
        same_setup = (cached.threads, cached.build, cached.provider) == (
            threads,
            onnxruntime_build(),
            today,
        )
        if fresh and same_setup and cached.build:
            return cached
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # missing, unreadable or older-format cache: measure again
    result = measure_in_a_child(threads)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(cache_file)
    return result
