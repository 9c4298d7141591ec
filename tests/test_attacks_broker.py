"""The attack suite through a real enrolled run (issue 22): one enrolled device of four turns hostile.

Everything is real: Mosquitto with the generated configuration (TLS, passwords, ACL), ``nefl-coord serve``
with an enrolment folder and ``aggregation = robust``, three honest ``nefl-edge join`` processes (ONNX Runtime,
Fashion-MNIST shards, torch and onnx blocked) and a fourth enrolled device that is the same ``nefl-edge join``
with its own key, started through :data:`HOSTILE_DEVICE`: a few of the device's own functions are wrapped so
that it signs valid messages that lie. One attack class per test:

- ``scaled``: honest training, upload ``w - 5 (trained - w)``; ``signflip``: ``w - (trained - w)``;
- ``inflated``: hello and every update claim 10,000,000 samples;
- ``bn_mean`` / ``bn_var``: federated BatchNorm answers with every batch mean + 1e4, or every variance x 1e-6;
- ``falsified``: every federated evaluation claims 100 % on its held-out samples;
- ``mute``: hello with a tier (and a speed of 1e9 samples/s) that makes it the only device of the small
  submodel, then never answers a task.

Each attacked run (seed 0) is held to the clean runs of seeds 0 and 1 (:data:`CLEAN_SEEDS`): on every submodel
its final test accuracy (the coordinator's test samples) must be at least the lower clean seed's minus
:data:`TOLERANCE`. The spread between the clean seeds is printed with the figures, so that the 2 points can be
read against it. Measured at load 16 on a 2-core machine: 79-113 s a run (the mute run 191 s: each of its
3 drops waits out the deadline), 15.7 minutes for the module: all slow. Figures: docs/benchmarks.md, "Attacks
through a broker"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from nefl_edge.coordinator.broker import free_ports, port_open
from nefl_edge.coordinator.broker_config import BrokerOptions, BrokerSettings, write_broker_config
from nefl_edge.coordinator.enrolment import add_device
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.core.identity import install_bundle, open_identity
from tests.helpers import device_env, make_shards, spawn_coordinator, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = ["pi-0", "pi-1", "pi-2", "pi-3"]
HOSTILE = "pi-3"
SHARD = 600
ROUNDS = 4
CLEAN_SEEDS = (0, 1)
TOLERANCE = 0.02
RUN_TIMEOUT_S = 900

HOSTILE_DEVICE = r"""
import sys
import numpy as np
from nefl_edge.core import wire
from nefl_edge.edge_client import client, session

attack = sys.argv[1]
sent = {}

keep = client.EdgeClient._keep_global
def keep_global(self, manifest, sub, round_, tensors, metrics=None):
    # the global weights of the task (what the device was sent): what the lie is built on
    sent.clear()
    sent.update({n: np.array(v, np.float32) for n, v in tensors.items()})
    return keep(self, manifest, sub, round_, tensors, metrics)
client.EdgeClient._keep_global = keep_global

factor = {"scaled": 5.0, "signflip": 1.0}.get(attack)
if factor is not None:
    parts = client.tensor_parts
    def lying_parts(tensors, keep_dtype=False):
        if set(tensors) <= set(sent):
            tensors = {n: sent[n] - factor * (np.asarray(t, np.float32) - sent[n]) for n, t in tensors.items()}
        return parts(tensors, keep_dtype)
    client.tensor_parts = lying_parts

if attack == "inflated":
    send = session.DeviceSession.send_update
    session.DeviceSession.send_update = lambda self, task, sub, n, metrics, body: send(
        self, task, sub, 10_000_000, metrics, body
    )
    announce = session.DeviceSession.announce
    def inflated_announce(self):
        if self.hello is not None:
            self.hello = self.hello.model_copy(update={"num_samples": 10_000_000})
        announce(self)
    session.DeviceSession.announce = inflated_announce

if attack in ("bn_mean", "bn_var", "falsified"):
    answer = session.DeviceSession.send_evaluation
    def lying_answer(self, task, results, counts, body=b""):
        if attack == "falsified":
            results = [r.model_copy(update={"correct": r.count, "loss": 0.0}) for r in results]
        elif body:
            batches = {c.submodel: c.batches for c in counts}
            tensors = {n: np.array(v, np.float32) for n, v in wire.unpack_tensors(body).items()}
            for name in tensors:
                k = int(name.split("/", 1)[0])
                if attack == "bn_mean" and name.endswith(".mean_sum"):
                    tensors[name] = tensors[name] + np.float32(1e4 * batches[k])
                if attack == "bn_var" and name.endswith(".var_sum"):
                    tensors[name] = tensors[name] * np.float32(1e-6)
            body = wire.pack_tensors(tensors)
        return answer(self, task, results, counts, body)
    session.DeviceSession.send_evaluation = lying_answer

if attack == "mute":
    profile = client.DeviceWork.profile
    def boastful(self, manifest):
        return profile(self, manifest).model_copy(update={"samples_per_s": 1e9})
    client.DeviceWork.profile = boastful
    client.DeviceWork.run_task = lambda self, task, received: None
    client.DeviceWork.run_evaluation = lambda self, task, received: None

from nefl_edge.edge_client.cli import main
sys.argv = ["nefl-edge", *sys.argv[2:]]
main()
"""
"""The hostile device: ``python -c HOSTILE_DEVICE <attack> join ...`` is ``nefl-edge join ...`` with the
device's own functions wrapped (its protocol, session, signing and ONNX Runtime training are the real ones)."""


class Deployment:
    """The generated broker folder with four enrolled device identities (``states[name]``), and its Mosquitto."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tls_port, self.plain_port = free_ports(2)
        opts = BrokerOptions(
            folder / "broker",
            ("127.0.0.1",),
            self.tls_port,
            self.plain_port,
            bind="127.0.0.1",
            persistence=False,
            user="root" if os.geteuid() == 0 else None,
        )
        self.settings: BrokerSettings = write_broker_config(opts)
        self.enrol = folder / "enrol"
        self.states: dict[str, Path] = {}
        for name in DEVICES:
            state = folder / "state" / name
            with open_identity(state) as ident:
                public = ident.public_key
            bundle = add_device(self.enrol, name, public, self.settings.folder).bundle
            install_bundle(state, bundle).close()
            bundle.unlink()
            self.states[name] = state
        self.shards = make_shards(folder, [SHARD] * len(DEVICES))
        log = (folder / "mosquitto.log").open("ab")
        conf = str(self.settings.folder / "mosquitto.conf")
        self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.tls_port) and port_open(self.plain_port), 10, "mosquitto to listen", 0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    yield d
    d.stop()


@dataclass
class RunResult:
    """One finished run: its metrics.jsonl and clients.jsonl rows, and the coordinator's log."""

    metrics: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    log: str
    seconds: float

    def final(self) -> list[float]:
        """The last round's test accuracy per submodel (the coordinator's test samples)."""
        last = max(r["round"] for r in self.metrics)
        rows = sorted((r for r in self.metrics if r["round"] == last), key=lambda r: r["submodel"])
        return [r["accuracy"] for r in rows]

    def rounds(self) -> dict[int, dict[str, Any]]:
        """The round-level fields (the same on every submodel's row), by round."""
        return {r["round"]: r for r in self.metrics if r["submodel"] == 0 and r["round"] > 0}


def enrolled_run(d: Deployment, attack: Optional[str], seed: int) -> RunResult:
    """One robust run of ``ROUNDS`` rounds: three honest enrolled devices and ``HOSTILE`` doing ``attack``
    (None: honest). Static tiers: the devices train the large submodel, except in the ``mute`` run, where the
    hostile device declares the only small-submodel tier (so it alone would cover that submodel)."""
    import time

    name = f"{attack or 'clean'}-{seed}"
    folder = d.folder / name
    folder.mkdir()
    run = f"atk-{name}"
    coord = spawn_coordinator(
        d.address,
        folder,
        *("--run", run, "--enrolment-dir", str(d.enrol), "--tls-ca", str(d.settings.ca_cert)),
        *("--username", "nefl-coord", "--password-file", str(d.settings.coordinator_password_file)),
        *("--rounds", str(ROUNDS), "--gammas", "0.5,1.0", "--min-clients", "4", "--policy", "static"),
        *("--aggregation", "robust", "--seed", str(seed), "--lr", "0.05", "--momentum", "0.9"),
        *("--max-steps", "12", "--bn", "federated", "--bn-device-samples", "128", "--evaluation", "both"),
        *("--eval-samples", "1000", "--eval-every", "1", "--no-eval-background"),
        *("--deadline-s", "30", "--wait-clients-s", "300"),
    )
    edges = []
    started = time.monotonic()
    try:
        for i, node in enumerate(DEVICES):
            tier = (0 if node == HOSTILE else 1) if attack == "mute" else 1
            args = ["join", "--state-dir", str(d.states[node]), "--data", str(d.shards[i]), "--run", run]
            args += ["--cache", str(folder / f"cache-{node}"), "--threads", "1", "--tier", str(tier)]
            lie = attack if node == HOSTILE and attack else None
            command = [sys.executable, "-c", HOSTILE_DEVICE, lie, *args] if lie else [sys.executable, "-m"]
            if not lie:
                command += ["nefl_edge.edge_client", *args]
            log = (folder / f"{node}.log").open("ab")
            edges.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=device_env(folder), start_new_session=True
                )
            )
        code = coord.wait(RUN_TIMEOUT_S)
        seconds = time.monotonic() - started
        edge_codes = [edge.wait(60) for edge in edges]
    finally:
        for p in [coord, *edges]:
            stop(p)
    log = (folder / "coordinator.log").read_text()
    assert code == 0, f"{name}: the coordinator exited {code}:\n{log[-3000:]}"
    hostile_log = (folder / f"{HOSTILE}.log").read_text()
    assert edge_codes == [0] * len(DEVICES), f"{name}: devices exited {edge_codes}:\n{hostile_log[-2000:]}"
    run_dir = next((folder / "runs").glob(f"{run}-*"))
    return RunResult(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "clients.jsonl"), log, seconds)


_runs: dict[tuple[Optional[str], int], RunResult] = {}


def cached_run(d: Deployment, attack: Optional[str], seed: int = 0) -> RunResult:
    """Runs are shared between the tests of this module (the clean ones by every test)."""
    if (attack, seed) not in _runs:
        _runs[attack, seed] = enrolled_run(d, attack, seed)
    return _runs[attack, seed]


def percent(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def held_to_clean(d: Deployment, attack: str) -> RunResult:
    """The attacked run, its figures printed beside the clean seeds', held to the lower clean seed."""
    clean = [cached_run(d, None, s).final() for s in CLEAN_SEEDS]
    attacked = cached_run(d, attack)
    floor = [min(c[k] for c in clean) for k in range(len(clean[0]))]
    spread = [max(c[k] for c in clean) - floor[k] for k in range(len(floor))]
    figures = {
        "attack": attack,
        **{f"clean seed {s}": percent(c) for s, c in zip(CLEAN_SEEDS, clean)},
        "clean spread": percent(spread),
        "attacked": percent(attacked.final()),
        "attacked run s": round(attacked.seconds, 1),
        "clean run s": [round(cached_run(d, None, s).seconds, 1) for s in CLEAN_SEEDS],
    }
    print(json.dumps(figures))
    for k, (a, f) in enumerate(zip(attacked.final(), floor)):
        assert a >= f - TOLERANCE, (
            f"{attack}: submodel {k} ends at {100 * a:.1f} %, more than {100 * TOLERANCE:.0f} points below the lower "
            f"clean seed ({100 * f:.1f} %; clean spread {100 * spread[k]:.1f} points)"
        )
    return attacked


@pytest.mark.parametrize("attack", ["scaled", "signflip"])
def test_a_reversed_update_is_left_out_and_its_device_quarantined(deployment: Deployment, attack: str) -> None:
    result = held_to_clean(deployment, attack)
    rounds = result.rounds()
    left_out = {r: rounds[r]["robust"].get("left_out", []) for r in (1, 2, 3)}
    assert all(lo == [HOSTILE] for lo in left_out.values()), f"{attack}: not exactly its update left out: {left_out}"
    assert rounds[4]["quarantined_nodes"] == [HOSTILE], f"{attack}: not quarantined in round 4: {rounds[4]}"


def test_inflated_sample_counts_are_capped(deployment: Deployment) -> None:
    result = held_to_clean(deployment, "inflated")
    capped = {r: row["robust"].get("capped", []) for r, row in result.rounds().items()}
    assert all(HOSTILE in c for c in capped.values()), f"the 10,000,000 samples were not capped: {capped}"
    claimed = {c["num_samples"] for c in result.clients if c["node"] == HOSTILE and c["status"] == "updated"}
    assert claimed == {10_000_000}, f"the lie did not reach the coordinator as sent: {claimed}"


@pytest.mark.parametrize("attack", ["bn_mean", "bn_var"])
def test_skewed_batchnorm_statistics_are_left_out(deployment: Deployment, attack: str) -> None:
    result = held_to_clean(deployment, attack)
    for r, row in result.rounds().items():
        rejected = row["bn_rejected"]
        assert rejected and all(found == [HOSTILE] for found in rejected.values()), f"round {r}: liar kept: {rejected}"


def test_a_falsified_evaluation_is_named_and_left_out(deployment: Deployment) -> None:
    result = held_to_clean(deployment, "falsified")
    clean = cached_run(deployment, None, 0)
    for row, honest in zip(
        sorted((r for r in result.metrics if r["round"] == ROUNDS), key=lambda r: r["submodel"]),
        sorted((r for r in clean.metrics if r["round"] == ROUNDS), key=lambda r: r["submodel"]),
    ):
        k = row["submodel"]
        assert HOSTILE in row["fed_disagree"], f"submodel {k}: the 100 % device is not named: {row}"
        assert row["fed_highest"] == 1.0, f"submodel {k}: the spread does not show the 100 % device: {row}"
        gap = abs(row["fed_accuracy"] - honest["fed_accuracy"])
        assert gap < 0.08, (
            f"submodel {k}: federated accuracy {row['fed_accuracy']:.3f} against {honest['fed_accuracy']:.3f} clean"
        )


def test_a_mute_device_claiming_capacity_is_quarantined_and_never_the_only_cover(deployment: Deployment) -> None:
    result = held_to_clean(deployment, "mute")
    rounds = result.rounds()
    dropped = [rounds[r]["dropped"] for r in sorted(rounds)]
    assert dropped[:3] == [1, 1, 1], f"drops per round {dropped}"
    assert HOSTILE in rounds[ROUNDS]["quarantined_nodes"], "a device that never answered 3 tasks was not quarantined"
    for r in sorted(rounds):
        trained = {c["submodel"] for c in result.clients if c["round"] == r and c["status"] == "updated"}
        assert trained == {0, 1}, f"round {r}: a submodel left untrained behind the mute device: {trained}"
