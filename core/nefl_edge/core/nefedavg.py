"""NeFedAvg (Kang et al., arXiv 2308.07761, Alg. 1), streaming.

Updates are folded in one at a time into running weighted sums, so memory is O(global model) whatever the
number of clients.

- A consistent element becomes the weighted average over the clients whose submodel covers it; an element
  that no client covered this round keeps its previous value.
- Inconsistent tensors (BatchNorm, step sizes) are averaged only among the clients of the same submodel; a
  submodel that no client trained keeps its copy.

Weighting: ``"samples"`` (the default) weights each client by its number of local samples, as FedAvg does,
so a device with ten times the data counts ten times as much and the result does not depend on how data is
split into devices. ``"uniform"`` weights every client equally, as the paper's code (``utils/NeFedAvg.py``)
does.

How it stays near memory speed: consistent sums are float32 (one read of the update, one read and one write
of the sum per element; the weighting multiply runs on cache-sized blocks), and coverage is not counted per
element. A submodel's slice of a tensor is a prefix, so the weight that covers an element is the sum of the
per-submodel round weights whose slice contains it; :meth:`NeFedAvg.result` divides each prefix region by
that sum (largest slice first, smaller nested ones overwrite their part). Only where a tensor's slices are
not nested (possible with hand-written submodel lists) is a coverage array built, one tensor at a time.
Working memory: the float32 sums (1x the consistent model) plus, during :meth:`NeFedAvg.result`, the new
state and one tensor's scratch. Float32 sums stay within 1e-6 of a float64 fold for 100 ResNet18 updates
(``tests/test_nefedavg_speed.py``, ``bench/aggregation.py``); inconsistent tensors are small and keep
float64 sums.

Robust mode (``robust=RobustOptions(...)``, ``RunConfig.aggregation = "robust"``): the updates are kept and
:meth:`NeFedAvg.result` runs :func:`nefl_edge.core.robust.robust_aggregate` (clipping, agreement with the
median, capped weights, coordinate-wise trimmed mean per nested region) instead of the streaming average;
its working memory is the round's update bytes plus one model (see that module).
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np

from nefl_edge.core.nested import GlobalState, Tensors, prefix_slice
from nefl_edge.core.robust import ClientUpdate, RobustOptions, RobustReport, robust_aggregate
from nefl_edge.core.specs import param_layout

Weighting = Literal["samples", "uniform"]

BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: the weighted copy of a block stays in cache (L2)


class NeFedAvg:
    """Streaming NeFedAvg over one round: ``add`` each client update, then ``result``. With ``robust``
    options the round is aggregated by :func:`~nefl_edge.core.robust.robust_aggregate` instead, and
    ``robust_report`` says afterwards whom it clipped, capped or left out."""

    def __init__(
        self, state: GlobalState, weighting: Weighting = "samples", robust: Optional[RobustOptions] = None
    ) -> None:
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self._state = state
        self._weighting = weighting
        self._robust = robust
        self._kept: list[ClientUpdate] = []
        self.robust_report = RobustReport()
        # robust mode keeps the updates until result() instead of streaming sums
        self._sums = {} if robust else {k: np.zeros(v.shape, np.float32) for k, v in state.consistent.items()}
        self._layouts = [
            [(name, info.shape, info.kind == "consistent") for name, info in param_layout(state.config, spec).items()]
            for spec in state.specs
        ]
        self._sub_sums: list[Tensors | None] = [None] * len(state.specs)
        self._sub_weight = [0.0] * len(state.specs)
        self._scratch = np.empty(0 if robust else BLOCK_ELEMENTS, np.float32)
        self.updates = 0

    def add(self, index: int, tensors: Tensors, num_samples: int, node: str = "") -> None:
        """Fold one client's trained submodel ``index`` into the round. ``tensors`` must hold every tensor
        of that submodel's layout with its shape (the coordinator validates updates before this); ``node``
        names the client in the robust report."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        weight = float(num_samples) if self._weighting == "samples" else 1.0
        if self._robust is not None:
            self._kept.append(ClientUpdate(index, tensors, weight, node))
            self.updates += 1
            return
        sub_sums = self._sub_sums[index]
        if sub_sums is None:
            sub_sums = self._sub_sums[index] = {
                name: np.zeros(shape, np.float64) for name, shape, consistent in self._layouts[index] if not consistent
            }
        for name, shape, consistent in self._layouts[index]:
            value = tensors[name]
            if consistent:
                self._fold(self._sums[name][prefix_slice(shape)], value, weight)
            else:
                sub_sums[name] += weight * np.asarray(value, np.float64)
        self._sub_weight[index] += weight
        self.updates += 1

    def _fold(self, target: np.ndarray, value: np.ndarray, weight: float) -> None:
        """``target += weight * value`` in float32 without a full-size temporary."""
        if value.dtype != np.float32:
            value = value.astype(np.float32)
        if weight == 1.0:
            np.add(target, value, out=target)
            return
        w = np.float32(weight)
        if target.ndim == 0 or target.size <= BLOCK_ELEMENTS:
            scratch = self._scratch[: target.size].reshape(target.shape)
            np.multiply(value, w, out=scratch)
            np.add(target, scratch, out=target)
            return
        rows = max(1, BLOCK_ELEMENTS // max(1, target[0].size))
        if target[0].size > BLOCK_ELEMENTS:  # one row is bigger than a block: recurse into it
            for r in range(target.shape[0]):
                self._fold(target[r], value[r], weight)
            return
        for start in range(0, target.shape[0], rows):
            t, v = target[start : start + rows], value[start : start + rows]
            scratch = self._scratch[: t.size].reshape(t.shape)
            np.multiply(v, w, out=scratch)
            np.add(t, scratch, out=t)

    def result(self) -> GlobalState:
        """The aggregated global state (a new object; the input state is not modified)."""
        state = self._state
        if self._robust is not None:
            out, self.robust_report = robust_aggregate(state, self._kept, self._robust)
            return out
        out = GlobalState(
            state.config, list(state.specs), {}, [{k: v.copy() for k, v in t.items()} for t in state.inconsistent]
        )
        regions: dict[str, dict[tuple[int, ...], float]] = {}
        for index, weight in enumerate(self._sub_weight):
            if weight <= 0:
                continue
            for name, shape, consistent in self._layouts[index]:
                if consistent:
                    per_shape = regions.setdefault(name, {})
                    per_shape[shape] = per_shape.get(shape, 0.0) + weight
        for name, old in state.consistent.items():
            covered = regions.get(name)
            if covered is None:
                out.consistent[name] = old.copy()
                continue
            # where the largest slice is the whole tensor, every element is overwritten: no copy of the old
            whole = old.shape in covered
            target = out.consistent[name] = np.empty_like(old) if whole else old.copy()
            _divide_regions(target, self._sums[name], covered)
        for i, sums in enumerate(self._sub_sums):
            if sums is not None:
                out.inconsistent[i] = {k: (v / self._sub_weight[i]).astype(np.float32) for k, v in sums.items()}
        return out


def _divide_regions(out: np.ndarray, sums: np.ndarray, weights: dict[tuple[int, ...], float]) -> None:
    """``out[covered] = sums / coverage`` where ``weights`` maps each prefix shape to the round weight of the
    submodels with that slice."""
    shapes = sorted(weights, key=lambda s: int(np.prod(s)), reverse=True)
    nested = all(all(a >= b for a, b in zip(big, small)) for big, small in zip(shapes, shapes[1:]))
    if nested:  # largest slice first; a smaller one is covered by itself and every larger one
        cover = 0.0
        for shape in shapes:
            cover += weights[shape]
            where = prefix_slice(shape)
            np.divide(sums[where], np.float32(cover), out=out[where])
        return
    coverage = np.zeros(out.shape, np.float32)
    for shape, weight in weights.items():
        coverage[prefix_slice(shape)] += np.float32(weight)
    np.divide(sums, coverage, out=out, where=coverage > 0)
