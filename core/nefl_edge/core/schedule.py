"""The local training schedule both sides agree on: how many steps a task takes and which samples each step
trains on. The device's trainer follows it; the coordinator uses it to price a task and, in simulation, to train
the same batches in PyTorch."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from nefl_edge.core.schemas import TrainConfig


def planned_steps(num_samples: int, cfg: TrainConfig) -> int:
    """Local steps of a task. ``cfg.partial_batch`` (the paper's code, a ``DataLoader`` without
    ``drop_last``): every batch of every epoch, the last smaller one too when it has at least two samples.
    Otherwise ``num_samples // batch_size`` steps per epoch (at least one)."""
    if cfg.partial_batch:
        per_epoch = num_samples // cfg.batch_size + (num_samples % cfg.batch_size >= 2)
    else:
        per_epoch = max(1, num_samples // cfg.batch_size) if num_samples >= 2 else 0
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def local_batches(
    num_samples: int, cfg: TrainConfig, rng: Optional[np.random.Generator] = None
) -> Iterator[np.ndarray]:
    """The sample indices of each local step: a fresh shuffle per epoch (from ``rng``, by default seeded
    with ``cfg.seed``), ``planned_steps`` batches in all, none smaller than two (BatchNorm cannot train on
    one sample)."""
    total = planned_steps(num_samples, cfg)
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
    step = 0
    while step < total:
        order = rng.permutation(num_samples)
        for lo in range(0, num_samples, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            if len(idx) < 2 or step >= total:
                break
            yield idx
            step += 1
