"""Start a real node process for a benchmark, on loopback, and stop it afterwards."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from salala.node import Client, connect
from salala.node._launch import spawn_node, wait_ready

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]


@contextmanager
def running_node(data_dir: Path, *extra: str) -> Iterator[Client]:
    process = spawn_node(data_dir, [*LOOPBACK, *extra])
    try:
        wait_ready(data_dir, process)
        with connect(data_dir) as client:
            yield client
    finally:
        process.terminate()
        process.wait(30)
