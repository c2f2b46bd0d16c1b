"""Which accelerators this device really has, and how much memory each has free.

An onnxruntime wheel lists the providers it was *built* with: onnxruntime-gpu offers
CUDAExecutionProvider on a machine without a GPU, and a session asked to use it fails or
silently runs on CPU while the mesh believes it has a GPU. So every accelerator provider
has a probe that looks for the device itself. The probes read everything through a
:class:`Host` (platform, file-system root, NVML reader) so that tests can give each one
the hardware it looks for.

Decisions, provider by provider:

- CUDA and TensorRT (which runs on CUDA): an NVIDIA device found through NVML, with its
  total and free memory; when NVML cannot be loaded or fails, ``/proc/driver/nvidia/gpus``
  still proves a device exists (memory unknown). NVML is read with ctypes: pynvml and
  nvidia-ml-py only wrap the same library, so depending on them would add nothing.
- ROCm: ``/dev/kfd`` (the amdgpu compute interface) and an AMD card (vendor 0x1002)
  under ``/sys/class/drm`` whose ``mem_info_vram_total`` and ``_used`` give its memory.
- NNAPI on Android, CoreML on macOS, DirectML on Windows: the platform's own API, present
  on every such device. Their memory is the system's (shared), so it is left unknown.
- QNN: a Qualcomm NPU. On Windows only ARM64 machines, which are all Snapdragon (the
  onnxruntime-qnn wheel exists only for them); on Android and Linux only when
  ``/sys/devices/soc0`` names Qualcomm or Snapdragon, since a QNN build on another SoC
  has no HTP backend to load and an unreadable soc0 is no proof.
- OpenVINO and XNNPACK run on the CPU, so they need no device: wherever the build has
  them they work, and they are not listed as accelerators.
"""

import ctypes
import platform as platform_module
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# (name, total bytes, free bytes) per device, as NVML reports them.
NvmlReader = Callable[[], list[tuple[str, int, int]]]


@dataclass(frozen=True)
class Accelerator:
    """A device a provider runs on; memory in bytes, None where the device shares the
    system's memory or its driver does not say."""

    provider: str
    name: str
    memory_total: int | None
    memory_free: int | None

    def to_dict(self) -> dict[str, str | int | None]:
        """Within what an advert admits: a driver's odd numbers or long names must not
        make every peer refuse this node's advert."""

        def bytes_or_none(value: int | None) -> int | None:
            return None if value is None else min(max(value, 0), 1 << 50)

        return {
            **asdict(self),
            "provider": self.provider[:64],
            "name": self.name[:128],
            "memory_total": bytes_or_none(self.memory_total),
            "memory_free": bytes_or_none(self.memory_free),
        }


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


def read_nvml(library: str = "libnvidia-ml.so.1") -> list[tuple[str, int, int]]:
    """Every NVIDIA device's name, total and free memory from the driver's NVML library.

    Raises OSError when the library is missing (no NVIDIA driver) or a call fails.
    """
    nvml = ctypes.CDLL(library)

    def check(status: int, call: str) -> None:
        if status != 0:
            raise OSError(f"NVML {call} failed with status {status}")

    check(nvml.nvmlInit_v2(), "nvmlInit_v2")
    try:
        count = ctypes.c_uint()
        check(nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)), "nvmlDeviceGetCount_v2")
        devices = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            check(
                nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)),
                "nvmlDeviceGetHandleByIndex_v2",
            )
            name = ctypes.create_string_buffer(96)
            check(nvml.nvmlDeviceGetName(handle, name, len(name)), "nvmlDeviceGetName")
            memory = _NvmlMemory()
            check(nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)), "GetMemoryInfo")
            devices.append((name.value.decode(errors="replace"), memory.total, memory.free))
        return devices
    finally:
        nvml.nvmlShutdown()


@dataclass(frozen=True)
class Host:
    """What the probes may look at. :meth:`here` is this device; tests build their own."""

    platform: str  # sys.platform: "linux", "android", "darwin", "win32", ...
    machine: str  # platform.machine(): "x86_64", "aarch64", "ARM64", ...
    root: Path  # where the file system starts ("/" here; a test's tmp_path)
    nvml: NvmlReader

    @classmethod
    def here(cls) -> "Host":
        library = "nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1"
        return cls(sys.platform, platform_module.machine(), Path("/"), lambda: read_nvml(library))


Device = tuple[str, int | None, int | None]  # name, memory total, memory free
Probe = Callable[[Host], list[Device]]


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def nvidia_gpus(host: Host) -> list[Device]:
    """NVIDIA devices: NVML's list with memory, else the driver's /proc entries."""
    try:
        return [(name, total, free) for name, total, free in host.nvml()]
    except OSError:
        pass  # no NVML library or it failed: the driver's /proc files still show devices
    gpus = host.root / "proc" / "driver" / "nvidia" / "gpus"
    found: list[Device] = []
    for info in sorted(gpus.glob("*/information")):
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in (_text(info) or "").splitlines()
                if line.startswith("Model:")
            ),
            "NVIDIA GPU",
        )
        found.append((model, None, None))
    return found


def amd_gpus(host: Host) -> list[Device]:
    """AMD devices ROCm can use: /dev/kfd and amdgpu cards reporting their VRAM."""
    if not (host.root / "dev" / "kfd").exists():
        return []
    found: list[Device] = []
    for card in sorted((host.root / "sys" / "class" / "drm").glob("card*")):
        device = card / "device"
        if not card.name[4:].isdigit() or _text(device / "vendor") != "0x1002":
            continue
        total, used = _text(device / "mem_info_vram_total"), _text(device / "mem_info_vram_used")
        if total is None or not total.isdigit():
            continue  # not an amdgpu compute card (or one that hides its memory)
        free = int(total) - int(used) if used is not None and used.isdigit() else None
        found.append((_text(device / "product_name") or f"AMD GPU {card.name}", int(total), free))
    return found


def _on(platform: str, name: str) -> Probe:
    """A probe for a platform API that every device of that platform has."""
    return lambda host: [(name, None, None)] if host.platform == platform else []


def qualcomm_npu(host: Host) -> list[Device]:
    """A Qualcomm NPU for QNN: any Windows-on-ARM machine, or a Snapdragon SoC."""
    if host.platform == "win32":
        return [("Qualcomm NPU", None, None)] if host.machine.upper() == "ARM64" else []
    if host.platform not in ("android", "linux"):
        return []
    soc = host.root / "sys" / "devices" / "soc0"
    names = f"{_text(soc / 'vendor') or ''} {_text(soc / 'family') or ''}".lower()
    return [("Qualcomm NPU", None, None)] if "qualcomm" in names or "snapdragon" in names else []


# The device probe of every accelerator provider. Providers not named here run on the
# CPU and need none.
PROBES: dict[str, Probe] = {
    "TensorrtExecutionProvider": nvidia_gpus,
    "CUDAExecutionProvider": nvidia_gpus,
    "ROCMExecutionProvider": amd_gpus,
    "CoreMLExecutionProvider": _on("darwin", "CoreML"),
    "QNNExecutionProvider": qualcomm_npu,
    "NnapiExecutionProvider": _on("android", "NNAPI"),
    "DmlExecutionProvider": _on("win32", "DirectML"),
}
CPU_PROVIDERS = frozenset(
    {"OpenVINOExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"}
)
