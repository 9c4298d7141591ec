"""Evaluation arithmetic both sides share: the device's held-out split, the summed result of evaluating a
submodel (:class:`EvalResult`), and the BatchNorm statistics a device sends for federated re-estimation
(:class:`BnStats`): sums over batches of the batch mean and the unbiased batch variance per BatchNorm layer.
Summed over devices and divided by the total count, they are exactly what PyTorch's cumulative re-estimation
(``momentum=None``, train mode) computes over the union of the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
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


Layout = Tuple[Tuple[str, int], ...]
"""BatchNorm layers in order: (prefix, channels) each."""


@dataclass(frozen=True)
class _Flat:
    """Statistics held as two float64 vectors: every layer's sums end to end, in ``layout`` order."""

    layout: Layout
    means: np.ndarray
    variances: np.ndarray


@dataclass(frozen=True)
class _Expected:
    """What :meth:`BnStats.from_tensors` checks a device's tensors against, for one layout."""

    layout: Layout
    names: frozenset[str]
    mean_names: Tuple[str, ...]
    var_names: Tuple[str, ...]
    shapes: List[Tuple[int, ...]]
    bounds: Tuple[Tuple[int, int], ...]


_expected_by_layout: Dict[Layout, _Expected] = {}
MAX_LAYOUTS = 64


def _expected(layout: Layout) -> _Expected:
    known = _expected_by_layout.get(layout)
    if known is None:
        sizes = [size for _, size in layout]
        ends = np.cumsum([0, *sizes]).tolist()
        known = _Expected(
            layout,
            frozenset(f"{p}{s}" for p, _ in layout for s in (".mean_sum", ".var_sum")),
            tuple(f"{p}.mean_sum" for p, _ in layout),
            tuple(f"{p}.var_sum" for p, _ in layout),
            [(size,) for size in sizes],
            tuple(zip(ends[:-1], ends[1:])),
        )
        if len(_expected_by_layout) >= MAX_LAYOUTS:  # a model has a few submodels: only a misuse gets here
            _expected_by_layout.clear()
        _expected_by_layout[layout] = known
    return known


class BnStats:
    """Per BatchNorm layer (prefix ``stem.bn``, ...): sums over batches of the batch mean and the unbiased
    batch variance (``mean_sum``, ``var_sum``: prefix -> array), and the number of batches.

    Statistics read from the network (:meth:`from_tensors`) are held as two float64 vectors, every layer
    end to end, until something asks for the per-layer dicts: folding thousands of devices' statistics
    (:meth:`add`) then costs two vector additions per device, not two small additions and a few objects per
    layer. The dicts, once asked for, are the truth (a caller may change them) and the vectors are dropped."""

    def __init__(
        self,
        mean_sum: Optional[Dict[str, np.ndarray]] = None,
        var_sum: Optional[Dict[str, np.ndarray]] = None,
        batches: int = 0,
    ) -> None:
        self._mean_sum: Optional[Dict[str, np.ndarray]] = {} if mean_sum is None else mean_sum
        self._var_sum: Optional[Dict[str, np.ndarray]] = {} if var_sum is None else var_sum
        self._flat: Optional[_Flat] = None
        self.batches = batches

    def __repr__(self) -> str:
        return f"BnStats(layers={len(self.mean_sum)}, batches={self.batches})"

    def _dicts(self) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        if self._mean_sum is None or self._var_sum is None:
            flat = self._flat
            assert flat is not None
            bounds = _expected(flat.layout).bounds
            prefixes = [p for p, _ in flat.layout]
            self._mean_sum = {p: flat.means[a:b] for p, (a, b) in zip(prefixes, bounds)}
            self._var_sum = {p: flat.variances[a:b] for p, (a, b) in zip(prefixes, bounds)}
            self._flat = None
        return self._mean_sum, self._var_sum

    @property
    def mean_sum(self) -> Dict[str, np.ndarray]:
        return self._dicts()[0]

    @property
    def var_sum(self) -> Dict[str, np.ndarray]:
        return self._dicts()[1]

    def add(self, other: BnStats) -> None:
        """Add ``other``'s sums and batches to these (in float64)."""
        theirs = other._flat
        if theirs is not None:
            ours = self._flat
            if ours is not None and (ours.layout is theirs.layout or ours.layout == theirs.layout):
                np.add(ours.means, theirs.means, out=ours.means)
                np.add(ours.variances, theirs.variances, out=ours.variances)
                self.batches += other.batches
                return
            if ours is None and not self._mean_sum and not self._var_sum:  # empty: start from a copy
                self._flat = _Flat(theirs.layout, theirs.means.copy(), theirs.variances.copy())
                self._mean_sum = self._var_sum = None
                self.batches += other.batches
                return
        mean_sum, var_sum = self._dicts()
        for name, value in other.mean_sum.items():
            mean_sum[name] = mean_sum.get(name, 0.0) + value.astype(np.float64)
            var_sum[name] = var_sum.get(name, 0.0) + other.var_sum[name].astype(np.float64)
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
        ``1..MAX_STATS_BATCHES``; raises ``ValueError`` naming what is wrong.

        The values are checked all at once (one concatenation, one finiteness test, one sign test); only a
        device whose tensors fail is looked at tensor by tensor, to say which one is wrong."""
        if not 0 < batches <= MAX_STATS_BATCHES:
            raise ValueError(f"batch count {batches} is outside 1..{MAX_STATS_BATCHES}")
        layout: Layout = tuple(channels.items())
        want = _expected(layout)
        if tensors.keys() != want.names:
            extra, missing = sorted(set(tensors) - want.names), sorted(want.names - set(tensors))
            raise ValueError(f"unexpected tensors {extra[:3]}, missing {missing[:3]}")
        means = [tensors[n] for n in want.mean_names]
        variances = [tensors[n] for n in want.var_names]
        f32 = np.dtype(np.float32)
        if (
            all(v.dtype == f32 for v in means)
            and all(v.dtype == f32 for v in variances)
            and [v.shape for v in means] == want.shapes
            and [v.shape for v in variances] == want.shapes
        ):
            flat_mean = np.concatenate(means, dtype=np.float64) if means else np.zeros(0)
            flat_var = np.concatenate(variances, dtype=np.float64) if variances else np.zeros(0)
            if np.isfinite(flat_mean).all() and np.isfinite(flat_var).all() and not (flat_var < 0).any():
                stats = cls(batches=batches)
                stats._flat = _Flat(want.layout, flat_mean, flat_var)
                stats._mean_sum = stats._var_sum = None
                return stats
        cls._explain(tensors, channels)
        raise AssertionError("unreachable: _explain raises for tensors that failed the checks")

    @staticmethod
    def _explain(tensors: Tensors, channels: Dict[str, int]) -> None:
        """Raise ``ValueError`` naming the first tensor that fails :meth:`from_tensors`' checks."""
        for prefix, size in channels.items():
            for suffix in (".mean_sum", ".var_sum"):
                value = tensors[prefix + suffix]
                if value.dtype != np.float32 or value.shape != (size,):
                    raise ValueError(f"{prefix}{suffix}: {value.dtype} {value.shape}, expected float32 ({size},)")
                if not np.isfinite(value).all():
                    raise ValueError(f"{prefix}{suffix} holds NaN or Inf")
                if suffix == ".var_sum" and (value < 0).any():
                    raise ValueError(f"{prefix}{suffix} holds a negative variance")


def bn_channels(params: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """BatchNorm layer prefix -> channels, from a submodel's tensor shapes."""
    return {n.removesuffix(".running_mean"): int(s[0]) for n, s in params.items() if n.endswith(".running_mean")}
