"""Which onnxruntime execution providers to use on this device.

Accelerators come first because a session falls back to the next provider for any op
the first cannot run; CPU is always last so every model still runs somewhere.
"""

import onnxruntime as ort

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


def available_providers() -> tuple[str, ...]:
    """Local compute providers this onnxruntime build offers, best first."""
    present = set(ort.get_available_providers())
    return tuple(name for name in PREFERENCE if name in present)


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers a session should use: the requested ones that exist, then CPU."""
    present = available_providers()
    wanted = [p for p in (requested or present) if p in present]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted
