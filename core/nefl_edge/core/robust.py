"""Byzantine-robust NeFedAvg: aggregation of nested submodel updates that a minority of hostile clients
cannot steer.

Exact NeFedAvg (:mod:`nefl_edge.core.nefedavg`) averages each element over the clients whose submodel covers
it, so one client that uploads ``w - 5 (trained - w)`` or claims ten million samples owns every element it
covers. Here, per round (:func:`robust_aggregate`):

1. **Deltas and clipping.** Each update becomes ``delta = trained - sent``. Its trained part (every tensor
   but BatchNorm running statistics) is clipped, the consistent and the inconsistent tensors separately, to
   ``clip`` times the round's median update norm (Sun et al. 2019, "Can you really backdoor federated
   learning?", arXiv 1911.07963: norm clipping). Departure: submodels differ in size, so the median is taken
   over the relative norms ``||delta|| / ||sent||`` and the threshold is that median times the client's own
   ``||sent||``; the median is over the clients of the same submodel when at least three trained it, else
   over every client of the round (with nested submodels one client per submodel is common).
2. **Agreement.** With at least three clients, every client's clipped consistent delta on the region all
   of them cover is compared, tensor by tensor, with the coordinate-wise median of the other clients'
   deltas (the robust centre; leave-one-out up to ``LEAVE_ONE_OUT`` clients); a client whose cosine
   similarity with it, averaged over the tensors, is below ``agree`` is left out of the round (a sign flip
   or a scaled reversal points away from it). This is in the spirit of centered clipping (Karimireddy, He and Jaggi
   2021, "Learning from history for Byzantine robust optimization", ICML), which also measures clients
   against a robust centre; departure: one median step instead of their iterated clipping around the
   previous round's momentum, and exclusion instead of clipping around the centre.
3. **Weights.** Sample counts (or 1 with ``uniform`` weighting) are capped at ``max_weight`` times the
   round's median weight, so a client that claims more samples than the others cannot take more than that
   share of any average.
4. **Coordinate-wise trimmed mean** (Yin, Chen, Ramchandran and Bartlett 2018, "Byzantine-robust distributed
   learning: towards optimal statistical rates", ICML): per element, over the clients that cover it, the
   ``b = max(1, floor(trim * c))`` largest and smallest of the ``c`` deltas are dropped and the rest
   averaged with their (capped) weights. Departures: Yin et al. trim an unweighted mean over one shared
   coverage; here the coverage differs per region of a nested tensor, the kept values keep their weights,
   and where fewer than ``min_trim`` (3) clients cover an element nothing can be trimmed and the weighted
   mean of the clipped deltas is used (the fallback: clipping and the agreement step are then the only
   protection of that element).
5. **Inconsistent tensors** (BatchNorm affine parameters, step sizes, running statistics: one copy per
   submodel) get the same trimmed mean among the clients of their submodel.

An element no client covers keeps its value, as in exact NeFedAvg.

Memory: unlike the streaming exact mode, a trimmed mean needs every value of an element at once, so the
round's updates are kept (references to what the grid delivered: the sum of the round's update sizes)
until :func:`robust_aggregate`; its own working memory is one copy of the global model (the result) plus
blocks of at most ``BLOCK_VALUES`` clipped deltas at a time (deltas are recomputed per block, never stored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nefl_edge.core.nested import GlobalState, Tensors, prefix_slice
from nefl_edge.core.specs import param_layout

SELECT_PASSES = 4
"""Trimming up to this many values per side selects them pass by pass; more: one sort per element."""
BLOCK_VALUES = 1 << 22
"""Values (clients x elements) sorted at once in one block of a region: 32 MiB of float32."""


@dataclass(frozen=True)
class RobustOptions:
    """The parameters of :func:`robust_aggregate` (``RunConfig``'s ``robust_*`` keys)."""

    trim: float = 0.25
    """Share of the covering clients trimmed from each side of every element (at least one where ``min_trim``
    clients cover it)."""
    clip: float = 2.0
    """Updates are clipped to this multiple of the round's median (relative) update norm."""
    agree: float = 0.0
    """Clients whose delta has a cosine similarity below this with the median delta are left out."""
    max_weight: float = 2.0
    """No client weighs more than this multiple of the round's median weight."""
    min_trim: int = 3
    """Fewest covering clients where trimming applies (below: the weighted mean of clipped deltas)."""

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.clip <= 0 or self.max_weight < 1 or not -1 <= self.agree <= 1 or self.min_trim < 3:
            raise ValueError("clip must be > 0, max_weight >= 1, agree in [-1, 1] and min_trim >= 3")


@dataclass
class ClientUpdate:
    """One client's update as :func:`robust_aggregate` takes it."""

    index: int
    tensors: Tensors
    weight: float
    node: str = ""


@dataclass
class RobustReport:
    """What the robust aggregation did: who was clipped (node or position -> factor < 1), who was left out
    for disagreeing with the others, and whose weight was capped."""

    clipped: dict[str, float] = field(default_factory=dict)
    disagreeing: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    cosine: dict[str, float] = field(default_factory=dict)


def _is_stat(name: str) -> bool:
    return "running_" in name


def trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float, min_trim: int) -> np.ndarray:
    """Coordinate-wise weighted trimmed mean over axis 0 of ``values`` (clients x elements): drop the
    ``max(1, floor(trim * c))`` smallest and largest per element when ``c >= min_trim`` clients (and
    ``trim > 0``), then the ``weights``-weighted mean of the rest."""
    c = values.shape[0]
    w = weights.astype(np.float64)
    if c < min_trim or trim <= 0:
        return (np.tensordot(w, values.astype(np.float64), axes=1) / w.sum()).astype(np.float32)
    b = max(1, int(np.floor(trim * c)))
    flat = values.reshape(c, -1)
    if b > SELECT_PASSES:
        order = np.argsort(flat, axis=0, kind="stable")[b : c - b]
        kept = np.take_along_axis(flat, order, axis=0).astype(np.float64)
        kept_w = w[order]
        return ((kept * kept_w).sum(axis=0) / kept_w.sum(axis=0)).astype(np.float32).reshape(values.shape[1:])
    # b passes that drop the smallest and the largest remaining value: no sort of every element's values
    cols = np.arange(flat.shape[1])
    keep = np.ones(flat.shape, bool)
    low, high = flat.copy(), flat.copy()
    for _ in range(b):
        i = np.argmin(low, axis=0)
        low[i, cols], keep[i, cols] = np.inf, False
        j = np.argmax(high, axis=0)
        high[j, cols], keep[j, cols] = -np.inf, False
    kept_w = np.where(keep, w[:, None], 0.0)
    out = np.einsum("ij,ij->j", flat.astype(np.float64), kept_w) / kept_w.sum(axis=0)
    return out.astype(np.float32).reshape(values.shape[1:])


def _closure(shapes: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``shapes`` closed under the element-wise minimum, largest first: every element's covering clients are
    exactly those whose shape contains the smallest of these shapes that contains the element."""
    out = set(shapes)
    grew = True
    while grew:
        grew = False
        for a in list(out):
            for b in list(out):
                m = tuple(min(x, y) for x, y in zip(a, b))
                if m not in out:
                    out.add(m)
                    grew = True
    return sorted(out, key=lambda s: int(np.prod(s)), reverse=True)


def _contains(big: tuple[int, ...], small: tuple[int, ...]) -> bool:
    return all(a >= b for a, b in zip(big, small))


def _region_mean(
    deltas: list[Callable[[tuple[slice, ...]], np.ndarray]],
    weights: np.ndarray,
    shape: tuple[int, ...],
    opts: RobustOptions,
) -> np.ndarray:
    """The trimmed mean over the clients' deltas (``deltas[i](slices)`` gives client ``i``'s clipped delta at
    ``slices``) of the ``shape`` prefix, in blocks of rows so that the stacked values stay under
    ``BLOCK_VALUES``."""
    if len(shape) == 0:
        return trimmed_mean(np.stack([d(()) for d in deltas]), weights, opts.trim, opts.min_trim)
    out = np.empty(shape, np.float32)
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, BLOCK_VALUES // max(1, row * len(deltas)))
    rest = prefix_slice(shape[1:])
    for lo in range(0, shape[0], rows):
        hi = min(shape[0], lo + rows)
        block = np.stack([d((slice(lo, hi), *rest)) for d in deltas])
        out[lo:hi] = trimmed_mean(block, weights, opts.trim, opts.min_trim)
    return out


class _Deltas:
    """Clients' clipped deltas, computed block by block from their updates and the sent weights (views of
    the global state), so that no copy of an update is kept."""

    def __init__(self, state: GlobalState, updates: list[ClientUpdate], layouts: list[dict[str, Any]]) -> None:
        self.state, self.updates, self.layouts = state, updates, layouts
        self.factor: list[dict[str, float]] = [{} for _ in updates]

    def sent(self, i: int, name: str) -> np.ndarray:
        u = self.updates[i]
        if self.layouts[u.index][name].kind == "consistent":
            return self.state.consistent[name][prefix_slice(self.layouts[u.index][name].shape)]
        return self.state.inconsistent[u.index][name]

    def get(self, i: int, name: str, where: tuple[slice, ...]) -> np.ndarray:
        delta = np.subtract(self.updates[i].tensors[name][where], self.sent(i, name)[where], dtype=np.float32)
        factor = self.factor[i].get(name, 1.0)
        return delta * np.float32(factor) if factor != 1.0 else delta

    def getter(self, i: int, name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
        return lambda where: self.get(i, name, where)

    def norm(self, i: int, names: Sequence[str]) -> tuple[float, float]:
        """(||delta||, ||sent||) over ``names`` of client ``i``, before clipping."""
        change = size = 0.0
        for n in names:
            d = np.subtract(self.updates[i].tensors[n], self.sent(i, n), dtype=np.float32).reshape(-1)
            ref = self.sent(i, n).reshape(-1)
            change += float(np.dot(d.astype(np.float64), d))
            size += float(np.dot(ref.astype(np.float64), ref))
        return float(np.sqrt(change)), float(np.sqrt(size))


LEAVE_ONE_OUT = 16
"""Up to this many clients, each is compared with the median of the others (its own value would pull the
median its way); above, with the median of all (one client moves it little)."""


def _leave_one_out_medians(block: np.ndarray) -> np.ndarray:
    """Row ``i``: the coordinate-wise median of ``block`` without its row ``i`` (one sort of the block: the
    remaining values are the sorted ones with the row's rank skipped)."""
    n = block.shape[0]
    order = np.argsort(block, axis=0)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[:, None], axis=0)
    srt = np.take_along_axis(block, order, axis=0)

    def remaining(k: int, rank: np.ndarray) -> np.ndarray:  # the k-th smallest value without that rank
        return np.where(k < rank, srt[k], srt[min(k + 1, n - 1)])

    out = np.empty_like(block)
    m = n - 1
    for i in range(n):
        if m % 2:
            out[i] = remaining(m // 2, ranks[i])
        else:
            out[i] = (remaining(m // 2 - 1, ranks[i]) + remaining(m // 2, ranks[i])) / 2
    return out


def _agreement(deltas: _Deltas, layouts: list[dict[str, Any]], state: GlobalState) -> list[float]:
    """Per client: the mean over the consistent tensors that every client has of the cosine similarity
    between its clipped delta and the coordinate-wise median of the other clients' deltas, on the prefix
    every client covers. Per tensor, not over the flattened model: the large convolutions would drown the
    classifier, where honest updates agree most."""
    n = len(deltas.updates)
    sums, counted = np.zeros(n), 0
    for name in state.consistent:
        shapes = [layouts[u.index][name].shape for u in deltas.updates if name in layouts[u.index]]
        if len(shapes) < n or not shapes[0]:
            continue
        common = tuple(min(dims) for dims in zip(*shapes))
        row = int(np.prod(common[1:])) if len(common) > 1 else 1
        rows = max(1, BLOCK_VALUES // max(1, row * n * (n if n <= LEAVE_ONE_OUT else 1)))
        rest = prefix_slice(common[1:])
        dots, squares, centre_sq = np.zeros(n), np.zeros(n), np.zeros(n)
        for lo in range(0, common[0], rows):
            where = (slice(lo, min(common[0], lo + rows)), *rest)
            block = np.stack([deltas.get(i, name, where).reshape(-1) for i in range(n)])
            if n <= LEAVE_ONE_OUT:
                centres = _leave_one_out_medians(block)
            else:
                centres = np.broadcast_to(np.median(block, axis=0), block.shape)
            dots += np.einsum("ij,ij->i", block, centres, dtype=np.float64)
            squares += np.einsum("ij,ij->i", block, block, dtype=np.float64)
            centre_sq += np.einsum("ij,ij->i", centres, centres, dtype=np.float64)
        denom = np.sqrt(squares * centre_sq)
        sums += np.divide(dots, denom, out=np.zeros(n), where=denom > 0)
        counted += 1
    return [float(v / counted) if counted else 1.0 for v in sums]


def robust_aggregate(
    state: GlobalState, updates: list[ClientUpdate], opts: RobustOptions
) -> tuple[GlobalState, RobustReport]:
    """The robust NeFedAvg of ``updates`` (each holding every tensor of its submodel's layout) over
    ``state``; see the module docstring for the method. Returns the new state and what was done."""
    report = RobustReport()
    out = state.copy()
    if not updates:
        return out, report
    layouts = [param_layout(state.config, spec) for spec in state.specs]
    names = [u.node or f"#{i}" for i, u in enumerate(updates)]
    deltas = _Deltas(state, updates, layouts)

    # 1. clipping, consistent and inconsistent trained tensors apart, relative to the sent weights
    per_sub: dict[int, list[int]] = {}
    for i, u in enumerate(updates):
        per_sub.setdefault(u.index, []).append(i)
    for part in ("consistent", "inconsistent"):
        groups = [[n for n, x in layouts[u.index].items() if x.kind == part and not _is_stat(n)] for u in updates]
        measured = [deltas.norm(i, g) for i, g in enumerate(groups)]
        norms = [m[0] for m in measured]
        sizes = [max(m[1], 1e-12) for m in measured]
        relative = np.array([n / s for n, s in zip(norms, sizes)])
        for i, u in enumerate(updates):
            peers = per_sub[u.index] if len(per_sub[u.index]) >= 3 else list(range(len(updates)))
            limit = opts.clip * float(np.median(relative[peers])) * sizes[i]
            if norms[i] > limit > 0:
                factor = limit / norms[i]
                for n in groups[i]:
                    deltas.factor[i][n] = factor
                report.clipped[names[i]] = min(report.clipped.get(names[i], 1.0), factor)

    # 2. agreement with the coordinate-wise median of the others on the region every client covers
    keep = list(range(len(updates)))
    if len(updates) >= 3:
        scores = _agreement(deltas, layouts, state)
        for i in range(len(updates)):
            report.cosine[names[i]] = scores[i]
        keep = [i for i in keep if report.cosine[names[i]] >= opts.agree]
        report.disagreeing = [names[i] for i in range(len(updates)) if i not in keep]
        if not keep:  # nobody agrees with the centre (it is ~0): keep everyone, clipped
            keep, report.disagreeing = list(range(len(updates))), []

    # 3. weight cap
    raw = np.array([updates[i].weight for i in keep], np.float64)
    cap = opts.max_weight * float(np.median(raw))
    weights = np.minimum(raw, cap)
    report.capped = [names[i] for i, w in zip(keep, raw) if w > cap]

    # 4. consistent tensors, region by region of the nested slices
    for name, old in state.consistent.items():
        covering = [
            (layouts[updates[i].index][name].shape, i, w)
            for i, w in zip(keep, weights)
            if name in layouts[updates[i].index]
        ]
        if not covering:
            continue
        target = out.consistent[name]
        for shape in _closure({s for s, _, _ in covering}):
            mine = [(i, w) for s, i, w in covering if _contains(s, shape)]
            getters = [deltas.getter(i, name) for i, _ in mine]
            mean = _region_mean(getters, np.array([w for _, w in mine]), shape, opts)
            where = prefix_slice(shape)
            target[where] = old[where] + mean

    # 5. inconsistent tensors, per submodel
    for k in sorted({updates[i].index for i in keep}):
        own = [(i, w) for i, w in zip(keep, weights) if updates[i].index == k]
        ws = np.array([w for _, w in own])
        for name, info in layouts[k].items():
            if info.kind == "consistent":
                continue
            mean = _region_mean([deltas.getter(i, name) for i, _ in own], ws, info.shape, opts)
            out.inconsistent[k][name] = (state.inconsistent[k][name] + mean).astype(np.float32)
    return out, report
