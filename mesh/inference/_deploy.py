"""Deploying a model over the mesh: plan, cut, hand each stage to its peers, wait.

The deploying node plans from the adverts it holds (measured GFLOP/s, free memory, RTT),
cuts the model at the planned points into fragments in its own store, then asks every
chosen peer over ``/salala/deploy/1.0.0`` to host its stage. A host fetches the fragment
by hash from the deployer, loads it, warms it up and advertises it; it reports transfer
progress as it goes. The deploy returns once the deployer sees every stage advertised.
"""

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import (
    CutAnalysis,
    ModelStore,
    StoredModel,
    analyze_stored,
    llm_card,
    split_stored_at,
)
from .._errors import MeshError
from .._peerid import short_id
from ..membership import Mesh
from ..wire import CODECS, SchemaError, read_message, write_message
from ._headers import HOST_REPLY, HOST_REQUEST
from ._placement import PeerCapacity, PlacementError, measured_bandwidth, plan_placement
from ._router import Router
from ._serving import ServingEntry, StageServer

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/salala/deploy/1.0.0")
HOST_TIMEOUT_S = 600.0
PROGRESS_EVERY_S = 0.5
VISIBLE_TIMEOUT_S = 15.0
# Cutting a large model holds the GIL for seconds at a time (onnx parses, infers shapes
# and copies protobufs in C++), and a node whose loop is held that long finds its peers
# silent and evicts them until the next exchange. Peers live when the deploy began are
# waited for this long before the plan or the hosting goes on without them.
REJOIN_TIMEOUT_S = 30.0

DeployProgress = Callable[[dict[str, Any]], None]


class DeployError(MeshError):
    """A deployment could not be completed."""


def peer_capacity(peer_id: str, capacity: dict[str, Any], rtt_ms: float) -> PeerCapacity:
    """What placement may count on at a peer, from its advert's capacity.

    Its GFLOP/s were measured on its first provider. When that provider is an accelerator
    whose free memory the peer reports (a GPU), its stages live in that device's memory,
    so that, not the host's free memory, bounds what a stage there may hold. onnxruntime
    runs a session on the provider's device 0, the first listed. Older adverts carry no
    ``accelerators``; their peers are planned by host memory.
    """
    memory = float(capacity.get("memory_available") or 1 << 30)
    providers = capacity.get("providers") or []
    devices = [
        a
        for a in capacity.get("accelerators") or []
        if providers and isinstance(a, dict) and a.get("provider") == providers[0]
    ]
    if devices and isinstance(devices[0].get("memory_free"), int):
        memory = float(devices[0]["memory_free"])
    return PeerCapacity(
        peer_id, gflops=float(capacity.get("gflops") or 1.0), memory_available=memory, rtt_ms=rtt_ms
    )


async def serve_deploy(server: StageServer, peer_id: str, stream: INetStream) -> None:
    """Host the stage a member asks us to, reporting fetch progress until it is ready.

    A request that fails HOST_REQUEST is answered with the field at fault (an unknown
    codec is named, with the codecs this node supports), and nothing is fetched.
    """
    try:
        request = await read_message(stream, HOST_REQUEST)
    except SchemaError as exc:
        await write_message(stream, {"ok": False, "error": str(exc), "field": exc.field})
        return
    entry = ServingEntry(**request["entry"])
    sources = request["sources"]
    progress = {"bytes": 0, "total": 0}

    def note(done: int, total: int) -> None:
        progress.update(bytes=done, total=total)

    async def report() -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY_S)
            await write_message(stream, {"progress": dict(progress)})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        try:
            # pinned: under a store quota, not evicted between its fetch and its hosting
            with trio.fail_after(HOST_TIMEOUT_S), server.fetcher.pinned([entry.fragment]):
                await server.host(entry, sources, note)
            verdict: dict[str, Any] = {"ok": True}
        except (MeshError, trio.TooSlowError) as exc:  # caught here, not as a task group
            verdict = {"ok": False, "error": str(exc) or "hosting timed out"}
        nursery.cancel_scope.cancel()
    await write_message(stream, verdict)


class Deployer:
    def __init__(self, mesh: Mesh, server: StageServer, router: Router, store: ModelStore) -> None:
        self.mesh = mesh
        self.server = server
        self.router = router
        self.store = store
        self._analyses: dict[str, CutAnalysis] = {}

    def _capacities(self) -> list[PeerCapacity]:
        peers = []
        for member in self.mesh.membership.members():
            advert = member.advert
            if not self.mesh.takes_work(advert.peer_id) or not advert.compatible:
                continue
            rtt_ms = 0.0 if advert.peer_id == self.mesh.peer_id else float(member.rtt_ms or 1.0)
            peers.append(peer_capacity(advert.peer_id, advert.capacity, rtt_ms))
        return peers

    def _bandwidth(self) -> float:
        """What live members' direct links measured (their adverts carry each one's
        median), and our own links: the bandwidth the plan assumes between stages."""
        samples = list(self.mesh.direct.bandwidths()) if self.mesh.direct is not None else []
        for member in self.mesh.membership.members():
            link = member.advert.link
            if (
                link is not None
                and link.get("bandwidth")
                and self.mesh.is_live(member.advert.peer_id)
            ):
                samples.append(float(link["bandwidth"]))
        return measured_bandwidth(samples)

    async def _host_on(
        self,
        peer_id: str,
        entry: ServingEntry,
        progress: DeployProgress,
        sources: list[str] | None = None,
    ) -> None:
        label = {"stage": entry.stage, "peer": short_id(peer_id), "fragment": entry.fragment[:12]}
        done = {"bytes": entry.fragment_bytes, "total": entry.fragment_bytes}
        sources = sources or [self.mesh.peer_id]
        if peer_id == self.mesh.peer_id:
            with self.server.fetcher.pinned([entry.fragment]):  # see serve_deploy
                await self.server.host(entry, sources)
            progress({**label, "state": "ready", **done})
            return
        stream = await self.mesh.open_stream(peer_id, PROTOCOL)
        try:
            await write_message(stream, {"entry": entry.to_dict(), "sources": sources})
            with trio.fail_after(HOST_TIMEOUT_S):
                while True:
                    reply = await read_message(stream, HOST_REPLY, HOST_TIMEOUT_S)
                    if "progress" in reply:
                        progress({**label, "state": "fetching", **reply["progress"]})
                        continue
                    if not reply.get("ok"):
                        why = reply.get("error")
                        raise DeployError(
                            f"{short_id(peer_id)} cannot host stage {entry.stage}: {why}"
                        )
                    progress({**label, "state": "ready", **done})
                    return
        finally:
            with trio.move_on_after(2):
                await stream.reset()

    async def deploy(
        self,
        stored: StoredModel,
        shards: int | None,
        replicas: int,
        codec: str,
        progress: DeployProgress = lambda event: None,
    ) -> dict[str, Any]:
        if codec not in CODECS:
            raise DeployError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        warnings: list[str] = []
        live_at_start = [p.peer_id for p in self._capacities()]
        analysis = self._analyses.get(stored.sha256)
        if analysis is None:
            analysis = await trio.to_thread.run_sync(analyze_stored, stored)
            card = llm_card(stored)
            if card is not None:  # a language model's stages hold caches at full context
                per_past = card.kv_bytes_per_token() // (2 * card.num_layers)
                analysis = analysis.with_caches(per_past * card.context_length)
            self._analyses[stored.sha256] = analysis
        warnings += await self._rejoined(live_at_start, "planned without it")
        peers = self._capacities()
        try:
            placement = plan_placement(analysis, peers, shards, replicas, self._bandwidth())
        except PlacementError as exc:
            raise DeployError(f"cannot place {stored.name}: {exc}") from exc
        hosts = {p for s in placement.stages for p in s.peers}
        if len(hosts) < len(placement.stages) * replicas:
            warnings.append(
                f"{len(placement.stages)} stages x {replicas} replicas over {len(peers)} live "
                f"peer(s): stages share hosts"
            )
        plan = await trio.to_thread.run_sync(
            split_stored_at, self.store, stored, analysis, placement.cuts
        )
        warnings += await self._rejoined(sorted(hosts), "its stages may fail")
        self.router.deployments()  # the clock sees every deployment we know of first
        created = self.server.clock.tick()
        deployment = f"{stored.name}@{created}-{short_id(self.mesh.peer_id)}"
        stage_plan = [
            {
                "fragment": f.sha256,
                "bytes": self.store.object_size(f.sha256),  # every file of it
                "inputs": f.inputs,
                "outputs": f.outputs,
            }
            for f in plan.fragments
        ]
        first = ServingEntry(deployment, created, stored.name, 0, codec, stage_plan)
        entries = [first.for_stage(i) for i in range(len(stage_plan))]
        progress(
            {
                "state": "planned",
                "deployment": deployment,
                "stages": [list(s.peers) for s in placement.stages],
            }
        )
        failures: list[str] = []
        ready: dict[int, list[str]] = {}

        async def host(peer_id: str, entry: ServingEntry) -> None:
            try:
                await self._host_on(peer_id, entry, progress)
                ready.setdefault(entry.stage, []).append(peer_id)
            except (MeshError, trio.TooSlowError) as exc:
                failures.append(str(exc))

        # Hosts fetch the fragments from us: keep them until the deployment is advertised.
        with self.store.pinned(f.sha256 for f in plan.fragments):
            async with trio.open_nursery() as nursery:
                for stage, entry in zip(placement.stages, entries, strict=True):
                    for peer_id in stage.peers:
                        nursery.start_soon(host, peer_id, entry)
            missing = [e.stage for e in entries if e.stage not in ready]
            if missing:
                raise DeployError(
                    f"stages {missing} of {stored.name} found no host: {'; '.join(failures)}"
                )
            await self._until_visible(stored.name, deployment)
        return {
            "deployment": deployment,
            "model": stored.name,
            "codec": codec,
            "bottleneck_ms": round(placement.bottleneck_s * 1000, 3),
            "warnings": [*warnings, *failures],
            "stages": [
                {
                    "stage": e.stage,
                    "fragment": e.fragment,
                    "peers": ready[e.stage],
                    "flops": f.flops,
                    "weight_bytes": f.weight_bytes,
                    "estimated_ms": round(s.seconds * 1000, 3),
                }
                for e, f, s in zip(entries, plan.fragments, placement.stages, strict=True)
            ],
        }

    async def rehost(self, entry: ServingEntry, avoid: set[str]) -> str:
        """Host a stage whose every replica is gone on the fastest live peer that can
        fetch its fragment from someone; returns that peer."""
        live = [
            m
            for m in self.mesh.membership.members()
            if self.mesh.is_live(m.advert.peer_id)
            and m.advert.compatible
            and m.advert.peer_id not in avoid
        ]
        # A member its owner holds back lends its copy of the fragment only as a last
        # resort (an unplugged phone should not upload on battery), and no compute.
        holders = [m.advert.peer_id for m in live if entry.fragment in m.advert.fragments]
        sources = sorted(holders, key=lambda p: self.mesh.unavailable_reason(p) is not None)
        if not sources:
            raise DeployError(f"no live peer holds fragment {entry.fragment[:12]}")
        workers = [m for m in live if self.mesh.unavailable_reason(m.advert.peer_id) is None]
        ranked = sorted(workers, key=lambda m: -float(m.advert.capacity.get("gflops") or 0))
        failures = []
        for member in ranked:
            peer_id = member.advert.peer_id
            try:
                await self._host_on(peer_id, entry, lambda event: None, sources)
                return peer_id
            except (MeshError, trio.TooSlowError) as exc:
                failures.append(f"{short_id(peer_id)}: {exc}")
        raise DeployError(f"no peer could take stage {entry.stage}: {'; '.join(failures)}")

    async def _rejoined(self, peer_ids: list[str], consequence: str) -> list[str]:
        """Wait for these peers to be live again; a warning for each that is not."""
        with trio.move_on_after(REJOIN_TIMEOUT_S):
            while not all(self.mesh.is_live(p) for p in peer_ids):
                await trio.sleep(0.2)
        return [
            f"{short_id(p)} was not live after {REJOIN_TIMEOUT_S:.0f} s; {consequence}"
            for p in peer_ids
            if not self.mesh.is_live(p)
        ]

    async def _until_visible(self, model: str, deployment: str) -> None:
        """Wait until our own membership table shows every stage hosted."""
        with trio.move_on_after(VISIBLE_TIMEOUT_S):
            while True:
                found = self.router.deployments().get(model)
                if found and found.entries[0].deployment == deployment and all(found.hosts):
                    return
                await trio.sleep(0.1)
        raise DeployError(f"{deployment} was hosted but its adverts did not arrive")
