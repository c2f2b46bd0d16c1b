"""The onnx package, for the work that edits graphs.

Nodes host and run fragments with onnxruntime alone, and phones have no onnx wheel, so
onnx is an extra. Whoever splits, imports or exports a model asks for it here and gets
a message saying what to install instead of an ImportError from deep inside.
"""

from types import ModuleType

from ._errors import OnnxMissingError

EXTRA = "salala[onnx]"


def require_onnx(purpose: str) -> ModuleType:
    """``import onnx``, or an :class:`OnnxMissingError` naming ``purpose`` and the fix."""
    try:
        import onnx
    except ImportError as exc:
        raise OnnxMissingError(
            f"{purpose} needs the onnx package, which is not installed on this node: "
            f"pip install '{EXTRA}' (hosting and running fragments does not need it)"
        ) from exc
    return onnx
