"""The NeFL paper's protocol (``--preset paper``), its baselines (fjord-paper, scalefl), the paper's ResNet
stem, parallel simulation and the CIFAR-10 command."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nefl_edge.coordinator.assignment import assign, window_tiers
from nefl_edge.coordinator.config import ConfigError, RunConfig, load_config
from nefl_edge.coordinator.engine import RoundEngine
from nefl_edge.coordinator.grid import InProcessGrid
from nefl_edge.coordinator.models import SubmodelNet, build_submodel, initial_consistent
from nefl_edge.coordinator.simulate import client_names, simulate
from nefl_edge.coordinator.strategies import get_strategy
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import (
    SpecError,
    full_spec,
    get_model_config,
    make_specs,
    mflops,
    param_count,
    param_layout,
)
from tests.reference import naive_forward

GAMMAS = (0.2, 0.4, 0.6, 0.8, 1.0)


def test_paper_preset_sets_the_papers_protocol() -> None:
    cfg = load_config(None, {"preset": "paper"})

    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.1, 0.0, 0.0)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.fraction) == (5, 32, 0.1)
    assert (cfg.weighting, cfg.tier_window, cfg.cover_submodels) == ("uniform", 2, False)
    assert (cfg.step_init, cfg.stem_pool, cfg.lr_decay_at, cfg.lr_decay) == ("one", True, [0.5, 0.75], 0.1)
    assert (cfg.bn, cfg.specs, cfg.lr_decay_round, cfg.train.partial_batch) == ("tracked", "paper", "at", True)


def test_explicit_settings_override_the_preset(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "paper"\ntier_window = 1\n[train]\nepochs = 2\n')

    cfg = load_config(toml, {"train.lr": 0.05, "stem_pool": False})

    assert (cfg.tier_window, cfg.train.epochs, cfg.train.lr, cfg.stem_pool) == (1, 2, 0.05, False)
    assert (cfg.weighting, cfg.train.momentum) == ("uniform", 0.0)  # the rest is still the paper's


def test_without_a_preset_nothing_changes() -> None:
    assert load_config(None, {}).model_dump() == RunConfig().model_dump()
    assert RunConfig().tier_window == 0 and not RunConfig().lr_decay_at and not RunConfig().stem_pool


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="preset"):
        load_config(None, {"preset": "papers"})


def test_lr_schedule_decays_after_half_and_three_quarters_of_the_rounds() -> None:
    cfg = RunConfig(rounds=8, lr_decay_at="0.5,0.75", train=TrainConfig(lr=0.1))  # type: ignore[arg-type]

    lrs = [cfg.lr_at(r) for r in range(1, 9)]

    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    assert RunConfig(rounds=500, lr_decay_at=[0.5, 0.75]).lr_at(250) == pytest.approx(0.1)
    assert RunConfig(rounds=500, lr_decay_at=[0.5, 0.75]).lr_at(251) == pytest.approx(0.01)


def test_the_engine_gives_each_round_the_scheduled_lr() -> None:
    cfg = load_config(None, {"preset": "paper", "rounds": 4, "fraction": 1.0, "policy": "static"})
    strategy = get_strategy("nefl-w")
    config, plan = strategy.setup(cfg.network(), GAMMAS)
    state = init_global_state(config, plan.specs, {})
    seen: list[tuple[int, float]] = []

    def record(state: GlobalState, index: int, data: Dataset, train: TrainConfig) -> Tensors:
        seen.append((len(seen), train.lr))
        return extract(state, index)

    shards = {n: Dataset(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), n) for n in client_names(2)}
    grid = InProcessGrid(shards, {n: 0 for n in shards}, record)
    engine = RoundEngine(strategy, cfg, config, plan)

    for r in range(1, 5):
        state, _ = engine.run_round(r, state, grid)

    # the paper's code decays at rounds T/2 and 3T/4 themselves (`if iter == args.epochs/2`): rounds 2 and 3 of 4
    assert [lr for _, lr in seen] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001])


def test_tier_window_draws_stay_in_the_window_and_are_seeded() -> None:
    strategy = get_strategy("nefl-wd")
    _, plan = strategy.setup(get_model_config("resnet-small"), GAMMAS)
    caps = {f"c{i}": i % 5 for i in range(200)}

    def draw(seed: int) -> dict[str, int]:
        return assign(strategy, plan, caps, sorted(caps), False, window=2, window_rng=np.random.default_rng(seed))

    first = draw(1)

    assert first == draw(1) and first != draw(2)
    for node, k in first.items():
        assert max(0, caps[node] - 2) <= k <= min(4, caps[node] + 2), node
    assert set(first[n] for n in caps if caps[n] == 2) == {0, 1, 2, 3, 4}
    assert window_tiers(plan, 0, 2) == [0, 1, 2] and window_tiers(plan, 4, 2) == [2, 3, 4]


def test_tier_window_shares_match_the_papers_code() -> None:
    strategy = get_strategy("nefl-wd")
    _, plan = strategy.setup(get_model_config("resnet-small"), GAMMAS)
    caps = {f"c{i}": i % 5 for i in range(20000)}

    drawn = assign(strategy, plan, caps, sorted(caps), False, window=2, window_rng=np.random.default_rng(0))

    counts = Counter(drawn.values())
    shares = [counts[k] / len(caps) for k in range(5)]
    assert shares == pytest.approx([47 / 300, 31 / 150, 41 / 150, 31 / 150, 47 / 300], abs=0.01)


def test_tier_window_draws_only_tiers_the_method_serves() -> None:
    strategy = get_strategy("nefl-d")  # resnet-small's depth-only submodels serve tiers 2..4 only
    _, plan = strategy.setup(get_model_config("resnet-small"), GAMMAS)
    caps = {f"c{i}": 0 for i in range(50)}

    drawn = assign(strategy, plan, caps, sorted(caps), False, window=2, window_rng=np.random.default_rng(0))

    assert plan.tier_submodel[:2] == [None, None]
    assert set(drawn.values()) == {plan.tier_submodel[2]}


def test_paper_resnet18_stem_pools_to_16x16_and_counts_as_the_papers_code() -> None:
    config = load_config(None, {"preset": "paper", "model": "resnet18", "dataset": "cifar10"}).network()
    net = SubmodelNet(config, full_spec(config)).eval()
    x = torch.randn(2, 3, 32, 32)

    after_stem = net.stem(x)

    assert after_stem.shape == (2, 64, 16, 16)
    assert net(x).shape == (2, 10)
    steps = sum(1 for k in param_layout(config, full_spec(config)) if k.endswith(".step"))
    assert param_count(config, full_spec(config)) - steps == 11_173_962  # the paper's code, without our steps
    plain = get_model_config("resnet18", "cifar10")
    assert mflops(config, full_spec(config)) < 0.3 * mflops(plain, full_spec(plain))


def test_pooled_stem_naive_forward_matches_the_submodel_net() -> None:
    config = load_config(None, {"preset": "paper"}).network()
    specs = make_specs(config, GAMMAS)
    state = init_global_state(config, specs, initial_consistent(config, 1))
    x = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)

    for k in (0, 4):
        with torch.no_grad():
            got = build_submodel(state, k).eval()(torch.from_numpy(x)).double().numpy()
        diff = np.abs(got - naive_forward(state, k, x)).max()
        assert diff <= 1e-5, f"submodel {k}: the pooled-stem net differs from the naive forward by {diff}"


def test_post_activation_blocks_end_in_a_relu() -> None:
    config = get_model_config("resnet18", "cifar10")
    block = SubmodelNet(config, full_spec(config)).stages[0]["0"]

    out = block(torch.randn(2, 64, 8, 8))

    assert block.relu_after and float(out.detach().min()) >= 0.0


def test_step_sizes_start_at_one_with_the_paper_preset() -> None:
    ode, one = get_model_config("resnet-small"), load_config(None, {"preset": "paper"}).network()
    specs = make_specs(ode, (0.2,))  # skips blocks: the ODE initialisation gives steps of 2 there

    ode_steps = [v for k, v in init_global_state(ode, specs, {}).inconsistent[0].items() if k.endswith(".step")]
    one_steps = [v for k, v in init_global_state(one, specs, {}).inconsistent[0].items() if k.endswith(".step")]

    assert max(float(s[0]) for s in ode_steps) > 1.0
    assert all(float(s[0]) == 1.0 for s in one_steps)


@pytest.fixture(scope="module")
def tiny_fmnist(fmnist_dir: Path) -> tuple[list[Dataset], Dataset]:
    data = load_dataset(fmnist_dir, "train")
    shards = [Dataset(data.x[i * 24 : (i + 1) * 24], data.y[i * 24 : (i + 1) * 24], f"s{i}") for i in range(5)]
    test = load_dataset(fmnist_dir, "test")
    return shards, Dataset(test.x[:100], test.y[:100], "test")


def paper_run(method: str, **overrides: object) -> RunConfig:
    base = {"preset": "paper", "method": method, "rounds": 2, "fraction": 1.0, "policy": "static", "device": "cpu"}
    return load_config(None, {**base, "eval_every": 2, "train.epochs": 1, **overrides})


@pytest.mark.parametrize("method", ["fjord-paper", "scalefl"])
def test_new_baselines_run_a_short_paper_simulation(method: str, tiny_fmnist: tuple[list[Dataset], Dataset]) -> None:
    shards, test = tiny_fmnist
    cfg = paper_run(method)
    strategy = get_strategy(method)

    result = simulate(cfg, shards, list(range(5)), test)

    assert result.state is not None and strategy.device_trainable
    assert len(result.accuracy) == 2 and len(result.accuracy[-1]) == 5 and sum(result.updates) == 10
    layout = param_layout(result.state.config, result.state.specs[0])
    assert not layout["stages.0.0.step"].trainable  # fixed step sizes, at 1
    assert all(float(t["stages.0.0.step"][0]) == 1.0 for t in result.state.inconsistent)
    shared_bn = layout["stages.0.0.bn1.weight"].kind == "consistent"
    assert shared_bn == (method == "scalefl")  # fjord-paper: per-submodel BN; scalefl: shared (nested)
    nefl_wd = get_strategy("nefl-wd").plan(cfg.network(), GAMMAS).specs
    nefl_w = get_strategy("nefl-w").plan(cfg.network(), GAMMAS).specs
    assert result.state.specs == (nefl_wd if method == "scalefl" else nefl_w)


def test_parallel_workers_give_the_serial_result(tiny_fmnist: tuple[list[Dataset], Dataset]) -> None:
    # Training and the evaluation step (federated BatchNorm statistics, federated evaluation) in the pool.
    shards, test = tiny_fmnist
    cfg = paper_run("nefl-wd", bn="federated", evaluation="both")
    threads = torch.get_num_threads()

    serial = simulate(cfg, shards, list(range(5)), test, threads=1)  # as each worker
    parallel = simulate(cfg, shards, list(range(5)), test, workers=2, threads=1)

    assert torch.get_num_threads() == threads, "simulate left its pinned thread count behind"
    assert serial.state is not None and parallel.state is not None
    for name, value in serial.state.flat().items():
        assert np.array_equal(parallel.state.flat()[name], value), name
    assert parallel.accuracy == serial.accuracy


def write_cifar(folder: Path, rng: np.random.Generator, train: int = 40, test: int = 20) -> None:
    """A tiny CIFAR-10 folder in the python-batch format (data written by the test itself)."""
    folder.mkdir()
    for name, n in (("data_batch_1", train // 2), ("data_batch_2", train - train // 2), ("test_batch", test)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"labels": (np.arange(n) % 10).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_table_iii_command_runs_end_to_end(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", np.random.default_rng(0))
    out = tmp_path / "result.json"
    # The README's Table III command with 4 clients, 2 rounds and 1 epoch instead of 100, 500 and 5.
    command = [
        sys.executable, "-m", "nefl_edge.coordinator", "simulate", "--preset", "paper", "--method", "nefl-wd",
        "--model", "resnet18", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--augment",
        "--clients", "4", "--fraction", "0.5", "--rounds", "2", "--epochs", "1", "--eval-samples", "20",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip

    run = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["method"] == "nefl-wd" and result["rounds"][-1] == 2 and result["updates"] == [2, 2]
    assert len(result["accuracy"][-1]) == 5 and all(0.0 <= a <= 1.0 for a in result["accuracy"][-1])


def kept(masks: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(i for i, bit in enumerate(stage) if bit) for stage in masks)


# The notes' reading of the authors' get_submodel_info, method WD (shared/notes/nefl-paper-results.md, 3a):
# s2D per submodel and the parameter share each spec has (BatchNorm affine counted, step sizes not).
PAPER_WD = {
    "resnet18": (
        [0.34, 0.4, 0.6, 0.8, 1.0],
        [[[1, 1], [1, 1], [1, 1], [1, 0]]] + [[[1, 1]] * 4] * 4,
        [0.198, 0.401, 0.603, 0.801, 1.0],
    ),
    "resnet34": (
        [0.378296187, 0.625390289, 0.770943105, 0.899800797, 1.0],
        [
            [[1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 0, 0, 1], [1, 0, 1]],
            [[1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 0, 0, 1], [1, 0, 1]],
            [[1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1, 0, 1], [1, 0, 1]],
            [[1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1]],
            [[1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1]],
        ],
        [0.201, 0.401, 0.559, 0.802, 1.0],
    ),
}


@pytest.mark.parametrize("model", ["resnet18", "resnet34"])
def test_paper_preset_gives_the_papers_wd_submodels(model: str) -> None:
    shares, masks, gammas = PAPER_WD[model]
    cfg = load_config(None, {"preset": "paper", "model": model, "dataset": "cifar10"})

    _, plan = get_strategy("nefl-wd").setup(cfg.network(), GAMMAS)

    config = cfg.network()
    full = param_count(config, full_spec(config)) - sum(
        1 for k in param_layout(config, full_spec(config)) if "step" in k
    )
    for k, spec in enumerate(plan.specs):
        assert spec.blocks == kept(masks[k]), f"{model} submodel {k}: kept blocks {spec.describe()}"
        assert spec.width == pytest.approx(np.sqrt(shares[k]), abs=1e-6), f"{model} submodel {k}: width"
        steps = sum(1 for key in param_layout(config, spec) if key.endswith(".step"))
        share = (param_count(config, spec) - steps) / full
        assert share == pytest.approx(gammas[k], abs=6e-4), f"{model} submodel {k}: parameter share {share:.4f}"
    assert plan.tier_submodel == [0, 1, 2, 3, 4]


def test_paper_preset_gives_sqrt_gamma_widths_to_width_methods() -> None:
    cfg = load_config(None, {"preset": "paper", "model": "resnet18", "dataset": "cifar10"})

    for method in ("nefl-w", "fjord-paper"):
        _, plan = get_strategy(method).setup(cfg.network(), GAMMAS)
        assert [s.width for s in plan.specs] == pytest.approx([np.sqrt(g) for g in GAMMAS], abs=1e-6), method
        assert all(s.blocks == full_spec(cfg.network()).blocks for s in plan.specs), method


def test_paper_specs_only_where_the_paper_has_them() -> None:
    cfg = load_config(None, {"preset": "paper", "model": "resnet18", "dataset": "cifar10", "gammas": "0.3,1.0"})
    with pytest.raises(SpecError, match="paper's WD specs"):
        get_strategy("nefl-wd").setup(cfg.network(), tuple(cfg.gammas))
    # fedavg-smallest under the preset trains the paper's smallest submodel
    paper = load_config(None, {"preset": "paper", "model": "resnet18", "dataset": "cifar10"}).network()
    assert get_strategy("fedavg-smallest").plan(paper, GAMMAS).specs[0] == make_specs(paper, GAMMAS)[0]
    # resnet-small (not in the paper): NeFL-W widths, the smallest also drops the last block of the last stage
    small = load_config(None, {"preset": "paper"}).network()
    specs = make_specs(small, GAMMAS)
    assert specs[0].blocks == ((0, 1), (0, 1), (0,)) and abs(specs[0].gamma - 0.2) <= 0.03
    assert [s.width for s in specs[1:]] == pytest.approx([np.sqrt(g) for g in GAMMAS[1:]], abs=1e-6)
    assert load_config(None, {"preset": "paper", "specs": "nested"}).network().specs == "nested"
