"""Sharded inference on a member: the stage server, the router and the deployer,
wired to the mesh's protocols and run for as long as the node runs."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ...models import ModelStore
from .._errors import MeshError
from ..membership import Mesh
from ..wire import FETCH_PROTOCOL, Fetcher, FrameBudget, serve_fetch
from . import _card, _deploy
from ._deploy import Deployer
from ._router import Router, UnknownDeploymentError
from ._serving import DEFAULT_KV_BUDGET, StageServer
from ._undeploy import Undeployer

RETIRE_EVERY_S = 2.0  # one membership exchange: a finished redeploy is seen by then


@dataclass(frozen=True)
class Inference:
    server: StageServer
    router: Router
    deployer: Deployer
    fetcher: Fetcher
    undeployer: Undeployer
    store: ModelStore

    async def text_side(self, model: str) -> tuple[str, bytes, bytes]:
        """(first fragment's hash, card bytes, tokenizer bytes) of a deployed language
        model: from this node's store if it holds a fragment, else from a host."""
        deployment = self.router.deployments().get(model)
        if deployment is None:
            raise UnknownDeploymentError(f"no deployment of {model!r} in the mesh")
        fragment = deployment.entries[0].fragment
        for entry in deployment.entries:
            local = self.store.object_path(entry.fragment).parent
            found = _card.read_text_side(local)
            if found is not None:
                return fragment, *found
        failures = []
        for entry, hosts in zip(deployment.entries, deployment.hosts, strict=True):
            for peer_id in hosts:
                try:
                    return fragment, *await _card.fetch_card(self.mesh, peer_id, entry.fragment)
                except MeshError as exc:
                    failures.append(str(exc))
        raise MeshError(
            f"{model} has no text side anywhere (is it a language model?): "
            + ("; ".join(failures[:3]) or "no live host")
        )

    @property
    def mesh(self) -> Mesh:
        return self.server.mesh

    def objects_in_use(self) -> set[str]:
        """Store objects inference needs: the fragments of stages hosted here and of every
        deployment this node knows of (it may be asked to host them, or to supply them)."""
        used = set(self.server.hosted_fragments())
        for deployment in self.router.deployments().values():
            used.update(entry.fragment for entry in deployment.entries)
        return used


@asynccontextmanager
async def open_inference(
    mesh: Mesh,
    store: ModelStore,
    threads: int | None,
    compute: trio.CapacityLimiter,
    budget: FrameBudget,
    max_payload: int,
    undeployed_file: Path | None = None,
    kv_budget: int = DEFAULT_KV_BUDGET,
    memory_budget: int | None = None,
) -> AsyncIterator[Inference]:
    """``undeployed_file`` keeps the undeploy markers across restarts; ``kv_budget``
    bounds the bytes of every generation session's caches on this node, and
    ``memory_budget`` (None: whatever is free) what its stages and caches may use."""
    fetcher = Fetcher(mesh, store)
    server = StageServer(
        mesh, fetcher, threads, compute, budget, max_payload, kv_budget, memory_budget
    )
    router = Router(mesh, server)
    deployer = Deployer(mesh, server, router, store)
    router.rehost = deployer.rehost
    undeployer = Undeployer(mesh, server, router, undeployed_file)
    mesh.handle(FETCH_PROTOCOL, partial(serve_fetch, store))
    mesh.handle(_deploy.PROTOCOL, partial(_deploy.serve_deploy, server))
    mesh.handle(_card.PROTOCOL, partial(_card.serve_card, server.hosted_fragments, store))

    async def retire_replaced() -> None:
        while True:
            await trio.sleep(RETIRE_EVERY_S)
            server.retire(router.current())
            undeployer.sync()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        nursery.start_soon(retire_replaced)
        yield Inference(server, router, deployer, fetcher, undeployer, store)
        nursery.cancel_scope.cancel()
