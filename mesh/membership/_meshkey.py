"""The mesh key: the shared secret that names a mesh and admits its members.

A key is 32 random bytes, written ``salala-mesh-`` plus base32 so people can paste it.
The mesh *id* is a short public digest of the key: it names the mDNS service and shows
in invites and status, and reveals nothing about the key.
"""

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .._errors import MeshError

PREFIX = "salala-mesh-"


class MeshKeyError(MeshError, ValueError):
    """A mesh key that is not in the ``salala-mesh-…`` format."""


@dataclass(frozen=True)
class MeshKey:
    secret: bytes

    @classmethod
    def generate(cls) -> "MeshKey":
        return cls(secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str) -> "MeshKey":
        text = text.strip()
        if not text.startswith(PREFIX):
            raise MeshKeyError(f"a mesh key starts with {PREFIX!r} (see `salala mesh create`)")
        encoded = text[len(PREFIX) :].upper()
        try:
            secret = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
        except ValueError as exc:
            raise MeshKeyError(f"mesh key is not valid base32: {exc}") from exc
        if len(secret) != 32:
            raise MeshKeyError(f"a mesh key holds 32 bytes, this one {len(secret)}")
        return cls(secret)

    def __str__(self) -> str:
        return PREFIX + base64.b32encode(self.secret).decode().rstrip("=").lower()

    def __repr__(self) -> str:
        return f"MeshKey(id={self.mesh_id})"  # never print the secret by accident

    @property
    def mesh_id(self) -> str:
        return hashlib.sha256(b"salala mesh id\0" + self.secret).hexdigest()[:8]

    def proof(self, role: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 under a key derived for authentication only."""
        auth_key = hmac.new(self.secret, b"salala auth v1", hashlib.sha256).digest()
        message = b"".join(len(p).to_bytes(4, "big") + p for p in (role, *parts))
        return hmac.new(auth_key, message, hashlib.sha256).digest()
