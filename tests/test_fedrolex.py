"""FedRolex (``coordinator.strategies.FedRolex``): its rolling window extraction and aggregation, and the
submodels it deploys, against a naive element-by-element window loop written here that keeps the global model
in the paper's channel order; the same through the round engine across a checkpoint and resume; and a short
simulated run (the serve run is the simulate/serve parity test of tests/test_engine.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator import checkpoint
from nefl_edge.coordinator.config import ConfigError, RunConfig
from nefl_edge.coordinator.engine import RoundEngine
from nefl_edge.coordinator.grid import InProcessGrid
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.simulate import simulate
from nefl_edge.coordinator.strategies import Plan, get_strategy
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


def _trained(sent: Tensors, rng: np.random.Generator) -> Tensors:
    """A client's update in the naive loop: what it was sent, moved by noise."""
    return {n: (v + rng.standard_normal(v.shape)).astype(np.float32) for n, v in sent.items()}


def assert_deployed_is_window(state: GlobalState, paper: GlobalState, r: int, what: str) -> None:
    """Every submodel ``state`` deploys (its nested prefix, what evaluation, export and predict run) is the
    naive window ``r`` of the paper-ordered state, the full model included (so every global element)."""
    for k in range(len(state.specs)):
        got, want = extract(state, k), naive_extract(paper, k, r)
        assert got.keys() == want.keys(), f"{what}: submodel {k} names"
        for name in want:
            assert np.allclose(got[name], want[name], atol=1e-5), f"{what}: submodel {k} deploys wrong {name}"


# (submodel, samples) of each round's updates; () is a round that aggregates nothing; rounds without the
# full model (1, 6, 9) leave the elements no window covered at their old value
ROUNDS = {
    1: ((0, 3), (0, 5), (1, 2)), 2: ((0, 3), (1, 2), (2, 7)), 3: ((2, 1),), 4: (), 5: ((0, 4), (1, 1), (2, 2)),
    6: ((0, 4), (1, 1)), 7: ((1, 3), (2, 3)), 8: ((0, 2), (2, 5)), 9: ((0, 6),), 10: ((0, 1), (1, 1), (2, 1)),
    11: (), 12: ((1, 2), (2, 2)), 13: ((0, 3), (2, 4)),
}  # fmt: skip


def test_rounds_send_aggregate_and_deploy_the_naive_windows() -> None:
    # The naive loop keeps the global model in the paper's order and gathers window (r + i) mod C each round;
    # the strategy keeps its state in the last window's coordinates. Rounds 1-13 wrap both hidden sizes (5, 8).
    state = tiny_state(7)
    paper = state.copy()
    strategy = get_strategy("fedrolex")
    rng = np.random.default_rng(7)
    assert_deployed_is_window(state, paper, 0, "before training")
    for r, clients in ROUNDS.items():
        updates = []
        for k, samples in clients:
            sent, want = strategy.extract(state, k, r), naive_extract(paper, k, r)
            assert sent.keys() == want.keys()
            for name in want:
                assert sent[name].shape == want[name].shape, f"round {r} submodel {k} {name}: shape"
                assert np.allclose(sent[name], want[name], atol=1e-5), f"round {r} submodel {k}: sent wrong {name}"
            updates.append((k, _trained(sent, rng), samples))
        if not updates:
            state = strategy.keep(state, r)  # what the engine does with fewer than min_updates
        else:
            agg = strategy.aggregator(state, "samples", r)
            for i, (k, tensors, samples) in enumerate(updates):
                agg.add(k, tensors, samples, f"c{i}")
            assert agg.updates == len(updates)
            state = agg.result()
            paper = naive_aggregate(paper, updates, r)
        assert_deployed_is_window(state, paper, r, f"after round {r}")
    # not vacuous: the deployed small submodel is not the paper's prefix after the last round
    prefix = naive_extract(paper, 0, 0)["stages.1.1.conv1.weight"]
    assert not np.allclose(extract(state, 0)["stages.1.1.conv1.weight"], prefix), "deployed the paper's prefix"


def test_a_round_without_the_full_model_keeps_what_no_window_covered() -> None:
    state = tiny_state(3)
    strategy = get_strategy("fedrolex")
    before = naive_extract(state, 2, 1)  # the full model in window 1's coordinates
    agg = strategy.aggregator(state, "samples", 1)
    agg.add(0, _trained(strategy.extract(state, 0, 1), np.random.default_rng(0)), 4)

    after = extract(agg.result(), 2)

    kept = np.all(before["stem.conv.weight"] == after["stem.conv.weight"], axis=(1, 2, 3))
    width = param_layout(state.config, state.specs[0])["stem.conv.weight"].shape[0]
    assert kept.tolist() == [False] * width + [True] * (len(kept) - width), f"stem channels kept: {kept}"


def test_round_zero_is_the_deployed_prefix_and_training_rounds_are_not() -> None:
    state = tiny_state()
    strategy = get_strategy("fedrolex")

    assert all(np.array_equal(v, extract(state, 0)[n]) for n, v in strategy.extract(state, 0, 0).items())
    moved = strategy.extract(state, 0, 1)["stages.1.1.conv1.weight"]
    assert not np.array_equal(moved, extract(state, 0)["stages.1.1.conv1.weight"]), "round 1 sent the prefix"


def test_window_aggregation_runs_robust() -> None:
    state = tiny_state(5)
    strategy = get_strategy("fedrolex")
    agg = strategy.aggregator(state, "uniform", 2, RobustOptions())
    sent = strategy.extract(state, 2, 2)
    for node in ("a", "b", "c"):
        agg.add(2, sent, 1, node)

    result = agg.result()  # three identical updates of the full model: the robust mean is what was sent

    for name, value in extract(result, 2).items():
        assert np.allclose(value, sent[name], atol=1e-6), name


def test_engine_rounds_and_a_resume_from_the_checkpoint_deploy_the_naive_windows(tmp_path: Path) -> None:
    # The round engine (serve's and simulate's) over the in-process grid, with a deterministic numpy trainer:
    # rounds 1-6, a checkpoint written and read back by serve's own code, a fresh engine for rounds 7-12.
    # Round 4's updates are all rejected (non-finite), so it aggregates nothing. The naive loop replays the
    # engine's assignment in the paper's order; after every round the deployed submodels are its window.
    state = tiny_state(11)
    paper = state.copy()
    strategy = get_strategy("fedrolex")
    plan = Plan(list(state.specs), [0, 1, 2])
    cfg = RunConfig(method="fedrolex", policy="static", bn="server", evaluation="test", gammas=[0.2, 0.6, 1.0])
    shards = {f"c{t}": Dataset(np.zeros((n, 2, 8, 8), np.float32), np.zeros(n, np.int64), f"c{t}") for t, n in
              ((0, 30), (1, 20), (2, 10))}  # fmt: skip
    failing = {4}
    current = [0]

    def train(client: GlobalState, k: int, data: Dataset, train: TrainConfig) -> Tensors:
        scale = np.float32("nan") if current[0] in failing else np.float32(0.5)
        return {n: v * scale + np.float32(len(data) / 100) for n, v in extract(client, k).items()}

    grid = InProcessGrid(shards, {"c0": 0, "c1": 1, "c2": 2}, train)

    def engine() -> RoundEngine:
        out = RoundEngine(strategy, cfg, state.config, plan)
        out.evaluate_at = lambda r: False
        return out

    rounds = engine()
    for r in range(1, 13):
        if r == 7:
            snapshot = {"rng": rounds.rng.bit_generator.state, "quarantine": rounds.quarantine.dump()}
            checkpoint.save(tmp_path, checkpoint.Checkpoint(6, state.flat(), snapshot, {}))
            saved = checkpoint.load(tmp_path)
            state = GlobalState.from_flat(state.config, plan.specs, saved.state)
            rounds = engine()
            rounds.rng.bit_generator.state = saved.engine["rng"]
            rounds.quarantine.restore(saved.engine["quarantine"])
        current[0] = r
        state, report = rounds.run_round(r, state, grid)
        assert report.aggregated == (r not in failing), f"round {r}: aggregated {report.aggregated}"
        updates = []
        for c in report.clients:
            if c["status"] == "updated":
                samples = len(shards[c["node"]])
                sent = naive_extract(paper, c["submodel"], r)
                updates.append((c["submodel"], {n: v * np.float32(0.5) + np.float32(samples / 100) for n, v in
                                                 sent.items()}, samples))  # fmt: skip
        assert len(updates) == (0 if r in failing else 3), f"round {r}: {report.clients}"
        if updates:
            paper = naive_aggregate(paper, updates, r)
        assert_deployed_is_window(state, paper, r, f"engine, after round {r}")


def test_a_simulated_round_trains_the_rolled_window(fmnist_dir: Path) -> None:
    # One client of the smallest submodel, one round: FedRolex moves the channels of window 1 (1..n in the
    # paper's order) of the global tensors, HeteroFL the prefix (0..n-1), from the same initial model and data;
    # FedRolex's state is then in window 1's coordinates (its element j is the paper's channel j + 1), so that
    # the prefix it deploys is the window it trained.
    data = load_dataset(fmnist_dir, "train")
    shard = [Dataset(data.x[:64], data.y[:64], "c0")]
    test = Dataset(data.x[-100:], data.y[-100:], "test")
    moved = {}
    for method in ("fedrolex", "heterofl"):
        cfg = RunConfig(
            method=method, gammas=[0.2, 1.0], rounds=1, train=TrainConfig(lr=0.05, batch_size=32), seed=3,
            policy="static", cover_submodels=False, bn="server",
        )  # fmt: skip
        result = simulate(cfg, shard, [0], test, data.x[-300:-100])
        assert result.state is not None and result.updates == [1]
        assert all(0.0 <= a <= 1.0 for a in result.accuracy[-1]), result.accuracy
        config, plan = get_strategy(method).setup(get_model_config("resnet-small"), (0.2, 1.0))
        before = init_global_state(config, plan.specs, initial_consistent(config, 3), 3).consistent["stem.conv.weight"]
        after = result.state.consistent["stem.conv.weight"]

        def changed(new: np.ndarray, old: np.ndarray) -> list[int]:
            return np.flatnonzero(np.abs(new - old).reshape(16, -1).max(axis=1) > 0).tolist()

        if method == "fedrolex":
            moved["deployed"] = changed(after, np.roll(before, -1, axis=0))  # in the state's own order
            after = np.roll(after, 1, axis=0)  # to the paper's order
        moved[method] = changed(after, before)
        width = scaled(16, plan.specs[0].width)

    assert moved["heterofl"] == list(range(width)), moved
    assert moved["fedrolex"] == list(range(1, width + 1)), moved
    assert moved["deployed"] == list(range(width)), moved


def test_tracked_batchnorm_statistics_are_refused_clearly(fmnist_dir: Path) -> None:
    data = load_dataset(fmnist_dir, "train")
    shard = [Dataset(data.x[:32], data.y[:32], "c0")]

    with pytest.raises(ConfigError, match=r"bn = tracked: fedrolex .* use --bn federated or --bn server"):
        simulate(RunConfig(method="fedrolex", gammas=[0.2, 1.0], rounds=1, bn="tracked"), shard, [0], shard[0])
