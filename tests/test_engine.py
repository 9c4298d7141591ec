"""The round engine: the same method and seed give the same global state through `simulate` (in-process) and
through `serve` with real devices on a real broker; and the engine's rules (selection, assignment with
coverage, the deadline projection's margin, screening, quarantine, resume overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.assignment import DEADLINE_MARGIN, ClientInfo, assign, capacity, projected_seconds
from nefl_edge.coordinator.config import FIXED_ON_RESUME, METHODS, ConfigError, RunConfig, resume_config
from nefl_edge.coordinator.evaluation import held_out
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.screening import Quarantine, UpdateRejected, screen
from nefl_edge.coordinator.simulate import client_names, simulate
from nefl_edge.coordinator.strategies import STRATEGIES, get_strategy
from nefl_edge.core.data import load_dataset, load_npz
from nefl_edge.core.nested import GlobalState, init_global_state
from nefl_edge.core.schemas import DeviceProfile, TrainConfig
from nefl_edge.core.specs import get_model_config, mflops
from nefl_edge.export.artifacts import export_set
from tests.helpers import Broker, make_shards, spawn_coordinator, spawn_edge, stop

GAMMAS = (0.2, 0.6, 1.0)
PROFILE = dict(arch="x", system="y", python="3", cores=1, memory_mb=1, onnxruntime="1", backend="portable")


@pytest.mark.integration
@pytest.mark.parametrize(("method", "bn"), [("nefl-wd", "federated"), ("heterofl", "server"), ("fedrolex", "server")])
def test_simulate_and_serve_give_the_same_global_state(method: str, bn: str, broker: Broker, tmp_path: Path) -> None:
    # Prepare: three shards, device i of tier i, one round of every client, the same seed on both paths;
    # BatchNorm statistics from the devices (federated) or re-estimated on the coordinator (server).
    shards = make_shards(tmp_path, [96, 128, 160])
    names = client_names(3)
    cfg = RunConfig(
        method=method, gammas=list(GAMMAS), rounds=1, seed=7, policy="static", min_clients=3,
        eval_samples=200, bn=bn, bn_calibration=100, train=TrainConfig(lr=0.05, batch_size=32),
    )  # fmt: skip
    strategy = get_strategy(method)
    config = strategy.configure(get_model_config("resnet-small", "fmnist"))
    plan = strategy.plan(config, GAMMAS)
    artifacts = tmp_path / "sim-artifacts"
    export_set(config, plan.specs, artifacts)
    test, calibration = held_out(load_dataset(None, "test"), cfg.eval_samples, cfg.bn_calibration)

    # Execute: in process, through the device's own ONNX Runtime trainer...
    simulated = simulate(
        cfg, [load_npz(s) for s in shards], [0, 1, 2], test, calibration, trainer="ort", artifacts=artifacts
    )
    # ... and over MQTT with three real device processes.
    coord = spawn_coordinator(
        broker.address, tmp_path, "--method", method, "--gammas", "0.2,0.6,1.0", "--rounds", "1", "--seed", "7",
        "--policy", "static", "--min-clients", "3", "--eval-samples", "200", "--bn", bn,
        "--bn-calibration", "100", "--lr", "0.05", "--batch-size", "32", "--deadline-s", "120",
    )  # fmt: skip
    edges = [spawn_edge(broker.address, s, n, tmp_path, tier=i) for i, (s, n) in enumerate(zip(shards, names))]
    try:
        assert coord.wait(300) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)

    # Assert: every tensor of the global state agrees.
    from safetensors.numpy import load_file

    run_dir = next((tmp_path / "runs").glob("default-*"))
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    served = GlobalState.from_flat(config, plan.specs, load_file(str(run_dir / meta["state"])))
    assert meta["round"] == 1
    assert simulated.state is not None and simulated.updates == [3]
    flat_sim, flat_served = simulated.state.flat(), served.flat()
    assert flat_sim.keys() == flat_served.keys()
    worst = max(float(np.abs(flat_sim[k] - flat_served[k]).max()) for k in flat_sim)
    initial = init_global_state(config, plan.specs, initial_consistent(config, 7), 7).flat()
    moved = max(float(np.abs(flat_sim[k] - initial[k]).max()) for k in flat_sim)
    assert worst < 1e-5, worst
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert sorted((c["node"], c["submodel"], c["status"]) for c in clients) == [
        (names[i], plan.tier_submodel[i], "updated") for i in range(3)
    ]
    assert moved > 1e-3  # the round trained something


def test_the_strategy_list_and_the_config_agree() -> None:
    assert tuple(STRATEGIES) == METHODS


def test_selection_takes_ceil_of_the_fraction_and_at_least_the_minimum() -> None:
    strategy, rng = get_strategy("nefl-wd"), np.random.default_rng(0)
    pool = client_names(10)

    assert len(strategy.select(rng, pool, 0.25, 1)) == 3
    assert len(strategy.select(rng, pool, 0.1, 4)) == 4
    assert len(strategy.select(rng, pool[:2], 0.5, 5)) == 2
    assert strategy.select(rng, [], 0.5, 1) == []


def test_coverage_gives_every_submodel_a_client_when_all_devices_are_fast() -> None:
    strategy = get_strategy("nefl-wd")
    plan = strategy.plan(strategy.configure(get_model_config("resnet-small")), (0.2, 0.4, 0.6, 0.8, 1.0))
    nodes = client_names(7)
    capacities = {n: 4 for n in nodes}

    without = assign(strategy, plan, capacities, nodes, cover=False)
    covered = assign(strategy, plan, capacities, nodes, cover=True)

    assert set(without.values()) == {4}
    assert set(covered.values()) == {0, 1, 2, 3, 4}
    assert sum(1 for k in covered.values() if k == 4) == 3


def test_coverage_moves_the_slowest_devices_down_and_keeps_the_fast_ones_on_large_submodels() -> None:
    strategy = get_strategy("nefl-wd")
    plan = strategy.plan(strategy.configure(get_model_config("resnet-small")), (0.2, 0.6, 1.0))
    capacities = {"slow-a": 1, "slow-b": 1, "fast": 2, "faster": 2}
    speeds = {"slow-a": 10.0, "slow-b": 12.0, "fast": 90.0, "faster": 100.0}

    covered = assign(strategy, plan, capacities, sorted(capacities), cover=True, speeds=speeds)

    assert covered == {"slow-a": 0, "slow-b": 1, "fast": 2, "faster": 2}


def test_coverage_never_gives_a_client_more_than_it_affords() -> None:
    strategy = get_strategy("nefl-wd")
    plan = strategy.plan(strategy.configure(get_model_config("resnet-small")), (0.2, 0.6, 1.0))
    capacities = {"a": 0, "b": 0, "c": 1}

    covered = assign(strategy, plan, capacities, ["a", "b", "c"], cover=True)

    assert covered == {"a": 0, "b": 0, "c": 1}


def test_the_deadline_policy_keeps_its_margin_and_never_trusts_device_numbers() -> None:
    config = get_model_config("resnet-small")
    strategy = get_strategy("nefl-wd")
    plan = strategy.plan(config, (0.2, 0.6, 1.0))
    costs = [mflops(config, s) for s in plan.specs]
    train = TrainConfig(batch_size=32)
    samples = 320  # 10 steps of 32
    # Throughput on the probe (submodel 0) at which the full model takes exactly margin * deadline:
    deadline = 100.0
    speed_at_margin = samples * costs[2] / costs[0] / (DEADLINE_MARGIN * deadline)

    def tier(speed: float) -> int:
        profile = DeviceProfile(**PROFILE, samples_per_s=speed, probe_mflops=costs[0])
        return capacity(ClientInfo("d", samples, None, profile), "deadline", plan, config, train, deadline)

    assert tier(speed_at_margin * 1.01) == 2
    assert tier(speed_at_margin * 0.99) < 2
    assert tier(1e-30) == 0
    assert tier(float("inf")) == 0
    profile = DeviceProfile(**PROFILE, samples_per_s=0.0, probe_mflops=0.0)
    assert projected_seconds(profile, costs[0], samples, train) == float("inf")


def test_screening_rejects_forged_sample_counts_huge_weights_and_wrong_shapes() -> None:
    shapes = {"w": (2, 2), "bn.running_var": (2,)}
    reference = {"w": np.ones((2, 2), np.float32), "bn.running_var": np.ones(2, np.float32)}
    fine = {"w": np.full((2, 2), 1.5, np.float32), "bn.running_var": np.full(2, 50.0, np.float32)}

    screen(fine, shapes, reference, 10, 10, norm_bound=10.0)
    with pytest.raises(UpdateRejected, match="bad_samples"):
        screen(fine, shapes, reference, 10_000_000, 10, norm_bound=10.0)
    with pytest.raises(UpdateRejected, match="norm_bound"):
        screen({**fine, "w": np.full((2, 2), 1e6, np.float32)}, shapes, reference, 10, 10, norm_bound=10.0)
    with pytest.raises(UpdateRejected, match="bad_shape"):
        screen({**fine, "w": np.ones((3, 2), np.float32)}, shapes, reference, 10, 10, norm_bound=10.0)
    with pytest.raises(UpdateRejected, match="not_finite"):
        screen({**fine, "w": np.full((2, 2), np.nan, np.float32)}, shapes, reference, 10, 10, norm_bound=10.0)


def test_three_rejections_in_a_row_quarantine_a_client_for_a_while() -> None:
    q = Quarantine(strikes=3, rounds=2)

    for r in (1, 2, 3):
        q.record("bad", True, r)
    q.record("good", True, 3)

    assert q.active(4) == ["bad"] and q.active(5) == ["bad"] and q.active(6) == []
    assert not q.blocked("good", 4)


def test_resume_applies_run_settings_and_refuses_to_change_the_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(RunConfig(rounds=3).model_dump_json())

    assert resume_config(tmp_path, {"rounds": 9, "deadline_s": 30.0}).rounds == 9
    assert resume_config(tmp_path, {"train.lr": 0.01}).train.lr == 0.01
    assert resume_config(tmp_path, {"method": "nefl-wd"}).method == "nefl-wd"
    for key, value in {"method": "heterofl", "gammas": "0.5,1.0", "seed": 3, "model": "resnet18"}.items():
        with pytest.raises(ConfigError, match="cannot change on --resume"):
            resume_config(tmp_path, {key: value})
    assert set(RunConfig.model_fields) >= FIXED_ON_RESUME
    with pytest.raises(ConfigError, match=r"config\.json is missing"):
        resume_config(tmp_path / "nothing", {})


def test_random_coverage_rotates_devices_over_submodels_within_their_capacity() -> None:
    strategy = get_strategy("nefl-wd")
    plan = strategy.plan(strategy.configure(get_model_config("resnet-small")), (0.2, 0.6, 1.0))
    capacities = {"slow-a": 1, "slow-b": 1, "fast-a": 2, "fast-b": 2}
    rng = np.random.default_rng(0)

    rounds = [assign(strategy, plan, capacities, sorted(capacities), cover=True, rng=rng) for _ in range(40)]

    assert all(set(a.values()) == {0, 1, 2} for a in rounds)
    assert all(a[n] <= capacities[n] for a in rounds for n in a)
    assert {a["fast-a"] for a in rounds} == {0, 2}  # a fast device also trains the smallest submodel
    assert {a["slow-a"] for a in rounds} == {0, 1}
