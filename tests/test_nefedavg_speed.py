"""NeFedAvg's float32 folding against a float64 reference, and its working memory (issue 15)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.core.specs import get_model_config, make_specs

Updates = list[tuple[int, Tensors, int]]


def resnet18_round(clients: int, seed: int = 0) -> tuple[GlobalState, Updates]:
    config = get_model_config("resnet18", "cifar10")
    specs = make_specs(config)
    state = init_global_state(config, specs, {}, seed)
    rng = np.random.default_rng(seed)
    pool = [
        {k: v + rng.standard_normal(v.shape, np.float32) * np.float32(0.05) for k, v in extract(state, i).items()}
        for i in range(len(specs))
    ]
    return state, [(c % len(specs), pool[c % len(specs)], int(rng.integers(1, 1000))) for c in range(clients)]


def float64_reference(state: GlobalState, updates: Updates) -> dict[str, np.ndarray]:
    """Consistent tensors of NeFedAvg folded in float64 with a coverage count per element."""
    sums = {k: np.zeros(v.shape) for k, v in state.consistent.items()}
    cover = {k: np.zeros(v.shape) for k, v in state.consistent.items()}
    for _, tensors, n in updates:
        for name, value in tensors.items():
            if name in sums:
                region = tuple(slice(0, s) for s in value.shape)
                sums[name][region] += n * value.astype(np.float64)
                cover[name][region] += n
    return {k: np.where(cover[k] > 0, sums[k] / np.maximum(cover[k], 1), state.consistent[k]) for k in sums}


def fold(state: GlobalState, updates: Updates) -> GlobalState:
    agg = NeFedAvg(state)
    for index, tensors, n in updates:
        agg.add(index, tensors, n)
    return agg.result()


def test_float32_fold_is_within_1e_6_of_float64_on_resnet18() -> None:
    state, updates = resnet18_round(40)

    got = fold(state, updates)

    want = float64_reference(state, updates)
    worst = max(float(np.max(np.abs(got.consistent[k] - want[k]))) for k in want)
    assert worst <= 1e-6


@pytest.mark.parametrize("clients", [5, 60])
def test_working_memory_stays_under_three_models(clients: int) -> None:
    state, updates = resnet18_round(clients)
    model_bytes = sum(v.nbytes for v in state.flat().values())

    tracemalloc.start()
    try:
        fold(state, updates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak <= 3 * model_bytes
