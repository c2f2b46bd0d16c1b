"""What the local API can do: one async method per request, over the node's parts.

Errors from the layers below are translated here, at the boundary, into the user-facing
tree of :mod:`._errors`; nothing from onnx, onnxruntime or libp2p reaches a client.
"""

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .. import models, runtime
from ..mesh import Mesh, short_id
from ._errors import (
    BadRequestError,
    CannotSplitError,
    InvalidInputError,
    InvalidModelError,
    SalalaError,
    UnknownModelError,
)
from ._paths import DataDir
from ._protocol import decode_tensors, encode_tensors

_TRANSLATIONS: list[tuple[type[Exception], type[SalalaError]]] = [
    (models.UnknownModelError, UnknownModelError),
    (models.InvalidModelError, InvalidModelError),
    (models.SplitError, CannotSplitError),
    (runtime.InputMismatchError, InvalidInputError),
    (runtime.ModelLoadError, InvalidModelError),
]


def translate(exc: Exception) -> SalalaError | None:
    """The user-facing error for a lower layer's refusal, or None for a real fault."""
    for source, target in _TRANSLATIONS:
        if isinstance(exc, source):
            return target(str(exc))
    return None


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadRequestError(f"parameter {name!r} must be a {kind.__name__}, not {value!r}")
    return value


class NodeService:
    """The node's request handlers. Owned by the daemon, shared by all API connections."""

    def __init__(
        self,
        *,
        data_dir: DataDir,
        store: models.ModelStore,
        mesh: Mesh,
        throughput: runtime.Throughput,
        threads: int | None,
    ) -> None:
        self.data_dir = data_dir
        self.store = store
        self.mesh = mesh
        self.throughput = throughput
        self.threads = threads
        self.shutdown_requested = trio.Event()
        self._started = trio.current_time()
        self._sessions: dict[str, runtime.ModelSession] = {}
        self._loading = trio.Lock()
        # One model run at a time: each session already uses every physical core.
        self._compute = trio.CapacityLimiter(1)
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "status": self.status,
            "models": self.list_models,
            "add_model": self.add_model,
            "split_model": self.split_model,
            "infer": self.infer,
            "peers": self.peers,
            "invite": self.invite,
            "shutdown": self.shutdown,
        }

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "peer_id": self.mesh.peer_id,
            "short_id": short_id(self.mesh.peer_id),
            "addrs": list(self.mesh.addrs),
            "mesh_id": self.mesh.mesh_id,
            "mdns_interfaces": [i.name for i in self.mesh.interfaces]
            if self.mesh.config.mdns
            else [],
            "members": len(self.mesh.membership.members()),
            "pid": os.getpid(),
            "data_dir": str(self.data_dir.root),
            "uptime_s": round(trio.current_time() - self._started, 3),
            "capacity": runtime.probe_capacity(self.throughput).to_dict(),
            "models": len(self.store.list()),
        }

    async def list_models(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.store.list()]

    async def add_model(self, params: dict[str, Any]) -> dict[str, Any]:
        path = Path(_param(params, "path", str))
        if not path.is_absolute():
            raise BadRequestError(f"model path {str(path)!r} must be absolute")
        name = _param(params, "name", str)
        stored = await trio.to_thread.run_sync(self.store.add, path, name)
        return stored.to_dict()

    async def split_model(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.store.get(_param(params, "name", str))
        parts = _param(params, "parts", int)
        if not 1 <= parts <= 64:
            raise BadRequestError(f"parts must be between 1 and 64, not {parts}")
        plan = await trio.to_thread.run_sync(
            models.split_stored, self.store, stored, parts, limiter=self._compute
        )
        self.mesh.refresh()  # the advert lists held fragments: announce them now
        return plan.to_dict()

    async def _session(self, stored: models.StoredModel) -> runtime.ModelSession:
        async with self._loading:
            session = self._sessions.get(stored.sha256)
            if session is None:
                session = await trio.to_thread.run_sync(
                    lambda: runtime.ModelSession(stored.path, threads=self.threads)
                )
                self._sessions[stored.sha256] = session
            return session

    async def infer(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.store.get(_param(params, "model", str))
        inputs = decode_tensors(params.get("inputs"))
        session = await self._session(stored)
        session.check_inputs(inputs)  # refuse cheaply before waiting for a compute slot
        outputs = await trio.to_thread.run_sync(session.run, inputs, limiter=self._compute)
        return {"outputs": encode_tensors(outputs)}

    async def peers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.mesh.peers()

    async def invite(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"uri": self.mesh.invite(), "mesh_id": self.mesh.mesh_id}

    async def shutdown(self, params: dict[str, Any]) -> dict[str, Any]:
        self.shutdown_requested.set()
        return {}
