"""``bn = federated`` statistics carried by the next round's tasks (issue 24): an evaluated round other than the
last sends no statistics round trip of its own; round r+1's training tasks ask each device for the statistics of
the weights they ship (state r's), and round r is finished with them once round r+1 has collected. In process
(``simulate``'s grid) against PyTorch's re-estimation written here; over a real Mosquitto with real devices.
The binding of such statistics to their task is tested in ``tests/test_stats_scale.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.cadence import run_rounds
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.grid import InProcessGrid
from nefl_edge.coordinator.models import build_submodel, initial_consistent
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.coordinator.strategies import get_strategy, train_torch
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nested import GlobalState, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import get_model_config
from tests.helpers import Broker, make_shards, serve_until_done

GAMMAS = (0.2, 0.6, 1.0)


def reestimated(state: GlobalState, k: int, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """PyTorch's own re-estimation of submodel ``k``'s running statistics over ``x`` in batches of ``batch``
    (``momentum=None``: the plain average over batches of the batch means and unbiased variances)."""
    import torch

    net = build_submodel(state.copy(), k)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            net(torch.from_numpy(x[lo : lo + batch]))
    return {n: v.numpy() for n, v in net.state_dict().items() if "running_" in n}


@pytest.mark.slow  # 264 s at load 14 on 2 cores (PyTorch training and re-estimation of three submodels)
def test_in_process_the_statistics_of_round_r_come_from_round_r_plus_1_and_round_r_waits_for_them() -> None:
    # Prepare: three clients of 64, 96 and 64 real images (multiples of the batch of 32), one of each tier; every
    # client selected every round; bn federated, evaluation on the coordinator's side, every round.
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    state = init_global_state(config, plan.specs, initial_consistent(config, 7), 7)
    train = load_dataset(None, "train")
    sizes = {"a": 64, "b": 96, "c": 64}
    shards, lo = {}, 0
    for node, n in sizes.items():
        shards[node], lo = Dataset(train.x[lo : lo + n], train.y[lo : lo + n], node), lo + n
    tiers = {"a": 0, "b": 1, "c": 2}
    cfg = RunConfig(
        gammas=list(GAMMAS), bn="federated", evaluation="test", policy="static", rounds=2, eval_every=1,
        fraction=1.0, min_clients=3, train=TrainConfig(lr=0.05, max_steps=2),
    )  # fmt: skip
    engine = RoundEngine(strategy, cfg, config, plan)
    grid = InProcessGrid(shards, tiers, train_torch)
    finished: list[tuple[RoundReport, GlobalState, bool, bool]] = []

    def finish(report: RoundReport, at: GlobalState, evaluate: bool, last: bool) -> None:
        finished.append((report, at.copy(), evaluate, last))

    # Execute
    run_rounds(engine, grid, state, 0, finish)

    # Assert: rounds finished in order; 1 with carried statistics, 2 (the last) with its own round trip.
    assert [(f[0].round, f[2], f[3]) for f in finished] == [(1, True, False), (2, True, True)]
    for report, _, _, last in finished:
        phase = "bn_statistics" if last else "bn_statistics_carried"
        assert phase in report.phases, f"round {report.round}: phases {report.phases}"
        assert report.bn_batches == {0: 2, 1: 3, 2: 2}, f"round {report.round}: batches {report.bn_batches}"
    # Each finished state's statistics are PyTorch's re-estimation of that state's own weights over the
    # training data of the client that trains the submodel in the next round (here the same clients).
    assignment = {c["submodel"]: c["node"] for c in finished[1][0].clients}
    assert assignment == {0: "a", 1: "b", 2: "c"}, assignment
    for report, at, _, _ in finished:
        for k, node in assignment.items():
            want = reestimated(at, k, shards[node].x, 32)
            own = at.inconsistent[k]
            for name, value in want.items():
                np.testing.assert_allclose(
                    own[name], value, rtol=1e-4, atol=1e-5, err_msg=f"round {report.round}, submodel {k}: {name}"
                )
    before = finished[0][1].inconsistent[2]["stem.bn.running_mean"]
    after = finished[1][1].inconsistent[2]["stem.bn.running_mean"]
    assert not np.allclose(before, after), "round 2 kept round 1's statistics: nothing was re-estimated"


@pytest.mark.integration
@pytest.mark.slow
def test_serve_carries_the_statistics_in_the_next_rounds_tasks_with_real_devices(
    broker: Broker, tmp_path: Path
) -> None:
    # Prepare: three real devices of tiers 0, 1, 2; bn federated, the coordinator's own test samples.
    shards = make_shards(tmp_path, [320, 320, 320])
    options = (
        "--bn", "federated", "--evaluation", "test", "--eval-samples", "200",
        "--policy", "static", "--gammas", "0.2,0.6,1.0", "--rounds", "3", "--eval-every", "1",
        "--min-clients", "3", "--max-steps", "4", "--lr", "0.05", "--deadline-s", "120", "--wait-clients-s", "90",
    )  # fmt: skip

    # Execute
    serve_until_done(broker.address, tmp_path, shards, *options, timeout=420)

    # Assert: rounds 1 and 2 got their statistics from the next round's tasks (no round trip of their own),
    # round 3 from its own; every submodel re-estimated each round; every update taken, nothing refused.
    run_dir = next((tmp_path / "runs").glob("default-*"))
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] > 0]
    assert sorted({(r["round"], r["submodel"]) for r in rows}) == [(r, k) for r in (1, 2, 3) for k in range(3)]
    for row in rows:
        carried = row["round"] < 3
        assert ("bn_statistics_carried" in row["phases"]) == carried, (row["round"], row["phases"])
        assert ("bn_statistics" in row["phases"]) == (not carried), (row["round"], row["phases"])
        assert row["bn_batches"] == {"0": 10, "1": 10, "2": 10}, (row["round"], row["bn_batches"])
        assert row["updates"] == 3 and not row["rejected"], (row["round"], row["updates"], row["rejected"])
        assert 0.0 <= row["accuracy"] <= 1.0
    for i in range(3):
        log = (tmp_path / f"dev{i}.log").read_text()
        assert log.count("sent the statistics of the received weights") == 2, f"dev{i}: {log[-2000:]}"
