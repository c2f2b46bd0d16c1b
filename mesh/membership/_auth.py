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
from collections.abc import Callable

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .._errors import AuthError, WireError
from ..wire import blob, flag, read_message, record, write_message
from ._meshkey import MeshKey

PROTOCOL = TProtocol("/salala/auth/1.0.0")
HANDSHAKE_TIMEOUT_S = 5.0
_NONCE = 32


# The four messages of the handshake, in order.
DIALER_NONCE = record({"nonce": blob(_NONCE)})
RESPONDER_PROOF = record({"nonce": blob(_NONCE), "proof": blob(32)})
DIALER_PROOF = record({"proof": blob(32)})
VERDICT = record({"ok": flag})


async def prove_as_dialer(stream: INetStream, key: MeshKey, me: ID, peer: ID) -> None:
    """Run the dialer's side; raises AuthError if the peer is not in our mesh."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            nonce_d = secrets.token_bytes(_NONCE)
            await write_message(stream, {"nonce": nonce_d})
            reply = await read_message(stream, RESPONDER_PROOF)
            nonce_r = reply["nonce"]
            expected = key.proof(b"responder", nonce_d, nonce_r, peer.to_bytes(), me.to_bytes())
            if not hmac.compare_digest(reply["proof"], expected):
                raise AuthError(f"peer {peer} does not hold this mesh's key")
            proof = key.proof(b"dialer", nonce_d, nonce_r, me.to_bytes(), peer.to_bytes())
            await write_message(stream, {"proof": proof})
            if not (await read_message(stream, VERDICT))["ok"]:
                raise AuthError(f"peer {peer} refused our proof")
    except (WireError, trio.TooSlowError) as exc:
        raise AuthError(f"mesh handshake with {peer} failed: {exc}") from exc


async def verify_as_responder(
    stream: INetStream, key: MeshKey, me: ID, peer: ID, proven: Callable[[], None] = lambda: None
) -> None:
    """Run the responder's side; raises AuthError if the dialer is not in our mesh.

    ``proven`` runs once the dialer's proof checks out and before we tell it so: the
    dialer's next stream may arrive before this task runs again, and must find it admitted.
    """
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            nonce_d = (await read_message(stream, DIALER_NONCE))["nonce"]
            nonce_r = secrets.token_bytes(_NONCE)
            proof = key.proof(b"responder", nonce_d, nonce_r, me.to_bytes(), peer.to_bytes())
            await write_message(stream, {"nonce": nonce_r, "proof": proof})
            expected = key.proof(b"dialer", nonce_d, nonce_r, peer.to_bytes(), me.to_bytes())
            if not hmac.compare_digest(
                (await read_message(stream, DIALER_PROOF))["proof"], expected
            ):
                await write_message(stream, {"ok": False})
                raise AuthError(f"peer {peer} does not hold this mesh's key")
            proven()
            await write_message(stream, {"ok": True})
    except (WireError, trio.TooSlowError) as exc:
        raise AuthError(f"mesh handshake with {peer} failed: {exc}") from exc
