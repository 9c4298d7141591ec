"""Faults the coordinator handles as docs/protocol.md promises, with real processes on a real Mosquitto: a
broker restart in the middle of a round (both orders of reconnection), SIGTERM to the coordinator, and a
device that leaves cleanly."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.core.errors import ExitCode
from tests.helpers import Broker, make_shards, spawn_coordinator, spawn_edge, stop, wait_for

pytestmark = pytest.mark.integration
COMMON = ("--gammas", "0.2,1.0", "--eval-samples", "300", "--bn-calibration", "100", "--wait-clients-s", "90")


def run_dir(folder: Path) -> Path:
    return wait_for(lambda: next((folder / "runs").glob("default-*"), None), 120, "the run directory")


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def checkpoint_round(directory: Path) -> int:
    try:
        return int(json.loads((directory / "checkpoint.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.mark.slow  # kept out of the default suite for time (25-65 s under load); ./dev test-slow runs it
@pytest.mark.parametrize("first", ["devices", "coordinator"])
def test_a_broker_restart_mid_round_loses_no_update(first: str, broker: Broker, tmp_path: Path) -> None:
    # Prepare: two devices with enough data that round 1 is still training when the broker goes down.
    shards = make_shards(tmp_path, [3000, 3000])
    coord = spawn_coordinator(
        broker.address, tmp_path, "--rounds", "1", "--deadline-s", "90", "--epochs", "2", "--min-clients", "2",
        "--policy", "static", *COMMON,
    )  # fmt: skip
    edges = [spawn_edge(broker.address, s, f"dev{i}", tmp_path, tier=i) for i, s in enumerate(shards)]
    logs = [tmp_path / f"dev{i}.log" for i in range(2)]
    try:
        for log in logs:
            wait_for(lambda log=log: "round 1: training" in text(log), 180, f"{log.stem} to train")

        # Execute: the broker restarts empty while both train; one side is held until the other reconnected.
        held = edges if first == "coordinator" else [coord]
        broker.stop()
        for p in held:
            os.killpg(p.pid, signal.SIGSTOP)
        broker.start()
        if first == "coordinator":
            wait_for(lambda: "reconnected to the broker" in text(tmp_path / "coordinator.log"), 60, "coordinator")
        else:
            for log in logs:
                wait_for(lambda log=log: text(log).count("connected to broker") >= 2, 60, f"{log.stem} reconnect")
        for p in held:
            os.killpg(p.pid, signal.SIGCONT)
        assert coord.wait(240) == 0, text(tmp_path / "coordinator.log")[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)

    # Assert: both updates of round 1 were aggregated, nobody was dropped.
    out = run_dir(tmp_path)
    round1 = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] == 1]
    assert round1 and all(r["updates"] == 2 and r["dropped"] == 0 and r["aggregated"] for r in round1), round1
    assert sorted(c["status"] for c in read_jsonl(out / "clients.jsonl")) == ["updated", "updated"]


def retained_on(broker: Broker, topic: str, timeout: float = 3.0) -> list[str]:
    """Topics holding retained messages under ``topic`` (read with a plain paho client)."""
    found: list[str] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retained-probe")
    client.on_message = lambda c, u, m: found.append(m.topic) if m.retain and m.payload else None
    client.on_subscribe = lambda *a: subscribed.set()
    host, port = broker.address.split(":")
    client.connect(host, int(port))
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        subscribed.wait(timeout)
        # Retained messages are sent right after SUBACK; a marker published afterwards arrives after them.
        marker = threading.Event()
        client.subscribe("probe/marker", qos=1)
        client.message_callback_add("probe/marker", lambda c, u, m: marker.set())
        client.publish("probe/marker", b"x", qos=1)
        marker.wait(timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return found


def test_sigterm_ends_the_run_cleanly_for_the_devices(broker: Broker, tmp_path: Path) -> None:
    # Prepare: a long run with two devices.
    shards = make_shards(tmp_path, [400, 400])
    coord = spawn_coordinator(
        broker.address, tmp_path, "--rounds", "50", "--deadline-s", "60", "--min-clients", "2", *COMMON
    )
    edges = [spawn_edge(broker.address, s, f"dev{i}", tmp_path, tier=i) for i, s in enumerate(shards)]
    try:
        out = run_dir(tmp_path)
        wait_for(lambda: checkpoint_round(out) >= 1, 240, "round 1 to be checkpointed", interval=0.05)
        assert retained_on(broker, "nefl/default/manifest/#")

        # Execute: what systemd or docker does to stop a service.
        os.killpg(coord.pid, signal.SIGTERM)
        code = coord.wait(120)
        device_codes = [e.wait(60) for e in edges]
    finally:
        for p in [coord, *edges]:
            stop(p)

    # Assert: the coordinator said so and cleaned up; devices left on its end message; the state is kept.
    log = text(tmp_path / "coordinator.log")
    assert code == ExitCode.INTERRUPTED, log[-3000:]
    assert "SIGTERM" in log
    assert device_codes == [0, 0]
    assert all("ended: coordinator stopped (SIGTERM)" in text(tmp_path / f"dev{i}.log") for i in range(2))
    assert retained_on(broker, "nefl/default/manifest/#") == []
    assert retained_on(broker, "nefl/default/weights/#") == []
    done = checkpoint_round(out)
    assert done >= 1
    assert max(r["round"] for r in read_jsonl(out / "metrics.jsonl")) == done


def test_a_device_that_leaves_cleanly_is_seen_at_once(broker: Broker, tmp_path: Path) -> None:
    # Prepare: two devices; the second leaves after round 1 while the run goes on. Evaluation inline and
    # tracked BatchNorm statistics, so that round 1's checkpoint exists before round 2 starts (in the
    # background it can lag a round behind; with bn = federated an evaluated round's statistics come with the
    # next round's tasks, and its checkpoint waits for that round).
    shards = make_shards(tmp_path, [300, 300])
    coord = spawn_coordinator(
        broker.address,
        tmp_path,
        *("--rounds", "3", "--deadline-s", "100", "--min-clients", "1", "--no-eval-background", "--bn", "tracked"),
        *COMMON,
    )
    edges = [spawn_edge(broker.address, s, f"dev{i}", tmp_path, tier=i) for i, s in enumerate(shards)]
    try:
        wait_for(lambda: "client dev1 joined" in text(tmp_path / "coordinator.log"), 120, "dev1 to join")
        wait_for(lambda: "client dev0 joined" in text(tmp_path / "coordinator.log"), 120, "dev0 to join")
        out = run_dir(tmp_path)
        wait_for(lambda: checkpoint_round(out) >= 1, 240, "round 1", interval=0.05)

        # Execute: the device is stopped the way a service is (SIGTERM): it says `offline` and leaves.
        os.killpg(edges[1].pid, signal.SIGTERM)
        assert edges[1].wait(60) == 130, "a device stopped by SIGTERM exits 130 (the unit counts it as success)"
        assert coord.wait(300) == 0, text(tmp_path / "coordinator.log")[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)

    # Assert: after it left, no round selected it or waited for it (far below the 100 s deadline).
    clients = read_jsonl(out / "clients.jsonl")
    assert {c["node"] for c in clients if c["round"] == 3} == {"dev0"}
    rounds = {r["round"]: r for r in read_jsonl(out / "metrics.jsonl") if r["submodel"] == 0}
    assert all(rounds[r]["seconds"] < 60 for r in (2, 3)), rounds
    assert "client dev1 went offline (left)" in text(tmp_path / "coordinator.log")
