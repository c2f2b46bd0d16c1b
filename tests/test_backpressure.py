"""Backpressure is by bytes, end to end: a slow but live stage makes senders wait and is
never mistaken for a dead one."""

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from conftest import NodeProcess, minilm_inputs
from mesh_helpers import deployed_everywhere, formed, identity, mesh_of
from salala.mesh import FrameBudget
from test_sharded import reference


async def test_a_budget_admits_by_bytes_in_total_and_per_peer() -> None:
    budget = FrameBudget(total=100, per_peer=60)
    assert not budget.fits(61)
    a = await budget.lease("a", 60)
    b = await budget.lease("b", 40)
    admitted: list[str] = []

    async def wait_for(peer: str, size: int) -> None:
        lease = await budget.lease(peer, size)
        admitted.append(peer)
        lease.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for, "a", 1)  # a's share is spent
        nursery.start_soon(wait_for, "c", 1)  # the whole budget is spent
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [] and budget.used == 100
        b.release()
        b.release()  # releasing twice gives back nothing more
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == ["c"]  # room in total, but a still holds its whole share
        a.release()
    assert admitted == ["c", "a"] and budget.used == 0
    with pytest.raises(ValueError):
        await budget.lease("a", 61)


@pytest.mark.slow
def test_a_stage_frozen_below_the_eviction_time_delays_but_loses_and_replays_nothing(
    tmp_path: Path,
) -> None:
    with mesh_of(tmp_path, 3) as nodes:
        formed(nodes)
        ids = [identity(node)[0] for node in nodes]
        with nodes[0].client() as client:
            deployment = client.deploy("minilm", shards=3)
        deployed_everywhere(nodes, deployment["deployment"])
        hosts = [s["peers"] for s in deployment["stages"]]
        frozen = next(n for n, i in zip(nodes, ids, strict=True) if i != ids[0] and [i] in hosts)

        count = 48
        inputs = [minilm_inputs(batch=1, tokens=16, seed=seed) for seed in range(count)]
        expected = [reference(feeds) for feeds in inputs]
        answers: dict[int, list[np.ndarray]] = {i: [] for i in range(count)}
        errors: list[BaseException] = []
        started = threading.Semaphore(0)

        def worker(node: NodeProcess, indexes: list[int]) -> None:
            try:
                with node.client() as client:
                    for i in indexes:
                        started.release()
                        answers[i].append(client.infer("minilm", inputs[i])["last_hidden_state"])
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(nodes[0], list(range(k, count, 6))))
            for k in range(6)
        ]
        for thread in threads:
            thread.start()
        for _ in range(12):
            started.acquire(timeout=60)
        frozen.process.send_signal(signal.SIGSTOP)
        time.sleep(3)  # below the 7 s after which a silent member is evicted
        frozen.process.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join(180)
        assert not errors, errors
        for i in range(count):
            assert len(answers[i]) == 1, f"request {i} answered {len(answers[i])} times"
            assert np.abs(answers[i][0] - expected[i]).max() <= 1e-5
        log = nodes[0].log()
        assert "replaying without" not in log, log
        assert "re-planned" not in log, log
        with nodes[0].client() as client:
            (now,) = [d for d in client.deployments() if d["model"] == "minilm"]
        assert now["deployment"] == deployment["deployment"]
        assert [s["hosts"] for s in now["stages"]] == hosts
