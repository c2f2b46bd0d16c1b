"""Serving stages of deployments: the inference data path on every member.

Frames arrive over direct links (see ``wire._direct``), or on ``/salala/infer/1.0.0``
streams (one long-lived stream per sending peer). A reader per link or stream validates
each frame, refuses oversized ones, and hands stage work to a bounded queue: when the
queue is full the reader stops reading, the sender's TCP (or Yamux) window fills, and
its writes wait. That is the backpressure; there is
no unbounded buffer anywhere. One worker runs the sessions (they already use every
core) and forwards each output to the next stage's peer in its own task, so the next
request computes while the last one is on the wire. Results and errors go straight
back to the requester.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import psutil
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ...models import InvalidModelError, LlmCard, llm_card
from ...runtime import InputMismatchError, ModelLoadError, ModelSession
from .._errors import MeshError, WireError
from .._peerid import short_id
from ..membership import MAX_SERVING, Mesh
from ..wire import (
    PEER_ID,
    Fetcher,
    FrameBudget,
    Lease,
    LinkFrame,
    Links,
    Progress,
    SchemaError,
    encode_frame,
    frame_timeout,
    read_header,
    read_leased_payload,
    skip_payload,
    validate,
)
from ._clock import DeploymentClock
from ._decoder import DecoderStage
from ._headers import ATTEMPT, INFER_FRAME, REQUEST_ID
from ._kvcache import CacheFull, CacheMiss, KVCache, Step
from ._placement import MEMORY_FACTOR
from ._sampling import Sampling
from ._undeployed import Undeployed

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/salala/infer/1.0.0")
QUEUE = 8
IDLE_TIMEOUT_S = 3600.0
MAX_HOSTED = MAX_SERVING
OUTBOUND_FRAMES = 4  # outputs (of the largest size) a node keeps on the wire at once
SKIP_AT_MOST = 4  # an oversized frame up to this many times the limit is read and dropped
DEFAULT_MAX_PAYLOAD = 256 << 20
DEFAULT_KV_BUDGET = 1 << 30


@dataclass(frozen=True)
class ServingEntry:
    """One stage of a deployment, as hosts advertise it.

    It carries the whole deployment's plan (each stage's fragment, inputs, outputs), so
    any node can route, name a stage nobody hosts, or hand that stage to a new host
    from any one host's advert.
    """

    deployment: str
    created: int
    model: str
    stage: int
    codec: str
    plan: list[dict[str, Any]]

    @property
    def stages(self) -> int:
        return len(self.plan)

    @property
    def fragment(self) -> str:
        return str(self.plan[self.stage]["fragment"])

    @property
    def fragment_bytes(self) -> int:
        return int(self.plan[self.stage]["bytes"])

    @property
    def inputs(self) -> list[str]:
        return list(self.plan[self.stage]["inputs"])

    @property
    def rank(self) -> tuple[int, str]:
        """Order among deployments of one model: Lamport time, then the unique id."""
        return (self.created, self.deployment)

    def for_stage(self, stage: int) -> "ServingEntry":
        return replace(self, stage=stage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _warm(session: ModelSession, card: LlmCard | None) -> None:
    """One run on zeros so the first real request does not pay for allocation (a
    decoder stage: a prefill of 8 tokens into an empty cache, all of them attended)."""
    feeds = DecoderStage(session, card).empty_cache() if card is not None else {}
    for spec in session.inputs:
        if spec.name in feeds:
            continue
        shape = [
            d if isinstance(d, int) and d > 0 else (1 if i == 0 else 8)
            for i, d in enumerate(spec.shape)
        ]
        fill = 1 if card is not None and spec.name == "attention_mask" else 0
        feeds[spec.name] = np.full(shape, fill, dtype=spec.dtype or np.float32)
    try:
        session.run(feeds)
    except InputMismatchError:
        pass  # a model that rejects zeros is still loaded; warm-up is best effort


class StageServer:
    def __init__(
        self,
        mesh: Mesh,
        fetcher: Fetcher,
        threads: int | None,
        compute: trio.CapacityLimiter,
        budget: FrameBudget,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        kv_budget: int = DEFAULT_KV_BUDGET,
        memory_budget: int | None = None,
    ) -> None:
        self.mesh = mesh
        self.memory_budget = memory_budget
        self._kv_budget = kv_budget
        # Generation sessions' caches, all decoder stages: within what the memory budget
        # leaves beside the loaded stages (see _fit_cache).
        self.kv = KVCache(kv_budget if memory_budget is None else min(kv_budget, memory_budget))
        self.budget = budget  # inbound frames, shared with training
        self.fetcher = fetcher
        self.threads = threads
        self.max_payload = max_payload
        self.served: Counter[str] = Counter()  # fragment sha -> stage runs
        self.links = Links(mesh, PROTOCOL)
        self.clock = DeploymentClock()  # Lamport time of deployments, shared by the room
        self.undeployed = Undeployed()  # undeploy markers, shared by the room
        self.on_reply: Callable[[dict[str, Any], dict[str, np.ndarray]], None] = lambda h, t: None
        self._compute = compute
        self._hosted: dict[tuple[str, int], ServingEntry] = {}
        self._sessions: dict[str, ModelSession] = {}
        self._cards: dict[str, LlmCard] = {}  # of the decoder fragments loaded
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[
            tuple[dict[str, Any], dict[str, np.ndarray], Lease | None]
        ](QUEUE)
        # Outputs on their way to the next stage: the worker waits for room here, so a
        # slow downstream stage slows this one instead of piling up send tasks.
        self._outbound = FrameBudget(
            OUTBOUND_FRAMES * max_payload, OUTBOUND_FRAMES // 2 * max_payload
        )
        self._nursery: trio.Nursery | None = None

    def _stages_held(self) -> int:
        """Memory the loaded stages take: their weights times MEMORY_FACTOR."""
        sizes = {e.fragment: e.fragment_bytes for e in self._hosted.values()}
        return sum(int(MEMORY_FACTOR * sizes.get(f, 0)) for f in self._sessions)

    def memory_free(self) -> int:
        """Memory this node can still lend: free memory, within its budget less what its
        loaded stages and generation caches hold."""
        free = int(psutil.virtual_memory().available)
        if self.memory_budget is None:
            return free
        return max(0, min(free, self.memory_budget - self._stages_held() - self.kv.used))

    def _fit_cache(self) -> None:
        """Caches get what the memory budget leaves beside the stages loaded now."""
        if self.memory_budget is not None:
            room = max(0, self.memory_budget - self._stages_held())
            self.kv.budget = min(self._kv_budget, room)

    def serving(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self._hosted.values()]

    def hosted_fragments(self) -> list[str]:
        return sorted({entry.fragment for entry in self._hosted.values()})

    # ---- hosting ---------------------------------------------------------------

    async def host(
        self, entry: ServingEntry, sources: list[str], progress: Progress | None = None
    ) -> None:
        """Fetch (if needed), load and warm a stage; then advertise it."""
        if not self.clock.observe(entry.created):
            raise MeshError(
                f"{entry.deployment} claims logical time {entry.created}, implausibly far "
                f"ahead of this node's {self.clock.value}"
            )
        if self.undeployed.covers(entry.model, entry.created):
            raise MeshError(f"{entry.deployment} has been undeployed")
        self._check_room(entry)
        if entry.fragment not in self._sessions:
            needed = int(MEMORY_FACTOR * entry.fragment_bytes)
            free = self.memory_free()
            if needed > free:
                raise MeshError(
                    f"stage {entry.stage} of {entry.model} needs about {needed >> 20} MiB; "
                    f"{short_id(self.mesh.peer_id)} has {free >> 20} MiB free to lend"
                )
            path = await self.fetcher.fetch(entry.fragment, entry.fragment_bytes, sources, progress)
            try:
                session = await trio.to_thread.run_sync(
                    lambda: ModelSession(path, threads=self.threads)
                )
                card = llm_card(path)  # every fragment of a language model has one
            except (ModelLoadError, InvalidModelError) as exc:
                raise MeshError(f"fragment {entry.fragment[:12]} does not load: {exc}") from exc
            await trio.to_thread.run_sync(_warm, session, card, limiter=self._compute)
            self._sessions[entry.fragment] = session
            if card is not None:
                self._cards[entry.fragment] = card
        self._check_room(entry)  # again: other stages may have landed while this one loaded
        self._hosted[(entry.deployment, entry.stage)] = entry
        self._fit_cache()
        kind = "decoder" if entry.fragment in self._cards else "stateless"
        log.info("hosting stage %d of %s (%s)", entry.stage, entry.deployment, kind)
        self.mesh.refresh()

    def _check_room(self, entry: ServingEntry) -> None:
        """An advert lists at most MAX_HOSTED stages; one more and peers would refuse it."""
        if (entry.deployment, entry.stage) not in self._hosted and len(self._hosted) >= MAX_HOSTED:
            raise MeshError(
                f"{short_id(self.mesh.peer_id)} already hosts {MAX_HOSTED} stages; "
                "undeploy something first"
            )

    def retire(self, current: dict[str, tuple[int, str]]) -> None:
        """Stop hosting stages of deployments older than the ``current`` (complete) one of
        their model, and unload sessions nobody uses any more.

        Older stages are kept until a newer deployment is whole, so a redeploy still
        landing, or a member advertising part of one that never completes, never leaves
        a model without a working deployment.
        """
        stale = [
            key
            for key, entry in self._hosted.items()
            if entry.model in current and entry.rank < current[entry.model]
        ]
        for key in stale:
            del self._hosted[key]
        in_use = {e.fragment for e in self._hosted.values()}
        for fragment in [f for f in self._sessions if f not in in_use]:
            del self._sessions[fragment]
            self._cards.pop(fragment, None)
        self._fit_cache()
        if stale:
            self.mesh.refresh()

    def drop_undeployed(self) -> list[str]:
        """Stop hosting stages that an undeploy marker covers and unload their sessions;
        returns the deployments dropped."""
        gone = [k for k, e in self._hosted.items() if self.undeployed.covers(e.model, e.created)]
        for key in gone:
            del self._hosted[key]
        if gone:
            self.retire({})  # unloads the sessions nothing hosts any more
            self.mesh.refresh()
        return sorted({deployment for deployment, _ in gone})

    # ---- frames in -----------------------------------------------------------------

    async def handle_stream(self, peer_id: str, stream: INetStream) -> None:
        """Frames from one peer, each checked against INFER_FRAME before anything reads it;
        a bad one is refused to its requester (if it names one), and the stream reset."""
        while True:
            try:
                header, size = await read_header(stream, INFER_FRAME, IDLE_TIMEOUT_S)
            except SchemaError as exc:
                await self._refuse_unreadable(exc)
                raise
            if size > self.max_payload:
                if header["kind"] == "infer":  # results and refusals are ours to receive
                    await self._refuse_too_large(header, size)
                if size > SKIP_AT_MOST * self.max_payload:
                    raise WireError(f"a frame of {size} bytes is not worth reading past")
                # Skip, not reset: a reset would reach the sender as "peer unreachable".
                await skip_payload(stream, size, frame_timeout(size))
                continue
            # Wait for room in the node's budget before reading the payload: a sender
            # whose frames we cannot hold yet is slowed down, never mistaken for dead.
            tensors, lease = await read_leased_payload(stream, header, size, self.budget, peer_id)
            await self._take(header, tensors, lease)

    async def handle_link_frame(self, peer_id: str, frame: LinkFrame) -> None:
        """A frame from a direct link: checked as a stream's, but read already (leased,
        or skipped when over the limit), so the link goes on whatever is wrong with this
        one frame."""
        try:
            header = frame.header(INFER_FRAME)
        except SchemaError as exc:
            await self._refuse_unreadable(exc)
            return
        if frame.payload is None:
            if header["kind"] == "infer":
                await self._refuse_too_large(header, frame.size)
            return
        try:
            tensors = frame.tensors(header)
        except WireError as exc:
            log.debug("a frame from %s: %s", short_id(peer_id), exc)
            return
        await self._take(header, tensors, frame.lease)

    async def _take(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray], lease: Lease | None
    ) -> None:
        """A whole frame from a peer: stage work for the worker (which releases its
        lease once the stage has run), or an answer to a request of ours."""
        try:
            if header["kind"] == "infer":
                await self._jobs_send.send((header, tensors, lease))
                lease = None
            else:
                self.on_reply(header, tensors)
        finally:
            if lease is not None:
                lease.release()

    async def _refuse_too_large(self, header: dict[str, Any], size: int) -> None:
        limit = self.max_payload
        message = f"tensors of {size} bytes exceed this peer's limit of {limit}"
        await self._refuse(header, "too_large", message)

    async def submit(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Queue stage work from this node (the requester or a previous local stage)."""
        await self._jobs_send.send((header, tensors, None))

    # ---- frames out -----------------------------------------------------------------

    async def deliver(
        self,
        peer_id: str,
        header: dict[str, Any],
        tensors: dict[str, np.ndarray],
        codec: str = "raw",
    ) -> None:
        """Send a frame to a peer, or hand it over directly when the peer is us."""
        if peer_id == self.mesh.peer_id:
            if header["kind"] == "infer":
                await self.submit(header, tensors)
            else:
                self.on_reply(header, tensors)
            return
        head, views = encode_frame(header, tensors, codec)
        await self.links.send(peer_id, head, views)

    async def _refuse_unreadable(self, exc: SchemaError) -> None:
        """Tell the requester of a frame that failed its schema, if the frame named one
        and a request id validly: the error names the bad field."""
        partial = exc.partial if isinstance(exc.partial, dict) else {}
        try:
            reply = validate(partial.get("reply"), PEER_ID)
            rid = validate(partial.get("rid"), REQUEST_ID)
        except SchemaError:
            return
        try:
            attempt = validate(partial.get("attempt"), ATTEMPT)
        except SchemaError:
            attempt = None
        if partial.get("kind") == "infer":
            header = {"reply": reply, "rid": rid, "attempt": attempt}
            await self._refuse(header, "bad_request", str(exc), field=exc.field)

    async def _refuse(self, header: dict[str, Any], code: str, message: str, **extra: Any) -> None:
        reply = header["reply"]
        error = {
            "kind": "error",
            "rid": header["rid"],
            "attempt": header["attempt"],
            "code": code,
            "message": message[:4096],
            "peer": self.mesh.peer_id,
            **extra,
        }
        try:
            await self.deliver(reply, error, {})
        except MeshError as exc:
            log.debug("cannot tell %s about %s: %s", short_id(reply), code, exc)

    # ---- the worker ---------------------------------------------------------------

    async def _run_stage(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """One INFER-checked frame of stage work (from a peer, or from this node)."""
        entry = self._hosted.get((header["dep"], header["stage"]))
        if header.get("gen", {}).get("release"):
            await self._release(header)
            return
        if entry is None or entry.stages != len(header["route"]):
            where = f"stage {header['stage']} of {header['dep']}"
            await self._refuse(
                header, "not_hosted", f"{short_id(self.mesh.peer_id)} does not host {where}"
            )
            return
        held_back = self.mesh.unavailable_reason(self.mesh.peer_id)
        if held_back is not None:  # work already running here finishes; new work goes elsewhere
            here = short_id(self.mesh.peer_id)
            await self._refuse(header, "unavailable", f"{here} takes no work: {held_back}")
            return
        session = self._sessions[entry.fragment]
        started = time.perf_counter()
        if "gen" in header:
            outputs = await self._decoder_step(header, tensors, entry, session)
        else:
            outputs = await self._stateless_step(header, tensors, entry, session)
        if outputs is None:
            return  # refused
        self.served[entry.fragment] += 1
        trace = [
            *header["trace"],
            [entry.stage, self.mesh.peer_id, round((time.perf_counter() - started) * 1000, 3)],
        ]
        if entry.stage == entry.stages - 1:
            result = {
                "kind": "result",
                "rid": header["rid"],
                "attempt": header["attempt"],
                "trace": trace,
            }
            await self._forward(header["reply"], result, outputs, "raw", header)
            return
        later = {name for names in header["downstream"][entry.stage + 1 :] for name in names}
        carried = {name: value for name, value in tensors.items() if name in later}
        carried.update(outputs)
        onward = {**header, "stage": entry.stage + 1, "trace": trace}
        await self._forward(header["route"][entry.stage + 1], onward, carried, entry.codec, header)

    async def _stateless_step(
        self,
        header: dict[str, Any],
        tensors: dict[str, np.ndarray],
        entry: ServingEntry,
        session: ModelSession,
    ) -> dict[str, np.ndarray] | None:
        feeds = {spec.name: tensors[spec.name] for spec in session.inputs if spec.name in tensors}
        try:
            session.check_inputs(feeds)
            return await trio.to_thread.run_sync(session.run, feeds, limiter=self._compute)
        except InputMismatchError as exc:
            await self._refuse(
                header, "invalid_input", f"stage {entry.stage} of {entry.model}: {exc}"
            )
            return None

    async def _decoder_step(
        self,
        header: dict[str, Any],
        tensors: dict[str, np.ndarray],
        entry: ServingEntry,
        session: ModelSession,
    ) -> dict[str, np.ndarray] | None:
        """A generation step: this stage's layers over the new tokens, against the
        session's cache here (see ``_kvcache``); the last stage samples."""
        gen = header["gen"]
        where = f"stage {entry.stage} of {entry.model}"
        card = self._cards.get(entry.fragment)
        if card is None:
            await self._refuse(header, "invalid_input", f"{where} is not part of a language model")
            return None
        stage = DecoderStage(session, card)
        step = None
        if stage.pasts:  # a stage with layers keeps their cache; the LM head alone does not
            step = await self._begin_step(header, tensors, stage, (entry, where))
            if step is None:
                return None
        sampling = Sampling(gen["temperature"], gen["top_p"], gen["top_k"], gen["seed"])
        try:
            outputs, presents = await trio.to_thread.run_sync(
                stage.run,
                tensors,
                None if step is None else step.pasts,
                sampling,
                gen["step"],
                limiter=self._compute,
            )
        except InputMismatchError as exc:
            if step is not None:
                step.abort()
            await self._refuse(header, "invalid_input", f"{where}: {exc}")
            return None
        except BaseException:
            if step is not None:
                step.abort()
            raise
        if step is not None:
            step.commit(presents, int(tensors["attention_mask"].shape[1]))
        return outputs

    async def _release(self, header: dict[str, Any]) -> None:
        """A session has ended (or was replaced): drop its cache here and pass the word
        down its route. Best effort; an idle cache is evicted anyway."""
        stage = header["stage"]
        self.kv.drop((header["dep"], stage, header["gen"]["sid"]))
        if stage + 1 < len(header["route"]):
            onward = {**header, "stage": stage + 1}
            await self._forward(header["route"][stage + 1], onward, {}, "raw", header)

    async def _begin_step(
        self,
        header: dict[str, Any],
        tensors: dict[str, np.ndarray],
        stage: DecoderStage,
        at: tuple[ServingEntry, str],
    ) -> Step | None:
        """Check a step against the session's cache here and reserve its room; None when
        refused (the requester is told why)."""
        gen, (entry, where) = header["gen"], at
        mask = tensors.get("attention_mask")
        if mask is None or mask.ndim != 2 or mask.shape[0] != 1 or not np.all(mask == 1):
            shape = None if mask is None else list(mask.shape)
            needed = f"a step needs an attention_mask of ones [1, past + new], not {shape}"
            await self._refuse(header, "invalid_input", f"{where}: {needed}")
            return None
        total, new = int(mask.shape[1]), int(mask.shape[1]) - gen["past"]
        problem: str | None = None
        if new < 1:
            problem = f"attention_mask covers {total} tokens, not more than {gen['past']} cached"
        elif total > stage.card.context_length:
            problem = f"{total} tokens exceed the model's context of {stage.card.context_length}"
        else:
            moving = [
                s for s in stage.session.inputs if s.name in tensors and s.name != "attention_mask"
            ]
            wrong = [
                s.name
                for s in moving
                if tensors[s.name].ndim < 2 or tensors[s.name].shape[1] != new
            ]
            if wrong:
                problem = f"{wrong[0]} must carry the {new} new tokens the mask adds"
        if problem is not None:
            await self._refuse(header, "invalid_input", f"{where}: {problem}")
            return None
        key = (entry.deployment, entry.stage, gen["sid"])
        try:
            return self.kv.begin(key, gen["past"], stage.bytes_per_token * total)
        except CacheMiss as exc:
            await self._refuse(header, "cache_miss", f"{where}: {exc}")
        except CacheFull as exc:
            here = short_id(self.mesh.peer_id)
            await self._refuse(header, "cache_full", f"{where} on {here}: {exc}")
        return None

    async def _forward(
        self,
        peer_id: str,
        header: dict[str, Any],
        tensors: dict[str, np.ndarray],
        codec: str,
        request: dict[str, Any],
    ) -> None:
        lease = None
        if peer_id != self.mesh.peer_id:  # a hand-off to our own queue is not on the wire
            size = min(sum(t.nbytes for t in tensors.values()), self._outbound.per_peer)
            lease = await self._outbound.lease(peer_id, size)

        async def send() -> None:
            try:
                await self.deliver(peer_id, header, tensors, codec)
            except MeshError as exc:
                await self._refuse(request, "unreachable", str(exc), unreachable=peer_id)
            finally:
                if lease is not None:
                    lease.release()

        assert self._nursery is not None
        self._nursery.start_soon(send)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.mesh.handle(PROTOCOL, self.handle_stream)
            if self.mesh.direct is not None:
                self.mesh.direct.handle(
                    PROTOCOL, self.handle_link_frame, self.max_payload, self.budget
                )
            task_status.started()
            async for header, tensors, lease in self._jobs_receive:
                try:
                    await self._run_stage(header, tensors)
                except Exception:  # a bug in one request must not stop the worker
                    log.exception("stage failed")
                    await self._refuse(header, "internal", "the stage failed; see its log")
                finally:
                    if lease is not None:
                        lease.release()
