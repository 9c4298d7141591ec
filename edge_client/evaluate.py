"""Federated evaluation and BatchNorm statistics on the device, with stock ``onnxruntime``.

- The held-out split: a seeded share of the device's data (``TrainConfig.eval_fraction``) that it never
  trains on and evaluates submodels on (:func:`split_held_out`).
- Evaluation: loss sum, correct predictions and count of a submodel on the held-out split, through the
  submodel's eval graph (eval-mode BatchNorm with the statistics in the weights it was sent).
- BatchNorm statistics (federated re-estimation): the submodel's statistics graph (``export/stats.py``)
  gives each batch's mean and unbiased variance per BatchNorm layer under the weights it was sent; the device
  sends their sums over its batches and the batch count (:class:`BnStats`). Summed over devices and divided
  by the total count, they are exactly what PyTorch's cumulative re-estimation (``momentum=None``, train
  mode) computes over the union of the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from nefl_edge.edge_client.data import Dataset
from nefl_edge.edge_client.runtime import session_options

Tensors = Dict[str, np.ndarray]
EVAL_SPLIT_SEED = 20230815
MEAN_SUFFIX, VAR_SUFFIX = ".batch_mean", ".batch_var"
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


class SubmodelEvaluator:
    """Evaluation (``eval`` graph) and BatchNorm statistics (``stats`` graph) of one submodel, run by stock
    ``onnxruntime`` (also present in the training build)."""

    def __init__(self, files: Dict[str, Path], threads: int = 0, spin: bool = False) -> None:
        import onnxruntime as ort

        options = session_options(ort, threads, spin)
        self._sessions: Dict[str, Any] = {
            role: ort.InferenceSession(str(files[role]), options, providers=["CPUExecutionProvider"])
            for role in ("eval", "stats")
            if role in files
        }

    def _feed(self, role: str, tensors: Tensors) -> Dict[str, np.ndarray]:
        names = [i.name for i in self._sessions[role].get_inputs()]
        return {n: np.ascontiguousarray(tensors[n], np.float32) for n in names if n in tensors}

    def evaluate(self, tensors: Tensors, data: Dataset, batch_size: int = 256) -> EvalResult:
        """Loss sum, correct predictions and count of the submodel with ``tensors`` on ``data``."""
        session = self._sessions["eval"]
        feed = self._feed("eval", tensors)
        result = EvalResult()
        for lo in range(0, len(data), batch_size):
            x, y = data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]
            feed.update({"input": np.ascontiguousarray(x, np.float32), "labels": np.ascontiguousarray(y, np.int64)})
            loss, logits = session.run(None, feed)
            result.loss_sum += float(loss) * len(y)
            result.correct += int((np.argmax(logits, axis=1) == y).sum())
            result.count += len(y)
        return result

    def bn_stats(self, tensors: Tensors, x: np.ndarray, batch_size: int, max_batches: Optional[int] = None) -> BnStats:
        """Sums of the per-batch means and unbiased variances of every BatchNorm layer over
        :func:`stats_batches` of ``x``, under ``tensors``."""
        session = self._sessions["stats"]
        names = [o.name for o in session.get_outputs()]
        feed = self._feed("stats", tensors)
        stats = BnStats()
        for idx in stats_batches(len(x), batch_size, max_batches):
            feed["input"] = np.ascontiguousarray(x[idx], np.float32)
            values = dict(zip(names, session.run(None, feed)))
            batch = BnStats(
                {n.removesuffix(MEAN_SUFFIX): v for n, v in values.items() if n.endswith(MEAN_SUFFIX)},
                {n.removesuffix(VAR_SUFFIX): v for n, v in values.items() if n.endswith(VAR_SUFFIX)},
                1,
            )
            stats.add(batch)
        return stats
