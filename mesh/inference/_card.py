"""Getting a language model's text side from a host: ``/salala/card/1.0.0``.

A requester tokenizes prompts and detokenizes tokens itself, but it may hold no part of
the model. Every fragment of a causal language model carries the model's card
(``llm.json``: context length, stop tokens, chat template, defaults) and its
``tokenizer.json`` beside the ONNX file, so any host of any stage can hand them over.
A host only serves fragments it hosts; the reply is size-capped and checked against
its schema here, and its contents are parsed by the caller before use.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import ModelStore
from .._errors import MeshError
from .._peerid import short_id
from ..membership import Mesh
from ..wire import SHA256, SchemaError, blob, read_message, record, text, where, write_message

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/salala/card/1.0.0")
CARD_FILE = "llm.json"
TOKENIZER_FILE = "tokenizer.json"
MAX_CARD = 256 << 10
MAX_TOKENIZER = 32 << 20
TIMEOUT_S = 30.0

CARD_REQUEST = record({"fragment": SHA256})
CARD_REPLY = where(
    record(
        {},
        {
            "card": blob(MAX_CARD),
            "tokenizer": blob(MAX_TOKENIZER),
            "error": text(1024),
            "field": text(256),
        },
    ),
    lambda r: ("error" in r) != ("card" in r and "tokenizer" in r),
    "a reply holds the card and the tokenizer, or an error",
)


def read_text_side(folder: Path) -> tuple[bytes, bytes] | None:
    """(card, tokenizer) bytes from a fragment's folder, or None if it has none."""
    try:
        card = (folder / CARD_FILE).read_bytes()
        tokenizer = (folder / TOKENIZER_FILE).read_bytes()
    except OSError:
        return None
    if len(card) > MAX_CARD or len(tokenizer) > MAX_TOKENIZER:
        return None
    return card, tokenizer


async def serve_card(
    hosted: Callable[[], list[str]], store: ModelStore, peer_id: str, stream: INetStream
) -> None:
    """Hand over the card of a fragment this node hosts (``hosted`` lists them)."""
    with trio.fail_after(TIMEOUT_S):
        try:
            request = await read_message(stream, CARD_REQUEST)
        except SchemaError as exc:
            await write_message(stream, {"error": str(exc), "field": exc.field})
            return
        fragment = request["fragment"]
        found = None
        if fragment in hosted():
            found = read_text_side(store.object_path(fragment).parent)
        if found is None:
            await write_message(stream, {"error": f"no card for fragment {fragment[:12]} here"})
            return
        card, tokenizer = found
        await write_message(stream, {"card": card, "tokenizer": tokenizer})


async def fetch_card(mesh: Mesh, peer_id: str, fragment: str) -> tuple[bytes, bytes]:
    """The card and tokenizer of ``fragment`` from a peer that hosts it."""
    try:
        with trio.fail_after(TIMEOUT_S):
            stream = await mesh.open_stream(peer_id, PROTOCOL)
            try:
                await write_message(stream, {"fragment": fragment})
                reply = await read_message(
                    stream, CARD_REPLY, max_frame=MAX_CARD + MAX_TOKENIZER + 4096
                )
            finally:
                await stream.close()
    except (trio.TooSlowError, SchemaError) as exc:
        raise MeshError(f"{short_id(peer_id)} gave no usable card: {exc}") from exc
    if "error" in reply:
        raise MeshError(f"{short_id(peer_id)}: {reply['error']}")
    return reply["card"], reply["tokenizer"]
