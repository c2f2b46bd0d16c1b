"""Errors raised by the mesh layer.

MeshError
└── ListenAddressError    the host cannot listen where it was asked to
"""


class MeshError(Exception):
    """Base class for errors raised by :mod:`salala.mesh`."""


class ListenAddressError(MeshError, ValueError):
    """A listen multiaddr is malformed, or its port cannot be bound."""


class WireError(MeshError):
    """A peer sent something that is not a valid message of the protocol."""


class AuthError(MeshError):
    """A peer failed the mesh-key handshake (wrong key, or not speaking it)."""
