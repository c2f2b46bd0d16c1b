"""The store and deployment lifecycle across real node processes: undeploy mesh-wide,
the store quota with eviction, and models gc."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, start_node
from mesh_helpers import formed, identity, mesh_of, peer_ids, wait_until
from models_for_tests import mlp_model
from salala.mesh import MeshKey
from salala.models import builtin_models
from salala.node import UnknownModelError
from salala.node._launch import SALALA

pytestmark = pytest.mark.slow


def listed(node: NodeProcess) -> dict[str, str]:
    """model -> deployment, as this node's deployments call shows them."""
    with node.client() as client:
        return {d["model"]: d["deployment"] for d in client.deployments()}


def advertised(node: NodeProcess, model: str) -> set[str]:
    """Peers that this node sees advertising a stage of ``model``."""
    with node.client() as client:
        return {
            peer["peer_id"]
            for peer in client.peers()
            if any(entry["model"] == model for entry in peer["serving"])
        }


def gone_everywhere(nodes: list[NodeProcess], model: str) -> bool:
    return all(model not in listed(n) and not advertised(n, model) for n in nodes)


def deployed_everywhere(nodes: list[NodeProcess], model: str, deployment: str) -> None:
    wait_until(
        lambda: all(listed(n).get(model) == deployment for n in nodes),
        15,
        f"{deployment} listed on every node",
    )


def test_undeploy_reaches_every_node_and_hosts_that_missed_it_do_not_bring_it_back(
    tmp_path: Path,
) -> None:
    model = mlp_model(tmp_path / "mlp" / "model.onnx", layers=6, width=128, seed=1)
    key = MeshKey.generate()
    with mesh_of(tmp_path, 3, key) as nodes:
        formed(nodes)
        ids = [identity(n)[0] for n in nodes]
        with nodes[0].client() as client:
            client.add_model(model, "mlp")
            deployment = client.deploy("mlp", shards=3)
        assert {p for s in deployment["stages"] for p in s["peers"]} == set(ids)
        deployed_everywhere(nodes, "mlp", deployment["deployment"])

        # Node 2 freezes (the others evict it) and node 0, the deployer, stops: both miss
        # the undeploy, and both host a stage of it.
        listen_addr0 = identity(nodes[0])[1].split("/p2p/")[0]
        nodes[2].process.send_signal(signal.SIGSTOP)
        nodes[0].stop()
        wait_until(lambda: peer_ids(nodes[1]) == {ids[1]}, 20, "node 1 evicting both")
        with nodes[1].client() as client:
            result = client.undeploy("mlp")
        assert result["deployments"] == [deployment["deployment"]]
        assert result["hosts"] == [ids[1]] and result["pending"] == []  # the others are away
        assert "mlp" not in listed(nodes[1]) and not advertised(nodes[1], "mlp")
        saved = json.loads((nodes[1].data_dir / "undeployed.json").read_text())
        assert saved == {"mlp": result["upto"]}

        # Both come back: node 2 still advertising its stage, node 0 knowing nothing. Node 0
        # keeps its port: it is node 2's only bootstrap address, and a node that slept past
        # its eviction redials only that (a membership limit, not this test's subject).
        _, bootstrap = identity(nodes[1])
        nodes[0] = start_node(
            nodes[0].data_dir,
            "--mesh-key",
            str(key),
            "--peer",
            bootstrap,
            listen=listen_addr0,
        )
        nodes[2].process.send_signal(signal.SIGCONT)
        formed(nodes)
        wait_until(lambda: gone_everywhere(nodes, "mlp"), 20, "mlp gone on every node")
        time.sleep(4)  # two more advert rounds: nothing brings it back
        assert gone_everywhere(nodes, "mlp")
        for node in nodes:  # every node now carries the marker itself
            with node.client() as client:
                own = next(p for p in client.peers() if p["self"])
            assert {"model": "mlp", "upto": result["upto"]} in own["undeployed"]
        with nodes[1].client() as client, pytest.raises(UnknownModelError):
            client.infer("mlp", {"x": np.zeros((1, 128), np.float32)})

        # A later deploy, even from the node that slept through the undeploy, is newer.
        with nodes[2].client() as client:
            client.add_model(model, "mlp")
            again = client.deploy("mlp", shards=2)
        deployed_everywhere(nodes, "mlp", again["deployment"])
        with nodes[1].client() as client:
            outputs = client.infer("mlp", {"x": np.ones((1, 128), np.float32)})
        assert outputs["y"].shape == (1, 128)


def test_undeploying_a_model_nobody_advertises_marks_it_and_a_later_deploy_wins(
    tmp_path: Path,
) -> None:
    with mesh_of(tmp_path, 1) as nodes, nodes[0].client() as client:
        result = client.undeploy("minilm")  # its hosts might be asleep: it is marked anyway
        assert result["deployments"] == [] and result["upto"] >= 1
        deployment = client.deploy("minilm", shards=1)
        assert [d["deployment"] for d in client.deployments()] == [deployment["deployment"]]


def store_objects(node: NodeProcess) -> set[str]:
    return {p.name for p in (node.data_dir / "store" / "objects").iterdir() if len(p.name) == 64}


def test_a_tight_store_quota_refuses_what_does_not_fit_and_evicts_what_is_unused(
    tmp_path: Path,
) -> None:
    # Each model has exactly one cut, into halves of 3.15 MB; the small node's quota
    # holds the built-in model plus 5 MB: one such fragment, not two.
    models = {
        name: mlp_model(tmp_path / name / "model.onnx", layers=2, width=888, seed=seed, relu=False)
        for name, seed in (("mlp-a", 1), ("mlp-b", 2))
    }
    builtin = sum(p.stat().st_size for p in builtin_models().values())
    quota = builtin + 5 * 10**6
    with mesh_of(tmp_path, 1) as nodes:
        big = nodes[0]
        _, bootstrap = identity(big)
        key = (big.data_dir / "mesh.key").read_text().strip()
        small = start_node(
            tmp_path / "small",
            "--mesh-key",
            key,
            "--peer",
            bootstrap,
            "--max-store-gb",
            f"{quota / 1e9:.9f}",
        )
        nodes.append(small)
        small_id, _ = identity(small)
        formed(nodes)
        with small.client() as client:
            assert client.status()["store"]["quota"] == quota
        with big.client() as client:
            for name, path in models.items():
                client.add_model(path, name)
            first = client.deploy("mlp-a", shards=2)
        held = next(s["fragment"] for s in first["stages"] if small_id in s["peers"])
        assert held in store_objects(small)
        size = (small.data_dir / "store" / "objects" / held / "model.onnx").stat().st_size

        # Another fragment does not fit beside the one in use: the deployer's CLI says why.
        before = store_objects(small)
        refused = subprocess.run(
            [SALALA, "deploy", "mlp-b", "--shards", "2", "--data-dir", str(big.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1
        message = " ".join(refused.stderr.split())
        assert "--max-store-gb" in message and f"needs {size / 1e6:.2f} MB" in message, message
        assert f"store quota of {quota / 1e6:.2f} MB" in message, message
        assert store_objects(small) == before
        assert not list((small.data_dir / "store" / "incoming").glob("*.part"))

        # Once mlp-a is undeployed its fragment is unused, and makes room for mlp-b's.
        with small.client() as client:
            client.undeploy("mlp-a")
        with big.client() as client:
            second = client.deploy("mlp-b", shards=2)
        wanted = next(s["fragment"] for s in second["stages"] if small_id in s["peers"])
        assert wanted in store_objects(small) and held not in store_objects(small)
        with small.client() as client:
            assert client.status()["store"]["used"] <= quota
            assert [m["name"] for m in client.models()] == ["minilm"]  # named: never evicted

        # On the deployer, gc frees mlp-a's fragments and keeps mlp-b's (deployed) and
        # every named model.
        a_fragments = {s["fragment"] for s in first["stages"]}
        b_fragments = {s["fragment"] for s in second["stages"]}
        with big.client() as client:
            named = {m["sha256"] for m in client.models()}
        assert a_fragments <= store_objects(big)
        gc = subprocess.run(
            [SALALA, "models", "gc", "--json", "--data-dir", str(big.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert gc.returncode == 0, gc.stderr
        freed = json.loads(gc.stdout)
        assert {r["sha256"] for r in freed["removed"]} == a_fragments
        assert freed["freed"] >= sum(r["size"] for r in freed["removed"]) > 6 * 10**6
        assert store_objects(big) == named | b_fragments
        splits = [json.loads(p.read_text()) for p in (big.data_dir / "store/splits").iterdir()]
        assert splits and all(
            {f["sha256"] for f in plan["fragments"]} <= b_fragments for plan in splits
        )
        with big.client() as client:  # mlp-b still runs, across both nodes
            outputs = client.infer("mlp-b", {"x": np.ones((1, 888), np.float32)})
        assert outputs["y"].shape == (1, 888)
