"""Accelerator probes: a provider is offered only where its device exists.

Each probe reads a Host (platform, machine, file-system root, NVML reader); these tests
give it the hardware it looks for (files under tmp_path, an NVML reader, a stub NVML
library) since none of it exists on this machine.
"""

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
from salala import runtime
from salala.runtime._accelerators import Accelerator, Host, read_nvml
from salala.runtime._providers import choose_providers, probe_hardware

CUDA, TRT, ROCM = "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"
NNAPI, COREML, DML, QNN = (
    "NnapiExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "QNNExecutionProvider",
)
OPENVINO, XNNPACK, CPU = (
    "OpenVINOExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)
EVERY = [TRT, CUDA, ROCM, COREML, QNN, NNAPI, DML, OPENVINO, XNNPACK, CPU, "AzureExecutionProvider"]
GiB = 1 << 30


def no_nvml() -> list[tuple[str, int, int]]:
    raise OSError("libnvidia-ml.so.1: cannot open shared object file")


def host(
    root: Path,
    platform: str = "linux",
    machine: str = "x86_64",
    nvml: Callable[[], list[tuple[str, int, int]]] = no_nvml,
) -> Host:
    return Host(platform, machine, root, nvml)


def write(root: Path, path: str, text: str) -> None:
    file = root / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def test_cuda_is_offered_with_each_devices_memory_when_nvml_finds_one(tmp_path: Path) -> None:
    def nvml() -> list[tuple[str, int, int]]:
        return [("NVIDIA A10", 24 * GiB, 20 * GiB), ("NVIDIA T4", 16 * GiB, 3 * GiB)]

    found = probe_hardware(host(tmp_path, nvml=nvml), [CUDA, CPU])
    assert found.providers == (CUDA, CPU)
    assert found.accelerators == (
        Accelerator(CUDA, "NVIDIA A10", 24 * GiB, 20 * GiB),
        Accelerator(CUDA, "NVIDIA T4", 16 * GiB, 3 * GiB),
    )


def test_tensorrt_shares_the_cuda_devices_which_are_listed_once(tmp_path: Path) -> None:
    nvml = lambda: [("NVIDIA L4", 24 * GiB, 22 * GiB)]  # noqa: E731
    found = probe_hardware(host(tmp_path, nvml=nvml), [TRT, CUDA, CPU])
    assert found.providers == (TRT, CUDA, CPU)
    assert found.accelerators == (Accelerator(TRT, "NVIDIA L4", 24 * GiB, 22 * GiB),)


def test_no_nvidia_device_means_no_cuda_whatever_the_wheel_lists(tmp_path: Path) -> None:
    found = probe_hardware(host(tmp_path), [TRT, CUDA, CPU])
    assert found == runtime._providers.Hardware((CPU,), ())
    # NVML loads but counts no device (a driver without a GPU attached)
    assert probe_hardware(host(tmp_path, nvml=lambda: []), [CUDA, CPU]).providers == (CPU,)


def test_a_failing_nvml_falls_back_to_the_drivers_proc_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/driver/nvidia/gpus/0000:01:00.0/information",
        "Model: \t\t NVIDIA GeForce RTX 3060\nIRQ:   \t\t 130\nGPU UUID: \t GPU-1\n",
    )
    found = probe_hardware(host(tmp_path), [CUDA, CPU])
    assert found.providers == (CUDA, CPU)
    assert found.accelerators == (Accelerator(CUDA, "NVIDIA GeForce RTX 3060", None, None),)


def test_a_probe_that_raises_anything_finds_nothing(tmp_path: Path) -> None:
    def broken() -> list[tuple[str, int, int]]:
        raise ValueError("driver answered nonsense")

    assert probe_hardware(host(tmp_path, nvml=broken), [CUDA, CPU]).providers == (CPU,)


def test_a_device_without_its_provider_in_the_build_is_not_offered(tmp_path: Path) -> None:
    nvml = lambda: [("NVIDIA A10", 24 * GiB, 20 * GiB)]  # noqa: E731
    found = probe_hardware(host(tmp_path, nvml=nvml), [CPU])
    assert found == runtime._providers.Hardware((CPU,), ())


def amd_card(root: Path, card: str, vendor: str = "0x1002") -> None:
    write(root, f"sys/class/drm/{card}/device/vendor", f"{vendor}\n")
    write(root, f"sys/class/drm/{card}/device/mem_info_vram_total", f"{16 * GiB}\n")
    write(root, f"sys/class/drm/{card}/device/mem_info_vram_used", f"{6 * GiB}\n")


def test_rocm_needs_kfd_and_an_amd_card_reporting_its_vram(tmp_path: Path) -> None:
    amd_card(tmp_path, "card1")
    amd_card(tmp_path, "card0", vendor="0x8086")  # an Intel iGPU beside it
    (tmp_path / "sys/class/drm/card1-DP-1").mkdir()  # a connector, not a card
    assert probe_hardware(host(tmp_path), [ROCM, CPU]).providers == (CPU,)  # no /dev/kfd

    write(tmp_path, "dev/kfd", "")
    found = probe_hardware(host(tmp_path), [ROCM, CPU])
    assert found.providers == (ROCM, CPU)
    assert found.accelerators == (Accelerator(ROCM, "AMD GPU card1", 16 * GiB, 10 * GiB),)


@pytest.mark.parametrize(
    ("provider", "platform", "name"),
    [(NNAPI, "android", "NNAPI"), (COREML, "darwin", "CoreML"), (DML, "win32", "DirectML")],
)
def test_platform_apis_are_offered_only_on_their_platform(
    tmp_path: Path, provider: str, platform: str, name: str
) -> None:
    found = probe_hardware(host(tmp_path, platform=platform), [provider, CPU])
    assert found.providers == (provider, CPU)
    assert found.accelerators == (Accelerator(provider, name, None, None),)
    for elsewhere in {"linux", "android", "darwin", "win32"} - {platform}:
        assert probe_hardware(host(tmp_path, platform=elsewhere), [provider, CPU]).providers == (
            CPU,
        )


def test_qnn_needs_a_qualcomm_chip(tmp_path: Path) -> None:
    def offered(platform: str, machine: str = "aarch64") -> tuple[str, ...]:
        return probe_hardware(host(tmp_path, platform, machine), [QNN, CPU]).providers

    assert offered("win32", "ARM64") == (QNN, CPU)  # Windows on ARM: Snapdragon
    assert offered("win32", "AMD64") == (CPU,)
    assert offered("android") == (CPU,)  # soc0 unreadable: no proof
    write(tmp_path, "sys/devices/soc0/family", "Snapdragon\n")
    assert offered("android") == (QNN, CPU)
    assert offered("darwin") == (CPU,)


def test_cpu_providers_need_no_device_and_come_before_plain_cpu(tmp_path: Path) -> None:
    found = probe_hardware(host(tmp_path, platform="android"), [CPU, XNNPACK, NNAPI, OPENVINO])
    assert found.providers == (NNAPI, OPENVINO, XNNPACK, CPU)
    assert [a.provider for a in found.accelerators] == [NNAPI]


def test_read_nvml_fails_cleanly_without_the_driver_library() -> None:
    with pytest.raises(OSError):
        read_nvml("libnvidia-ml-not-here.so.1")


STUB_NVML = r"""
#include <stdio.h>
typedef struct { unsigned long long total, free, used; } memory_t;
int nvmlInit_v2(void) { return INIT_STATUS; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned int *count) { *count = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **handle) {
    *handle = (void *)(unsigned long)(i + 1); return 0;
}
int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    snprintf(name, length, "Stub GPU %lu", (unsigned long)handle); return 0;
}
int nvmlDeviceGetMemoryInfo(void *handle, memory_t *memory) {
    unsigned long n = (unsigned long)handle;
    memory->total = n * (8ULL << 30); memory->used = n << 20;
    memory->free = memory->total - memory->used; return 0;
}
"""


def stub_nvml(directory: Path, init_status: int) -> str:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the stub NVML library")
    source, library = directory / "nvml.c", directory / f"libnvml-{init_status}.so"
    source.write_text(STUB_NVML)
    subprocess.run(
        [compiler, "-shared", "-fPIC", f"-DINIT_STATUS={init_status}", "-o", library, source],
        check=True,
    )
    return str(library)


def test_read_nvml_reads_names_and_64_bit_memory_through_the_driver_abi(tmp_path: Path) -> None:
    """A stub library with NVML's C signatures stands in for the NVIDIA driver."""
    assert read_nvml(stub_nvml(tmp_path, 0)) == [
        ("Stub GPU 1", 8 * GiB, 8 * GiB - (1 << 20)),
        ("Stub GPU 2", 16 * GiB, 16 * GiB - (2 << 20)),
    ]
    with pytest.raises(OSError, match="nvmlInit_v2 failed with status 9"):
        read_nvml(stub_nvml(tmp_path, 9))


def test_this_machine_offers_cpu_alone_whichever_wheel_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This machine has no GPU: a wheel built with every provider still gets CPU here
    (OpenVINO and XNNPACK aside, which run on the CPU)."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    if (nvidia.exists() and any(nvidia.iterdir())) or Path("/dev/kfd").exists():
        pytest.skip("this machine has a GPU")
    with pytest.raises(OSError):
        read_nvml()  # no NVIDIA driver library either
    assert runtime.available_providers() == (CPU,)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])  # -gpu
    assert runtime.available_providers() == (CPU,)
    assert choose_providers() == [CPU] and choose_providers([CUDA]) == [CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: EVERY)
    assert runtime.available_providers() == (OPENVINO, XNNPACK, CPU)
    assert runtime.find_accelerators() == ()
    capacity = runtime.probe_capacity()
    assert capacity.providers == (OPENVINO, XNNPACK, CPU) and capacity.accelerators == ()


def test_a_drivers_odd_numbers_still_fit_the_advert() -> None:
    """More used than total, huge totals, long names: the node's own advert must stay
    one that every peer admits."""
    from salala.mesh.membership._adverts import ACCELERATOR

    odd = Accelerator("ROCMExecutionProvider", "x" * 300, 1 << 60, -(1 << 20))
    sent = odd.to_dict()
    ACCELERATOR(sent, "accelerator")  # raises if a peer would refuse it
    assert sent["memory_free"] == 0 and sent["memory_total"] == 1 << 50
    assert len(sent["name"]) == 128
