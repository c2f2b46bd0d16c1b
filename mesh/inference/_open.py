"""Sharded inference on a member: the stage server, the router and the deployer,
wired to the mesh's protocols and run for as long as the node runs."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ...models import ModelStore
from ..membership import Mesh
from ..wire import FETCH_PROTOCOL, Fetcher, FrameBudget, serve_fetch
from . import _deploy
from ._deploy import Deployer
from ._router import Router
from ._serving import StageServer
from ._undeploy import Undeployer

RETIRE_EVERY_S = 2.0  # one membership exchange: a finished redeploy is seen by then


@dataclass(frozen=True)
class Inference:
    server: StageServer
    router: Router
    deployer: Deployer
    fetcher: Fetcher
    undeployer: Undeployer

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
) -> AsyncIterator[Inference]:
    """``undeployed_file`` keeps the undeploy markers across restarts."""
    fetcher = Fetcher(mesh, store)
    server = StageServer(mesh, fetcher, threads, compute, budget, max_payload)
    router = Router(mesh, server)
    deployer = Deployer(mesh, server, router, store)
    router.rehost = deployer.rehost
    undeployer = Undeployer(mesh, server, router, undeployed_file)
    mesh.handle(FETCH_PROTOCOL, partial(serve_fetch, store))
    mesh.handle(_deploy.PROTOCOL, partial(_deploy.serve_deploy, server))

    async def retire_replaced() -> None:
        while True:
            await trio.sleep(RETIRE_EVERY_S)
            server.retire(router.current())
            undeployer.sync()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        nursery.start_soon(retire_replaced)
        yield Inference(server, router, deployer, fetcher, undeployer)
        nursery.cancel_scope.cancel()
