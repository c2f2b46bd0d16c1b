"""Moving stored objects between members by content hash.

An object is a folder: ``model.onnx`` plus any external-data files under their relative
names (see ``models._store``). A fetch asks a peer for an object by sha256 from a byte
offset into the object's bytes laid end to end (``model.onnx`` first, then each external
file in the store's digest order). The reply names the object's size and, when it has
more than one file, its manifest: each file's relative name and size. The bytes land in
``<store>/incoming/<sha>.part``, so an interrupted transfer resumes where it stopped.

The caller names the object's whole size (the deployment's plan or the training setup
carries it), and a fetch never writes more: a peer that announces another size, a
manifest that does not add up to it, or keeps sending, cannot fill our disk. Every name
in a manifest must be one safe relative path inside the object folder. Before the first
byte, that size is reserved under the store's quota (evicting unused objects, or
refusing with TransferError). The finished bytes are hashed by the store's digest rule
before the object enters the store: a peer cannot hand us anything but the object we
asked for.
"""

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import (
    MODEL_FILE,
    InvalidModelError,
    ModelStore,
    PathEscapeError,
    StoreFullError,
    digest_order,
    inside,
)
from .._errors import MeshError, WireError
from .._peerid import short_id
from ._links import Streams
from ._messages import read_message, read_some, write_all, write_message
from ._schema import SHA256, array, integer, record, row, text, where

log = logging.getLogger(__name__)

FETCH_PROTOCOL = TProtocol("/salala/fetch/1.0.0")
CHUNK = 1 << 20
STALL_TIMEOUT_S = 15.0  # a transfer may be long, but each chunk must keep coming

Progress = Callable[[int, int], None]  # (bytes so far, total)


class TransferError(MeshError):
    """No peer could supply an object, or what arrived was not it."""


MAX_OBJECT = 1 << 40
MAX_FILES = 2048  # a model exported one file per tensor has a few hundred; fits one frame
MAX_PATH = 255
MAX_DEPTH = 8
Manifest = list[tuple[str, int]]  # (relative name, bytes), in the order they are sent


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= MAX_DEPTH and all(part not in ("", ".", "..") for part in parts)


# One relative path inside the object folder: no leading "/", no "\\", no control
# characters, no empty, "." or ".." part. ``models.inside`` checks again where it is written.
RELATIVE_PATH = where(
    text(MAX_PATH, r"[^/\\\x00-\x1f]+(/[^/\\\x00-\x1f]+)*"),
    _safe_relative,
    f"must be a relative path of at most {MAX_DEPTH} parts, none of them '.' or '..'",
)
MANIFEST = array(row(RELATIVE_PATH, integer(0, MAX_OBJECT)), MAX_FILES, 1)


def _consistent(reply: dict[str, Any]) -> bool:
    if "error" in reply:
        return len(reply) == 1
    if "size" not in reply:
        return False
    files = reply.get("files")
    if files is None:
        return True
    names = [name for name, _ in files]
    return (
        names[0] == MODEL_FILE
        and len(set(names)) == len(names)
        and sum(size for _, size in files) == reply["size"]
    )


FETCH_REQUEST = record({"sha256": SHA256, "offset": integer(0, MAX_OBJECT)})
FETCH_REPLY = where(
    record({}, {"size": integer(0, MAX_OBJECT), "files": MANIFEST, "error": text(1024)}),
    _consistent,
    "a reply holds an error, or a size and optionally a manifest of distinct files that "
    f"starts with {MODEL_FILE} and adds up to that size",
)


def object_manifest(folder: Path) -> Manifest:
    """The object's files, with their sizes, in the order the store's digest reads them."""
    root = folder.resolve()
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in digest_order(root)]


def _read_range(folder: Path, manifest: Manifest, offset: int) -> Iterator[tuple[Path, int, int]]:
    """(file, start, length) pieces that cover the object's bytes from ``offset`` on."""
    for name, size in manifest:
        if offset < size:
            yield folder / name, offset, size - offset
            offset = 0
        else:
            offset -= size


async def serve_fetch(store: ModelStore, peer_id: str, stream: INetStream) -> None:
    """Send the requested object (its manifest, then its bytes) from the requested offset."""
    request = await read_message(stream, FETCH_REQUEST)
    sha256, offset = request["sha256"], request["offset"]
    folder = store.object_path(sha256).parent
    try:
        manifest = await trio.to_thread.run_sync(object_manifest, folder)
    except OSError:
        await write_message(stream, {"error": f"no object {sha256[:12]} here"})
        return
    if len(manifest) > MAX_FILES:
        await write_message(stream, {"error": f"object {sha256[:12]} has over {MAX_FILES} files"})
        return
    size = sum(file_size for _, file_size in manifest)
    reply: dict[str, Any] = {"size": size}
    if len(manifest) > 1:  # single-file objects keep the reply every version understands
        reply["files"] = [list(item) for item in manifest]
    await write_message(stream, reply)
    for path, start, length in _read_range(folder, manifest, offset):
        with path.open("rb") as source:
            source.seek(start)
            while length > 0:
                chunk = await trio.to_thread.run_sync(source.read, min(CHUNK, length))
                if not chunk:
                    break  # the file shrank under us: the requester's hash check will tell
                length -= len(chunk)
                with trio.fail_after(STALL_TIMEOUT_S):
                    await write_all(stream, chunk)
    with trio.move_on_after(STALL_TIMEOUT_S):
        await stream.close()


async def _fetch_from(
    mesh: Streams,
    peer_id: str,
    sha256: str,
    size: int,
    part: Path,
    unpacked: Path,
    progress: Progress | None,
) -> Manifest:
    """Fetch the object's bytes into ``part``; returns the manifest the peer sent, each of
    its names checked to land inside ``unpacked`` before any byte is written."""
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
        manifest = [(name, file_size) for name, file_size in reply.get("files", [])]
        manifest = manifest or [(MODEL_FILE, size)]
        for name, _ in manifest:
            try:
                inside(unpacked, name)
            except PathEscapeError as exc:
                raise TransferError(f"{short_id(peer_id)}: {exc}") from exc
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
        return manifest
    finally:
        with trio.move_on_after(2):
            await stream.reset()


def _digest_of(part: Path, manifest: Manifest) -> str:
    """The store's digest of the object laid end to end in ``part``: the model file's
    bytes, then each external file's relative name and bytes."""
    digest = hashlib.sha256()
    with part.open("rb") as source:
        for index, (name, size) in enumerate(manifest):
            if index:
                digest.update(name.encode())
            while size > 0:  # the part holds exactly the manifest's bytes (see _fetch_from)
                chunk = source.read(min(CHUNK * 4, size))
                digest.update(chunk)
                size -= len(chunk)
    return digest.hexdigest()


def _unpack(part: Path, manifest: Manifest, folder: Path) -> Path:
    """Split ``part`` into the object's files under ``folder``; returns its model file.

    The last file is copied out first and the part cut short behind it, and so on, so the
    disk holds at most one file twice; the first file (the model) is the part, renamed.
    """
    starts = [0]
    for _, size in manifest[:-1]:
        starts.append(starts[-1] + size)
    folder.mkdir(exist_ok=True)
    for (name, size), start in reversed(list(zip(manifest, starts, strict=True))[1:]):
        target = inside(folder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with part.open("rb") as source, target.open("wb") as sink:
            source.seek(start)
            shutil.copyfileobj(_Limited(source, size), sink, CHUNK * 4)
        with part.open("r+b") as source:
            source.truncate(start)
    model_file = folder / MODEL_FILE
    part.replace(model_file)
    return model_file


class _Limited:
    """A reader that stops after ``size`` bytes."""

    def __init__(self, source: Any, size: int) -> None:
        self._source, self._left = source, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        chunk = self._source.read(n)
        self._left -= len(chunk)
        return bytes(chunk)


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
    unpacked = inside(incoming, sha256)
    failures = []
    attempts = [s for s in sources if s != mesh.peer_id]
    for index, peer_id in enumerate(attempts):
        if part.exists() and part.stat().st_size > size:
            part.unlink()  # left by an earlier fetch that was told another size
        resumed = part.stat().st_size if part.exists() else 0
        if resumed:
            log.info("resuming fragment %s at byte %d", sha256[:12], resumed)
        try:
            manifest = await _fetch_from(mesh, peer_id, sha256, size, part, unpacked, progress)
        except (MeshError, WireError, OSError, trio.TooSlowError) as exc:
            failures.append(f"{short_id(peer_id)}: {exc}")
            continue
        if await trio.to_thread.run_sync(_digest_of, part, manifest) != sha256:
            part.unlink()  # corrupt or not what we asked for: start over
            failures.append(f"{short_id(peer_id)}: bytes do not hash to {sha256[:12]}")
            if resumed:  # the kept prefix may have been the bad part: once more, whole
                attempts.insert(index + 1, peer_id)
            continue
        try:
            model_file = await trio.to_thread.run_sync(_unpack, part, manifest, unpacked)
            stored, _ = await trio.to_thread.run_sync(
                partial(store.add_object, model_file, move=True)
            )
        except (InvalidModelError, OSError) as exc:
            raise TransferError(f"object {sha256[:12]} does not import: {exc}") from exc
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)  # what a concurrent import left
            part.unlink(missing_ok=True)
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
