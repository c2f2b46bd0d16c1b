"""How many threads one onnxruntime session should use on this device."""

import psutil


def fitted_thread_count() -> int:
    """One intra-op thread per physical core.

    Hyper-threads share execution units, so counting them makes matmul-heavy models
    slower, not faster; where physical cores cannot be read (Android) we fall back to
    logical cores.
    """
    try:
        physical = psutil.cpu_count(logical=False)
    except (OSError, NotImplementedError):  # PermissionError on Android /proc
        physical = None
    if physical:
        return physical
    try:
        return psutil.cpu_count(logical=True) or 1
    except (OSError, NotImplementedError):
        return 1
