"""In-place distillation into the smallest submodel (``nefl-wd-distill``, the sandwich rule of Yu & Huang,
ICCV 2019): its local step against a naive PyTorch reference, its aggregation of the smallest submodel's own
tensors, its deadline projection, a short simulate run, and serve's refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from nefl_edge.coordinator.assignment import ClientInfo, capacity, projected_seconds, task_mflops
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
from nefl_edge.coordinator.simulate import simulate
from nefl_edge.coordinator.strategies import SMALLEST_PREFIX, get_strategy
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.errors import ExitCode
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import DeviceProfile, TrainConfig
from nefl_edge.core.specs import DEFAULT_GAMMAS, get_model_config, mflops, param_layout

GAMMAS = (0.2, 0.6, 1.0)


def fresh_state(seed: int = 1) -> GlobalState:
    strategy = get_strategy("nefl-wd-distill")
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, GAMMAS)
    return init_global_state(config, plan.specs, initial_consistent(config, seed=seed), seed)


def naive_net(state: GlobalState, index: int) -> SubmodelNet:
    net = SubmodelNet(state.config, state.specs[index]).train()
    net.load_tensors(extract(state, index))
    return net


def test_the_local_step_is_the_sandwich_rule_of_a_naive_reference(fmnist_dir: Path) -> None:
    """One batch, plain SGD: the big submodel on the labels, an independent copy of the smallest on the big
    one's detached softmax; the smallest's gradients of the shared (nested) tensors land on the big one's
    prefix; its own tensors (BatchNorm, step sizes) step on their own."""
    state = fresh_state()
    data = load_dataset(fmnist_dir, "train")
    shard = Dataset(data.x[:32], data.y[:32], "shard")
    cfg = TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=32, seed=3)

    update = get_strategy("nefl-wd-distill").local_train(state, 2, shard, cfg)

    big, small = naive_net(state, 2), naive_net(state, 0)
    x, y = torch.from_numpy(shard.x), torch.from_numpy(shard.y)
    logits = big(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    p = torch.softmax(logits.detach(), dim=1)
    q_log = torch.log_softmax(small(x), dim=1)
    kd = (p * (torch.log(p) - q_log)).sum(dim=1).mean()
    (ce + kd).backward()
    small_layout = param_layout(state.config, state.specs[0])
    expected: dict[str, np.ndarray] = {}
    with torch.no_grad():
        big_grads = {n: q.grad.clone() for n, q in big.named_parameters()}
        for name, q in small.named_parameters():
            if small_layout[name].kind == "consistent":
                region = tuple(slice(0, n) for n in q.shape)
                big_grads[name][region] += q.grad
            else:
                expected[SMALLEST_PREFIX + name] = (q - cfg.lr * q.grad).numpy()
        for name, q in big.named_parameters():
            expected[name] = (q - cfg.lr * big_grads[name]).numpy()
        for name, b in big.named_buffers():
            if not name.endswith("num_batches_tracked"):
                expected[name] = b.numpy()
        for name, b in small.named_buffers():
            if not name.endswith("num_batches_tracked"):
                expected[SMALLEST_PREFIX + name] = b.numpy()

    assert set(update) == set(expected), sorted(set(update) ^ set(expected))[:5]
    for name, value in expected.items():
        diff = float(np.abs(update[name] - value).max())
        assert diff <= 2e-5, f"{name}: local step differs from the naive sandwich rule by {diff}"
    moved = float(np.abs(update[SMALLEST_PREFIX + "stem.bn.weight"] - state.inconsistent[0]["stem.bn.weight"]).max())
    assert moved > 0, "the smallest submodel's own BatchNorm did not train"


def test_the_smallest_submodels_own_tensors_are_averaged_over_everyone_who_trained_them() -> None:
    state = fresh_state()
    strategy = get_strategy("nefl-wd-distill")
    agg = strategy.aggregator(state, "samples", 1)
    own0 = extract(state, 0)
    own2 = extract(state, 2)
    small_own = [n for n, i in param_layout(state.config, state.specs[0]).items() if i.kind != "consistent"]
    agg.add(0, {n: np.full_like(v, 1.0) for n, v in own0.items()}, 10)
    update2 = {n: np.full_like(v, 5.0) for n, v in own2.items()}
    update2.update({SMALLEST_PREFIX + n: np.full_like(own0[n], 3.0) for n in small_own})
    agg.add(2, update2, 30)
    out = agg.result()

    for name in small_own:
        assert np.allclose(out.inconsistent[0][name], (1 * 10 + 3 * 30) / 40), name  # sample-weighted
    for name, value in out.inconsistent[2].items():
        assert np.allclose(value, 5.0), name
    assert np.allclose(out.consistent["stem.conv.weight"][: own0["stem.conv.weight"].shape[0], :1], (10 + 150) / 40)
    shapes = strategy.update_shapes(state.config, strategy.plan(state.config, GAMMAS), 2)
    assert set(shapes) == set(update2) and set(strategy.extract(state, 2, round_=1)) == set(update2)


def test_the_deadline_projection_prices_the_extra_smallest_submodel() -> None:
    config = get_strategy("nefl-wd").configure(get_model_config("resnet-small"))
    plain = get_strategy("nefl-wd").plan(config, DEFAULT_GAMMAS)
    distill = get_strategy("nefl-wd-distill").plan(config, DEFAULT_GAMMAS)
    small, full = mflops(config, plain.specs[0]), mflops(config, plain.specs[4])
    assert task_mflops(config, distill, 0) == small
    assert task_mflops(config, distill, 4) == full + small
    assert task_mflops(config, plain, 4) == full

    train = TrainConfig(batch_size=10)
    profile = DeviceProfile(
        arch="x", system="x", python="3", cores=1, memory_mb=1, onnxruntime="1", backend="x",
        samples_per_s=100.0, probe_mflops=small,
    )  # fmt: skip
    client = ClientInfo("d", 100, profile=profile)
    # a deadline the full model fits alone (with the margin) but not with the smallest beside it
    deadline = (projected_seconds(profile, full, 100, train) + projected_seconds(profile, full + small, 100, train)) / 2
    assert capacity(client, "deadline", plain, config, train, deadline, margin=1.0) == 4
    assert capacity(client, "deadline", distill, config, train, deadline, margin=1.0) == 3


def test_a_short_simulate_run_trains_the_smallest_submodel_through_the_larger_clients(fmnist_dir: Path) -> None:
    data = load_dataset(fmnist_dir, "train")
    shards = [Dataset(data.x[i * 40 : (i + 1) * 40], data.y[i * 40 : (i + 1) * 40], f"c{i}") for i in range(4)]
    test = Dataset(data.x[-200:], data.y[-200:], "test")
    runs = {}
    for method in ("nefl-wd", "nefl-wd-distill"):
        cfg = RunConfig(
            method=method, gammas=list(GAMMAS), rounds=2, train=TrainConfig(batch_size=20), policy="static",
            cover_submodels=False, bn="tracked",
        )  # fmt: skip
        runs[method] = simulate(cfg, shards, [2, 2, 1, 1], test)

    for method, result in runs.items():
        assert result.updates == [4, 4], f"{method}: {result.updates}"
        assert all(a is not None and 0.0 <= a <= 1.0 for a in result.tier_accuracy()[1:]), method
    # No client draws submodel 0: under nefl-wd its own BatchNorm stays at its initial value, under the
    # distillation variant every client trains it.
    start = fresh_state(0).inconsistent[0]["stem.bn.weight"]
    plain = runs["nefl-wd"].state.inconsistent[0]["stem.bn.weight"]
    distilled = runs["nefl-wd-distill"].state.inconsistent[0]["stem.bn.weight"]
    assert np.array_equal(plain, start), "nefl-wd changed a submodel no client trained"
    assert not np.array_equal(distilled, start), "the distilling clients did not train the smallest submodel"


def test_serve_refuses_the_distillation_variant_with_one_sentence(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "nefl_edge.coordinator", "serve", "--broker", "127.0.0.1:1"]
    run = subprocess.run(
        [*argv, "--method", "nefl-wd-distill", "--runs-dir", str(tmp_path)], capture_output=True, text=True
    )

    assert run.returncode == ExitCode.BAD_INPUT, run.stderr
    assert run.stderr.count("error:") == 1 and "simulate" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
