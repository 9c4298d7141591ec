"""The local schedule under the paper's protocol: each epoch's last, smaller batch is trained too (the paper's
code uses a DataLoader without drop_last), and the lr decays at rounds T/2 and 3T/4 themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.config import RunConfig, load_config
from nefl_edge.core.data import Dataset
from nefl_edge.core.schedule import local_batches, planned_steps
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.edge_client.trainer import train_local


def reference_batches(n: int, batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """A DataLoader(shuffle=True, drop_last=False) per epoch, written out; a 1-sample batch is left out."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out += [order[i : i + batch] for i in range(0, n, batch) if len(order[i : i + batch]) >= 2]
    return out


@pytest.mark.parametrize(("n", "expected_per_epoch"), [(50, 2), (64, 2), (65, 2), (66, 3), (600, 19), (1, 0), (2, 1)])
def test_partial_batch_keeps_every_batch_of_two_or_more(n: int, expected_per_epoch: int) -> None:
    cfg = TrainConfig(batch_size=32, epochs=3, partial_batch=True, seed=7)

    batches = list(local_batches(n, cfg))

    assert planned_steps(n, cfg) == 3 * expected_per_epoch, f"{n} samples: planned steps"
    want = reference_batches(n, 32, 3, 7)
    assert len(batches) == len(want), f"{n} samples: {len(batches)} batches, the reference has {len(want)}"
    for k, (got, ref) in enumerate(zip(batches, want)):
        assert np.array_equal(got, ref), f"{n} samples: batch {k} differs from the reference"


def test_every_sample_is_seen_once_per_epoch_with_partial_batches() -> None:
    cfg = TrainConfig(batch_size=32, epochs=5, partial_batch=True)

    batches = list(local_batches(50, cfg))

    for epoch in range(5):
        seen = np.sort(np.concatenate(batches[2 * epoch : 2 * epoch + 2]))
        assert np.array_equal(seen, np.arange(50)), f"epoch {epoch} does not cover the 50 samples once"


def test_without_partial_batch_the_schedule_is_unchanged() -> None:
    cfg = TrainConfig(batch_size=32, epochs=5)

    assert planned_steps(50, cfg) == 5 and planned_steps(600, cfg) == 90 and planned_steps(1, cfg) == 0
    assert [len(b) for b in local_batches(50, cfg)] == [32, 18, 32, 18, 32]


class CountingBackend:
    """A stand-in device backend that records the batch sizes it is given."""

    name = "counting"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        self.sizes.append(len(y))
        return 1.0, 0


def test_device_trainer_follows_the_paper_schedule() -> None:
    data = Dataset(np.zeros((50, 1, 4, 4), np.float32), np.zeros(50, np.int64), "fifty")
    backend = CountingBackend()

    metrics = train_local(backend, data, TrainConfig(batch_size=32, epochs=5, partial_batch=True))  # type: ignore[arg-type]

    assert backend.sizes == [32, 18] * 5, f"device batches: {backend.sizes}"
    assert metrics.steps == 10


def test_paper_preset_keeps_partial_batches_and_explicit_settings_win(tmp_path: Path) -> None:
    assert load_config(None, {"preset": "paper"}).train.partial_batch
    assert not load_config(None, {"preset": "paper", "train.partial_batch": False}).train.partial_batch
    assert not load_config(None, {}).train.partial_batch


def test_lr_decays_at_the_papers_rounds_under_the_preset() -> None:
    paper = load_config(None, {"preset": "paper", "rounds": 500})
    ours = RunConfig(rounds=500, lr_decay_at=[0.5, 0.75], train=TrainConfig(lr=0.1))

    assert [paper.lr_at(r) for r in (1, 249, 250, 374, 375, 500)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert [ours.lr_at(r) for r in (250, 251, 375, 376)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    # 40 rounds (bench.accuracy's paper preset): decays at rounds 20 and 30
    forty = load_config(None, {"preset": "paper", "rounds": 40})
    assert [forty.lr_at(r) for r in (19, 20, 29, 30)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
