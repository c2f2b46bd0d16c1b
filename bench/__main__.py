"""`python -m bench [NAME ...]`: run benchmarks, print tables, write bench/results/*.json."""

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import psutil
from rich.console import Console
from rich.table import Table

from . import churn, codecs, generation, idle, inference, local, mesh_join, training, transport

RESULTS = Path(__file__).resolve().parent / "results"

BENCHMARKS: dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]] = {
    "local": ("MiniLM on one device, batch 1, 128 tokens (latency in ms)", local.run),
    "idle": (
        "An idle node: import time, memory (MiB) and CPU, alone and in a 3-node mesh; "
        "then what each heavy import costs",
        idle.run,
    ),
    "mesh": ("Mesh membership on loopback: join time (ms), idle cost per node", mesh_join.run),
    "inference": ("Sharded inference vs one session vs Ray (ms, req/s)", inference.run),
    "transport": (
        "One hop's cost (payload, then a 1-byte answer; median ms), and the direct link "
        "against libp2p through real nodes",
        transport.run,
    ),
    "training": ("Pipeline training on the mesh vs torch (steps/s)", training.run),
    "churn": ("1,000 requests while stage hosts are killed and restarted every 10 s", churn.run),
    "codecs": ("Activation codecs: MiniLM in 3 fragments, 32 real sentences", codecs.run),
    "generation": (
        "SmolLM2-135M generation: one session, the mesh, llama.cpp (greedy, 32 tokens)",
        generation.run,
    ),
}
TARGETS: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    "inference": inference.targets,
    "generation": generation.targets,
    "transport": transport.targets,
    "idle": idle.targets,
}
# Benchmarks whose rows print as one table per value of their "part" column.
BY_PART = {"idle"}


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        values = (row.get(column, "") for column in columns)
        table.add_row(*(_cell(v) for v in values))
    return table


def _cell(value: Any) -> str:
    """Two decimals, or two significant digits for small numbers (errors, cosine gaps)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:.2g}"


def main(names: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "cpu_count": psutil.cpu_count(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
    }
    console = Console() if sys.stdout.isatty() else Console(width=200)
    for name in names or list(BENCHMARKS):
        title, run = BENCHMARKS[name]
        rows = run()
        extra: dict[str, Any] = {}
        if name in TARGETS:
            extra["targets"] = TARGETS[name](rows)
            console.print(extra["targets"])
        if name == "inference":
            inference.plot(rows, RESULTS / "inference.png")
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"title": title, "machine": machine, "rows": rows, **extra}, indent=2)
        )
        if name in BY_PART:
            for part in dict.fromkeys(row["part"] for row in rows):
                section = [
                    {k: v for k, v in row.items() if k != "part"}
                    for row in rows
                    if row["part"] == part
                ]
                console.print(_table(f"{title}: {part}", section))
        else:
            console.print(_table(title, rows))
        console.print(f"results: {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
