"""Moving fragments between members by content hash.

A fetch asks a peer for an object by sha256 from a byte offset; the bytes land in
``<store>/incoming/<sha>.part``, so an interrupted transfer resumes where it stopped.
The caller names the object's size (the deployment's plan or the training setup
carries it), and a fetch never writes more: a peer that announces another size, or
keeps sending, cannot fill our disk. Before the first byte, that size is reserved
under the store's quota (evicting unused objects, or refusing with TransferError). The
finished file is hashed before it enters the store: a peer cannot hand us anything but
the object we asked for.
"""

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import MODEL_FILE, ModelStore, StoreFullError, inside
from .._errors import MeshError, WireError
from .._peerid import short_id
from ._links import Streams
from ._messages import read_message, read_some, write_all, write_message
from ._schema import SHA256, integer, record, text, where

log = logging.getLogger(__name__)

FETCH_PROTOCOL = TProtocol("/salala/fetch/1.0.0")
CHUNK = 1 << 20
STALL_TIMEOUT_S = 15.0  # a transfer may be long, but each chunk must keep coming

Progress = Callable[[int, int], None]  # (bytes so far, total)


class TransferError(MeshError):
    """No peer could supply an object, or what arrived was not it."""


MAX_OBJECT = 1 << 40
FETCH_REQUEST = record({"sha256": SHA256, "offset": integer(0, MAX_OBJECT)})
FETCH_REPLY = where(
    record({}, {"size": integer(0, MAX_OBJECT), "error": text(1024)}),
    lambda reply: len(reply) == 1,
    "a reply holds either a size or an error",
)


async def serve_fetch(store: ModelStore, peer_id: str, stream: INetStream) -> None:
    """Send the requested object from the requested offset."""
    request = await read_message(stream, FETCH_REQUEST)
    sha256, offset = request["sha256"], request["offset"]
    path = store.object_path(sha256)
    if not path.is_file() or any(p.name != MODEL_FILE for p in path.parent.iterdir()):
        await write_message(stream, {"error": f"no single-file object {sha256[:12]} here"})
        return
    size = path.stat().st_size
    await write_message(stream, {"size": size})
    with path.open("rb") as source:
        source.seek(min(offset, size))
        while chunk := await trio.to_thread.run_sync(source.read, CHUNK):
            with trio.fail_after(STALL_TIMEOUT_S):
                await write_all(stream, chunk)
    with trio.move_on_after(STALL_TIMEOUT_S):
        await stream.close()


async def _fetch_from(
    mesh: Streams, peer_id: str, sha256: str, size: int, part: Path, progress: Progress | None
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    stream = await mesh.open_stream(peer_id, FETCH_PROTOCOL)
    try:
        await write_message(stream, {"sha256": sha256, "offset": offset})
        reply = await read_message(stream, FETCH_REPLY)
        if "error" in reply:
            raise TransferError(f"{short_id(peer_id)}: {reply['error']}")
        if reply["size"] != size:
            raise TransferError(
                f"{short_id(peer_id)} offers {reply['size']} bytes of {sha256[:12]}, "
                f"which has {size}"
            )
        with part.open("ab") as sink:
            while offset < size:
                chunk = await read_some(stream, min(CHUNK, size - offset), STALL_TIMEOUT_S)
                if not chunk:
                    raise TransferError(
                        f"{short_id(peer_id)} stopped after {offset} of {size} bytes"
                    )
                sink.write(chunk)
                offset += len(chunk)
                if progress is not None:
                    progress(offset, size)
    finally:
        with trio.move_on_after(2):
            await stream.reset()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK * 4):
            digest.update(chunk)
    return digest.hexdigest()


async def fetch_object(
    mesh: Streams,
    store: ModelStore,
    sha256: str,
    size: int,
    sources: list[str],
    progress: Progress | None = None,
) -> Path:
    """The object's path in our store, fetched from the first source that has it.

    ``sha256`` and ``size`` come from a schema-checked plan; no more than ``size`` bytes
    are ever written for it.
    """
    if store.object_path(sha256).is_file():
        return store.object_path(sha256)
    try:  # room under the store's quota first, so a fetch that cannot fit writes nothing
        reservation = await trio.to_thread.run_sync(
            store.reserve, size, f"fragment {sha256[:12]}", sha256
        )
    except StoreFullError as exc:
        raise TransferError(str(exc)) from exc
    try:
        return await _fetch_into(mesh, store, sha256, size, sources, progress)
    finally:
        store.release(reservation)


async def _fetch_into(
    mesh: Streams,
    store: ModelStore,
    sha256: str,
    size: int,
    sources: list[str],
    progress: Progress | None,
) -> Path:
    incoming = store.root / "incoming"
    incoming.mkdir(exist_ok=True)
    part = inside(incoming, f"{sha256}.part")
    failures = []
    attempts = [s for s in sources if s != mesh.peer_id]
    for index, peer_id in enumerate(attempts):
        if part.exists() and part.stat().st_size > size:
            part.unlink()  # left by an earlier fetch that was told another size
        resumed = part.stat().st_size if part.exists() else 0
        if resumed:
            log.info("resuming fragment %s at byte %d", sha256[:12], resumed)
        try:
            await _fetch_from(mesh, peer_id, sha256, size, part, progress)
        except (MeshError, WireError, OSError, trio.TooSlowError) as exc:
            failures.append(f"{short_id(peer_id)}: {exc}")
            continue
        if await trio.to_thread.run_sync(_sha256_of, part) != sha256:
            part.unlink()  # corrupt or not what we asked for: start over
            failures.append(f"{short_id(peer_id)}: bytes do not hash to {sha256[:12]}")
            if resumed:  # the kept prefix may have been the bad part: once more, whole
                attempts.insert(index + 1, peer_id)
            continue
        model_file = incoming / sha256 / MODEL_FILE
        model_file.parent.mkdir(exist_ok=True)
        part.replace(model_file)
        stored, _ = await trio.to_thread.run_sync(partial(store.add_object, model_file, move=True))
        model_file.unlink(missing_ok=True)  # still here if a concurrent import won
        model_file.parent.rmdir()
        if stored != sha256:
            raise TransferError(f"object {sha256[:12]} changed on import")
        return store.object_path(sha256)
    raise TransferError(
        f"no peer could supply fragment {sha256[:12]} ({'; '.join(failures) or 'no sources'})"
    )


class Fetcher:
    """Fetches objects into one node's store, one download per hash at a time.

    Two stages set up on one node at once (replicas of a training stage, or a deploy
    racing a re-host) may want the same object; they share its ``.part`` file, so the
    second waits for the first and then finds the object stored.
    """

    def __init__(self, mesh: Streams, store: ModelStore) -> None:
        self._mesh = mesh
        self._store = store
        self._locks: dict[str, trio.Lock] = {}

    async def fetch(
        self, sha256: str, size: int, sources: list[str], progress: Progress | None = None
    ) -> Path:
        async with self._locks.setdefault(sha256, trio.Lock()):
            return await fetch_object(self._mesh, self._store, sha256, size, sources, progress)

    @contextmanager
    def pinned(self, shas: Iterable[str]) -> Iterator[None]:
        """Keep objects from eviction while a stage fetches and loads them."""
        with self._store.pinned(shas):
            yield
