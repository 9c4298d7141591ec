"""In-place distillation into the smallest submodel (``nefl-wd-distill``, the sandwich rule of Yu & Huang,
ICCV 2019): its local step against a naive PyTorch reference (in PyTorch for ``simulate``, and on the device
graphs through ONNX Runtime: the training build's and the portable one that stock onnxruntime runs), its
aggregation of the smallest submodel's own tensors, its deadline projection, a short simulate run and a short
serve run with real devices over a real Mosquitto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from nefl_edge.coordinator.assignment import ClientInfo, capacity, projected_seconds, task_mflops
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.coordinator.simulate import ort_trainer, simulate
from nefl_edge.coordinator.strategies import SMALLEST_PREFIX, get_strategy
from nefl_edge.core.artifacts import load_manifest, submodel_paths
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import DISTILL_ROLES, ArtifactRole, DeviceProfile, TrainConfig
from nefl_edge.core.specs import DEFAULT_GAMMAS, get_model_config, mflops, param_layout
from nefl_edge.edge_client.trainer import DISTILL_FILES, create_backend, distill_student, train_local
from nefl_edge.export.artifacts import export_set
from tests.helpers import Broker, make_shards, spawn_coordinator, spawn_edge, stop, wait_for

GAMMAS = (0.2, 0.6, 1.0)
# One step of lr 0.05 with a weight decay large enough that counting it twice on the shared tensors (or not
# at all on the smallest submodel's own ones) moves a weight by far more than the tolerances below.
STEP = TrainConfig(lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=32, seed=3)


def fresh_state(seed: int = 1) -> GlobalState:
    strategy = get_strategy("nefl-wd-distill")
    config = strategy.configure(get_model_config("resnet-small"))
    plan = strategy.plan(config, GAMMAS)
    return init_global_state(config, plan.specs, initial_consistent(config, seed=seed), seed)


def naive_net(state: GlobalState, index: int) -> SubmodelNet:
    net = SubmodelNet(state.config, state.specs[index]).train()
    net.load_tensors(extract(state, index))
    return net


def naive_sandwich_step(
    state: GlobalState, index: int, x: np.ndarray, y: np.ndarray, cfg: TrainConfig
) -> dict[str, np.ndarray]:
    """One batch, one SGD step from zero momentum (``buf = grad``, so ``p - lr * (grad + wd * p)``): submodel
    ``index`` on the labels, an independent copy of the smallest on ``KL(p || q)`` written out with ``p`` the big
    one's detached softmax; the smallest's gradients of the shared (nested) tensors land on the big one's prefix,
    its own tensors (BatchNorm, step sizes) step on their own. Returns the update a client sends."""
    big, small = naive_net(state, index), naive_net(state, 0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    logits = big(xt)
    ce = torch.nn.functional.cross_entropy(logits, yt)
    p = torch.softmax(logits.detach(), dim=1)
    q_log = torch.log_softmax(small(xt), dim=1)
    kd = (p * (torch.log(p) - q_log)).sum(dim=1).mean()
    (ce + kd).backward()
    small_layout = param_layout(state.config, state.specs[0])
    expected: dict[str, np.ndarray] = {}
    with torch.no_grad():
        big_grads = {n: q.grad.clone() for n, q in big.named_parameters()}
        for name, q in small.named_parameters():
            if small_layout[name].kind == "consistent":
                big_grads[name][tuple(slice(0, n) for n in q.shape)] += q.grad
            elif q.requires_grad:
                expected[SMALLEST_PREFIX + name] = (q - cfg.lr * (q.grad + cfg.weight_decay * q)).numpy()
        for name, q in big.named_parameters():
            if q.requires_grad:
                expected[name] = (q - cfg.lr * (big_grads[name] + cfg.weight_decay * q)).numpy()
        for name, b in [*big.named_buffers(), *big.named_parameters()]:
            if name not in expected and not name.endswith("num_batches_tracked"):
                expected[name] = b.numpy()
        for name, b in [*small.named_buffers(), *small.named_parameters()]:
            own = small_layout.get(name) is not None and small_layout[name].kind != "consistent"
            if own and SMALLEST_PREFIX + name not in expected:
                expected[SMALLEST_PREFIX + name] = b.numpy()
    return expected


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float, running_tol: float, what: str) -> None:
    assert set(got) == set(want), f"{what}: update names differ: {sorted(set(got) ^ set(want))[:5]}"
    for name, value in want.items():
        limit = running_tol if "running" in name else tol
        diff = float(np.abs(got[name] - value).max())
        assert diff <= limit, f"{what}: {name} differs from the naive sandwich rule by {diff} (tolerance {limit})"


@pytest.fixture(scope="module")
def batch(fmnist_dir: Path) -> Dataset:
    data = load_dataset(fmnist_dir, "train")
    return Dataset(data.x[:32], data.y[:32], "shard")


@pytest.fixture(scope="module")
def distill_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The method's export, as serve makes it (``distill=Plan.distill_smallest``)."""
    state = fresh_state()
    folder = tmp_path_factory.mktemp("distill-artifacts")
    export_set(state.config, state.specs, folder, distill=True)
    return folder


def test_the_local_step_is_the_sandwich_rule_of_a_naive_reference(batch: Dataset) -> None:
    """simulate's PyTorch step (``torch_training.distill_train``) against the naive step written above."""
    state = fresh_state()

    update = get_strategy("nefl-wd-distill").local_train(state, 2, batch, STEP)

    compare(update, naive_sandwich_step(state, 2, batch.x, batch.y, STEP), 2e-5, 2e-5, "PyTorch step")
    moved = float(np.abs(update[SMALLEST_PREFIX + "stem.bn.weight"] - state.inconsistent[0]["stem.bn.weight"]).max())
    assert moved > 0, "the smallest submodel's own BatchNorm did not train"


def test_the_export_adds_the_distillation_files_to_the_larger_submodels_only(
    distill_artifacts: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(distill_artifacts)  # verifies every file's sha256
    for sub in manifest.submodels:
        has = [role in sub.files for role in DISTILL_ROLES]
        assert all(has) if sub.index else not any(has), f"submodel {sub.index}: {list(sub.files)}"
        assert (distill_student(manifest, sub) is None) == (sub.index == 0)
    portable = onnx.load(str(distill_artifacts / manifest.submodels[2].files[ArtifactRole.DISTILL_PORTABLE].name))
    onnx.checker.check_model(portable)
    domains = {n.domain for n in portable.graph.node} | {o.domain for o in portable.opset_import}
    assert domains <= {"", "ai.onnx"}, f"the portable distillation step uses {domains}: stock onnxruntime lacks them"
    copy = shutil.copytree(distill_artifacts, tmp_path / "plain")
    plain = export_set(fresh_state().config, fresh_state().specs, copy)  # from the cache, without distill
    assert not any(role in sub.files for sub in plain.submodels for role in DISTILL_ROLES)


@pytest.mark.parametrize("submodel", [pytest.param(1, marks=pytest.mark.slow), 2])  # 1: slow, 40 s under load
def test_the_training_build_device_step_is_the_naive_sandwich_rule(
    distill_artifacts: Path, batch: Dataset, submodel: int
) -> None:
    """Through simulate's ONNX Runtime trainer (``ort_trainer``: the device's ``train_local`` and backend, the
    training build: submodel ``k``'s graph and the student graph, gradients summed in numpy)."""
    state = fresh_state()

    update = ort_trainer(distill_artifacts)(state, submodel, batch, STEP)

    # ONNX Runtime's training build: float32 kernels within 2e-5 of PyTorch's on the weights (as plain steps,
    # tests/test_strategies.py); its BatchNorm kernel updates running_var with the biased batch variance
    # (PyTorch: unbiased), a difference of 0.1 * var / (N*H*W) per step, below 2e-4 here.
    compare(update, naive_sandwich_step(state, submodel, batch.x, batch.y, STEP), 2e-5, 2e-4, "training build")


def test_the_portable_device_step_on_standard_operators_is_the_naive_sandwich_rule(
    distill_artifacts: Path, batch: Dataset
) -> None:
    """The one-graph step that stock onnxruntime runs (``distill-portable``), through the device's backend."""
    state = fresh_state()
    manifest = load_manifest(distill_artifacts)
    sub = manifest.submodels[2]
    student = distill_student(manifest, sub)
    paths = submodel_paths(distill_artifacts, sub, DISTILL_FILES["portable"])
    backend = create_backend("portable", paths, sub.params, STEP, student=student)
    with pytest.raises(ValueError, match="smallest"):
        backend.load(extract(state, 2), STEP)  # a broadcast without the smallest submodel's tensors
    backend.load(get_strategy("nefl-wd-distill").extract(state, 2, round_=1), STEP)

    loss, _ = backend.step(batch.x, batch.y)

    want = naive_sandwich_step(state, 2, batch.x, batch.y, STEP)
    # The portable BatchNorm uses the unbiased variance as PyTorch does: one tolerance for everything.
    compare(backend.tensors(), want, 2e-5, 2e-5, "portable step")
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(
            naive_net(state, 2)(torch.from_numpy(batch.x)), torch.from_numpy(batch.y)
        )
    assert abs(loss - float(ce)) <= 1e-5, f"the reported loss {loss} is not submodel 2's cross-entropy {float(ce)}"


@pytest.mark.slow  # 1-2 min under load
@pytest.mark.parametrize("kind", ["ort-training", "portable"])
def test_several_device_steps_with_momentum_follow_simulates_pytorch_steps(
    distill_artifacts: Path, fmnist_dir: Path, kind: str
) -> None:
    """Three steps with momentum and weight decay (the buffers of both submodels' tensors carried between steps):
    the device backend through the device's ``train_local`` against simulate's PyTorch ``distill_train`` on the
    same batches (``local_batches`` of the task's seed)."""
    state = fresh_state()
    data = load_dataset(fmnist_dir, "train")
    # On other batches an fp32 pre-activation near a ReLU kink makes ONNX Runtime's and PyTorch's stem gradients
    # part, for plain steps as much as for these (samples 200-295: stem.conv.weight differs by 6e-4 portable and
    # 2.2e-3 training build for plain steps, 8.5e-4 and 2.3e-3 for distillation steps; measured): this one has
    # none, so the tolerance can say something about the step.
    shard = Dataset(data.x[:96], data.y[:96], "shard")
    cfg = STEP.model_copy(update={"lr": 0.02})
    manifest = load_manifest(distill_artifacts)
    sub = manifest.submodels[2]
    student = distill_student(manifest, sub)
    backend = create_backend(
        kind, submodel_paths(distill_artifacts, sub, DISTILL_FILES[kind]), sub.params, cfg, student=student
    )
    backend.load(get_strategy("nefl-wd-distill").extract(state, 2, round_=1), cfg)

    metrics = train_local(backend, shard, cfg)
    want = get_strategy("nefl-wd-distill").local_train(state, 2, shard, cfg)

    assert metrics.steps == 3
    # float32 differences of three steps; the training build's biased running variance as above, three times
    compare(backend.tensors(), want, 1e-4, 1e-4 if kind == "portable" else 6e-4, f"{kind}, three steps")


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


@pytest.mark.integration
@pytest.mark.slow  # 4-5 min under load (257 s at load 15): the export, three devices' probes, two rounds
def test_a_short_serve_run_with_real_devices_distils_and_reports_every_submodel(broker: Broker, tmp_path: Path) -> None:
    """`nefl-coord serve --method nefl-wd-distill` with three real `nefl-edge join` devices over a real Mosquitto,
    one per tier; the tier-2 device has no training build (stock onnxruntime's route: the portable step)."""
    shards = make_shards(tmp_path, [600, 600, 600])
    coord = spawn_coordinator(
        broker.address, tmp_path, "--method", "nefl-wd-distill", "--rounds", "2", "--deadline-s", "180",
        "--gammas", ",".join(map(str, GAMMAS)), "--min-clients", "3", "--eval-samples", "500", "--lr", "0.05",
        "--wait-clients-s", "120", "--eval-every", "1",
    )  # fmt: skip
    edges = [
        spawn_edge(
            broker.address, shard, f"dev{i}", tmp_path, tier=i, block=("onnxruntime.training",) if i == 2 else ()
        )
        for i, shard in enumerate(shards)
    ]
    try:
        assert coord.wait(600) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
        for edge in edges:
            assert edge.wait(60) == 0, (tmp_path / f"dev{edges.index(edge)}.log").read_text()[-2000:]
    finally:
        for proc in [coord, *edges]:
            stop(proc)
    out = wait_for(lambda: next((tmp_path / "runs").glob("default-*"), None), 10, "the run directory")
    records = read_jsonl(out / "metrics.jsonl")
    final = {r["submodel"]: r for r in records if r["round"] == 2}
    assert sorted(final) == [0, 1, 2], f"per-submodel accuracy after the last round: {sorted(final)}"
    for k, record in final.items():
        assert 0.0 <= record["accuracy"] <= 1.0, record
        assert record["updates"] == 3 and record["aggregated"], f"submodel {k}: the round did not aggregate 3 updates"
    # Each device of a larger submodel fetched (and so ran) its backend's distillation files: the training
    # build's student graph on dev1, the one-graph portable step on dev2 (no training build).
    manifest = load_manifest(out / "artifacts")
    for node, index, kind in (("dev1", 1, "ort-training"), ("dev2", 2, "portable")):
        cached = {p.name for p in (tmp_path / f"cache-{node}" / "artifacts").iterdir()}
        wanted = {manifest.submodels[index].files[role].sha256 for role in DISTILL_FILES[kind]}
        assert wanted <= cached, f"{node} did not fetch its {kind} distillation files"
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "nefl-wd-distill"
