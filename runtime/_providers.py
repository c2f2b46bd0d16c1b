"""Which onnxruntime execution providers to use on this device.

A provider is usable when the onnxruntime build offers it *and* its device exists here
(see ``_accelerators``): a wheel's list says what it was compiled with, not what the
machine has. Accelerators come first because a session falls back to the next provider
for any op the first cannot run; CPU is always last so every model still runs somewhere.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from ._accelerators import CPU_PROVIDERS, PROBES, Accelerator, Device, Host

# Most capable first. Azure is a remote-inference provider, not local compute.
PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "QNNExecutionProvider",
    "NnapiExecutionProvider",
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class Hardware:
    """The usable providers, best first, and the accelerator devices behind them."""

    providers: tuple[str, ...]
    accelerators: tuple[Accelerator, ...]


def probe_hardware(host: Host | None = None, offered: Iterable[str] | None = None) -> Hardware:
    """Match the build's providers (``offered``, onnxruntime's list by default) with the
    devices found on ``host`` (this device by default). Never raises: a probe that fails
    finds nothing.

    A device is listed once, under the best provider that will run on it (TensorRT and
    CUDA share NVIDIA's devices).
    """
    host = host or Host.here()
    if offered is None:
        import onnxruntime as ort  # where the caller has not recorded the build's list

        offered = ort.get_available_providers()
    present = set(offered)
    providers: list[str] = []
    accelerators: list[Accelerator] = []
    found: dict[object, list[Device]] = {}
    for name in PREFERENCE:
        if name not in present:
            continue
        if name in CPU_PROVIDERS:
            providers.append(name)
            continue
        probe = PROBES[name]
        listed = probe in found
        if not listed:
            try:
                found[probe] = probe(host)
            except Exception:  # a driver or file-system surprise: no device proven
                found[probe] = []
        if found[probe]:
            providers.append(name)
            if not listed:
                accelerators += [Accelerator(name, *device) for device in found[probe]]
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return Hardware(tuple(providers), tuple(accelerators))


def available_providers() -> tuple[str, ...]:
    """Local compute providers this build offers and this device can run, best first."""
    return probe_hardware().providers


def find_accelerators() -> tuple[Accelerator, ...]:
    """The accelerator devices here that a usable provider runs on, with their memory."""
    return probe_hardware().accelerators


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers a session should use: the requested ones that exist, then CPU."""
    present = available_providers()
    wanted = [p for p in (requested or present) if p in present]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted
