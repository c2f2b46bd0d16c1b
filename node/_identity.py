"""The node's persistent Ed25519 identity: the libp2p key that names it in every mesh.

The 32-byte private key lives in the data dir, readable only by its owner; losing it
means the device joins as a new peer.
"""

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID


def load_or_create_identity(path: Path) -> KeyPair:
    if path.exists():
        private = Ed25519PrivateKey.from_bytes(path.read_bytes())
    else:
        private = Ed25519PrivateKey.new()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(private.to_bytes())
        tmp.replace(path)
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()
