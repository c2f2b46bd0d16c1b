"""The on-device runtime: sessions, input checks, capacity probe, throughput cache."""

import json
import os
import stat
import sys
import time
from pathlib import Path

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


def test_capacity_on_an_android_phone_reports_unknowns_instead_of_crashing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Termux: /proc/stat and /proc/loadavg are forbidden, psutil has no battery,
    and termux-battery-status answers in JSON (a real script on PATH stands in for it)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/proc/stat")

    monkeypatch.setattr(sys, "platform", "android")
    monkeypatch.setattr(psutil, "cpu_count", forbidden)
    monkeypatch.setattr(psutil, "getloadavg", forbidden)
    monkeypatch.setattr(os, "getloadavg", forbidden)
    monkeypatch.setattr(psutil, "virtual_memory", forbidden)
    script = tmp_path / "termux-battery-status"
    script.write_text(
        '#!/bin/sh\necho \'{"percentage": 81, "plugged": "PLUGGED_USB", "status": "CHARGING"}\'\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    capacity = runtime.probe_capacity()

    assert capacity.platform == "android"
    assert capacity.logical_cores is None and capacity.physical_cores is None
    assert capacity.memory_total is None and capacity.load_1m is None
    assert capacity.battery_percent == 81.0 and capacity.charging is True
    assert runtime._threads.fitted_thread_count() == 1


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
