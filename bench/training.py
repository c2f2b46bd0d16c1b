"""Training steps per second: the digits MLP on 1, 2 and 3 mesh nodes against torch.

Same model (3 fragments), same data, same batch schedule, Adam. Mesh nodes are real
processes on loopback; the job enters through node 0's local API, and one node hosts
every fragment in the 1-node case. Steps per second are counted between the first and
the last progress event, so setup (fetching graphs, loading sessions) is left out and
reported apart (time to the first step).
"""

import tempfile
import time
from pathlib import Path
from typing import Any

from salala.models import batch_indices, digits_mlp, export_digits, load_digits
from salala.node import connect
from salala.node._launch import local_mesh

STEPS = 100
BATCH = 64
MICRO_BATCHES = 4
OPTIMIZER = {"kind": "adam", "lr": 0.01}


def _torch_row() -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    model = torch.nn.Sequential(*digits_mlp(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=OPTIMIZER["lr"])
    data = load_digits()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    started = time.perf_counter()
    for step in range(STEPS):
        index = torch.from_numpy(batch_indices(len(y), BATCH, step))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    return {"setup": "torch, one process", "steps_per_s": round(STEPS / elapsed, 1)}


def _mesh_row(package: Path, nodes: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="salala-bench-train-") as tmp,
        local_mesh(Path(tmp), nodes) as mesh,
        connect(mesh[0].data_dir) as client,
    ):
        stamps: list[float] = []
        started = time.perf_counter()
        result = client.train(
            {
                "package": str(package),
                "steps": STEPS,
                "batch": BATCH,
                "micro_batches": MICRO_BATCHES,
                "checkpoint_every": 10,
                "optimizer": OPTIMIZER,
                "output": "digits",
            },
            on_progress=lambda event: stamps.append(time.perf_counter()),
        )
    stepping = stamps[-1] - stamps[0]
    return {
        "setup": f"mesh, {nodes} node{'s' if nodes > 1 else ''}",
        "steps_per_s": round((len(stamps) - 1) / stepping, 1),
        "to_first_step_s": round(stamps[0] - started, 2),
        "test_accuracy": round(result["test_accuracy"], 4),
    }


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="salala-bench-package-") as tmp:
        package = export_digits(Path(tmp) / "digits", 3)
        rows = [_torch_row()]
        rows += [_mesh_row(package, nodes) for nodes in (1, 2, 3)]
    for row in rows:
        row["model"] = f"digits MLP, batch {BATCH}, {MICRO_BATCHES} micro-batches, Adam"
    return rows
