"""The real coordinator process with real devices over a real Mosquitto: rounds, faults, resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from nefl_edge.coordinator.records import read_jsonl
from tests.helpers import Broker, make_shards, spawn_coordinator, spawn_edge, stop, wait_for

pytestmark = pytest.mark.integration
GAMMAS = "0.2,0.6,1.0"
COMMON = ("--gammas", GAMMAS, "--min-clients", "3", "--eval-samples", "1000", "--lr", "0.05", "--wait-clients-s", "90")


def run_dir(folder: Path) -> Path:
    return wait_for(
        lambda: next((folder / "runs").glob("default-*"), None) if (folder / "runs").exists() else None,
        120,
        "the run directory",
    )


def checkpoint_round(directory: Path) -> int:
    try:
        return int(json.loads((directory / "checkpoint.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def test_three_devices_three_rounds_improve_every_submodel(broker: Broker, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [1500, 1500, 1500])
    coord = spawn_coordinator(broker.address, tmp_path, "--rounds", "3", "--deadline-s", "120", *COMMON)
    edges = [spawn_edge(broker.address, shard, f"dev{i}", tmp_path, tier=i) for i, shard in enumerate(shards)]
    try:
        assert coord.wait(420) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
        for edge in edges:
            assert edge.wait(30) == 0
    finally:
        for p in [coord, *edges]:
            stop(p)
    out = run_dir(tmp_path)
    records = read_jsonl(out / "metrics.jsonl")
    assert sorted({r["round"] for r in records}) == [0, 1, 2, 3]
    assert len(records) == 4 * 3
    for sub in range(3):
        before = next(r for r in records if r["round"] == 0 and r["submodel"] == sub)
        after = next(r for r in records if r["round"] == 3 and r["submodel"] == sub)
        assert after["accuracy"] > before["accuracy"] and after["accuracy"] > 0.1 + 0.05, (sub, before, after)
        assert after["clients"] == 1
    assert all(r["updates"] == 3 and r["aggregated"] for r in records if r["round"] > 0)
    assert (out / "report.png").stat().st_size > 1000 and "report.png" in (out / "report.html").read_text()
    assert json.loads((out / "config.json").read_text())["gammas"] == [0.2, 0.6, 1.0]
    log = (tmp_path / "coordinator.log").read_text()
    assert "worst" in log and "average" in log


@pytest.mark.slow  # kept out of the default suite for time (25-65 s under load); ./dev test-slow runs it
def test_a_client_killed_mid_round_is_dropped_and_the_rest_aggregate(broker: Broker, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [600, 600, 6000])
    coord = spawn_coordinator(broker.address, tmp_path, "--rounds", "1", "--deadline-s", "60", "--epochs", "2", *COMMON)
    edges = [spawn_edge(broker.address, shard, f"dev{i}", tmp_path, tier=i) for i, shard in enumerate(shards)]
    try:
        wait_for(lambda: "round 1: training" in (tmp_path / "dev2.log").read_text(), 180, "dev2 to start training")
        stop(edges[2], signal.SIGKILL)
        assert coord.wait(240) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)
    records = read_jsonl(run_dir(tmp_path) / "metrics.jsonl")
    round1 = [r for r in records if r["round"] == 1]
    assert round1 and all(r["updates"] == 2 and r["aggregated"] for r in round1)
    assert all(r["dropped"] + (3 - r["updates"] - r["dropped"]) == 1 for r in round1)
    assert "went offline" in (tmp_path / "coordinator.log").read_text()


@pytest.mark.slow  # kept out of the default suite for time (25-65 s under load); ./dev test-slow runs it
def test_coordinator_killed_after_round_two_resumes_without_losing_or_repeating_rounds(
    broker: Broker, tmp_path: Path
) -> None:
    shards = make_shards(tmp_path, [800, 800, 800])
    args = ("--rounds", "4", "--deadline-s", "60", *COMMON)
    coord = spawn_coordinator(broker.address, tmp_path, *args)
    edges = [spawn_edge(broker.address, shard, f"dev{i}", tmp_path, tier=i) for i, shard in enumerate(shards)]
    try:
        out = run_dir(tmp_path)
        wait_for(lambda: checkpoint_round(out) >= 2, 300, "round 2 to be checkpointed", interval=0.05)
        stop(coord, signal.SIGKILL)
        assert checkpoint_round(out) == 2

        resumed = spawn_coordinator(broker.address, tmp_path, "--resume", str(out))
        assert resumed.wait(300) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
        for edge in edges:
            assert edge.wait(30) == 0
    finally:
        for p in [coord, *edges]:
            stop(p)
    records = read_jsonl(out / "metrics.jsonl")
    rounds = [r["round"] for r in records if r["submodel"] == 0]
    assert rounds == [0, 1, 2, 3, 4]
    assert len(records) == 5 * 3
    assert checkpoint_round(out) == 4
    assert "resuming" in (tmp_path / "coordinator.log").read_text()


@pytest.mark.slow  # kept out of the default suite for time (25-65 s under load); ./dev test-slow runs it
def test_a_broker_restart_mid_run_loses_nothing_and_late_devices_still_get_the_artifacts(
    broker: Broker, tmp_path: Path
) -> None:
    # Prepare: one device, a run of four rounds; the broker keeps no state across restarts (persistence off).
    shards = make_shards(tmp_path, [3000, 600])
    coord = spawn_coordinator(
        broker.address,
        tmp_path,
        "--rounds",
        "4",
        "--deadline-s",
        "30",
        "--epochs",
        "2",
        "--fraction",
        "1",
        "--gammas",
        GAMMAS,
        "--min-clients",
        "1",
        "--eval-samples",
        "500",
        "--wait-clients-s",
        "90",
    )
    edges = [spawn_edge(broker.address, shards[0], "dev0", tmp_path, tier=0)]
    try:
        out = run_dir(tmp_path)
        wait_for(lambda: checkpoint_round(out) >= 1, 240, "round 1")

        # Execute: the broker restarts empty; then a new device joins, which needs the retained manifest.
        broker.stop()
        broker.start()
        edges.append(spawn_edge(broker.address, shards[1], "dev1", tmp_path, tier=1))
        wait_for(lambda: "joined run default" in (tmp_path / "dev1.log").read_text(), 120, "dev1 to join")
        assert coord.wait(300) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)

    # Assert: every round exactly once, and the coordinator knew to publish its retained messages again.
    records = read_jsonl(out / "metrics.jsonl")
    assert sorted(r["round"] for r in records if r["submodel"] == 0) == [0, 1, 2, 3, 4]
    assert "publishing" in (tmp_path / "coordinator.log").read_text()
