"""Errors raised by the mesh layer.

MeshError
└── ListenAddressError    the host cannot listen where it was asked to
"""


class MeshError(Exception):
    """Base class for errors raised by :mod:`salala.mesh`."""


class ListenAddressError(MeshError, ValueError):
    """A listen multiaddr is malformed, or its port cannot be bound."""
