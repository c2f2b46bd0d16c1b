"""The on-device runtime: sessions, input checks, capacity probe, throughput cache."""

import builtins
import io
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from conftest import minilm_inputs, minilm_path
from salala import runtime
from salala.runtime import InputMismatchError, ModelLoadError, ModelSession


@pytest.fixture(scope="module")
def minilm() -> ModelSession:
    return ModelSession(minilm_path())


def test_session_matches_a_plain_onnxruntime_session(minilm: ModelSession) -> None:
    feeds = minilm_inputs()
    plain = ort.InferenceSession(str(minilm_path()), providers=["CPUExecutionProvider"])
    expected = plain.run(None, feeds)[0]
    np.testing.assert_allclose(minilm.run(feeds)["last_hidden_state"], expected, atol=1e-5)


def test_session_describes_its_inputs(minilm: ModelSession) -> None:
    assert [spec.name for spec in minilm.inputs] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert minilm.inputs[0].describe() == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "sequence"],
    }
    assert "CPUExecutionProvider" in minilm.providers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("attention_mask"), r"missing \['attention_mask'\]"),
        (lambda f: f.update(extra=np.zeros(1)), r"unexpected \['extra'\]"),
        (
            lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)),
            "'input_ids' has dtype int32",
        ),
        (lambda f: f.update(input_ids=f["input_ids"][None]), r"'input_ids' has shape \[1, 2, 16\]"),
    ],
)
def test_wrong_inputs_are_named(minilm: ModelSession, change, message: str) -> None:
    feeds = minilm_inputs()
    change(feeds)
    with pytest.raises(InputMismatchError, match=message):
        minilm.run(feeds)


def test_a_file_onnxruntime_cannot_load_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        ModelSession(path)


def test_capacity_reports_what_the_device_has() -> None:
    capacity = runtime.probe_capacity()
    assert capacity.logical_cores == psutil.cpu_count()
    assert capacity.memory_total == psutil.virtual_memory().total
    assert 0 < capacity.memory_available <= capacity.memory_total
    assert capacity.load_1m is not None and capacity.load_1m >= 0
    assert "CPUExecutionProvider" in capacity.providers
    assert capacity.gflops is None  # no measurement passed in


# What Android forbids an app to read (SELinux): /proc/stat from Android 8, /proc/net
# from Android 10, the thermal zones on most phones; /proc/loadavg on many.
ANDROID_DENIED = ("/proc/stat", "/proc/net", "/sys/class/thermal", "/proc/loadavg")


def test_capacity_on_an_android_phone_reports_unknowns_instead_of_crashing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Termux: every read of the paths Android denies raises PermissionError, psutil has
    no battery, and termux-battery-status answers in JSON (a real script on PATH stands
    in for it), carrying the battery temperature, a phone's only thermal signal."""

    def guard(real: Any) -> Any:
        def opener(path: Any, *args: Any, **kwargs: Any) -> Any:
            name = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
            if name.startswith(ANDROID_DENIED):
                raise PermissionError(13, "Permission denied", name)
            return real(path, *args, **kwargs)

        return opener

    for module, name in (
        (builtins, "open"),
        (io, "open"),
        (os, "open"),
        (os, "listdir"),
        (os, "scandir"),
    ):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/proc/loadavg")

    monkeypatch.setattr(os, "getloadavg", forbidden)  # C code: no open() to guard
    monkeypatch.setattr(sys, "platform", "android")
    script = tmp_path / "termux-battery-status"
    script.write_text(
        '#!/bin/sh\necho \'{"percentage": 81, "plugged": "PLUGGED_USB", '
        '"status": "CHARGING", "temperature": 33.4}\'\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for path in ANDROID_DENIED:  # the guard holds (and Linux has these, so it is hit)
        with pytest.raises(PermissionError):
            open(f"{path}/x" if path.endswith(("net", "thermal")) else path)

    capacity = runtime.probe_capacity()
    runtime._threads.fitted_thread_count()

    assert capacity.platform == "android"
    assert capacity.load_1m is None
    assert capacity.battery_percent == 81.0 and capacity.charging is True
    assert capacity.battery_temperature == 33.4
    assert "CPUExecutionProvider" in capacity.providers
    assert msgpack.unpackb(msgpack.packb(capacity.to_dict())) == capacity.to_dict()


def test_a_battery_that_cannot_be_read_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def read(self) -> runtime.BatteryState | None:
            raise OSError("no battery service")

    capacity = runtime.probe_capacity(battery=Broken())
    assert capacity.battery_percent is None and capacity.charging is None


def test_throughput_is_measured_then_cached_until_stale(tmp_path: Path) -> None:
    cache = tmp_path / "throughput.json"
    first = runtime.cached_throughput(cache, threads=1)
    assert first.gflops > 0 and first.threads == 1
    assert runtime.cached_throughput(cache, threads=1) == first  # served from the cache

    stale = json.loads(cache.read_text())
    stale["measured_at"] = time.time() - 30 * 24 * 3600
    cache.write_text(json.dumps(stale))
    assert runtime.cached_throughput(cache, threads=1).measured_at > stale["measured_at"]

    cache.write_text("{corrupt")
    assert runtime.cached_throughput(cache, threads=1).gflops > 0


def test_throughput_goes_into_the_capacity_advert(tmp_path: Path) -> None:
    measured = runtime.cached_throughput(tmp_path / "t.json", threads=1)
    capacity = runtime.probe_capacity(measured)
    assert capacity.gflops == measured.gflops
    assert capacity.to_dict()["gflops_measured_at"] == measured.measured_at


def test_throughput_is_measured_on_the_provider_sessions_pick_first(tmp_path: Path) -> None:
    measured = runtime.measure_throughput(threads=1)
    assert measured.provider == runtime._providers.choose_providers()[0] == "CPUExecutionProvider"

    # A figure measured on another provider (a GPU since removed), or cached before the
    # provider was recorded, is measured again on today's.
    cache = tmp_path / "throughput.json"
    cache.write_text(json.dumps(asdict(measured) | {"provider": "CUDAExecutionProvider"}))
    again = runtime.cached_throughput(cache, threads=1)
    assert again.provider == "CPUExecutionProvider" and again.measured_at > measured.measured_at
    assert runtime.cached_throughput(cache, threads=1) == again
    older = asdict(again)
    del older["provider"]
    cache.write_text(json.dumps(older))
    assert runtime.cached_throughput(cache, threads=1).measured_at > again.measured_at


def test_the_shipped_probe_model_is_the_matmul_onnx_helper_builds() -> None:
    from onnx import TensorProto, checker, helper

    size = runtime._throughput.MATRIX
    a, b, c = (
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "abc"
    )
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    assert runtime._throughput.probe_model() == model.SerializeToString()


NO_ONNX = """
import importlib.abc, sys

class NoOnnx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(f"{name} is blocked: nodes run without onnx")
        return None

sys.meta_path.insert(0, NoOnnx())
from salala import runtime
measured = runtime.measure_throughput(1)
assert measured.gflops > 0, measured
assert runtime.probe_capacity(measured).gflops == measured.gflops
print(sorted(m for m in sys.modules if m == "onnx" or m.startswith("onnx.")))
"""


def test_the_runtime_measures_and_probes_without_the_onnx_package() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_ONNX], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_capacity_lists_accelerators_as_plain_data_for_the_advert() -> None:
    capacity = replace(
        runtime.probe_capacity(),
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        accelerators=(
            runtime.Accelerator("CUDAExecutionProvider", "NVIDIA T4", 16 << 30, 3 << 30),
            runtime.Accelerator("NnapiExecutionProvider", "NNAPI", None, None),
        ),
    )
    data = capacity.to_dict()
    assert data["accelerators"] == [
        {
            "provider": "CUDAExecutionProvider",
            "name": "NVIDIA T4",
            "memory_total": 16 << 30,
            "memory_free": 3 << 30,
        },
        {
            "provider": "NnapiExecutionProvider",
            "name": "NNAPI",
            "memory_total": None,
            "memory_free": None,
        },
    ]
    wire = msgpack.packb(data, use_bin_type=True)
    assert msgpack.unpackb(wire, raw=False) == data
    assert runtime.probe_capacity().to_dict()["accelerators"] == []  # none on this machine


def test_capacity_takes_a_hardware_reading_made_earlier(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node probes accelerators in a worker thread (NVML can take seconds) and hands
    the last reading in: probing capacity on the event loop then never touches a driver."""

    def no_driver_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed the hardware again")

    monkeypatch.setattr(runtime._capacity, "probe_hardware", no_driver_here)
    earlier = runtime.Hardware(("CPUExecutionProvider",), ())
    assert runtime.probe_capacity(hardware=earlier).providers == ("CPUExecutionProvider",)
