"""FedRolex (``coordinator.strategies.FedRolex``): its rolling window extraction and aggregation against a
naive element-by-element implementation written here, and a short simulated run (the serve run is the
simulate/serve parity test of tests/test_engine.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.config import ConfigError
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.simulate import simulate
from nefl_edge.coordinator.strategies import get_strategy
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.core.robust import RobustOptions
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, get_model_config, param_layout, scaled

WIDTHS = (0.4, 0.75, 1.0)


def tiny_state(seed: int = 0) -> GlobalState:
    """A two-stage ResNet of 5 and 8 channels with FedRolex's sharing, every tensor random."""
    config = get_strategy("fedrolex").configure(ModelConfig("tiny", (1, 2), (5, 8), 2, 8, 3))
    specs = [SubmodelSpec(w, ((0,), (0, 1))) for w in WIDTHS]
    state = init_global_state(config, specs, consistent={}, seed=seed)
    rng = np.random.default_rng(seed)
    for tensors in (state.consistent, *state.inconsistent):
        for name in tensors:
            tensors[name] = rng.standard_normal(tensors[name].shape).astype(np.float32)
    return state


def hidden(name: str, ndim: int) -> tuple[bool, ...]:
    """Which axes of a tensor run over hidden channels, written out by hand for this ResNet."""
    if name == "stem.conv.weight":
        return (True, False, False, False)
    if name.endswith("conv1.weight") or name.endswith("conv2.weight") or name.endswith("shortcut.conv.weight"):
        return (True, True, False, False)
    if name == "head.weight":
        return (False, True)
    if name == "head.bias":
        return (False,)
    assert ndim == 1, name  # BatchNorm affine, shared
    return (True,)


def global_index(name: str, full: tuple[int, ...], idx: tuple[int, ...], r: int) -> tuple[int, ...]:
    """Where element ``idx`` of a submodel's tensor lives in the global tensor in round ``r``."""
    axes = hidden(name, len(full))
    return tuple((r + i) % g if h else i for i, g, h in zip(idx, full, axes))


def naive_extract(state: GlobalState, k: int, r: int) -> Tensors:
    out: Tensors = {}
    for name, info in param_layout(state.config, state.specs[k]).items():
        if info.kind != "consistent":
            out[name] = state.inconsistent[k][name].copy()
            continue
        full = state.consistent[name]
        sub = np.empty(info.shape, np.float32)
        for idx in np.ndindex(*info.shape):
            sub[idx] = full[global_index(name, full.shape, idx, r)]
        out[name] = sub
    return out


def naive_aggregate(state: GlobalState, updates: list[tuple[int, Tensors, int]], r: int) -> GlobalState:
    """Every global element: the sample-weighted mean over the clients whose window covered it this round,
    else its old value; per-submodel tensors: the mean over that submodel's clients, else the old copy."""
    out = state.copy()
    for name, old in state.consistent.items():
        sums, cover = np.zeros(old.shape), np.zeros(old.shape)
        for _, tensors, samples in updates:
            if name not in tensors:
                continue
            for idx in np.ndindex(*tensors[name].shape):
                where = global_index(name, old.shape, idx, r)
                sums[where] += samples * float(tensors[name][idx])
                cover[where] += samples
        out.consistent[name] = np.where(cover > 0, sums / np.maximum(cover, 1e-300), old).astype(np.float32)
    for k in range(len(state.specs)):
        mine = [(t, n) for j, t, n in updates if j == k]
        if mine:
            total = sum(n for _, n in mine)
            for name in state.inconsistent[k]:
                out.inconsistent[k][name] = (sum(n * t[name].astype(np.float64) for t, n in mine) / total).astype(
                    np.float32
                )
    return out


@pytest.mark.parametrize("r", [0, 1, 3, 7, 13])
def test_window_extraction_matches_the_naive_window(r: int) -> None:
    state = tiny_state(r)
    strategy = get_strategy("fedrolex")

    for k in range(len(state.specs)):
        got, want = strategy.extract(state, k, r), naive_extract(state, k, r)

        assert got.keys() == want.keys()
        for name in want:
            assert got[name].shape == want[name].shape, f"submodel {k} {name}: shape {got[name].shape}"
            assert np.array_equal(got[name], want[name]), f"round {r} submodel {k} {name}: wrong elements"


def test_round_zero_is_the_deployed_prefix_and_later_rounds_are_not() -> None:
    state = tiny_state()
    strategy = get_strategy("fedrolex")

    assert all(np.array_equal(v, extract(state, 0)[n]) for n, v in strategy.extract(state, 0, 0).items())
    moved = strategy.extract(state, 0, 1)["stages.1.1.conv1.weight"]
    assert not np.array_equal(moved, extract(state, 0)["stages.1.1.conv1.weight"]), "round 1 sent the prefix"


@pytest.mark.parametrize("r", [1, 6, 11])
def test_window_aggregation_matches_the_naive_average(r: int) -> None:
    state = tiny_state(100 + r)
    strategy = get_strategy("fedrolex")
    rng = np.random.default_rng(r)
    updates = []
    for k, samples in ((0, 3), (0, 5), (1, 2), (2, 7)) if r != 6 else ((0, 4), (1, 1)):
        sent = strategy.extract(state, k, r)
        trained = {n: (v + rng.standard_normal(v.shape)).astype(np.float32) for n, v in sent.items()}
        updates.append((k, trained, samples))

    agg = strategy.aggregator(state, "samples", r)
    for k, tensors, samples in updates:
        agg.add(k, tensors, samples)
    got, want = agg.result(), naive_aggregate(state, updates, r)

    for name in want.consistent:
        assert np.allclose(got.consistent[name], want.consistent[name], atol=1e-5), f"round {r}: {name}"
    for k in range(len(state.specs)):
        for name in want.inconsistent[k]:
            assert np.allclose(got.inconsistent[k][name], want.inconsistent[k][name], atol=1e-6), f"{k} {name}"
    assert agg.updates == len(updates)
    # not vacuous: without the full model (r = 6) some elements were covered by no window and kept their value
    stem_old, stem_new = state.consistent["stem.conv.weight"], got.consistent["stem.conv.weight"]
    kept = np.all(stem_old == stem_new, axis=(1, 2, 3))
    assert kept.any() == (r == 6) and not kept.all(), f"round {r}: channels kept {kept}"


def test_window_aggregation_runs_robust() -> None:
    state = tiny_state(5)
    strategy = get_strategy("fedrolex")
    agg = strategy.aggregator(state, "uniform", 2, RobustOptions())
    for node in ("a", "b", "c"):
        agg.add(2, strategy.extract(state, 2, 2), 1, node)

    result = agg.result()  # three identical updates: the robust mean is the sent model

    for name, value in state.consistent.items():
        assert np.allclose(result.consistent[name], value, atol=1e-6), name


def test_a_simulated_round_trains_the_rolled_window(fmnist_dir: Path) -> None:
    # One client of the smallest submodel, one round: FedRolex moves the channels of window 1 (1..n) of the
    # global tensors, HeteroFL the prefix (0..n-1), from the same initial model and data.
    data = load_dataset(fmnist_dir, "train")
    shard = [Dataset(data.x[:64], data.y[:64], "c0")]
    test = Dataset(data.x[-100:], data.y[-100:], "test")
    moved = {}
    for method in ("fedrolex", "heterofl"):
        result = simulate(
            get_strategy(method), get_model_config("resnet-small"), (0.2, 1.0), shard, [0], test, rounds=1,
            train=TrainConfig(lr=0.05, batch_size=32), fraction=1.0, seed=3, calibration=data.x[-300:-100],
        )  # fmt: skip
        assert result.state is not None and result.updates == [1]
        assert all(0.0 <= a <= 1.0 for a in result.accuracy[-1]), result.accuracy
        config, plan = get_strategy(method).setup(get_model_config("resnet-small"), (0.2, 1.0))
        before = init_global_state(config, plan.specs, initial_consistent(config, 3), 3).consistent["stem.conv.weight"]
        after = result.state.consistent["stem.conv.weight"]
        moved[method] = np.flatnonzero(np.abs(after - before).reshape(16, -1).max(axis=1) > 0).tolist()
        width = scaled(16, plan.specs[0].width)

    assert moved["heterofl"] == list(range(width)), moved
    assert moved["fedrolex"] == list(range(1, width + 1)), moved


def test_tracked_batchnorm_statistics_are_refused_clearly(fmnist_dir: Path) -> None:
    data = load_dataset(fmnist_dir, "train")
    shard = [Dataset(data.x[:32], data.y[:32], "c0")]

    with pytest.raises(ConfigError, match=r"bn = tracked: fedrolex .* use --bn federated or --bn server"):
        # without calibration samples simulate keeps the devices' tracked statistics
        simulate(get_strategy("fedrolex"), get_model_config("resnet-small"), (0.2, 1.0), shard, [0], shard[0], 1,
                 TrainConfig())  # fmt: skip
