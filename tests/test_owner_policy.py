"""The owner's policy, followed live by real nodes: a phone that is unplugged stops
taking work within seconds, its stage moves to another member, requests keep being
answered, and every member shows why."""

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, minilm_inputs, start_node
from mesh_helpers import deployed_everywhere, formed, identity, wait_until
from salala.node._launch import SALALA

pytestmark = pytest.mark.slow

PLUGGED = {"percentage": 80, "plugged": "PLUGGED_AC", "status": "CHARGING", "temperature": 30.5}
UNPLUGGED = {**PLUGGED, "plugged": "UNPLUGGED", "status": "DISCHARGING"}
ON_BATTERY = "on battery: the owner lends it only while charging"


def own_row(node: NodeProcess) -> dict:
    with node.client() as client:
        return next(p for p in client.peers() if p["self"])


def peers_json(node: NodeProcess) -> list[dict]:
    done = subprocess.run(
        [SALALA, "mesh", "peers", "--json", "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(done.stdout)


def test_an_unplugged_phone_stops_taking_work_and_its_stage_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start_node(tmp_path / "a", "--threads", "1")
    key = (first.data_dir / "mesh.key").read_text().strip()
    _, address = identity(first)
    join = ("--threads", "1", "--mesh-key", key, "--peer", address)
    second = start_node(tmp_path / "b", *join)
    battery = tmp_path / "battery.json"
    battery.write_text(json.dumps(PLUGGED))
    monkeypatch.setenv("SALALA_BATTERY_FILE", str(battery))  # the phone's battery
    phone = start_node(tmp_path / "phone", *join, "--only-while-charging")
    monkeypatch.delenv("SALALA_BATTERY_FILE")
    nodes = [first, second, phone]
    try:
        formed(nodes)
        phone_id, _ = identity(phone)
        assert own_row(phone)["capacity"]["available"] is True
        assert own_row(phone)["capacity"]["battery_temperature"] == 30.5
        with first.client() as client:
            deployment = client.deploy("minilm", shards=3)
        deployed_everywhere(nodes, deployment["deployment"])
        feeds = minilm_inputs(batch=1, tokens=16, seed=9)
        with first.client() as client:
            expected, route = client.infer_traced("minilm", feeds)
        assert phone_id in [hop["peer"] for hop in route]

        answers: list[tuple[np.ndarray, list[str]]] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def ask() -> None:  # a user's requests, all through the unplugging
            try:
                with second.client() as client:
                    while not stop.is_set():
                        result, trace = client.infer_traced("minilm", feeds)
                        answers.append((result["last_hidden_state"], [h["peer"] for h in trace]))
            except BaseException as exc:
                failures.append(exc)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            wait_until(lambda: failures or len(answers) >= 3, 30, "answers before unplugging")
            battery.write_text(json.dumps(UNPLUGGED))
            # Within 5 s the phone says it takes no work (its battery is read every 3 s).
            wait_until(lambda: not own_row(phone)["capacity"]["available"], 5, "the phone refusing")
            with phone.client() as client:  # its own status says so too
                assert client.status()["capacity"]["unavailable_reason"] == ON_BATTERY
            before = len(answers)
            wait_until(
                lambda: failures or len(answers) >= before + 5, 60, "answers after unplugging"
            )
        finally:
            stop.set()
            asker.join(60)
        assert not failures, failures
        for result, _ in answers:
            np.testing.assert_array_equal(result, expected["last_hidden_state"])
        # The last answers ran without the phone: its stage moved to a member that works.
        assert all(phone_id not in hops for _, hops in answers[before + 2 :])
        # Every member shows why, in `salala mesh peers --json`.
        for node in (first, second):
            row = wait_until(
                lambda n=node: next(
                    (
                        p
                        for p in peers_json(n)
                        if p["peer_id"] == phone_id and not p["capacity"]["available"]
                    ),
                    None,
                ),
                10,
                "the phone's reason reaching the mesh",
            )
            assert row["capacity"]["unavailable_reason"] == ON_BATTERY
        # Plugged in again, it takes work again.
        battery.write_text(json.dumps(PLUGGED))
        wait_until(lambda: own_row(phone)["capacity"]["available"], 10, "the phone working again")
    finally:
        for node in nodes:
            node.stop()
