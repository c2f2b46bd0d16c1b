"""Start a real node process for a benchmark, on loopback, and stop it afterwards."""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from salala.node import Client, NodeNotRunningError, connect

SALALA = str(Path(sys.executable).parent / "salala")


@contextmanager
def running_node(data_dir: Path, *extra: str) -> Iterator[Client]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "node.log").open("ab") as log:
        process = subprocess.Popen(
            [
                SALALA,
                "node",
                "start",
                "--data-dir",
                str(data_dir),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = connect(data_dir)
                break
            except NodeNotRunningError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        with client:
            yield client
    finally:
        process.terminate()
        process.wait(30)
