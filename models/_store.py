"""A content-addressed model store in the node's data dir.

Models are kept under the sha256 of their bytes, so two names for the same file share
storage, a fragment can be fetched from any peer by hash and checked on arrival, and a
half-written copy can never be mistaken for a good one (objects appear by rename).

    <root>/objects/<sha256>/model.onnx   plus its external-data files, same relative names,
                                         and its side files (``SIDE_FILES``) if it has any
    <root>/names.json                    name -> sha256
    <root>/incoming/<sha256>.part        a fetch in progress (or interrupted, to resume)

An object's hash covers every file in its folder, by this exact rule: sha256 over the
bytes of ``model.onnx``; then, for every other file (external data and side files) in
order of its name relative to the folder (POSIX, UTF-8), that name followed by its
bytes. A lone ``model.onnx`` therefore hashes to the sha256 of its bytes, and a fetch
can check an object from its manifest alone (``mesh.wire._transfer``). Side files are what a
language model needs beside its graph (``llm.json``, its card, and ``tokenizer.json``);
an object has them only if they lie beside the model file when it is added.

With a quota (``max_bytes``), every write first reserves its size: room is made by
evicting objects that nothing uses (see ``_quota``), or the write is refused. What is
in use is the named models, objects pinned by work in progress, and whatever the node's
running parts report through ``in_use`` (stages hosted, deployments known, jobs).
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import InvalidModelError, UnknownModelError
from ._quota import plan_eviction
from ._validate import check_model_file, side_files

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 4 << 20


@dataclass(frozen=True)
class StoredModel:
    name: str
    sha256: str
    size: int
    path: Path

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "path": str(self.path)}


def _digest(model_file: Path, external: list[Path], side: list[Path]) -> str:
    """sha256 by the rule in this module's docstring: the model file, then every other
    file by relative path (the order a fetch's manifest lists them in)."""
    digest = hashlib.sha256()
    root = model_file.parent.resolve()
    others = sorted([*external, *side], key=lambda f: f.relative_to(root).as_posix())
    for file in [model_file, *others]:
        if file is not model_file:
            digest.update(file.relative_to(model_file.parent.resolve()).as_posix().encode())
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def digest_order(folder: Path) -> list[Path]:
    """A stored object's files in the order its digest reads them: the model file, then
    every other file by relative path. Read from the folder alone (no parse), so serving
    an object costs no more than listing it."""
    root = folder.resolve()
    model_file = root / MODEL_FILE
    files = [p for p in root.rglob("*") if p.is_file() and p != model_file]
    return [model_file, *sorted(files, key=lambda p: p.relative_to(root).as_posix())]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidModelError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class ModelStore:
    """Models on this device, by name and by hash. Safe to use from several threads."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # Objects the node's running parts use (stages, deployments, training jobs). It is
        # called from worker threads, under the eviction lock; the node makes it safe.
        self.in_use: Callable[[], Set[str]] = frozenset
        self._objects = root / "objects"
        self._names_file = root / "names.json"
        self._lock = threading.Lock()  # names, pins, reservations; never held across calls out
        self._room = threading.Lock()  # one eviction decision at a time (worker threads only)
        self._pins: Counter[str] = Counter()
        self._reserved: dict[int, tuple[int, str | None]] = {}  # id -> (bytes, sha256)
        self._reservations = 0
        self._objects.mkdir(parents=True, exist_ok=True)

    def _names(self) -> dict[str, str]:
        try:
            return dict(json.loads(self._names_file.read_text()))
        except FileNotFoundError:
            return {}

    def _write_names(self, names: dict[str, str]) -> None:
        tmp = self._names_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(names, indent=1, sort_keys=True))
        tmp.replace(self._names_file)

    def object_path(self, sha256: str) -> Path:
        return self._objects / sha256 / MODEL_FILE

    def object_size(self, sha256: str) -> int:
        """Bytes of the whole object: its model file and every external-data file. A
        plan names this size, so a fetch of the object knows what to expect."""
        return _size(self._objects / sha256)

    # ---- room under the quota -------------------------------------------------------

    def objects(self) -> dict[str, tuple[int, float]]:
        """Every stored object: sha256 -> (bytes, when it was added)."""
        found = {}
        for folder in self._objects.iterdir():
            if _SHA256.match(folder.name) and folder.is_dir():
                found[folder.name] = (_size(folder), folder.stat().st_mtime)
        return found

    def used_bytes(self) -> int:
        """Bytes the store holds, plus those promised to writes in progress."""
        with self._lock:
            promised = sum(size for size, _ in self._reserved.values())
        return sum(size for size, _ in self.objects().values()) + promised + self._partial_bytes()

    @contextmanager
    def pinned(self, shas: Iterable[str]) -> Iterator[None]:
        """Keep these objects from eviction while the block runs (work in progress)."""
        shas = list(shas)
        with self._lock:
            self._pins.update(shas)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(shas)
                self._pins += Counter()  # drop zero counts

    def _protected(self) -> set[str]:
        with self._lock:
            held = {*self._names().values(), *self._pins}
            held |= {sha for _, sha in self._reserved.values() if sha}
        return held | set(self.in_use())

    def reserve(self, wanted: int, what: str, sha256: str | None = None) -> int:
        """Promise ``wanted`` bytes to a write, evicting unused objects to make room;
        StoreFullError if they cannot be made. Call from a worker thread, never from the
        event loop (``in_use`` may call back into it). Returns the id to ``release``."""
        with self._room:
            if self.max_bytes is not None:
                objects = self.objects()
                with self._lock:
                    promised = sum(size for size, _ in self._reserved.values())
                    fetching = {sha for _, sha in self._reserved.values() if sha} | {sha256}
                used = sum(size for size, _ in objects.values()) + promised
                used += self._partial_bytes()
                # Partial downloads count too, and when room is short those no fetch is
                # resuming go first: a peer that stops every transfer just short of its
                # end must not fill the disk.
                if used + wanted > self.max_bytes:
                    stale = self._partials(fetching)
                    self._drop_partials(stale)
                    used -= sum(stale.values())
                evict = plan_eviction(
                    objects, self._protected(), self.max_bytes, used, wanted, what
                )
                self._remove(evict)
            with self._lock:
                self._reservations += 1
                self._reserved[self._reservations] = (wanted, sha256)
                return self._reservations

    def _partials(self, fetching: Iterable[str | None]) -> dict[Path, int]:
        """Partial downloads (``incoming/*.part``) that no fetch in progress is resuming."""
        found, busy = {}, set(fetching)
        for part in (self.root / "incoming").glob("*.part"):
            if part.name.removesuffix(".part") not in busy:
                try:
                    found[part] = part.stat().st_size
                except OSError:
                    continue  # finished or removed meanwhile
        return found

    def _partial_bytes(self) -> int:
        return sum(self._partials(set()).values())

    @staticmethod
    def _drop_partials(parts: dict[Path, int]) -> None:
        for part in parts:
            part.unlink(missing_ok=True)

    def release(self, reservation: int) -> None:
        with self._lock:
            self._reserved.pop(reservation, None)

    @contextmanager
    def room(self, wanted: int, what: str, sha256: str | None = None) -> Iterator[None]:
        reservation = self.reserve(wanted, what, sha256)
        try:
            yield
        finally:
            self.release(reservation)

    def _remove(self, shas: Iterable[str]) -> list[str]:
        """Delete objects, then the split plans that pointed at them; returns the plans."""
        for sha in shas:
            shutil.rmtree(self._objects / sha, ignore_errors=True)
        dropped = []
        for plan_file in sorted((self.root / "splits").glob("*.json")):
            try:
                plan = json.loads(plan_file.read_text())
                needed = [plan["sha256"], *(f["sha256"] for f in plan["fragments"])]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours to judge
            if not all(isinstance(n, str) and (self._objects / n).is_dir() for n in needed):
                plan_file.unlink(missing_ok=True)
                dropped.append(plan_file.name)
        return dropped

    def collect_garbage(self) -> dict[str, Any]:
        """Remove every object no name, pin or running part uses, the split plans that
        pointed at them, and partial downloads no fetch is resuming. Worker thread only."""
        with self._room:
            protected = self._protected()
            objects = self.objects()
            removed = {sha: size for sha, (size, _) in objects.items() if sha not in protected}
            plans = self._remove(removed)
            with self._lock:
                fetching = {sha for _, sha in self._reserved.values() if sha}
            stale = self._partials(fetching)
            partial = sum(stale.values())
            self._drop_partials(stale)
        return {
            "removed": [{"sha256": sha, "size": size} for sha, size in sorted(removed.items())],
            "plans": plans,
            "freed": sum(removed.values()) + partial,
            "kept": len(objects) - len(removed),
            "used": self.used_bytes(),
            "quota": self.max_bytes,
        }

    # ---- adding ----------------------------------------------------------------------

    def add_object(self, path: Path, *, move: bool = False) -> tuple[str, int]:
        """Copy a checked model (its external data, its side files) in; return hash and size.

        ``move`` takes the files instead of copying them: they are already inside the
        store (a finished fetch), and the fetch's reservation already counts them.
        """
        path = Path(path)
        external = check_model_file(path)
        side = side_files(path, external)
        sha256 = _digest(path.resolve(), external, side)
        final = self._objects / sha256
        if not final.is_dir():
            size = sum(f.stat().st_size for f in [path, *external, *side])
            with self._room_for(0 if move else size, f"model {path.name}", sha256):
                source_root = path.parent.resolve()
                staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self._objects))
                take = os.replace if move else shutil.copyfile
                try:
                    take(path, staging / MODEL_FILE)
                    for file in [*external, *side]:
                        target = staging / file.relative_to(source_root)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        take(file, target)
                    staging.replace(final)
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
                    if not final.is_dir():  # a concurrent import of the same bytes won
                        raise
        return sha256, _size(final)

    @contextmanager
    def _room_for(self, wanted: int, what: str, sha256: str) -> Iterator[None]:
        if wanted == 0:
            yield
            return
        with self.room(wanted, what, sha256):
            yield

    def add(self, path: Path, name: str) -> StoredModel:
        """Import a model file under ``name`` (replacing what the name pointed to)."""
        check_name(name)
        sha256, size = self.add_object(path)
        with self._lock:
            names = self._names()
            names[name] = sha256
            self._write_names(names)
        return StoredModel(name, sha256, size, self.object_path(sha256))

    def get(self, name: str) -> StoredModel:
        sha256 = self._names().get(name)
        if sha256 is None or not self.object_path(sha256).is_file():
            known = ", ".join(sorted(self._names())) or "none"
            raise UnknownModelError(f"unknown model {name!r}; this node has: {known}")
        return StoredModel(name, sha256, _size(self._objects / sha256), self.object_path(sha256))

    def list(self) -> list[StoredModel]:
        return [self.get(name) for name in sorted(self._names())]
