"""Errors raised by model import, storage and splitting.

ModelError
├── InvalidModelError     not a usable ONNX model (garbage, truncated, unsafe paths)
├── UnknownModelError     no model by that name or hash in the store
├── SplitError            the model cannot be cut the way that was asked
├── PathEscapeError       a name would place a file outside the folder meant for it
├── StoreFullError        the store's quota leaves no room, even after evicting what is unused
├── LlmImportError        a language model cannot be imported: not a GGUF file or Hugging Face
│                         folder, the ``export`` extra is missing, or the builder failed
└── OnnxMissingError      the work needs the onnx package, which this node does not have
"""


class ModelError(Exception):
    """Base class for errors raised by :mod:`salala.models`."""


class InvalidModelError(ModelError, ValueError):
    """The file is not a valid, self-contained ONNX model."""


class UnknownModelError(ModelError, LookupError):
    """The store holds no model by that name."""


class SplitError(ModelError, ValueError):
    """The model has too few single-activation cut points for the requested parts."""


class PathEscapeError(ModelError, ValueError):
    """A file would land outside the folder it belongs in (``..``, absolute, symlink)."""


class StoreFullError(ModelError):
    """An object does not fit under the store's quota, even after evicting unused ones."""

    def __init__(self, message: str, *, quota: int, wanted: int, free: int) -> None:
        super().__init__(message)
        self.quota = quota
        self.wanted = wanted
        self.free = free


class LlmImportError(ModelError, ValueError):
    """A language model cannot be imported from that source on this machine."""


class OnnxMissingError(ModelError, ImportError):
    """Splitting, importing or exporting a model needs the ``onnx`` extra."""
