"""NeFedAvg (Kang et al., arXiv 2308.07761, Alg. 1), streaming.

Updates are folded in one at a time into running weighted sums and per-element coverage weights, so memory
is O(global model) whatever the number of clients.

- A consistent element becomes the weighted average over the clients whose submodel covers it; an element
  that no client covered this round keeps its previous value.
- Inconsistent tensors (BatchNorm, step sizes) are averaged only among the clients of the same submodel; a
  submodel that no client trained keeps its copy.

Weighting: ``"samples"`` (the default) weights each client by its number of local samples, as FedAvg does,
so a device with ten times the data counts ten times as much and the result does not depend on how data is
split into devices. ``"uniform"`` weights every client equally, as the paper's code (``utils/NeFedAvg.py``)
does.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from nefl_edge.coordinator.nested import GlobalState, Tensors, prefix_slice
from nefl_edge.coordinator.specs import param_layout

Weighting = Literal["samples", "uniform"]


class NeFedAvg:
    """Streaming NeFedAvg over one round: ``add`` each client update, then ``result``."""

    def __init__(self, state: GlobalState, weighting: Weighting = "samples") -> None:
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self._state = state
        self._weighting = weighting
        self._sums = {k: np.zeros(v.shape, np.float64) for k, v in state.consistent.items()}
        self._cover = {k: np.zeros(v.shape, np.float64) for k, v in state.consistent.items()}
        self._sub_sums: list[Tensors | None] = [None] * len(state.specs)
        self._sub_weight = [0.0] * len(state.specs)
        self.updates = 0

    def add(self, index: int, tensors: Tensors, num_samples: int) -> None:
        """Fold one client's trained submodel ``index`` into the round. ``tensors`` must hold every tensor
        of that submodel's layout with its shape (the coordinator validates updates before this)."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        weight = float(num_samples) if self._weighting == "samples" else 1.0
        layout = param_layout(self._state.config, self._state.specs[index])
        sub_sums = self._sub_sums[index]
        if sub_sums is None:
            sub_sums = self._sub_sums[index] = {
                k: np.zeros(info.shape, np.float64) for k, info in layout.items() if info.kind == "inconsistent"
            }
        for name, info in layout.items():
            value = tensors[name]
            if info.kind == "consistent":
                where = prefix_slice(info.shape)
                self._sums[name][where] += weight * value
                self._cover[name][where] += weight
            else:
                sub_sums[name] += weight * value
        self._sub_weight[index] += weight
        self.updates += 1

    def result(self) -> GlobalState:
        """The aggregated global state (a new object; the input state is not modified)."""
        out = self._state.copy()
        for name, old in out.consistent.items():
            cover = self._cover[name]
            covered = cover > 0
            old[covered] = (self._sums[name][covered] / cover[covered]).astype(np.float32)
        for i, sums in enumerate(self._sub_sums):
            if sums is not None:
                out.inconsistent[i] = {k: (v / self._sub_weight[i]).astype(np.float32) for k, v in sums.items()}
        return out
