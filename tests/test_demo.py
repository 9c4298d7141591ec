"""`nefl-coord demo` end to end (real broker, real devices) and the partitioners."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.broker import port_open
from nefl_edge.coordinator.partition import (
    DirichletPartitioner,
    IidPartitioner,
    ShardPartitioner,
    label_histogram,
    label_skew,
)
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.core.data import load_dataset


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.integration
@pytest.mark.parametrize("broker_flag", [[], ["--embedded-broker"]], ids=["mosquitto", "embedded-amqtt"])
def test_small_demo_end_to_end_leaves_nothing_behind(tmp_path: Path, broker_flag: list[str]) -> None:
    runs = tmp_path / "runs"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nefl_edge.coordinator",
            "demo",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--gammas",
            "0.2,0.6,1.0",
            "--samples-per-client",
            "400",
            "--eval-samples",
            "500",
            "--runs-dir",
            str(runs),
            *broker_flag,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, COLUMNS="120"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_dir = next(runs.glob("demo-*"))
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted({(r["round"], r["submodel"]) for r in records}) == [(r, s) for r in range(3) for s in range(3)]
    last = {r["submodel"]: r["accuracy"] for r in records if r["round"] == 2}
    for sub, acc in last.items():
        assert re.search(rf"│\s+{sub} │\s+[0-9.]+ │\s+{100 * acc:.2f} │", result.stdout), (
            sub,
            acc,
            result.stdout[-2000:],
        )
    assert f"{100 * min(last.values()):.2f}" in result.stdout.split("worst")[1].splitlines()[0]
    assert (run_dir / "report.png").stat().st_size > 1000 and (run_dir / "report.html").is_file()
    assert json.loads((run_dir / "config.json").read_text())["rounds"] == 2
    kind = "amqtt" if broker_flag else "mosquitto"
    port = int(re.search(rf"broker: {kind} on 127\.0\.0\.1:(\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert not port_open(port)
    assert processes_mentioning(str(runs)) == []
    assert all("ended" in p.read_text() for p in (run_dir / "logs").glob("*.log"))


def test_demo_without_data_says_how_to_get_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nefl_edge.coordinator",
            "demo",
            "--data-dir",
            str(tmp_path / "none"),
            "--runs-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr


@pytest.fixture(scope="module")
def labels(fmnist_dir: Path) -> np.ndarray:
    return load_dataset(fmnist_dir, "train").y


@pytest.mark.parametrize(
    "partitioner",
    [IidPartitioner(7, seed=1), DirichletPartitioner(7, 0.3, seed=1), ShardPartitioner(7, seed=1)],
    ids=lambda p: p.name,
)
def test_shards_are_disjoint_cover_everything_and_are_seeded(partitioner, labels: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    parts = partitioner.split(labels)

    joined = np.concatenate(parts)
    assert len(parts) == 7
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, partitioner.split(labels)))


def test_small_dirichlet_alpha_is_visibly_skewed(labels: np.ndarray) -> None:
    iid = label_skew(label_histogram(labels, IidPartitioner(20, seed=0).split(labels), 10))
    mild = label_skew(label_histogram(labels, DirichletPartitioner(20, 10.0, seed=0).split(labels), 10))
    skewed = label_skew(label_histogram(labels, DirichletPartitioner(20, 0.1, seed=0).split(labels), 10))

    assert iid < 0.01
    assert mild < 0.1
    assert skewed > 0.4


def test_partition_cli_writes_shards_and_histogram(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nefl_edge.coordinator",
            "partition",
            "--clients",
            "4",
            "--scheme",
            "dirichlet",
            "--alpha",
            "0.2",
            "--max-samples",
            "300",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    shards = sorted(tmp_path.glob("client-*.npz"))
    assert len(shards) == 4 and (tmp_path / "labels.png").is_file()
    with np.load(shards[0]) as data:
        first = data["y"]
    row = result.stdout.splitlines()[1].split()
    assert int(row[1]) == len(first) and [int(v) for v in row[2:]] == np.bincount(first, minlength=10).tolist()


def test_a_dirichlet_draw_that_starves_a_client_fails_loudly() -> None:
    # Prepare: 30 samples of 10 classes over 10 clients with a tiny alpha: nearly every class lands on one client
    labels = np.repeat(np.arange(10), 3)

    # Execute / Assert: flwr-datasets' rule (11 draws, then ValueError), not a silent starved client
    with pytest.raises(ValueError, match="fewer than 3 samples in 11 draws"):
        DirichletPartitioner(10, 0.01, seed=0).split(labels)


def test_the_demo_takes_its_run_settings_from_the_run_configuration() -> None:
    from dataclasses import fields

    from nefl_edge.coordinator.config import DEMO_SET, RunConfig
    from nefl_edge.coordinator.demo import DemoOptions, demo_config

    cfg = demo_config(3, {"rounds": None, "bn": "server", "aggregation": "robust", "runs_dir": Path("elsewhere")})
    shown = subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", "demo", "--help"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200", TERM="dumb"),
    )  # fmt: skip

    redeclared = {f.name for f in fields(DemoOptions)} & set(RunConfig.model_fields)
    assert not redeclared, f"DemoOptions re-declares run settings: {redeclared}"
    assert (cfg.run, cfg.min_clients, cfg.min_updates, cfg.rounds, cfg.deadline_s) == ("demo", 3, 1, 8, 180.0)
    assert (cfg.bn, cfg.aggregation, cfg.runs_dir) == ("server", "robust", Path("elsewhere"))
    assert shown.returncode == 0, shown.stderr
    options = set(re.findall(r"--[a-z][a-z-]+", shown.stdout))
    generated = {f"--{key.replace('_', '-')}" for key in ("aggregation", "bn_device_samples", "eval_every", "seed")}
    assert generated <= options, f"run settings missing from demo --help: {generated - options}"
    set_by_demo = {f"--{key.replace('_', '-')}" for key in DEMO_SET} | {"--augment", "--device"}
    assert not set_by_demo & options, f"demo --help offers what the demo sets itself: {set_by_demo & options}"
