"""The node process: owns the identity, the model store, the mesh and the local API.

Runs in the foreground until SIGINT/SIGTERM or an API ``shutdown``; every part it starts
is closed on the way out, including the API socket file.
"""

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import models, runtime
from ..mesh import (
    DEFAULT_KV_BUDGET,
    FrameBudget,
    Inference,
    LocalState,
    MeshConfig,
    MeshKey,
    Training,
    open_inference,
    open_mesh,
    open_training,
    short_id,
)
from ._backend import NodeBackend
from ._battery import BatteryWatch
from ._errors import NodeAlreadyRunningError
from ._http import HttpSettings, serve_http
from ._identity import load_or_create_identity
from ._paths import DataDir
from ._policy import PolicyWatch, compute_limiter
from ._server import serve_api
from ._service import NodeService
from ._slow_reading import SlowReading, refreshing

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/0"
HARDWARE_REFRESH_S = 30.0  # accelerators and their free memory, for placement
HARDWARE_TIMEOUT_S = 10.0  # NVML's first initialisation can take seconds
DEFAULT_MAX_REQUEST_BYTES = 1 << 30
INBOUND_FRAMES = 4
PEER_FRAMES = 2
DEFAULT_MAX_TENSOR_BYTES = 256 << 20  # per inference or training frame between peers


@dataclass(frozen=True)
class NodeConfig:
    data_dir: DataDir
    mesh_key: MeshKey
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    peers: list[str] = field(default_factory=list)
    interfaces: list[str] | None = None
    mdns: bool = True
    threads: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_store_bytes: int | None = None  # None: what the store holds + half the free disk
    http: HttpSettings | None = None  # the OpenAI-compatible API, off unless asked for
    max_memory_bytes: int | None = None  # what this node lends; None: whatever is free
    kv_cache_bytes: int = DEFAULT_KV_BUDGET  # generation sessions' caches, within the above
    direct_links: bool = True  # off: every frame goes over libp2p (the fallback path)
    policy: runtime.Policy = field(default_factory=runtime.Policy)  # the owner's


def _claim_socket(data_dir: DataDir) -> None:
    """Refuse to start over a live node; clear a socket left by one that crashed."""
    path = data_dir.socket
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listening: stale
    else:
        raise NodeAlreadyRunningError(f"a node is already running in {data_dir.root}")
    finally:
        probe.close()


def _return_freed_memory() -> None:
    """Give the heap that start-up freed back to the system: checking the built-in models
    and measuring throughput leave tens of MB freed but held by glibc's allocator, which
    an idle node would otherwise carry for its whole life. Not glibc (musl, Android's
    bionic): nothing to do."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _register_builtins(store: models.ModelStore) -> None:
    known = {m.name for m in store.list()}
    for name, path in models.builtin_models().items():
        if name not in known:
            try:
                store.add(path, name)
            except models.StoreFullError as exc:
                log.warning("built-in model %s not added: %s", name, exc)


def _open_store(config: NodeConfig) -> models.ModelStore:
    store = models.ModelStore(config.data_dir.store)
    store.max_bytes = config.max_store_bytes or models.default_quota(store.root, store.used_bytes())
    return store


def _objects_in_use(started: list[tuple[Inference, Training]]) -> Callable[[], set[str]]:
    """What the store must not evict, read on trio's thread (the store asks from the
    worker threads it runs in; reading the running parts there would race them)."""

    def collect() -> set[str]:
        if not started:
            return set()
        inference, training = started[0]
        return inference.objects_in_use() | training.server.objects_in_use()

    def in_use() -> set[str]:
        if trio.lowlevel.in_trio_run():  # type: ignore[attr-defined]  # stale trio-stubs
            return collect()
        return trio.from_thread.run_sync(collect)

    return in_use


async def _stop_on_signal(service: NodeService) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            service.shutdown_requested.set()
            return


async def run_node(
    config: NodeConfig,
    *,
    task_status: trio.TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # stale trio-stubs from libp2p
) -> None:
    """Run a node until it is asked to stop."""
    data_dir = config.data_dir
    data_dir.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    _claim_socket(data_dir)
    key_pair = load_or_create_identity(data_dir.identity)
    store = await trio.to_thread.run_sync(_open_store, config)
    running: list[tuple[Inference, Training]] = []  # filled once both are up
    store.in_use = _objects_in_use(running)
    await trio.to_thread.run_sync(_register_builtins, store)
    throughput = await trio.to_thread.run_sync(
        runtime.cached_throughput, data_dir.throughput_cache, config.threads
    )
    _return_freed_memory()

    started: list[Inference] = []  # filled once the mesh is up; adverts read it
    # Read off the event loop (a battery service, a GPU driver); adverts read the last.
    battery = BatteryWatch()
    hardware = SlowReading(
        lambda: runtime.probe_hardware(offered=throughput.offered),  # onnxruntime not loaded
        HARDWARE_REFRESH_S,
        HARDWARE_TIMEOUT_S,
    )

    def capacity_now() -> runtime.Capacity:
        found = hardware.value or runtime.Hardware(("CPUExecutionProvider",), ())
        return runtime.probe_capacity(throughput, battery, found)

    policy = PolicyWatch(config.policy, battery)

    def local_state() -> LocalState:
        server = started[0].server if started else None
        serving = server.serving() if server else []
        fragments = {*models.held_fragments(store), *(server.hosted_fragments() if server else [])}
        undeployed = started[0].undeployer.markers() if started else []
        capacity = capacity_now().to_dict()
        # The planner sees what this node lends, not what is free.
        if server is not None:
            capacity["memory_available"] = server.memory_free()
        elif config.max_memory_bytes is not None:
            free = capacity["memory_available"]
            if isinstance(free, int):
                capacity["memory_available"] = min(free, config.max_memory_bytes)
        held_back = policy.reason()
        capacity["available"] = held_back is None
        capacity["unavailable_reason"] = held_back
        return LocalState(capacity, sorted(fragments), serving, undeployed)

    compute = compute_limiter(config.policy.duty_cycle(os.cpu_count(), config.threads))
    # Frames from peers held at once (inference and training alike), and one peer's share.
    budget = FrameBudget(
        INBOUND_FRAMES * config.max_tensor_bytes, PEER_FRAMES * config.max_tensor_bytes
    )

    mesh_config = MeshConfig(
        key=config.mesh_key,
        listen=config.listen,
        peers=config.peers,
        interfaces=config.interfaces,
        mdns=config.mdns,
        link_dir=data_dir.links if config.direct_links else None,
    )
    async with (
        refreshing(battery.reading, hardware),
        open_mesh(key_pair, mesh_config, local_state) as mesh,
        open_inference(
            mesh,
            store,
            config.threads,
            compute,
            budget,
            config.max_tensor_bytes,
            data_dir.undeployed,
            config.kv_cache_bytes,
            config.max_memory_bytes,
        ) as inference,
        open_training(
            mesh,
            store,
            inference.fetcher,
            config.threads,
            compute,
            data_dir.training,
            budget,
            config.max_tensor_bytes,
        ) as training,
        trio.open_nursery() as nursery,
    ):
        started.append(inference)
        running.append((inference, training))
        service = NodeService(
            data_dir=data_dir,
            store=store,
            mesh=mesh,
            inference=inference,
            training=training,
            capacity=capacity_now,
            threads=config.threads,
            compute=compute,
            max_tensor_bytes=config.max_tensor_bytes,
        )
        nursery.start_soon(_stop_on_signal, service)
        nursery.start_soon(policy.run, mesh.refresh)
        await nursery.start(serve_api, data_dir.socket, service, config.max_request_bytes)
        if config.http is not None:
            await nursery.start(serve_http, config.http, NodeBackend(service))
        log.info(
            "node %s ready (pid %d) in mesh %s: api %s, listening on %s, store quota %.3f GB",
            short_id(mesh.peer_id),
            os.getpid(),
            mesh.mesh_id,
            data_dir.socket,
            ", ".join(mesh.addrs),
            (store.max_bytes or 0) / models.GB,
        )
        task_status.started(service)
        await service.shutdown_requested.wait()
        nursery.cancel_scope.cancel()
