"""The methods of coordinator.strategies: plans, what each shares, aggregation on hand-checkable cases,
FjORD's local training, and the simulate harness (torch and ONNX Runtime trainers, CIFAR-10 folders)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.simulate import ort_trainer, simulate
from nefl_edge.coordinator.strategies import STRATEGIES, Strategy, get_strategy, train_torch
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import (
    DEFAULT_GAMMAS,
    ModelConfig,
    SubmodelSpec,
    get_model_config,
    param_layout,
    scaled,
)


def constant_update(state: GlobalState, index: int, value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in extract(state, index).items()}


def two_client_round(strategy: Strategy, gammas: tuple[float, ...]) -> tuple[GlobalState, GlobalState]:
    """Submodel 0 sends all ones, the last submodel all threes (one sample each)."""
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, gammas)
    state = init_global_state(config, plan.specs, consistent={})
    agg = NeFedAvg(state)
    agg.add(0, constant_update(state, 0, 1.0), 1)
    last = len(plan.specs) - 1
    agg.add(last, constant_update(state, last, 3.0), 1)
    return state, agg.result()


def test_every_method_has_a_plan_for_the_default_gammas() -> None:
    config = get_model_config("resnet-small")
    for name, strategy in STRATEGIES.items():
        plan = strategy.plan(strategy.configure(config), DEFAULT_GAMMAS)

        assert len(plan.tier_submodel) == len(DEFAULT_GAMMAS), name
        served = [k for k in plan.tier_submodel if k is not None]
        assert served and sorted(set(served)) == list(range(len(plan.specs))), name
        for tier, k in enumerate(plan.tier_submodel):  # no tier gets more than it can afford
            if k is not None and name != "fedavg-smallest":
                assert plan.specs[k].gamma <= DEFAULT_GAMMAS[tier] + 0.03, (name, tier)


def test_depth_only_methods_serve_only_the_tiers_that_afford_a_depth_only_submodel() -> None:
    config = get_model_config("resnet-small")

    plan = get_strategy("depthfl").plan(config, DEFAULT_GAMMAS)

    # resnet-small's shallowest depth-only submodel (one block per stage) has gamma 0.44
    assert plan.tier_submodel[:2] == [None, None]
    assert [round(s.gamma, 2) for s in plan.specs] == [0.58, 1.0]
    assert plan.tier_submodel[2:] == [0, 0, 1]


def test_heterofl_averages_batchnorm_as_nested_slices_where_nefl_keeps_one_copy_per_submodel() -> None:
    gammas = (0.2, 1.0)
    _, hetero = two_client_round(get_strategy("heterofl"), gammas)
    _, nefl = two_client_round(get_strategy("nefl-w"), gammas)
    small = scaled(16, hetero.specs[0].width)

    bn = hetero.consistent["stem.bn.weight"]
    assert np.all(bn[:small] == 2.0) and np.all(bn[small:] == 3.0)
    assert "stem.bn.weight" not in nefl.consistent
    assert np.all(nefl.inconsistent[0]["stem.bn.weight"] == 1.0)
    assert np.all(nefl.inconsistent[1]["stem.bn.weight"] == 3.0)
    for state in (hetero, nefl):  # convolutions are nested slices for both
        conv = state.consistent["stem.conv.weight"]
        assert np.all(conv[:small] == 2.0) and np.all(conv[small:] == 3.0)


def test_depthfl_keeps_a_classifier_per_depth_and_averages_the_shared_blocks() -> None:
    state, result = two_client_round(get_strategy("depthfl"), (0.6, 1.0))
    shallow = state.specs[0]

    assert "head.weight" not in result.consistent
    assert np.all(result.inconsistent[0]["head.weight"] == 1.0)
    assert np.all(result.inconsistent[1]["head.weight"] == 3.0)
    assert np.all(result.consistent["stages.0.0.conv1.weight"] == 2.0)  # kept by both
    skipped = next(f"stages.{s}.1.conv1.weight" for s, kept in enumerate(shallow.blocks) if 1 not in kept)
    assert np.all(result.consistent[skipped] == 3.0)  # only the deep submodel has it


def test_fedavg_smallest_is_plain_weighted_fedavg_of_one_model() -> None:
    strategy = get_strategy("fedavg-smallest")
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, DEFAULT_GAMMAS)
    state = init_global_state(config, plan.specs, consistent={})
    agg = NeFedAvg(state)

    agg.add(0, constant_update(state, 0, 1.0), 1)
    agg.add(0, constant_update(state, 0, 3.0), 3)
    result = extract(agg.result(), 0)

    assert plan.tier_submodel == [0] * len(DEFAULT_GAMMAS)
    assert all(np.allclose(v, 2.5) for v in result.values())


def test_fedavg_full_trains_only_the_able_devices(fmnist_dir: Path) -> None:
    data = load_dataset(fmnist_dir, "train")
    shards = [Dataset(data.x[i * 40 : (i + 1) * 40], data.y[i * 40 : (i + 1) * 40], f"c{i}") for i in range(10)]
    test = Dataset(data.x[-100:], data.y[-100:], "test")

    cfg = RunConfig(
        method="fedavg-full", gammas=list(DEFAULT_GAMMAS), rounds=1, train=TrainConfig(batch_size=20),
        policy="static", cover_submodels=False, bn="tracked",
    )  # fmt: skip

    result = simulate(cfg, shards, [i % 5 for i in range(10)], test)

    assert result.updates == [2]  # tiers 4 of ten devices: clients 4 and 9
    assert result.tier_accuracy()[:4] == [None] * 4 and result.tier_accuracy()[4] is not None


def test_fjord_with_only_the_smallest_width_is_plain_local_sgd_of_that_submodel(fmnist_dir: Path) -> None:
    strategy = get_strategy("fjord")
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, (0.2, 1.0))
    state = init_global_state(config, plan.specs, initial_consistent(config, seed=1))
    data = load_dataset(fmnist_dir, "train")
    shard = Dataset(data.x[:96], data.y[:96], "shard")
    cfg = TrainConfig(lr=0.05, seed=3)

    fjord = strategy.local_train(state, 0, shard, cfg)
    plain = train_torch(state, 0, shard, cfg)

    for name, value in plain.items():
        assert np.abs(fjord[name] - value).max() <= 1e-5, name


def test_fjord_trains_several_widths_inside_the_devices_own_model(fmnist_dir: Path) -> None:
    strategy = get_strategy("fjord")
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, (0.2, 0.6, 1.0))
    state = init_global_state(config, plan.specs, initial_consistent(config, seed=1))
    data = load_dataset(fmnist_dir, "train")
    shard = Dataset(data.x[:320], data.y[:320], "shard")

    update = strategy.local_train(state, 1, shard, TrainConfig(lr=0.05, seed=3))

    small = scaled(16, plan.specs[0].width)
    mid = scaled(16, plan.specs[1].width)
    before = extract(state, 1)["stem.conv.weight"]
    changed = np.abs(update["stem.conv.weight"] - before).reshape(mid, -1).max(axis=1) > 0
    assert update["stem.conv.weight"].shape[0] == mid
    assert changed[:small].all() and changed[small:].all()  # both widths were drawn over ten batches
    # the smaller widths' channels are trained more often (every draw) than the outer ones (only width 1)
    drift = np.abs(update["stem.conv.weight"] - before).reshape(mid, -1).mean(axis=1)
    assert drift[:small].mean() > drift[small:].mean()


def test_methods_without_learned_steps_leave_the_step_at_one(fmnist_dir: Path) -> None:
    strategy = get_strategy("heterofl")
    config = strategy.configure(get_model_config("resnet-small"))
    state = init_global_state(config, strategy.plan(config, (1.0,)).specs, initial_consistent(config, seed=0))
    data = load_dataset(fmnist_dir, "train")

    trained = train_torch(state, 0, Dataset(data.x[:64], data.y[:64], "s"), TrainConfig())

    steps = [k for k, info in param_layout(config, state.specs[0]).items() if k.endswith(".step")]
    assert steps and all(not param_layout(config, state.specs[0])[k].trainable for k in steps)
    assert all(float(trained[k][0]) == 1.0 for k in steps)


def test_local_training_through_onnx_runtime_agrees_with_pytorch(
    small_artifacts: Path, small_config: ModelConfig, small_specs: list[SubmodelSpec], fmnist_dir: Path
) -> None:
    state = init_global_state(small_config, small_specs, initial_consistent(small_config, seed=4))
    data = load_dataset(fmnist_dir, "train")
    shard = Dataset(data.x[:64], data.y[:64], "shard")
    cfg = TrainConfig(lr=0.01, seed=7)

    ort = ort_trainer(small_artifacts)(state, 2, shard, cfg)
    ref = train_torch(state, 2, shard, cfg)

    for name, value in ref.items():
        # The training build's BatchNorm kernel updates running_var with the biased batch variance (PyTorch:
        # unbiased), 0.1 * var / (N*H*W) per step: 6e-5 per step at 7x7 maps, so 2e-4 over two steps.
        tol = 2e-4 if "running" in name else 2e-5
        assert np.abs(ort[name] - value).max() <= tol, name


def write_cifar(folder: Path, rng: np.random.Generator) -> None:
    """A tiny CIFAR-10 folder in the python-batch format (test data written by the test itself)."""
    folder.mkdir()
    for name, n in (("data_batch_1", 60), ("data_batch_2", 60), ("test_batch", 40)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"labels": (np.arange(n) % 10).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_simulate_command_runs_on_a_cifar10_folder(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar", np.random.default_rng(0))
    out = tmp_path / "result.json"

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nefl_edge.coordinator",
            "simulate",
            "--method",
            "heterofl",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "cifar"),
            "--clients",
            "4",
            "--fraction",
            "1",
            "--rounds",
            "1",
            "--eval-samples",
            "20",
            "--bn-calibration",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["method"] == "heterofl" and len(result["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"][-1])
    assert "heterofl" in run.stdout and "accuracy" in run.stdout


def test_simulate_command_rejects_an_unknown_method_clearly() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", "simulate", "--method", "fedprox"],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 2
    assert "unknown method 'fedprox'" in run.stderr and "nefl-wd" in run.stderr


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_names_its_paper(name: str) -> None:
    strategy = get_strategy(name)
    assert strategy.name == name and ("et al." in strategy.reference)


def test_simulate_refuses_the_ort_trainer_for_a_method_with_its_own_local_training() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", "simulate", "--method", "fjord", "--trainer", "ort"],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 2
    assert "fjord trains locally in its own way" in run.stderr and "--trainer torch" in run.stderr
    assert get_strategy("heterofl").device_trainable and not get_strategy("fjord").device_trainable


POLICY_MODULES = ("engine", "grid", "mqtt_grid", "registry", "strategies", "assignment")


@pytest.mark.parametrize("module", POLICY_MODULES)
def test_the_round_machinery_imports_no_torch(module: str) -> None:
    # The policy half (selection, assignment, extraction, aggregation) and what runs rounds over it are numpy
    # only; PyTorch is the simulator's local training (coordinator.torch_training), imported when it trains.
    probe = (
        f"import sys, nefl_edge.coordinator.{module}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'torchvision'}))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"importing nefl_edge.coordinator.{module} loads {run.stdout.strip()}"


def test_the_torch_half_is_loaded_by_local_training_only() -> None:
    # The probe can fail: training through a strategy does import torch (so the test above is not vacuous).
    probe = (
        "import sys\n"
        "from nefl_edge.coordinator.strategies import get_strategy\n"
        "from nefl_edge.core.data import Dataset\n"
        "from nefl_edge.core.nested import init_global_state\n"
        "from nefl_edge.core.schemas import TrainConfig\n"
        "from nefl_edge.core.specs import get_model_config\n"
        "import numpy as np\n"
        "s = get_strategy('heterofl'); config, plan = s.setup(get_model_config('resnet-small'), (0.5, 1.0))\n"
        "before = 'torch' in sys.modules\n"
        "state = init_global_state(config, plan.specs, consistent={})\n"
        "data = Dataset(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), 'z')\n"
        "s.local_train(state, 0, data, TrainConfig(batch_size=4))\n"
        "print(before, 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"], f"torch before / after local training: {run.stdout}"
