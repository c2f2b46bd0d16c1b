"""Errors raised by the on-device runtime.

    RuntimeFault
    ├── ModelLoadError        the file could not be turned into a session
    └── InputMismatchError    the caller's tensors do not fit the model's inputs

The node translates these into its own user-facing errors; onnxruntime's exception
types never leave this package.
"""


class RuntimeFault(Exception):
    """Base class for errors raised by :mod:`salala.runtime`."""


class ModelLoadError(RuntimeFault):
    """onnxruntime refused to build a session from a model file."""


class InputMismatchError(RuntimeFault, ValueError):
    """Input tensors have the wrong names, dtypes or shapes for the model."""
