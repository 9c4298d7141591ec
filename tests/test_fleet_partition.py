"""The fleet benchmark's device-correlated partition (bench/fleet.py, docs/benchmarks.md "Data that follows
the device"): seeded, disjoint, and the slow class holds the footwear, on the real Fashion-MNIST labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.fleet import (
    FAST_SHARE,
    HELD_LABELS,
    SLOW_CLASSES,
    SLOW_SHARE,
    class_table,
    device_correlated_split,
    fleet_partition,
)
from nefl_edge.core.data import load_dataset
from tests.hil.fleet import load_fleet


def test_the_device_correlated_split_is_seeded_disjoint_and_puts_the_footwear_on_the_slow_class(
    fmnist_dir: Path,
) -> None:
    labels = load_dataset(fmnist_dir, "train").y
    spec = load_fleet("bench-device")
    devices = spec.devices()
    split = fleet_partition("device-correlated", spec.seed)

    parts = split(labels, devices)
    again = split(labels, devices)
    other = fleet_partition("device-correlated", spec.seed + 1)(labels, devices)

    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True)), "same seed, different shards"
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True)), "the seed changes nothing"
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a training image is on two devices"
    slow = [d.cls.name in SLOW_CLASSES for d in devices]
    assert any(slow) and not all(slow), "the bench-device fleet needs slow and fast devices"
    held_by_slow = held_by_fast = 0
    for d, part, is_slow in zip(devices, parts, slow, strict=True):
        assert len(part) == d.samples, f"{d.node}: {len(part)} images, expected {d.samples}"
        held = int(np.isin(labels[part], HELD_LABELS).sum())
        share = SLOW_SHARE if is_slow else FAST_SHARE
        assert held == round(share * d.samples), f"{d.node}: {held} footwear images of {d.samples}"
        if is_slow:
            assert set(np.unique(labels[part])) >= set(HELD_LABELS), f"{d.node} lacks a held class"
            held_by_slow += held
        else:
            held_by_fast += held
    assert held_by_slow > 9 * held_by_fast, f"slow devices hold {held_by_slow} footwear images, fast {held_by_fast}"


def test_the_split_refuses_more_than_a_pool_holds() -> None:
    labels = np.array([5, 7, 0, 1, 2, 3])
    try:
        device_correlated_split(labels, [True], [6], seed=0)
    except ValueError as exc:
        assert "pool" in str(exc)
    else:
        raise AssertionError("a split that needs 5 footwear images of 2 did not fail")


def test_the_per_class_table_gives_the_held_classes_mean_beside_the_others() -> None:
    acc = [0.5] * 10
    for c in HELD_LABELS:
        acc[c] = 0.2
    record = {
        "held_labels": list(HELD_LABELS),
        "partition": "device-correlated",
        "policies": [{"policy": "p", "class_accuracy": {"round": 3, "per_submodel": [acc]}}],
    }

    row = [line for line in class_table(record) if line.startswith("| p |")]

    assert row == ["| p | 0 (3) | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " | 20.0 | 50.0 |"], row


@pytest.mark.slow  # 10,000 test images through resnet-small: ~50 s on the loaded 2-core host
def test_per_class_accuracy_of_a_checkpoint_adds_up_to_the_coordinators_accuracy(
    fmnist_dir: Path, tmp_path: Path
) -> None:
    from nefl_edge.coordinator import checkpoint
    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.coordinator.evaluation import evaluate
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.nested import init_global_state

    cfg = RunConfig(method="fedavg-smallest", data_dir=fmnist_dir, normalize=False)
    config, plan = get_strategy(cfg.method).setup(cfg.network(), tuple(cfg.gammas))
    state = init_global_state(config, plan.specs, initial_consistent(config, seed=2), 2)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    checkpoint.save(tmp_path, checkpoint.Checkpoint(7, state.flat(), {}, {}))

    from bench.fleet import class_accuracy

    result = class_accuracy(tmp_path)

    test = load_dataset(fmnist_dir, "test")
    counts = np.bincount(test.y, minlength=10)
    assert result is not None and result["round"] == 7 and len(result["per_submodel"]) == 1
    overall = float(np.dot(result["per_submodel"][0], counts) / counts.sum())
    expected = evaluate(state, 0, test)[0]
    assert abs(overall - expected) < 1e-9, f"per-class accuracies weigh up to {overall}, evaluate says {expected}"
    assert class_accuracy(tmp_path / "missing") is None
