"""What the local API can do: one async method per request, over the node's parts.

Errors from the layers below are translated here, at the boundary, into the user-facing
tree of :mod:`._errors`; nothing from onnx, onnxruntime or libp2p reaches a client.
"""

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import models, runtime
from ..mesh import ContextLengthError as MeshContextLengthError
from ..mesh import (
    DeployError,
    Inference,
    JobError,
    Mesh,
    StageRefusal,
    Training,
    TrainingError,
    UnknownDeploymentError,
    parse_job,
    short_id,
)
from ..mesh import NoRouteError as NoMeshRouteError
from ._errors import (
    BadRequestError,
    CannotDeployError,
    CannotSplitError,
    ContextLengthError,
    InvalidInputError,
    InvalidJobError,
    InvalidModelError,
    NoRouteError,
    SalalaError,
    StoreFullError,
    TrainingFailedError,
    UnknownModelError,
)
from ._generation import ChatMessage, Finished, GenerationRequest
from ._llm import MeshGenerator
from ._paths import DataDir
from ._protocol import decode_tensors, encode_tensors

_TRANSLATIONS: list[tuple[type[Exception], type[SalalaError]]] = [
    (UnknownDeploymentError, UnknownModelError),
    (NoMeshRouteError, NoRouteError),
    (DeployError, CannotDeployError),
    (JobError, InvalidJobError),
    (TrainingError, TrainingFailedError),
    (runtime.OptimizerError, InvalidJobError),
    (models.UnknownModelError, UnknownModelError),
    (models.InvalidModelError, InvalidModelError),
    (models.SplitError, CannotSplitError),
    (models.OnnxMissingError, CannotSplitError),
    (models.StoreFullError, StoreFullError),
    (models.ChatTemplateError, BadRequestError),
    (models.TokenizerMissingError, BadRequestError),
    (MeshContextLengthError, ContextLengthError),
    (runtime.InputMismatchError, InvalidInputError),
    (runtime.ModelLoadError, InvalidModelError),
]


def translate(exc: Exception) -> SalalaError | None:
    """The user-facing error for a lower layer's refusal, or None for a real fault."""
    if isinstance(exc, StageRefusal):
        return (InvalidInputError if exc.code == "invalid_input" else BadRequestError)(str(exc))
    for source, target in _TRANSLATIONS:
        if isinstance(exc, source):
            return target(str(exc))
    return None


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadRequestError(f"parameter {name!r} must be a {kind.__name__}, not {value!r}")
    return value


def generation_request(params: dict[str, Any]) -> GenerationRequest:
    """A local caller's generation parameters, checked (bounds as OpenAI's)."""
    prompt, messages = params.get("prompt"), params.get("messages")
    if (prompt is None) == (messages is None):
        raise BadRequestError("give exactly one of prompt and messages")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequestError("prompt must be a string")
    chat = None
    if messages is not None:
        checked = models.check_messages(messages)
        chat = [ChatMessage(m["role"], m["content"]) for m in checked]  # type: ignore[arg-type]
    max_tokens = _param(params, "max_tokens", int)
    temperature = params.get("temperature", 1.0)
    top_p = params.get("top_p", 1.0)
    top_k = params.get("top_k", 0)
    seed = params.get("seed")
    stop = params.get("stop", [])
    if max_tokens < 1:
        raise BadRequestError(f"max_tokens must be at least 1, not {max_tokens}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequestError(f"temperature must lie in [0, 2], not {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadRequestError(f"top_p must lie in (0, 1], not {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise BadRequestError(f"top_k must be a whole number >= 0, not {top_k!r}")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 1 << 63):
        raise BadRequestError(f"seed must be a whole number in [0, 2^63), not {seed!r}")
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise BadRequestError("stop must be a string or a list of up to 4 strings")
    return GenerationRequest(
        model=_param(params, "model", str),
        prompt=prompt,
        messages=chat,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        seed=seed,
        stop=stop,
    )


class NodeService:
    """The node's request handlers. Owned by the daemon, shared by all API connections."""

    def __init__(
        self,
        *,
        data_dir: DataDir,
        store: models.ModelStore,
        mesh: Mesh,
        inference: Inference,
        training: Training,
        capacity: Callable[[], runtime.Capacity],
        threads: int | None,
        compute: trio.CapacityLimiter,
        max_tensor_bytes: int,
    ) -> None:
        self.data_dir = data_dir
        self.store = store
        self.mesh = mesh
        self.inference = inference
        self.training = training
        self.max_tensor_bytes = max_tensor_bytes
        self._capacity = capacity  # this device now, from readings taken off the loop
        self.threads = threads
        self.shutdown_requested = trio.Event()
        self.stop_after_reply = False
        self._started = trio.current_time()
        self._sessions: dict[str, runtime.ModelSession] = {}
        self._loading = trio.Lock()
        self._compute = compute
        self.generator = MeshGenerator(inference)
        self.reports_progress = {"deploy", "train"}
        self.streams = {"generate"}  # handlers that emit events before their result
        self.methods: dict[str, Callable[..., Awaitable[Any]]] = {
            "status": self.status,
            "models": self.list_models,
            "add_model": self.add_model,
            "split_model": self.split_model,
            "infer": self.infer,
            "generate": self.generate,
            "peers": self.peers,
            "deploy": self.deploy,
            "deployments": self.deployments,
            "undeploy": self.undeploy,
            "gc_models": self.gc_models,
            "train": self.train,
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
            "served": dict(self.inference.server.served),
            "pid": os.getpid(),
            "data_dir": str(self.data_dir.root),
            "uptime_s": round(trio.current_time() - self._started, 3),
            "capacity": {
                **self._capacity().to_dict(),
                **{  # the owner's verdict, as this node advertises it
                    key: self.mesh.membership.own.capacity[key]
                    for key in ("available", "unavailable_reason")
                },
            },
            "models": len(self.store.list()),
            "store": {"used": self.store.used_bytes(), "quota": self.store.max_bytes},
            "kv_cache": {  # generation sessions whose stages run here
                "sessions": self.inference.server.kv.sessions(),
                "used": self.inference.server.kv.used,
                "budget": self.inference.server.kv.budget,
            },
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
        outputs, trace = await self.run(
            _param(params, "model", str), decode_tensors(params.get("inputs"))
        )
        route = [{"stage": s, "peer": p, "short_id": short_id(p), "ms": ms} for s, p, ms in trace]
        return {"outputs": encode_tensors(outputs), "route": route}

    async def run(
        self, name: str, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], list[Any]]:
        """Run a model: through the mesh if it is deployed there, else stored here."""
        if name in self.inference.router.deployments():
            size = sum(a.nbytes for a in inputs.values())
            if size > self.max_tensor_bytes:
                raise BadRequestError(
                    f"tensors of {size} bytes exceed the limit of {self.max_tensor_bytes} "
                    "(--max-tensor-mb)"
                )
            return await self.inference.router.infer(name, inputs)
        stored = self.store.get(name)
        session = await self._session(stored)
        session.check_inputs(inputs)  # refuse cheaply before waiting for a compute slot
        outputs = await trio.to_thread.run_sync(session.run, inputs, limiter=self._compute)
        return outputs, []

    async def generate(
        self, params: dict[str, Any], emit: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> dict[str, Any]:
        """Stream ``{"text": piece}`` events, then return the finish reason and usage."""
        request = generation_request(params)
        async for event in self.generator.generate(request):
            if isinstance(event, Finished):
                usage = event.usage
                return {
                    "finish_reason": event.finish_reason,
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                    },
                }
            await emit({"text": event.text})
        raise BadRequestError("generation ended without finishing")

    async def deploy(
        self, params: dict[str, Any], progress: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        stored = self.store.get(_param(params, "model", str))
        shards = params.get("shards")
        if shards is not None and (
            not isinstance(shards, int) or isinstance(shards, bool) or shards < 1
        ):
            raise BadRequestError(f"shards must be a positive number or 'auto', not {shards!r}")
        replicas = _param(params, "replicas", int)
        codec = _param(params, "codec", str)
        return await self.inference.deployer.deploy(stored, shards, replicas, codec, progress)

    async def train(
        self, params: dict[str, Any], progress: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        job = params.get("job")
        if not isinstance(job, dict):
            raise BadRequestError("train needs a job table")
        parsed = parse_job(job, Path(_param(params, "base", str)))
        return await self.training.driver.train(parsed, progress)

    async def deployments(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "model": model,
                "deployment": d.entries[0].deployment,
                "codec": d.entries[0].codec,
                "stages": [
                    {
                        "stage": e.stage,
                        "fragment": e.fragment,
                        "hosts": hosts,
                        "short_ids": [short_id(h) for h in hosts],
                    }
                    for e, hosts in zip(d.entries, d.hosts, strict=True)
                ],
            }
            for model, d in sorted(self.inference.router.deployments().items())
        ]

    async def undeploy(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove a model's deployment from the whole mesh (see mesh.inference._undeploy)."""
        model = models.check_name(_param(params, "model", str))
        return await self.inference.undeployer.undeploy(model)

    async def gc_models(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove every stored object that no named model and no live deployment uses."""
        freed = await trio.to_thread.run_sync(self.store.collect_garbage)
        self.mesh.refresh()  # the advert lists held fragments: announce the change now
        return freed

    async def peers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.mesh.peers()

    async def invite(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"uri": self.mesh.invite(), "mesh_id": self.mesh.mesh_id}

    async def shutdown(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stop once this call is answered (the API server sets ``shutdown_requested``
        after sending the reply; stopping first would cut the caller off)."""
        self.stop_after_reply = True
        return {}
