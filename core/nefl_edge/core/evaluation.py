"""Evaluation arithmetic both sides share: the device's held-out split, the summed result of evaluating a
submodel (:class:`EvalResult`), and the BatchNorm statistics a device sends for federated re-estimation
(:class:`BnStats`): sums over batches of the batch mean and the unbiased batch variance per BatchNorm layer.
Summed over devices and divided by the total count, they are exactly what PyTorch's cumulative re-estimation
(``momentum=None``, train mode) computes over the union of the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from nefl_edge.core.data import Dataset

Tensors = Dict[str, np.ndarray]
EVAL_SPLIT_SEED = 20230815
MAX_STATS_BATCHES = 1_000_000
"""No device can have run more batches than this; a larger claimed count is refused."""


def split_held_out(num_samples: int, fraction: float, seed: int = EVAL_SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of a device's data: a fixed seeded permutation, of which the
    first ``round(fraction * n)`` (at least one when ``fraction`` > 0 and there are two samples) are held
    out. The split is the same in every round, so held-out samples are never trained on."""
    order = np.random.default_rng(seed).permutation(num_samples)
    held = round(fraction * num_samples) if fraction > 0 else 0
    if fraction > 0 and num_samples >= 2:
        held = min(max(held, 1), num_samples - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def split_dataset(data: Dataset, fraction: float) -> Tuple[Dataset, Dataset]:
    """The training part and the held-out part of ``data`` (see :func:`split_held_out`)."""
    train, held = split_held_out(len(data), fraction)
    if not len(held):
        return data, Dataset(data.x[:0], data.y[:0], f"{data.name} (held out)")
    return (
        Dataset(data.x[train], data.y[train], data.name),
        Dataset(data.x[held], data.y[held], f"{data.name} (held out)"),
    )


def stats_batches(num_samples: int, batch_size: int, max_batches: Optional[int] = None) -> List[np.ndarray]:
    """The batches statistics are computed over: consecutive, in order, none smaller than two (a one-sample
    batch has no variance), at most ``max_batches``."""
    out: List[np.ndarray] = []
    for lo in range(0, num_samples, batch_size):
        idx = np.arange(lo, min(lo + batch_size, num_samples))
        if len(idx) < 2 or (max_batches is not None and len(out) >= max_batches):
            break
        out.append(idx)
    return out


@dataclass
class EvalResult:
    """Summed loss, correct predictions and sample count of one submodel on a held-out split."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0


@dataclass
class BnStats:
    """Per BatchNorm layer (prefix ``stem.bn``, ...): sums over batches of the batch mean and the unbiased
    batch variance, and the number of batches."""

    mean_sum: Dict[str, np.ndarray] = field(default_factory=dict)
    var_sum: Dict[str, np.ndarray] = field(default_factory=dict)
    batches: int = 0

    def add(self, other: BnStats) -> None:
        for name, value in other.mean_sum.items():
            self.mean_sum[name] = self.mean_sum.get(name, 0.0) + value.astype(np.float64)
            self.var_sum[name] = self.var_sum.get(name, 0.0) + other.var_sum[name].astype(np.float64)
        self.batches += other.batches

    def running(self) -> Tensors:
        """The re-estimated ``<p>.running_mean`` and ``<p>.running_var`` (float32)."""
        if self.batches <= 0:
            raise ValueError("no batches: nothing to re-estimate")
        out: Tensors = {}
        for name in self.mean_sum:
            out[f"{name}.running_mean"] = (self.mean_sum[name] / self.batches).astype(np.float32)
            out[f"{name}.running_var"] = (self.var_sum[name] / self.batches).astype(np.float32)
        return out

    def tensors(self) -> Tensors:
        """The sums as named tensors (``<p>.mean_sum``, ``<p>.var_sum``), as they travel."""
        out: Tensors = {}
        for name in self.mean_sum:
            out[f"{name}.mean_sum"] = np.asarray(self.mean_sum[name], np.float32)
            out[f"{name}.var_sum"] = np.asarray(self.var_sum[name], np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: Tensors, batches: int, channels: Dict[str, int]) -> BnStats:
        """Read sums that came from the network: exactly the layers of ``channels`` (prefix -> channels),
        float32, 1-D of the right length, finite, variances non-negative, ``batches`` in
        ``1..MAX_STATS_BATCHES``; raises ``ValueError`` naming what is wrong."""
        if not 0 < batches <= MAX_STATS_BATCHES:
            raise ValueError(f"batch count {batches} is outside 1..{MAX_STATS_BATCHES}")
        expected = {f"{p}{s}" for p in channels for s in (".mean_sum", ".var_sum")}
        if set(tensors) != expected:
            extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise ValueError(f"unexpected tensors {extra[:3]}, missing {missing[:3]}")
        stats = cls(batches=batches)
        for prefix, size in channels.items():
            for suffix, target in ((".mean_sum", stats.mean_sum), (".var_sum", stats.var_sum)):
                value = tensors[prefix + suffix]
                if value.dtype != np.float32 or value.shape != (size,):
                    raise ValueError(f"{prefix}{suffix}: {value.dtype} {value.shape}, expected float32 ({size},)")
                if not np.isfinite(value).all():
                    raise ValueError(f"{prefix}{suffix} holds NaN or Inf")
                if suffix == ".var_sum" and (value < 0).any():
                    raise ValueError(f"{prefix}{suffix} holds a negative variance")
                target[prefix] = value.astype(np.float64)
        return stats


def bn_channels(params: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """BatchNorm layer prefix -> channels, from a submodel's tensor shapes."""
    return {n.removesuffix(".running_mean"): int(s[0]) for n, s in params.items() if n.endswith(".running_mean")}
