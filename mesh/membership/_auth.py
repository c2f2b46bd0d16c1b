"""Proving mesh membership before anything else is served.

Noise already proves *who* a peer is (its peer id); this handshake proves it holds the
mesh key. Both proofs are HMACs over both nonces and both peer ids, so a proof cannot be
replayed on another connection or relayed between other peers:

    dialer  → responder   {nonce_d}
    dialer  ← responder   {nonce_r, proof_r = HMAC(k, "responder", nonce_d, nonce_r, id_r, id_d)}
    dialer  → responder   {proof_d = HMAC(k, "dialer",    nonce_d, nonce_r, id_d, id_r)}
    dialer  ← responder   {ok: true}

A peer that fails gets its stream reset and its connection closed; until a peer passes,
every other protocol handler refuses its streams.
"""

import hmac
import secrets

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .._errors import AuthError, WireError
from ..wire import field, read_message, write_message
from ._meshkey import MeshKey

PROTOCOL = TProtocol("/salala/auth/1.0.0")
HANDSHAKE_TIMEOUT_S = 5.0
_NONCE = 32


def _nonce(message: dict[str, object], name: str) -> bytes:
    value = field(message, name, bytes)
    if len(value) != _NONCE:
        raise WireError(f"{name} must be {_NONCE} bytes")
    return value


async def prove_as_dialer(stream: INetStream, key: MeshKey, me: ID, peer: ID) -> None:
    """Run the dialer's side; raises AuthError if the peer is not in our mesh."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            nonce_d = secrets.token_bytes(_NONCE)
            await write_message(stream, {"nonce": nonce_d})
            reply = await read_message(stream)
            nonce_r = _nonce(reply, "nonce")
            expected = key.proof(b"responder", nonce_d, nonce_r, peer.to_bytes(), me.to_bytes())
            if not hmac.compare_digest(field(reply, "proof", bytes), expected):
                raise AuthError(f"peer {peer} does not hold this mesh's key")
            proof = key.proof(b"dialer", nonce_d, nonce_r, me.to_bytes(), peer.to_bytes())
            await write_message(stream, {"proof": proof})
            if (await read_message(stream)).get("ok") is not True:
                raise AuthError(f"peer {peer} refused our proof")
    except (WireError, trio.TooSlowError) as exc:
        raise AuthError(f"mesh handshake with {peer} failed: {exc}") from exc


async def verify_as_responder(stream: INetStream, key: MeshKey, me: ID, peer: ID) -> None:
    """Run the responder's side; raises AuthError if the dialer is not in our mesh."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            nonce_d = _nonce(await read_message(stream), "nonce")
            nonce_r = secrets.token_bytes(_NONCE)
            proof = key.proof(b"responder", nonce_d, nonce_r, me.to_bytes(), peer.to_bytes())
            await write_message(stream, {"nonce": nonce_r, "proof": proof})
            expected = key.proof(b"dialer", nonce_d, nonce_r, peer.to_bytes(), me.to_bytes())
            if not hmac.compare_digest(field(await read_message(stream), "proof", bytes), expected):
                await write_message(stream, {"ok": False})
                raise AuthError(f"peer {peer} does not hold this mesh's key")
            await write_message(stream, {"ok": True})
    except (WireError, trio.TooSlowError) as exc:
        raise AuthError(f"mesh handshake with {peer} failed: {exc}") from exc
