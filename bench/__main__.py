"""`python -m bench`: run every benchmark, print a table, write bench/results/*.json."""

import json
import platform
from pathlib import Path

import onnxruntime as ort
import psutil
from rich.console import Console
from rich.table import Table

from . import local

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "cpu_count": psutil.cpu_count(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
    }
    rows = local.run()
    (RESULTS / "local.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    table = Table(title="MiniLM on one device, batch 1, 128 tokens")
    for column in ("setup", "p50 ms", "p95 ms", "n"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["setup"], f"{row['p50_ms']:.2f}", f"{row['p95_ms']:.2f}", str(row["n"]))
    Console().print(table)
    print(f"results: {RESULTS / 'local.json'}")


if __name__ == "__main__":
    main()
