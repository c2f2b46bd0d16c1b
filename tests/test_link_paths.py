"""The two paths frames take between real node processes: direct TLS links, and
libp2p streams when a link cannot be had. Same answers on both, bit for bit."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, minilm_inputs, start_node
from mesh_helpers import deployed_everywhere, formed, identity, mesh_of, wait_until

pytestmark = pytest.mark.slow

SHARDS = (2, 3, 4)


def links_of(node: NodeProcess) -> dict[str, dict]:
    with node.client() as client:
        return {p["peer_id"]: p["link"] for p in client.peers() if not p["self"]}


def every_link_is(nodes: list[NodeProcess], path: str) -> bool:
    return all(
        len(links) == len(nodes) - 1 and all(link["path"] == path for link in links.values())
        for links in (links_of(node) for node in nodes)
    )


def answers(nodes: list[NodeProcess], feeds: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """MiniLM's output for 2, 3 and 4 shards, asked of every node in turn."""
    found = {}
    for shards in SHARDS:
        with nodes[0].client() as client:
            deployment = client.deploy("minilm", shards=shards)
        deployed_everywhere(nodes, deployment["deployment"])
        outputs = []
        for node in nodes:
            with node.client() as client:
                result, route = client.infer_traced("minilm", feeds)
            assert len(route) == shards
            outputs.append(result["last_hidden_state"])
        assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
        found[shards] = outputs[0]
    return found


def test_answers_are_bit_identical_on_direct_links_and_over_libp2p(tmp_path: Path) -> None:
    feeds = minilm_inputs(batch=2, tokens=24, seed=5)
    results = {}
    for path, extra in (("direct", ()), ("libp2p", ("--no-link",))):
        with mesh_of(tmp_path / path, 3, None, "--threads", "1", *extra) as nodes:
            formed(nodes)
            wait_until(lambda n=nodes, p=path: every_link_is(n, p), 15, f"{path} links")
            results[path] = answers(nodes, feeds)
            for node in nodes:  # measured, and shown per link
                for link in links_of(node).values():
                    assert link["rtt_ms"] is not None and link["rtt_ms"] > 0
                    if path == "direct":  # and every frame took it
                        assert link["bandwidth"] > 0
                        assert link["frames"]["direct"] > 0 and link["frames"]["libp2p"] == 0
    for shards in SHARDS:
        assert np.array_equal(results["direct"][shards], results["libp2p"][shards]), shards


def test_a_link_port_nobody_listens_on_sends_frames_over_libp2p(tmp_path: Path) -> None:
    """b advertises its libp2p address, 127.0.0.1, but its direct link listens on
    127.0.0.2 only: dialing the advertised port is refused, as behind a firewall."""
    with mesh_of(tmp_path, 2) as nodes:
        formed(nodes)
        _, bootstrap = identity(nodes[0])
        key = (nodes[0].data_dir / "mesh.key").read_text().strip()
        blocked = start_node(
            tmp_path / "blocked",
            "--mesh-key",
            key,
            "--peer",
            bootstrap,
            "--listen",
            "/ip4/127.0.0.2/tcp/0/tls",
        )
        nodes.append(blocked)
        blocked_id, _ = identity(blocked)
        formed(nodes)

        def fallen_back() -> dict | None:
            """The dial failed (before the blocked node's advert is live here, the row
            says it advertises no link: not yet the case under test)."""
            link = links_of(nodes[0]).get(blocked_id)
            failed = link and "cannot open a direct link" in link.get("reason", "")
            return link if failed and link["path"] == "libp2p" else None

        wait_until(fallen_back, 15, "the blocked link's dial failing")
        with nodes[0].client() as client:
            deployment = client.deploy("minilm", shards=3)
        deployed_everywhere(nodes, deployment["deployment"])
        assert {p for s in deployment["stages"] for p in s["peers"]} >= {blocked_id}
        feeds = minilm_inputs(seed=2)
        outputs = []
        for node in nodes:
            with node.client() as client:
                outputs.append(client.infer("minilm", feeds)["last_hidden_state"])
        assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
        to_blocked = [links_of(node)[blocked_id]["frames"] for node in nodes[:2]]
        assert sum(f["libp2p"] for f in to_blocked) > 0  # frames to it took libp2p
        assert sum(f["direct"] for f in to_blocked) == 0
        assert links_of(nodes[1])[identity(nodes[0])[0]]["path"] == "direct"


def test_mesh_peers_json_shows_each_links_path_rtt_and_bandwidth(tmp_path: Path) -> None:
    from test_cli import salala

    with mesh_of(tmp_path, 2) as nodes:
        formed(nodes)
        wait_until(lambda: every_link_is(nodes, "direct"), 15, "direct links")
        rows = json.loads(salala(nodes[0], "mesh", "peers", "--json").stdout)
        other = next(r for r in rows if not r["self"])
        assert other["link"]["path"] == "direct"
        assert other["link"]["rtt_ms"] > 0 and other["link"]["bandwidth"] > 0
        table = salala(nodes[0], "mesh", "peers").stdout
        assert "direct" in table and "MB/s" in table
