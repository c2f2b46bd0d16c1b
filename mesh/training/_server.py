"""Training stages on a member: the ``/salala/train/1.0.0`` protocol.

Frames (``_frames``: msgpack header, raw tensor parts) carry, per job and attempt:

    setup   driver -> stage     parameters and optimiser state; the stage fetches its
                                two graphs by hash from the driver and answers ready
    fwd     stage -> next       one micro-batch's activation (and its labels)
    bwd     stage -> previous   the gradient of that activation
    step    driver -> stage     apply the optimiser (after averaging with replicas)
    grads   replica -> replica  a stage's gradient sums for one step
    end     driver -> stage     forget the job
    ready / loss / done / stepped / error    stage -> driver

Activations flow downstream and gradients upstream peer to peer; the driver only
feeds micro-batches in and says when to step. Replicas of a stage average their
gradients among themselves (each sends its sums to the others and all add them in
replica order, so every replica applies the same update); there is no server.
A stage set up for a newer attempt of a job drops frames of older attempts, which
is what makes a re-planned job safe against frames still in flight.

One worker per node runs the work in arrival order; sends go out in their own tasks
so that a stage never waits on a neighbour that is waiting on it.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import inside
from ...runtime import ModelSession, make_optimizer
from .._errors import WireError
from .._peerid import short_id
from ..membership import Mesh
from ..wire import (
    Fetcher,
    FrameBudget,
    Lease,
    LinkError,
    LinkFrame,
    Links,
    encode_frame,
    read_header,
    read_leased_payload,
)
from ._headers import TRAIN_FRAME
from ._stage import StageWork, split_snapshot

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/salala/train/1.0.0")
QUEUE = 256
SENDS_IN_FLIGHT = 8
IDLE_TIMEOUT_S = 3600.0
NEIGHBOUR_WAIT_S = 10.0
TO_DRIVER = frozenset({"ready", "loss", "done", "stepped", "error"})
TO_STAGE = frozenset({"setup", "fwd", "bwd", "step", "grads", "end"})

Frame = tuple[dict[str, Any], dict[str, np.ndarray], Lease | None]


@dataclass
class HostedStage:
    """A stage slot this node runs: its attempt (older frames are dropped), its work,
    its neighbours, and the gradient sums gathered for the step being taken."""

    attempt: int
    work: StageWork
    route: dict[str, Any]  # next, prev (peer ids or None), replicas (peer ids by index)
    checkpoints: Path
    graphs: tuple[str, str] = ("", "")  # forward and backward objects in the store
    step_request: dict[str, Any] | None = None
    received: dict[int, tuple[dict[str, np.ndarray], int]] = field(default_factory=dict)


def _key(header: dict[str, Any]) -> tuple[str, int, int]:
    return header["job"], header["stage"], header["replica"]


class TrainServer:
    """Every node's side of training: stage slots for any driver, and the inbox of the
    jobs this node drives. One per node, for as long as it runs."""

    def __init__(
        self,
        mesh: Mesh,
        fetcher: Fetcher,
        threads: int | None,
        compute: trio.CapacityLimiter,
        checkpoint_root: Path,
        budget: FrameBudget,
        max_payload: int,
    ) -> None:
        self.mesh = mesh
        self.budget = budget  # inbound frames, shared with inference
        self.max_payload = max_payload
        self.fetcher = fetcher
        self.threads = threads
        self.checkpoint_root = checkpoint_root
        self.links = Links(mesh, PROTOCOL)
        self._compute = compute
        self._stages: dict[tuple[str, int, int], HostedStage] = {}
        self._inboxes: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], None]] = {}
        self._work_send, self._work_receive = trio.open_memory_channel[Frame](QUEUE)
        self._sends = trio.CapacityLimiter(SENDS_IN_FLIGHT)
        self._ended: set[str] = set()  # job ids; a late setup must not revive one
        self._nursery: trio.Nursery | None = None

    def listen(
        self, job: str, deliver: Callable[[dict[str, Any], dict[str, np.ndarray]], None]
    ) -> None:
        """Route the driver-bound frames of ``job`` to ``deliver`` (this node drives it)."""
        self._inboxes[job] = deliver

    def unlisten(self, job: str) -> None:
        self._inboxes.pop(job, None)

    def objects_in_use(self) -> set[str]:
        """The store objects of the stage slots this node runs."""
        return {graph for hosted in self._stages.values() for graph in hosted.graphs}

    # ---- frames in and out -------------------------------------------------------

    async def handle_stream(self, peer_id: str, stream: INetStream) -> None:
        """Frames from one peer, each checked against TRAIN_FRAME and the payload limit
        before anything reads it; a bad one resets the stream (the guard in ``Mesh``
        answers with the field at fault)."""
        while True:
            header, size = await read_header(stream, TRAIN_FRAME, IDLE_TIMEOUT_S)
            if size > self.max_payload:
                raise WireError(
                    f"a training frame of {size} bytes exceeds this node's limit of "
                    f"{self.max_payload}"
                )
            tensors, lease = await read_leased_payload(stream, header, size, self.budget, peer_id)
            try:
                await self._accept(header, tensors, lease)
            except BaseException:
                lease.release()
                raise

    async def handle_link_frame(self, peer_id: str, frame: LinkFrame) -> None:
        """A frame from a direct link, read already (or skipped, when over the limit): a
        bad or oversized one is dropped (and logged) while the link goes on."""
        try:
            header = frame.header(TRAIN_FRAME)
            if frame.payload is None:
                limit = self.max_payload
                raise WireError(f"a frame of {frame.size} bytes exceeds the limit of {limit}")
            tensors = frame.tensors(header)
        except WireError as exc:
            log.info("dropped a training frame from %s: %s", short_id(peer_id), exc)
            return
        try:
            await self._accept(header, tensors, frame.lease)
        except BaseException:
            if frame.lease is not None:
                frame.lease.release()
            raise

    async def _accept(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray], lease: Lease | None = None
    ) -> None:
        """Hand a frame to its job's driver or to the stage worker; ``lease`` (the bytes
        it holds in the node's budget) ends once its work is done."""
        if header["kind"] in TO_DRIVER:
            deliver = self._inboxes.get(header["job"])
            if deliver is not None:
                deliver(header, tensors)
            if lease is not None:
                lease.release()
            return
        await self._work_send.send((header, tensors, lease))

    def send(self, peer_id: str, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Queue a frame for a peer (or this node) without waiting for it to leave."""

        async def go() -> None:
            async with self._sends:
                if peer_id == self.mesh.peer_id:
                    await self._accept(header, tensors)
                    return
                head, views = encode_frame(header, tensors)
                try:
                    await self.links.send(peer_id, head, views)
                except LinkError as exc:
                    driver = header.get("driver")
                    if isinstance(driver, str) and header["kind"] in TO_STAGE - {"end"}:
                        self._to_driver(header, "error", unreachable=peer_id, message=str(exc))

        assert self._nursery is not None
        self._nursery.start_soon(go)

    def _to_driver(
        self,
        header: dict[str, Any],
        kind: str,
        tensors: dict[str, np.ndarray] | None = None,
        **fields: Any,
    ) -> None:
        reply = {
            "kind": kind,
            "job": header["job"],
            "attempt": header.get("attempt"),
            "stage": header.get("stage"),
            "replica": header.get("replica"),
            "peer": self.mesh.peer_id,
            **fields,
        }
        if "driver" in header:  # every frame but "end" names its driver
            self.send(header["driver"], reply, tensors or {})

    # ---- the worker ---------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.mesh.handle(PROTOCOL, self.handle_stream)
            if self.mesh.direct is not None:
                self.mesh.direct.handle(
                    PROTOCOL, self.handle_link_frame, self.max_payload, self.budget
                )
            task_status.started()
            async for header, tensors, lease in self._work_receive:
                try:
                    if header["kind"] == "setup":  # its task holds the lease till it ends
                        nursery.start_soon(self._setup, header, tensors, lease)
                        lease = None
                    else:
                        await self._dispatch(header, tensors)
                except Exception as exc:  # one bad job must not stop the worker
                    log.exception("training frame %s failed", header["kind"])
                    self._to_driver(header, "error", message=f"{type(exc).__name__}: {exc}")
                finally:
                    if lease is not None:
                        lease.release()

    async def _dispatch(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """One frame for a stage; frames of attempts this node no longer runs are dropped."""
        kind = header["kind"]
        if kind == "end":
            self._ended.add(header["job"])
            for other in [k for k in self._stages if k[0] == header["job"]]:
                del self._stages[other]
            return
        hosted = self._stages.get(_key(header))
        if hosted is None or hosted.attempt != header["attempt"]:
            return  # a frame from an attempt that was re-planned away: drop it
        if kind == "fwd":
            await self._forward(hosted, header, tensors)
        elif kind == "bwd":
            await self._backward(hosted, header, tensors)
        elif kind == "step":
            hosted.step_request = header
            own, samples = hosted.work.take_gradients()
            hosted.received[header["replica"]] = (own, samples)
            for index, peer in enumerate(hosted.route["replicas"]):
                if index != header["replica"]:
                    share = {
                        **header,
                        "kind": "grads",
                        "replica": index,
                        "sender": header["replica"],
                        "samples": samples,
                    }
                    self.send(peer, share, own)
            await self._maybe_step(hosted)
        elif kind == "grads":
            if header["sender"] >= len(hosted.route["replicas"]):
                raise WireError(f"replica {header['sender']} is not part of this job")
            hosted.received[header["sender"]] = (tensors, header["samples"])
            await self._maybe_step(hosted)

    async def _setup(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray], lease: Lease | None
    ) -> None:
        """Fetch the stage's graphs, load them, wait for its neighbours, then say ready.

        Runs in its own task (fetching may take a while); anything that goes wrong is
        reported to the driver, which re-plans, and never reaches the node's nursery.
        The setup frame's bytes stay leased until the task ends, so setups that wait on
        slow fetches count against the node's frame budget.
        """
        try:
            await self._set_up(header, tensors)
        finally:
            if lease is not None:
                lease.release()

    async def _set_up(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        key = _key(header)
        try:
            checkpoints = inside(self.checkpoint_root, key[0], f"stage-{key[1]}.npz")
            work, unreachable = await self._prepare(header, tensors)
        except Exception as exc:  # a failed fetch, a bad optimiser, a full disk
            log.info("setup of %s refused: %r", header["job"], exc)
            self._to_driver(header, "error", message=f"setup failed: {exc}")
            return
        if unreachable:
            message = f"{short_id(unreachable)} is not a connected member"
            self._to_driver(header, "error", unreachable=unreachable, message=message)
            return
        current = self._stages.get(key)
        if key[0] in self._ended or (current and current.attempt > header["attempt"]):
            return  # the job ended, or was re-planned again, while this one loaded
        route = {k: header[k] for k in ("next", "prev", "replicas")}
        graphs = (header["forward"], header["backward"])
        self._stages[key] = HostedStage(header["attempt"], work, route, checkpoints, graphs)
        self._to_driver(header, "ready")

    async def _prepare(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray]
    ) -> tuple[StageWork, str | None]:
        driver = header["driver"]
        paths = []
        with self.fetcher.pinned([header["forward"], header["backward"]]):
            for name in ("forward", "backward"):
                paths.append(
                    await self.fetcher.fetch(header[name], header[f"{name}_bytes"], [driver])
                )
            forward, backward = await trio.to_thread.run_sync(
                lambda: tuple(ModelSession(p, threads=self.threads) for p in paths)
            )
        optimizer = make_optimizer(header["optimizer"])
        params, state = split_snapshot(tensors)
        optimizer.state = {n: v.copy() for n, v in state.items()}
        optimizer.steps = header["optimizer_steps"]
        work = StageWork(
            forward,
            backward,
            {n: v.copy() for n, v in params.items()},
            optimizer,
            first=header["stage"] == 0,
            last=header["stage"] == header["stages"] - 1,
        )
        neighbours = [header["next"], header["prev"], *header["replicas"]]
        unreachable = await self._wait_for(p for p in neighbours if isinstance(p, str))
        return work, unreachable

    async def _wait_for(self, peers: "Iterable[str]") -> str | None:
        """The first of ``peers`` this node still cannot reach after NEIGHBOUR_WAIT_S.

        A mesh that has only just formed may not have every pair connected yet; a
        neighbour that is still missing after the wait is reported as lost.
        """
        wanted = set(peers)
        with trio.move_on_after(NEIGHBOUR_WAIT_S):
            while not all(self.mesh.is_live(p) for p in wanted):
                await trio.sleep(0.2)
        return next((p for p in sorted(wanted) if not self.mesh.is_live(p)), None)

    async def _forward(
        self, hosted: HostedStage, header: dict[str, Any], tensors: dict[str, np.ndarray]
    ) -> None:
        work, micro_batch = hosted.work, header["mb"]
        x, labels = tensors["x"], tensors["labels"]
        if work.last:
            loss, grad_x = await trio.to_thread.run_sync(
                work.run_loss, x, labels, limiter=self._compute
            )
            self._to_driver(header, "loss", loss=loss, samples=len(x), mb=micro_batch)
            self._upstream(hosted, header, grad_x)
            return
        y = await trio.to_thread.run_sync(work.run_forward, micro_batch, x, limiter=self._compute)
        onward = {**header, "stage": header["stage"] + 1}
        self.send(hosted.route["next"], onward, {"x": y, "labels": labels})

    async def _backward(
        self, hosted: HostedStage, header: dict[str, Any], tensors: dict[str, np.ndarray]
    ) -> None:
        grad_x = await trio.to_thread.run_sync(
            hosted.work.run_backward, header["mb"], tensors["grad_y"], limiter=self._compute
        )
        self._upstream(hosted, header, grad_x)

    def _upstream(
        self, hosted: HostedStage, header: dict[str, Any], grad_x: np.ndarray | None
    ) -> None:
        if hosted.work.first:
            self._to_driver(header, "done", mb=header["mb"])
            return
        assert grad_x is not None
        back = {**header, "kind": "bwd", "stage": header["stage"] - 1}
        self.send(hosted.route["prev"], back, {"grad_y": grad_x})

    async def _maybe_step(self, hosted: HostedStage) -> None:
        """Apply the step once the driver asked and every replica's sums are here.

        Sums are added in replica order, so all replicas compute bit-identical updates.
        """
        request = hosted.step_request
        if request is None or len(hosted.received) < len(hosted.route["replicas"]):
            return
        ordered = [hosted.received[i] for i in sorted(hosted.received)]
        hosted.step_request, hosted.received = None, {}
        samples = sum(count for _, count in ordered)
        sums = (
            {
                name: np.sum([part[name] for part, count in ordered if count], axis=0)
                for name in hosted.work.params
            }
            if samples
            else {}
        )
        await trio.to_thread.run_sync(hosted.work.apply, sums, samples, limiter=self._compute)
        snapshot: dict[str, np.ndarray] = {}
        if request.get("checkpoint"):
            snapshot = hosted.work.snapshot()
            await trio.to_thread.run_sync(save_checkpoint, hosted.checkpoints, snapshot)
            if request["replica"]:
                snapshot = {}  # replicas hold the same state; the driver keeps replica 0's
        self._to_driver(
            request,
            "stepped",
            snapshot,
            step=request["step"],
            optimizer_steps=hosted.work.optimizer.steps,
        )


def save_checkpoint(path: Path, snapshot: dict[str, np.ndarray]) -> None:
    """Write ``snapshot`` as .npz by rename, so a crash mid-write keeps the last one.

    ``path`` comes from ``inside``; the folder is made here, after that check.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as file:
        np.savez(file, **snapshot)  # type: ignore[arg-type]  # numpy's stub types **kwds oddly
    partial.replace(path)
