"""Which deployment is newest is a logical (Lamport) time, not a wall clock: a device
whose clock is hours behind can still redeploy, and every node follows it."""

import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import minilm_inputs, start_node
from mesh_helpers import deployed_everywhere, formed, identity
from salala.mesh import MeshKey
from test_sharded import reference

pytestmark = pytest.mark.slow

# libfaketime shifts the wall clock only; trio's monotonic deadlines stay true. It is
# preloaded through `env` (which execs), not the `faketime` program (which forks and
# does not pass SIGTERM on), so stopping the node stops the node.
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))), None)
THREE_HOURS_BEHIND = (
    "env",
    f"LD_PRELOAD={LIBFAKETIME}",
    "FAKETIME=-3h",
    "FAKETIME_DONT_FAKE_MONOTONIC=1",
)


def logged_clock_lag_s(log: str) -> float:
    """How far behind real time the node's own log timestamps run."""
    stamp = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log, re.M)
    assert stamp, log
    return time.time() - datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp()


def test_a_node_whose_clock_runs_hours_behind_can_redeploy(tmp_path: Path) -> None:
    if LIBFAKETIME is None:
        pytest.skip("libfaketime is missing: `make install` installs Debian's faketime")
    key = MeshKey.generate()
    right = start_node(tmp_path / "right", "--mesh-key", str(key))
    try:
        _, address = identity(right)
        behind = start_node(
            tmp_path / "behind",
            "--mesh-key",
            str(key),
            "--peer",
            address,
            prefix=THREE_HOURS_BEHIND,
        )
        try:
            assert logged_clock_lag_s(behind.log()) > 2.5 * 3600
            nodes = [right, behind]
            formed(nodes)
            with right.client() as client:
                first = client.deploy("minilm", shards=2)
            deployed_everywhere(nodes, first["deployment"])
            with behind.client() as client:
                second = client.deploy("minilm", shards=2, codec="fp16")
            assert second["deployment"] != first["deployment"]
            deployed_everywhere(nodes, second["deployment"])
            feeds = minilm_inputs(seed=4)
            for node in nodes:
                with node.client() as client:
                    found = [d for d in client.deployments() if d["model"] == "minilm"]
                    assert found[0]["codec"] == "fp16"
                    out = client.infer("minilm", feeds)["last_hidden_state"]
                assert np.abs(out - reference(feeds)).max() < 0.05
        finally:
            behind.stop()
    finally:
        right.stop()
