"""BatchNorm statistics in the three modes (tracked, federated, server) and federated evaluation: the
statistics a submodel's clients upload are averaged within that submodel; federated re-estimation combines
the devices' batch statistics into exactly what re-estimation over the union of their batches gives; federated
evaluation equals central evaluation on the union of the devices' held-out splits; hostile answers are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.config import ConfigError, RunConfig, upgraded, validate
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.evaluation import (
    apply_bn_stats,
    bn_batch_stats,
    calibrate_bn,
    coordinator_data,
    evaluate,
)
from nefl_edge.coordinator.grid import EvalOutcome, InProcessGrid
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.strategies import get_strategy, train_torch
from nefl_edge.core.artifacts import submodel_paths
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.evaluation import BnStats, split_dataset
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import Manifest, TrainConfig
from nefl_edge.core.specs import get_model_config
from nefl_edge.edge_client.evaluate import SubmodelEvaluator
from nefl_edge.export.artifacts import export_set

GAMMAS = (0.2, 0.6, 1.0)


@pytest.fixture(scope="module")
def setup() -> tuple[GlobalState, list[Dataset]]:
    """A global state one local step away from its initialisation (so that statistics are not trivial) and
    two devices' data of 64 and 96 real Fashion-MNIST images."""
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    state = init_global_state(config, plan.specs, initial_consistent(config, 3), 3)
    train = load_dataset(None, "train")
    devices = [Dataset(train.x[:64], train.y[:64], "a"), Dataset(train.x[64:160], train.y[64:160], "b")]
    agg = NeFedAvg(state)
    agg.add(2, train_torch(state, 2, devices[0], TrainConfig(lr=0.05, max_steps=2)), 64)
    return agg.result(), devices


@pytest.fixture(scope="module")
def artifacts(
    setup: tuple[GlobalState, list[Dataset]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Manifest]:
    state = setup[0]
    folder = tmp_path_factory.mktemp("artifacts")
    return folder, export_set(state.config, state.specs, folder)


def test_tracked_statistics_are_averaged_within_their_submodel_only(setup: tuple[GlobalState, list[Dataset]]) -> None:
    # Prepare: two clients of submodel 0 report running means 1 and 5 (64 and 192 samples); a client of
    # submodel 1 reports 100.
    state = setup[0]
    name = "stem.bn.running_mean"

    def update(k: int, value: float) -> dict[str, np.ndarray]:
        tensors = extract(state, k)
        tensors[name] = np.full_like(tensors[name], value)
        return tensors

    by_samples, uniform = NeFedAvg(state, "samples"), NeFedAvg(state, "uniform")
    for agg in (by_samples, uniform):
        agg.add(0, update(0, 1.0), 64)
        agg.add(0, update(0, 5.0), 192)
        agg.add(1, update(1, 100.0), 64)

    # Execute
    weighted, equal = by_samples.result(), uniform.result()

    # Assert: (64 * 1 + 192 * 5) / 256 = 4 and (1 + 5) / 2 = 3 for submodel 0; submodel 1 keeps its own
    # client's 100; submodel 2, trained by nobody, keeps its statistics.
    assert np.allclose(weighted.inconsistent[0][name], 4.0) and np.allclose(equal.inconsistent[0][name], 3.0)
    assert np.allclose(weighted.inconsistent[1][name], 100.0)
    assert np.array_equal(weighted.inconsistent[2][name], state.inconsistent[2][name])


@pytest.mark.parametrize("k", [0, 2])
def test_federated_reestimation_on_devices_equals_reestimation_on_the_union_of_their_data(
    k: int, setup: tuple[GlobalState, list[Dataset]], artifacts: tuple[Path, Manifest]
) -> None:
    # Prepare: the devices' runner on the exported statistics graph (stock onnxruntime), batches of 32.
    state, devices = setup
    folder, manifest = artifacts
    runner = SubmodelEvaluator(submodel_paths(folder, manifest.submodels[k], ("eval", "stats")))
    central = state.copy()
    calibrate_bn(central, k, np.concatenate([d.x for d in devices]), batch=32)

    # Execute: each device sums its batch statistics; the coordinator combines them.
    parts = [runner.bn_stats(extract(state, k), d.x, 32) for d in devices]
    combined = state.copy()
    batches = apply_bn_stats(
        combined, k, [BnStats.from_tensors(p.tensors(), p.batches, _channels(state, k)) for p in parts]
    )

    # Assert: 2 + 3 batches, and the same statistics as re-estimation over the concatenated data.
    assert batches == 5
    names = [n for n in central.inconsistent[k] if "running_" in n]
    assert len(names) >= 10
    for name in names:
        assert np.allclose(combined.inconsistent[k][name], central.inconsistent[k][name], rtol=1e-4, atol=1e-5), name
        assert not np.allclose(central.inconsistent[k][name], state.inconsistent[k][name]), name
    torch_parts = [bn_batch_stats(state, k, d.x, 32) for d in devices]
    in_torch = state.copy()
    apply_bn_stats(in_torch, k, torch_parts)
    for name in names:
        assert np.allclose(in_torch.inconsistent[k][name], central.inconsistent[k][name], rtol=1e-5, atol=1e-6)


def _channels(state: GlobalState, k: int) -> dict[str, int]:
    return {
        n.removesuffix(".running_mean"): v.shape[0] for n, v in state.inconsistent[k].items() if "running_mean" in n
    }


def test_federated_evaluation_equals_central_evaluation_on_the_union_of_held_out_splits(
    setup: tuple[GlobalState, list[Dataset]], artifacts: tuple[Path, Manifest]
) -> None:
    # Prepare: the two devices (tiers 1 and 2) in an in-process grid; the engine evaluates with 25 % held out.
    state, devices = setup
    cfg = RunConfig(gammas=list(GAMMAS), bn="tracked", evaluation="federated", eval_fraction=0.25, policy="static")
    strategy = get_strategy("nefl-wd")
    engine = RoundEngine(strategy, cfg, state.config, strategy.plan(state.config, GAMMAS))
    grid = InProcessGrid({"a": devices[0], "b": devices[1]}, {"a": 1, "b": 2}, train_torch)
    report = RoundReport(1)

    # Execute
    engine.evaluation_step(1, state, grid, {"a": 1, "b": 2}, report)

    # Assert: submodels 0 and 1 on both held-out splits, submodel 2 on b's only, each equal to evaluating
    # the union centrally; the devices' own ONNX Runtime evaluator gives the same sums.
    held = [split_dataset(d, 0.25)[1] for d in devices]
    assert [len(h) for h in held] == [16, 24]
    union = Dataset(np.concatenate([h.x for h in held]), np.concatenate([h.y for h in held]), "union")
    for k, data in ((0, union), (1, union), (2, held[1])):
        accuracy, loss = evaluate(state, k, data)
        got = report.federated[k]
        assert got["samples"] == len(data) and got["devices"] == (1 if k == 2 else 2)
        assert got["accuracy"] == pytest.approx(accuracy) and got["loss"] == pytest.approx(loss, rel=1e-5)
    folder, manifest = artifacts
    runner = SubmodelEvaluator(submodel_paths(folder, manifest.submodels[1], ("eval",)))
    on_device = [runner.evaluate(extract(state, 1), h) for h in held]
    assert sum(r.correct for r in on_device) / 40 == pytest.approx(report.federated[1]["accuracy"])
    assert sum(r.loss_sum for r in on_device) / 40 == pytest.approx(report.federated[1]["loss"], rel=1e-5)


def test_held_out_samples_are_never_trained_on(setup: tuple[GlobalState, list[Dataset]]) -> None:
    devices = setup[1]
    seen: list[int] = []

    def trainer(state: GlobalState, index: int, data: Dataset, train: TrainConfig) -> dict[str, np.ndarray]:
        seen.append(len(data))
        return extract(state, index)

    grid = InProcessGrid({"a": devices[0]}, {"a": 0}, trainer)
    cfg = RunConfig(gammas=list(GAMMAS), evaluation="federated", eval_fraction=0.25, policy="static", min_clients=1)
    strategy = get_strategy("nefl-wd")
    engine = RoundEngine(strategy, cfg, setup[0].config, strategy.plan(setup[0].config, GAMMAS))
    _, report = engine.run_round(1, setup[0], grid)
    assert seen == [48] and report.clients[0]["num_samples"] == 48


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda o: o.bn_tensors[0].update({"stem.bn.mean_sum": np.ones(3, np.float32)}), "expected float32 (10,)"),
        (lambda o: o.bn_tensors[0].update({"stem.bn.var_sum": -o.bn_tensors[0]["stem.bn.var_sum"]}), "negative"),
        (lambda o: o.bn_tensors[0]["stem.bn.mean_sum"].__setitem__(0, np.nan), "NaN"),
        (lambda o: o.bn_tensors[0].pop("stem.bn.mean_sum"), "missing"),
        (lambda o: o.bn_batches.update({0: 10**9}), "batch count"),
        (lambda o: o.bn_batches.update({7: 1}), "exist"),
        (lambda o: setattr(o.results[0], "correct", o.results[0].count + 1), "counts"),
    ],
)
def test_hostile_evaluations_are_refused_whole(
    change: object, reason: str, setup: tuple[GlobalState, list[Dataset]], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a valid outcome from device a, then one thing wrong with it.
    state, devices = setup
    cfg = RunConfig(gammas=list(GAMMAS), bn="federated", evaluation="federated", policy="static")
    strategy = get_strategy("nefl-wd")
    engine = RoundEngine(strategy, cfg, state.config, strategy.plan(state.config, GAMMAS))
    grid = InProcessGrid({"a": devices[0]}, {"a": 0}, train_torch)
    from nefl_edge.coordinator.grid import EvalRequest

    (outcome,) = grid.evaluate(1, state, [EvalRequest("a", (0,), True, True, 0.25, 32)])
    report = RoundReport(1)
    assert engine._screen_evaluation(1, outcome, report)[1]  # valid as it came
    bad = EvalOutcome(
        outcome.node, "evaluated", dict(outcome.results), {k: dict(v) for k, v in outcome.bn_tensors.items()},
        dict(outcome.bn_batches),
    )  # fmt: skip
    bad.bn_tensors[0]["stem.bn.mean_sum"] = bad.bn_tensors[0]["stem.bn.mean_sum"].copy()
    change(bad)  # type: ignore[operator]

    # Execute
    results, stats = engine._screen_evaluation(1, bad, report)

    # Assert
    assert results == {} and stats == {} and report.rejected == {"eval_invalid": 1}
    assert reason in caplog.text


def test_an_evaluation_may_claim_no_more_samples_than_the_client_declared(
    setup: tuple[GlobalState, list[Dataset]],
) -> None:
    # Prepare: device a declared 10 samples (its hello) and evaluated 25 % of its real ones.
    state, devices = setup
    cfg = RunConfig(gammas=list(GAMMAS), bn="federated", evaluation="federated", policy="static")
    strategy = get_strategy("nefl-wd")
    engine = RoundEngine(strategy, cfg, state.config, strategy.plan(state.config, GAMMAS))
    grid = InProcessGrid({"a": devices[0]}, {"a": 0}, train_torch)
    from nefl_edge.coordinator.grid import EvalRequest

    (outcome,) = grid.evaluate(1, state, [EvalRequest("a", (0,), True, False, 0.25, 32)])
    engine.declared = {"a": 10}
    report = RoundReport(1)

    # Execute
    results, _ = engine._screen_evaluation(1, outcome, report)

    # Assert
    assert outcome.results[0].count > 10 and results == {} and report.rejected == {"eval_invalid": 1}


def test_old_runs_keep_server_reestimation_and_server_mode_needs_coordinator_data(tmp_path: Path) -> None:
    old = RunConfig().model_dump(mode="json")
    del old["bn"]
    assert validate(upgraded(old)).bn == "server" and validate(upgraded({**old, "bn_calibration": 0})).bn == "tracked"
    assert validate({"bn_calibration": 300}).bn == "federated"  # a new run's option does not switch the mode
    assert RunConfig().bn == "federated" and validate({**old, "bn": "tracked"}).bn == "tracked"
    with pytest.raises(ConfigError, match="bn = server"):
        coordinator_data("federated", "server", None, 100, 100)
    with pytest.raises(ConfigError, match="--evaluation federated"):  # a missing --data-dir is no silent switch
        coordinator_data("auto", "tracked", tmp_path / "nothing", 100, 100)
    test, calibration, federated = coordinator_data("federated", "tracked", tmp_path / "nothing", 100, 100)
    assert test is None and calibration is None and federated
    test, calibration, federated = coordinator_data("both", "server", None, 100, 50)
    assert test is not None and len(test) == 100 and calibration is not None and len(calibration) == 50 and federated


def test_the_mqtt_grid_refuses_evaluations_that_claim_what_was_not_asked(artifacts: tuple[Path, Manifest]) -> None:
    # Prepare: a grid on an unconnected link, with one pending evaluate task for dev1 (submodels 0 and 1, stats).
    from nefl_edge.coordinator.mqtt_grid import MqttGrid
    from nefl_edge.core.mqtt import BrokerAddress, MqttLink
    from nefl_edge.core.schemas import BnCount, EvalTask, Evaluation, SubmodelEval
    from nefl_edge.core.wire import Topics, pack_tensors

    folder, manifest = artifacts
    link = MqttLink("test", BrokerAddress("127.0.0.1", 1), "r", clean=True)
    grid = MqttGrid(link, "r", manifest, folder, 60.0, 60.0)
    topic = Topics("r").node("dev1", "update")
    task = EvalTask(
        run="r", node="dev1", task_id="t1", round=3, submodels=[0, 1], weights_sha256=["0" * 64] * 2,
        evaluate=True, bn_stats=True, deadline_s=60,
    )  # fmt: skip
    stats = {"0/stem.bn.mean_sum": np.zeros(5, np.float32), "0/stem.bn.var_sum": np.ones(5, np.float32)}

    def answer(body: bytes = b"", node: str = "dev1", task_id: str = "t1", **fields: object) -> EvalOutcome | None:
        message = Evaluation(run="r", node=node, task_id=task_id, round=3, **fields)  # type: ignore[arg-type]
        return grid._evaluation(3, (topic, message, body), {"dev1": task}, 0.0)

    ok = [SubmodelEval(submodel=0, loss=0.5, correct=3, count=4)]

    # Execute / Assert: forged sender and stale task are dropped and counted; the rest are rejected whole.
    assert answer(node="dev2") is None and answer(task_id="old") is None
    assert grid.rejections() == {"unknown_sender": 1, "stale": 1}
    for fields, body, reason in [
        ({"results": [SubmodelEval(submodel=2, loss=0.1, correct=1, count=1)]}, b"", "wrong_submodels"),
        ({"results": ok + ok}, b"", "wrong_submodels"),
        ({"bn": [BnCount(submodel=0, batches=2)]}, b"not safetensors", "bad_payload"),
        (
            {"bn": [BnCount(submodel=0, batches=2)]},
            pack_tensors({"1/stem.bn.mean_sum": stats["0/stem.bn.mean_sum"]}),
            "bad_names",
        ),
        (
            {"bn": [BnCount(submodel=0, batches=2)]},
            pack_tensors({"\u00b2/stem.bn.mean_sum": stats["0/stem.bn.mean_sum"]}),  # a digit int() refuses
            "bad_names",
        ),
    ]:
        outcome = answer(body, **fields)
        assert outcome is not None and outcome.status == "rejected" and outcome.reason.startswith(reason), fields
    task = task.model_copy(update={"bn_stats": False})
    assert answer(pack_tensors(stats), bn=[BnCount(submodel=0, batches=2)]).reason.startswith("unasked")  # type: ignore[union-attr]
    task = task.model_copy(update={"bn_stats": True})
    good = answer(pack_tensors(stats), results=ok, bn=[BnCount(submodel=0, batches=2)])
    assert good is not None and good.status == "evaluated"
    assert good.results[0].loss_sum == pytest.approx(2.0) and good.bn_batches == {0: 2}
    assert set(good.bn_tensors[0]) == {"stem.bn.mean_sum", "stem.bn.var_sum"}


def test_the_statistics_graph_is_standard_onnx_that_stock_onnxruntime_reads(artifacts: tuple[Path, Manifest]) -> None:
    import onnx

    folder, manifest = artifacts
    for sub in manifest.submodels:
        model = onnx.load(str(folder / sub.files["stats"].name))
        onnx.checker.check_model(model, full_check=True)
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)} and model.ir_version == 8
        assert {n.domain for n in model.graph.node} == {""}
        assert {i.name for i in model.graph.input} >= {"input"} and "labels" not in {i.name for i in model.graph.input}
        assert len(model.graph.output) == 2 * sum(p.name.endswith(".running_mean") for p in sub.params)
