"""A content-addressed model store in the node's data dir.

Models are kept under the sha256 of their bytes, so two names for the same file share
storage, a fragment can be fetched from any peer by hash and checked on arrival, and a
half-written copy can never be mistaken for a good one (objects appear by rename).

    <root>/objects/<sha256>/model.onnx   plus its external-data files, same relative names
    <root>/names.json                    name -> sha256
"""

import hashlib
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ._errors import InvalidModelError, UnknownModelError
from ._validate import load_checked

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHUNK = 4 << 20


@dataclass(frozen=True)
class StoredModel:
    name: str
    sha256: str
    size: int
    path: Path

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "path": str(self.path)}


def _digest(model_file: Path, external: list[Path]) -> str:
    """sha256 over the model file, then each external file's relative name and bytes."""
    digest = hashlib.sha256()
    for file in [model_file, *external]:
        if file is not model_file:
            digest.update(file.relative_to(model_file.parent.resolve()).as_posix().encode())
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidModelError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class ModelStore:
    """Models on this device, by name and by hash. Safe to use from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects = root / "objects"
        self._names_file = root / "names.json"
        self._lock = threading.Lock()
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

    def add_object(self, path: Path) -> tuple[str, int]:
        """Copy a checked model (and its external data) in; return its hash and size."""
        path = Path(path)
        _, external = load_checked(path)
        sha256 = _digest(path.resolve(), external)
        final = self._objects / sha256
        if not final.is_dir():
            source_root = path.parent.resolve()
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self._objects))
            try:
                shutil.copyfile(path, staging / MODEL_FILE)
                for file in external:
                    target = staging / file.relative_to(source_root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target)
                staging.replace(final)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not final.is_dir():  # a concurrent import of the same bytes won
                    raise
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        return sha256, size

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
        folder = self._objects / sha256
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return StoredModel(name, sha256, size, self.object_path(sha256))

    def list(self) -> list[StoredModel]:
        return [self.get(name) for name in sorted(self._names())]
