"""Churn: 1,000 requests from two requesters while stage hosts die and come back.

Five real nodes on loopback; MiniLM deployed in 2 stages with 2 replicas each. Nodes 0
and 1 send the requests (4 callers each); every 10 s one of the other nodes is killed
(SIGKILL) or a killed one is restarted with its data dir (same identity, new port).
Every answer is checked against one onnxruntime session. Lost requests (an error
reached the caller), duplicates (a request answered twice) and wrong answers must all
be 0; latency shows what the failovers cost.
"""

import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from salala.mesh import MeshKey
from salala.models import builtin_models
from salala.node import SalalaError, connect
from salala.node._launch import spawn_node, wait_ready
from salala.runtime import ModelSession

NODES = 5
REQUESTS = 1000
CALLERS_PER_REQUESTER = 4
CHURN_EVERY_S = 10.0
TOLERANCE = 1e-4


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, 30000, (1, 32), dtype=np.int64),
        "attention_mask": np.ones((1, 32), dtype=np.int64),
        "token_type_ids": np.zeros((1, 32), dtype=np.int64),
    }


class _Mesh:
    """Node processes that can be killed and restarted with the same data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = str(MeshKey.generate())
        self.processes: dict[int, Any] = {}
        self.bootstrap = ""

    def start(self, index: int) -> None:
        data_dir = self.root / f"node-{index}"
        args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--mesh-key", self.key]
        if self.bootstrap:
            args += ["--peer", self.bootstrap]
        process = spawn_node(data_dir, args)
        wait_ready(data_dir, process)
        self.processes[index] = process
        if not self.bootstrap:
            with connect(data_dir) as client:
                self.bootstrap = client.status()["addrs"][0]

    def kill(self, index: int) -> None:
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait(30)

    def alive(self, index: int) -> bool:
        return self.processes[index].poll() is None

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            process.wait(30)


def _wait_formed(mesh: _Mesh) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with connect(mesh.root / "node-0") as client:
            if len(client.peers()) == NODES:
                return
        time.sleep(0.2)
    raise TimeoutError("the mesh did not form")


def run() -> list[dict[str, Any]]:
    session = ModelSession(builtin_models()["minilm"])
    inputs = [_inputs(seed) for seed in range(REQUESTS)]
    expected = [session.run(feeds)["last_hidden_state"] for feeds in inputs]
    answers: list[list[np.ndarray]] = [[] for _ in range(REQUESTS)]
    failures: list[str] = []
    latencies: list[float] = []
    events: list[str] = []
    lock = threading.Lock()
    queue = iter(range(REQUESTS))

    with tempfile.TemporaryDirectory(prefix="salala-churn-") as tmp:
        mesh = _Mesh(Path(tmp))
        try:
            for index in range(NODES):
                mesh.start(index)
            _wait_formed(mesh)
            with connect(mesh.root / "node-0") as client:
                client.deploy("minilm", shards=2, replicas=2)

            def caller(requester: int) -> None:
                with connect(mesh.root / f"node-{requester}") as client:
                    while True:
                        with lock:
                            index = next(queue, None)
                        if index is None:
                            return
                        started = time.perf_counter()
                        try:
                            out = client.infer("minilm", inputs[index])["last_hidden_state"]
                        except SalalaError as exc:
                            with lock:
                                failures.append(f"request {index}: {exc}")
                            continue
                        with lock:
                            latencies.append((time.perf_counter() - started) * 1000)
                            answers[index].append(out)

            threads = [
                threading.Thread(target=caller, args=(requester,))
                for requester in (0, 1)
                for _ in range(CALLERS_PER_REQUESTER)
            ]
            for thread in threads:
                thread.start()
            victims = list(range(2, NODES))
            chooser = random.Random(0)
            while any(thread.is_alive() for thread in threads):
                time.sleep(CHURN_EVERY_S)
                dead = [v for v in victims if not mesh.alive(v)]
                # keep at most one victim down, so every stage keeps a possible host
                if dead:
                    mesh.start(dead[0])
                    events.append(f"restarted node {dead[0]}")
                elif any(thread.is_alive() for thread in threads):
                    victim = chooser.choice(victims)
                    mesh.kill(victim)
                    events.append(f"killed node {victim}")
            for thread in threads:
                thread.join()
        finally:
            mesh.stop_all()

    answered = sum(1 for a in answers if a)
    duplicates = sum(1 for a in answers if len(a) > 1)
    wrong = sum(
        1
        for got, want in zip(answers, expected, strict=True)
        if got and np.abs(got[0] - want).max() > TOLERANCE
    )
    ordered = sorted(latencies)
    return [
        {
            "requests": REQUESTS,
            "answered": answered,
            "lost": REQUESTS - answered,
            "duplicates": duplicates,
            "wrong": wrong,
            "p50_ms": round(ordered[len(ordered) // 2], 2) if ordered else None,
            "p99_ms": round(ordered[int(len(ordered) * 0.99)], 2) if ordered else None,
            "churn_events": len(events),
            "events": "; ".join(events),
            "errors": "; ".join(failures[:3]),
        }
    ]
