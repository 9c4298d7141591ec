"""A coordinator without any data: `serve` with real `nefl-edge` devices over a real Mosquitto evaluates on the
devices' held-out splits and re-estimates BatchNorm from their batch statistics (``--bn federated``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.core.evaluation import split_held_out
from tests.helpers import Broker, make_shards, serve_until_done

pytestmark = pytest.mark.integration


def test_serve_runs_with_no_coordinator_data_and_evaluates_on_the_devices(broker: Broker, tmp_path: Path) -> None:
    # Prepare: three devices of tiers 0, 1, 2; the coordinator's data folder does not exist.
    sizes = [400, 400, 400]
    shards = make_shards(tmp_path, sizes)
    options = (
        "--data-dir", str(tmp_path / "no-data"), "--evaluation", "federated",
        "--bn", "federated", "--policy", "static",
        "--gammas", "0.2,0.6,1.0", "--rounds", "2", "--eval-every", "1", "--min-clients", "3", "--max-steps", "8",
        "--lr", "0.05", "--deadline-s", "120", "--wait-clients-s", "90", "--eval-fraction", "0.2",
    )  # fmt: skip

    # Execute
    serve_until_done(broker.address, tmp_path, shards, *options, timeout=420)

    # Assert: rounds 1 and 2 evaluated by the devices, submodel k on the held-out splits of the devices that
    # can run it (tiers >= k), with BatchNorm statistics from every submodel; no round 0 (nothing to test on).
    run_dir = next((tmp_path / "runs").glob("default-*"))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    held = len(split_held_out(400, 0.2)[1])
    assert sorted({(r["round"], r["submodel"]) for r in rows}) == [(r, k) for r in (1, 2) for k in range(3)]
    for row in rows:
        k = row["submodel"]
        assert row["evaluated_by"] == "federated" and row["accuracy"] == row["fed_accuracy"]
        assert row["fed_samples"] == held * (3 - k) and row["fed_devices"] == 3 - k
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["bn_batches"][str(k)] > 0
        assert "bn_statistics" in row["phases"] and "federated_evaluation" in row["phases"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["bn"] == "federated" and config["evaluation"] == "federated"
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert {c["num_samples"] for c in clients} == {400 - held}
    assert "evaluated submodels [0, 1, 2]" in (tmp_path / "dev2.log").read_text()
    assert (run_dir / "report.html").is_file()
