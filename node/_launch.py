"""Starting node processes from Python: for local meshes, benchmarks and tests.

A node is always its own process (the same program a device runs); this only spawns
``salala node start`` and waits until its API answers.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from ._client import connect
from ._errors import NodeNotRunningError

SALALA = str(Path(sys.executable).parent / "salala")
READY_TIMEOUT_S = 60.0


def spawn_node(
    data_dir: Path, args: list[str], prefix: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``salala node start --data-dir DATA_DIR ARGS``, logging to DATA_DIR/node.log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "node.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [*(prefix or []), SALALA, "node", "start", "--data-dir", str(data_dir), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_ready(
    data_dir: Path, process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S
) -> None:
    """Return once the node answers on its API; raise if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log = (data_dir / "node.log").read_text(errors="replace")[-4000:]
            raise NodeNotRunningError(f"node exited with {process.returncode}:\n{log}")
        try:
            with connect(data_dir) as client:
                client.status()
            return
        except NodeNotRunningError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
