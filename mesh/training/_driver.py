"""Driving a training job from the node that was asked to run it.

The driver places the stages, feeds micro-batches into stage 0 of each replica and
says when to step; activations and gradients never pass through it. Every
``checkpoint_every`` steps the stages send their parameters and optimiser state back
(they also keep a copy on their own disk), so when a stage's peer dies or freezes the
driver re-plans onto the live peers and resumes from that checkpoint: at most that
many steps are lost. Batches are a pure function of the step, so a resumed job sees
the same data it would have seen.
"""

import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from ...models import (
    ModelError,
    ModelStore,
    TrainingPackage,
    batch_indices,
    compose_inference,
    inside,
    load_digits,
    load_package,
)
from ...runtime import ModelSession
from .._errors import MeshError
from .._peerid import short_id
from ..membership import Mesh
from ..wire import Fetcher, FrameBudget
from ._job import JobError, TrainJob
from ._server import TrainServer, save_checkpoint
from ._stage import PARAM

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0
WATCH_S = 0.5
MAX_REPLANS = 5


class TrainingError(MeshError):
    """A job that cannot go on: a stage refused it, or no peers are left to re-plan onto."""


class StageLost(Exception):
    def __init__(self, peer_id: str) -> None:
        super().__init__(peer_id)
        self.peer_id = peer_id


@dataclass
class Checkpoint:
    step: int
    stages: list[dict[str, np.ndarray]]  # p.<param> and o.<optimiser state>
    optimizer_steps: list[int]


def place(peers: list[str], stages: int, replicas: int) -> list[list[str]]:
    """plan[replica][stage]: distinct peers while they last, then round the ring again.

    ``peers`` come fastest first, so with fewer peers than slots the fastest host two.
    """
    return [[peers[(r * stages + s) % len(peers)] for s in range(stages)] for r in range(replicas)]


class Driver:
    def __init__(self, mesh: Mesh, server: TrainServer, store: ModelStore, root: Path) -> None:
        self.mesh = mesh
        self.server = server
        self.store = store
        self.root = root

    def _peers(self, avoid: set[str]) -> list[str]:
        rows = []
        for member in self.mesh.membership.members():
            peer = member.advert.peer_id
            if self.mesh.takes_work(peer) and member.advert.compatible and peer not in avoid:
                rows.append((-float(member.advert.capacity.get("gflops") or 1.0), peer))
        return [peer for _, peer in sorted(rows)]

    async def train(
        self, job: TrainJob, progress: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        with ExitStack() as pins:  # stages fetch the job's graphs from us while it runs
            return await self._train(job, progress, pins)

    async def _add_pinned(self, path: Path, pins: ExitStack) -> tuple[str, int]:
        added = await trio.to_thread.run_sync(self.store.add_object, path)
        pins.enter_context(self.store.pinned([added[0]]))
        return added

    async def _train(
        self, job: TrainJob, progress: Callable[[dict[str, Any]], None], pins: ExitStack
    ) -> dict[str, Any]:
        package = load_package(job.package)
        graphs = [
            (
                await self._add_pinned(package.file(f.forward), pins),
                await self._add_pinned(package.file(f.backward), pins),
            )
            for f in package.fragments
        ]
        try:
            data = await trio.to_thread.run_sync(load_digits)
        except ModelError as exc:
            raise TrainingError(f"cannot load dataset {job.dataset!r}: {exc}") from exc
        if job.batch > len(data.y_train):
            raise JobError(f"batch {job.batch} exceeds the {len(data.y_train)} training samples")
        initial = package.initial_params()
        checkpoint = Checkpoint(
            0, [{PARAM + n: v for n, v in p.items()} for p in initial], [0] * len(initial)
        )
        run = _Run(self, job, package, graphs, data, uuid.uuid4().hex[:16], progress)
        avoid: set[str] = set()
        used: set[str] = set()
        try:
            for attempt in range(MAX_REPLANS + 1):
                peers = self._peers(avoid)
                if not peers:
                    raise TrainingError("no live peers left to train on")
                plan = place(peers, len(package.fragments), job.replicas)
                used.update(p for row in plan for p in row)
                try:
                    checkpoint = await run.attempt(attempt, plan, checkpoint)
                    break
                except StageLost as lost:
                    avoid.add(lost.peer_id)
                    checkpoint = run.last_checkpoint
                    run.replans.append({"step": checkpoint.step, "lost": lost.peer_id})
                    progress(
                        {
                            "event": "replanned",
                            "lost": short_id(lost.peer_id),
                            "resume_step": checkpoint.step,
                        }
                    )
                    log.info(
                        "job %s lost %s; resuming from step %d",
                        run.job_id,
                        short_id(lost.peer_id),
                        checkpoint.step,
                    )
            else:
                raise TrainingError(f"gave up after {MAX_REPLANS} re-plans")
        finally:
            self.server.unlisten(run.job_id)
            for peer in used:
                if self.mesh.is_live(peer):
                    self.server.send(peer, {"kind": "end", "job": run.job_id}, {})
        return await run.finish(checkpoint)


class _Run:
    """One job's state across attempts."""

    def __init__(
        self,
        driver: Driver,
        job: TrainJob,
        package: TrainingPackage,
        graphs: list[tuple[tuple[str, int], tuple[str, int]]],
        data: Any,
        job_id: str,
        progress: Callable[[dict[str, Any]], None],
    ) -> None:
        self.driver = driver
        self.job = job
        self.package = package
        self.graphs = graphs  # per stage: (sha256, size) of its forward and backward graph
        self.data = data
        self.job_id = job_id
        self.progress = progress
        self.history: list[float] = []
        self.replans: list[dict[str, Any]] = []
        self.last_checkpoint = Checkpoint(0, [], [])
        self._send, self._receive = trio.open_memory_channel[
            tuple[dict[str, Any], dict[str, np.ndarray]]
        ](4096)

    def _deliver(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        try:
            self._send.send_nowait((header, tensors))
        except trio.WouldBlock:
            log.warning("job %s: driver inbox full, dropping %s", self.job_id, header["kind"])

    async def attempt(
        self, attempt: int, plan: list[list[str]], checkpoint: Checkpoint
    ) -> Checkpoint:
        """Set every slot up from ``checkpoint`` and train until done or a peer is lost."""
        self.last_checkpoint = checkpoint
        self.history = self.history[: checkpoint.step]
        self.driver.server.listen(self.job_id, self._deliver)
        base = {"job": self.job_id, "attempt": attempt, "driver": self.driver.mesh.peer_id}
        await self._set_up(base, plan, checkpoint)
        for step in range(checkpoint.step, self.job.steps):
            started = time.perf_counter()
            samples, loss = await self._pass(base, plan, step)
            keep = (step + 1) % self.job.checkpoint_every == 0 or step + 1 == self.job.steps
            await self._step(base, plan, step, keep)
            self.history.append(loss)
            elapsed = time.perf_counter() - started
            self.progress(
                {
                    "event": "step",
                    "step": step + 1,
                    "steps": self.job.steps,
                    "loss": loss,
                    "samples_per_s": samples / elapsed if elapsed else 0.0,
                }
            )
        return self.last_checkpoint

    def _to_slots(self, plan: list[list[str]], header: dict[str, Any], extra: Any) -> None:
        """Send ``header`` to every slot; ``extra(replica, stage, row)`` adds its fields."""
        stages = len(self.package.fragments)
        for replica, row in enumerate(plan):
            for stage, peer in enumerate(row):
                fields, tensors = extra(replica, stage, row)
                slot = {**header, "stage": stage, "stages": stages, "replica": replica}
                self.driver.server.send(peer, {**slot, **fields}, tensors)

    async def _set_up(
        self, base: dict[str, Any], plan: list[list[str]], checkpoint: Checkpoint
    ) -> None:
        last = len(self.package.fragments) - 1

        def setup(replica: int, stage: int, row: list[str]) -> Any:
            (forward, forward_bytes), (backward, backward_bytes) = self.graphs[stage]
            fields = {
                "forward": forward,
                "forward_bytes": forward_bytes,
                "backward": backward,
                "backward_bytes": backward_bytes,
                "optimizer": self.job.optimizer,
                "optimizer_steps": checkpoint.optimizer_steps[stage],
                "next": row[stage + 1] if stage < last else None,
                "prev": row[stage - 1] if stage else None,
                "replicas": [r[stage] for r in plan],
            }
            return fields, checkpoint.stages[stage]

        self._to_slots(plan, {**base, "kind": "setup"}, setup)
        slots = (last + 1) * len(plan)
        await self._collect(base["attempt"], plan, Counter(ready=slots), SETUP_TIMEOUT_S)

    async def _pass(
        self, base: dict[str, Any], plan: list[list[str]], step: int
    ) -> tuple[int, float]:
        """Every micro-batch of ``step`` forward and back; the samples and their mean loss."""
        indices = batch_indices(len(self.data.y_train), self.job.batch, step, self.job.seed)
        for replica, share in enumerate(np.array_split(indices, len(plan))):
            for micro_batch, chunk in enumerate(np.array_split(share, self.job.micro_batches)):
                header = {**base, "kind": "fwd", "stage": 0, "replica": replica}
                header.update(step=step, mb=micro_batch)
                tensors = {"x": self.data.x_train[chunk], "labels": self.data.y_train[chunk]}
                self.driver.server.send(plan[replica][0], header, tensors)
        count = self.job.micro_batches * len(plan)
        wanted = Counter(loss=count, done=count)
        replies = await self._collect(base["attempt"], plan, wanted, STEP_TIMEOUT_S)
        losses = [(h["loss"], h["samples"]) for h, _ in replies if h["kind"] == "loss"]
        return len(indices), sum(v * n for v, n in losses) / sum(n for _, n in losses)

    async def _step(
        self, base: dict[str, Any], plan: list[list[str]], step: int, keep: bool
    ) -> None:
        """Every slot applies its optimiser; with ``keep``, their snapshots are kept."""
        header = {**base, "kind": "step", "step": step, "checkpoint": keep}
        self._to_slots(plan, header, lambda replica, stage, row: ({}, {}))
        slots = len(self.package.fragments) * len(plan)
        stepped = await self._collect(base["attempt"], plan, Counter(stepped=slots), STEP_TIMEOUT_S)
        if keep:
            await trio.to_thread.run_sync(self._keep, step + 1, stepped)

    def _keep(self, step: int, stepped: list[tuple[dict[str, Any], dict[str, np.ndarray]]]) -> None:
        """Replica 0's snapshot of each stage becomes the job's checkpoint, on disk too."""
        stages = len(self.package.fragments)
        chosen = {h["stage"]: (h, t) for h, t in stepped if h["replica"] == 0}
        snapshot = [chosen[s][1] for s in range(stages)]
        self.last_checkpoint = Checkpoint(
            step, snapshot, [int(chosen[s][0]["optimizer_steps"]) for s in range(stages)]
        )
        for stage, tensors in enumerate(snapshot):
            save_checkpoint(inside(self.driver.root, self.job_id, f"stage-{stage}.npz"), tensors)

    async def _collect(
        self, attempt: int, plan: list[list[str]], wanted: Counter[str], timeout: float
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Wait for the replies ``wanted`` counts; StageLost names a peer that is gone."""
        peers = {p for row in plan for p in row}
        got: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        left = Counter(wanted)
        deadline = trio.current_time() + timeout
        while +left:
            if trio.current_time() > deadline:
                raise TrainingError(f"no {', '.join(left)} from the stages in {timeout:.0f} s")
            with trio.move_on_after(WATCH_S):
                header, tensors = await self._receive.receive()
                if header.get("attempt") != attempt:
                    continue
                if header["kind"] == "error":
                    unreachable = header.get("unreachable")
                    if isinstance(unreachable, str):
                        raise StageLost(unreachable)
                    raise TrainingError(
                        f"stage {header.get('stage')} on {short_id(str(header.get('peer')))}: "
                        f"{header.get('message')}"
                    )
                left[header["kind"]] -= 1
                got.append((header, tensors))
            # A peer gone, or held back by its owner's policy: its stages move.
            gone = [p for p in peers if not self.driver.mesh.takes_work(p)]
            if gone:
                raise StageLost(gone[0])
        return got

    async def finish(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """The trained model as one ONNX file in the store, and its test accuracy."""
        params = [
            {n[len(PARAM) :]: v for n, v in tensors.items() if n.startswith(PARAM)}
            for tensors in checkpoint.stages
        ]
        folder = self.driver.root / self.job_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "trained.onnx"
        await trio.to_thread.run_sync(compose_inference, self.package, params, path)
        stored = await trio.to_thread.run_sync(self.driver.store.add, path, self.job.output)
        session = await trio.to_thread.run_sync(ModelSession, stored.path)
        logits = await trio.to_thread.run_sync(session.run, {"x": self.data.x_test})
        accuracy = float(np.mean(np.argmax(logits["y"], axis=1) == self.data.y_test))
        return {
            "job": self.job_id,
            "model": stored.name,
            "sha256": stored.sha256,
            "steps": checkpoint.step,
            "loss": self.history,
            "test_accuracy": accuracy,
            "replans": self.replans,
            "checkpoints": str(folder),
        }


@dataclass(frozen=True)
class Training:
    server: TrainServer
    driver: Driver


@asynccontextmanager
async def open_training(
    mesh: Mesh,
    store: ModelStore,
    fetcher: Fetcher,
    threads: int | None,
    compute: trio.CapacityLimiter,
    root: Path,
    budget: FrameBudget,
    max_payload: int,
) -> AsyncIterator[Training]:
    """Serve training stages and drive jobs for as long as the node runs.

    ``root`` keeps checkpoints: the stages' own under ``stages/``, collected ones by job.
    """
    server = TrainServer(mesh, fetcher, threads, compute, root / "stages", budget, max_payload)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield Training(server, Driver(mesh, server, store, root))
        nursery.cancel_scope.cancel()
