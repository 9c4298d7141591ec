"""Brokers people run: the same short `serve` run (real coordinator and device processes, same seeds) through
one Mosquitto with the default chunk size, through a Mosquitto that caps packets at 128 KiB with a small
``--chunk-size``, through two Mosquittos bridged (devices on a site broker), and through RabbitMQ's MQTT
plugin; each must end in the same global state as the reference run within float tolerance."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Sequence

import numpy as np
import pytest

from nefl_edge.coordinator.bridge import ChunkTooLarge, check_chunk_size, chunk_size_for, packet_size
from nefl_edge.coordinator.broker import LocalBroker
from nefl_edge.core.mqtt import Security
from tests.helpers import make_shards, spawn_coordinator, spawn_edge, stop

pytestmark = pytest.mark.integration

SIZES = [96, 128, 160]
RUN_ARGS = (
    "--method", "nefl-wd", "--gammas", "0.2,0.6,1.0", "--rounds", "2", "--seed", "7", "--policy", "static",
    "--min-clients", "3", "--eval-samples", "200", "--lr", "0.05", "--batch-size", "32", "--deadline-s", "120",
    "--wait-clients-s", "90",
)  # fmt: skip
LIMIT = 131072  # a broker's 128 KiB cap on one MQTT packet (AWS IoT Core: 128 KB per message)
SMALL_CHUNK = 120 << 10  # below LIMIT by the frame header (<= 1 KiB + 8), the topic and the MQTT header
TOLERANCE = 1e-5

State = Dict[str, np.ndarray]


def serve_run(
    folder: Path,
    coordinator_broker: str,
    device_broker: str = "",
    coordinator_args: Sequence[str] = (),
    device_args: Sequence[str] = (),
    timeout_s: float = 300,
) -> State:
    """One short run: ``serve`` on ``coordinator_broker``, three `nefl-edge join` processes on
    ``device_broker`` (default: the same); the final global state from the run's checkpoint."""
    from safetensors.numpy import load_file

    folder.mkdir(parents=True, exist_ok=True)
    shards = make_shards(folder, SIZES)
    coord = spawn_coordinator(coordinator_broker, folder, *RUN_ARGS, *coordinator_args)
    edges = [
        spawn_edge(device_broker or coordinator_broker, shard, f"dev{i}", folder, *device_args, tier=i)
        for i, shard in enumerate(shards)
    ]
    try:
        code = coord.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        for p in [coord, *edges]:
            stop(p)
    log = (folder / "coordinator.log").read_text()
    assert code == 0, f"serve ended with {code} (None: still running after {timeout_s:.0f} s):\n{log[-3000:]}"
    run_dir = next((folder / "runs").glob("default-*"))
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    assert meta["round"] == 2, f"the checkpoint is of round {meta['round']}, expected 2"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = {r["round"]: r["updates"] for r in records if r["round"] > 0}
    assert updates == {1: 3, 2: 3}, f"every round should aggregate the three devices' updates: {updates}"
    return dict(load_file(str(run_dir / meta["state"])))


def differences(a: State, b: State) -> float:
    assert a.keys() == b.keys(), f"the states differ in tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> State:
    """The run through one Mosquitto with the default chunk size (1 MiB)."""
    folder = tmp_path_factory.mktemp("reference")
    with LocalBroker("mosquitto", folder / "broker") as broker:
        return serve_run(folder, broker.address)


@pytest.fixture
def limited_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A Mosquitto that refuses MQTT packets over 128 KiB (it disconnects the sender)."""
    with LocalBroker("mosquitto", tmp_path / "broker", extra_config=(f"max_packet_size {LIMIT}",)) as broker:
        yield broker


def test_a_small_chunk_size_runs_through_a_broker_with_a_128_kib_limit(
    reference: State, limited_broker: LocalBroker, tmp_path: Path
) -> None:
    state = serve_run(
        tmp_path,
        limited_broker.address,
        coordinator_args=("--chunk-size", str(SMALL_CHUNK)),
        device_args=("--max-message-size", str(SMALL_CHUNK)),
    )
    assert differences(state, reference) < TOLERANCE


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_chunk_check_says_what_fits_a_broker_with_a_128_kib_limit(
    limited_broker: LocalBroker, protocol: str
) -> None:
    # Over 3.1.1 the broker closes the connection on the oversized probe; over MQTT 5 its CONNACK says the limit.
    with pytest.raises(ChunkTooLarge) as refused:
        check_chunk_size(limited_broker.address, Security(), 1 << 20, "default", protocol)
    fits = chunk_size_for(LIMIT)
    assert f"--chunk-size {fits}" in str(refused.value), str(refused.value)
    assert packet_size(fits) <= LIMIT < packet_size(fits + 1024), "the advice is not the largest chunk that fits"
    check_chunk_size(limited_broker.address, Security(), fits, "default", protocol)  # fits: no error
    check_chunk_size(limited_broker.address, Security(), SMALL_CHUNK, "default", protocol)


def test_serve_refuses_a_chunk_size_the_broker_does_not_take_instead_of_stalling(
    limited_broker: LocalBroker, tmp_path: Path
) -> None:
    coord = spawn_coordinator(limited_broker.address, tmp_path, *RUN_ARGS)
    try:
        code = coord.wait(120)
    finally:
        stop(coord)
    log = (tmp_path / "coordinator.log").read_text()
    assert code == 2, f"serve should exit 2 on a chunk the broker refuses, got {code}:\n{log[-2000:]}"
    assert f"--chunk-size {chunk_size_for(LIMIT)}" in log and "Traceback" not in log, log[-2000:]
