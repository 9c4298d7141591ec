"""``simulate`` on the loop of ``serve`` (``cadence.run_rounds``): ``eval_every`` means the same rounds for the
loop and for the engine's evaluation step, ``fedavg-full`` trains every simulated device by default, and
PyTorch's threads are pinned for the run. (The worker pool's training and evaluation step against serial:
``tests/test_paper.py::test_parallel_workers_give_the_serial_result``.)"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nefl_edge.coordinator.cadence import run_rounds
from nefl_edge.coordinator.config import RunConfig, evaluates
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.grid import EvalOutcome, EvalRequest, InProcessGrid, wait_policy
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.simulate import client_names, fleet_config, pinned_threads, simulate
from nefl_edge.coordinator.strategies import get_strategy
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.nested import GlobalState, init_global_state
from nefl_edge.core.schemas import TrainConfig

SMALL = TrainConfig(batch_size=16, max_steps=2)


@pytest.fixture(scope="module")
def tiny(fmnist_dir: Path) -> tuple[list[Dataset], Dataset]:
    data = load_dataset(fmnist_dir, "train")
    shards = [Dataset(data.x[i * 40 : (i + 1) * 40], data.y[i * 40 : (i + 1) * 40], f"s{i}") for i in range(4)]
    return shards, Dataset(data.x[-100:], data.y[-100:], "test")


class CountingGrid(InProcessGrid):
    """The in-process grid, noting the rounds whose evaluation step reached the clients."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.evaluated: list[int] = []

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        self.evaluated.append(round_)
        return super().evaluate(round_, state, requests)


@pytest.mark.parametrize(("rounds", "every"), [(3, 0), (4, 3)])
def test_the_loop_and_the_engine_evaluate_the_same_rounds(
    rounds: int, every: int, tiny: tuple[list[Dataset], Dataset]
) -> None:
    # eval_every = 0 has one meaning (config.eval_every: every max(1, rounds // 20) rounds), for the rounds
    # the loop hands over as evaluated and for the engine's federated statistics pass alike.
    shards, _ = tiny
    cfg = RunConfig(gammas=[0.4, 1.0], rounds=rounds, eval_every=every, policy="static", bn="federated", train=SMALL)
    strategy = get_strategy(cfg.method)
    config, plan = strategy.setup(cfg.network(), tuple(cfg.gammas))
    state = init_global_state(config, plan.specs, initial_consistent(config, 0), 0)
    names = client_names(len(shards))
    trainer = strategy.local_train
    grid = CountingGrid(dict(zip(names, shards)), dict(zip(names, [0, 1, 0, 1])), trainer)
    finished: list[tuple[int, bool, bool]] = []

    def finish(report: RoundReport, state: GlobalState, evaluate: bool, last: bool) -> None:
        finished.append((report.round, evaluate, last))

    with pinned_threads(1, 1):  # PyTorch's default threads spin on a loaded host
        run_rounds(RoundEngine(strategy, cfg, config, plan), grid, state, 0, finish)

    expected = [r for r in range(1, rounds + 1) if evaluates(cfg, r)]
    assert [r for r, evaluate, _ in finished if evaluate] == expected, finished
    assert grid.evaluated == expected, f"statistics pass in rounds {grid.evaluated}, evaluated {expected}"
    assert [last for *_, last in finished] == [r == rounds for r in range(1, rounds + 1)]


def test_simulate_evaluates_the_rounds_serve_evaluates(tiny: tuple[list[Dataset], Dataset]) -> None:
    shards, test = tiny
    cfg = RunConfig(gammas=[0.4, 1.0], rounds=3, eval_every=0, policy="static", bn="tracked", train=SMALL)

    result = simulate(cfg, shards, [0, 1, 0, 1], test, threads=1)

    assert result.rounds == [r for r in range(4) if evaluates(cfg, r)] == [0, 1, 2, 3], result.rounds


def test_fedavg_full_trains_every_simulated_device_unless_gammas_are_given(
    tiny: tuple[list[Dataset], Dataset],
) -> None:
    shards, test = tiny
    options = {"method": "fedavg-full", "rounds": 1, "fraction": 1.0, "bn": "tracked", "train.max_steps": 1}

    cfg = fleet_config(options)
    given = fleet_config({**options, "gammas": "0.2,1.0"})
    result = simulate(cfg, shards, [i % len(cfg.gammas) for i in range(4)], test, threads=1)

    assert cfg.gammas == [1.0] and given.gammas == [0.2, 1.0]
    assert cfg.policy == given.policy == "static" and cfg.min_clients == 1
    assert result.updates == [4], f"fedavg-full trained {result.updates} of 4 devices"
    assert fleet_config({"method": "nefl-wd"}).gammas == RunConfig().gammas


def test_simulate_pins_pytorch_threads_and_passive_openmp_for_the_run(
    tiny: tuple[list[Dataset], Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, test = tiny
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads = torch.get_num_threads()
    wanted = 2 if threads == 1 else 1
    seen: list[tuple[int, str | None]] = []
    cfg = RunConfig(gammas=[1.0], rounds=1, policy="static", bn="tracked", eval_background=False, train=SMALL)

    simulate(cfg, shards[:2], [0, 0], test, threads=wanted, on_round=lambda r, a: seen.append(
        (torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"))
    ))  # fmt: skip

    assert seen == [(wanted, "PASSIVE")], f"during the run: {seen}"
    assert torch.get_num_threads() == threads, "the caller's thread count was not restored"
    assert "OMP_WAIT_POLICY" not in os.environ, "the wait policy outlived the run"


def test_workers_carry_the_statistics_to_the_serial_state(
    tiny: tuple[list[Dataset], Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    # bn = federated with evaluation on the coordinator's side: rounds 2 and 3 carry the statistics of rounds
    # 1 and 2 (ParallelGrid.run_carrying submits them with the trainings); the last round keeps its own trip.
    from nefl_edge.coordinator import simulate as simulate_module

    shards, test = tiny
    cfg = RunConfig(gammas=[0.4, 1.0], rounds=3, eval_every=1, policy="static", bn="federated", train=SMALL)
    carried: list[int] = []
    run_carrying = simulate_module.ParallelGrid.run_carrying

    def counted(self: simulate_module.ParallelGrid, round_: int, *args: object) -> Iterator[object]:
        carried.append(round_)
        return run_carrying(self, round_, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(simulate_module.ParallelGrid, "run_carrying", counted)
    serial = simulate(cfg, shards, [0, 1, 0, 1], test, threads=1)  # as each worker
    parallel = simulate(cfg, shards, [0, 1, 0, 1], test, workers=2, threads=1)

    assert carried == [2, 3], f"rounds whose tasks carried the statistics in the pool: {carried}"
    assert serial.state is not None and parallel.state is not None
    for name, value in serial.state.flat().items():
        assert np.array_equal(parallel.state.flat()[name], value), f"{name} differs from the serial run"
    assert parallel.accuracy == serial.accuracy, f"accuracy {parallel.accuracy} != serial {serial.accuracy}"


def test_serial_simulate_evaluates_inline_and_workers_in_the_background(
    tiny: tuple[list[Dataset], Dataset],
) -> None:
    # The process that trains takes the cores: its evaluation waits for the round (no thread beside it).
    shards, test = tiny
    cfg = RunConfig(gammas=[1.0], rounds=1, policy="static", bn="tracked", eval_background=True, train=SMALL)
    threads: dict[str, str] = {}

    for mode, workers in (("serial", 1), ("workers", 2)):
        simulate(cfg, shards[:2], [0, 0], test, threads=1, workers=workers, on_round=lambda r, a, mode=mode: (
            threads.setdefault(mode, threading.current_thread().name)
        ))  # fmt: skip

    assert threads["serial"] == threading.main_thread().name, f"serial evaluated on {threads['serial']}"
    assert threads["workers"] != threading.main_thread().name, "--workers evaluated on the main thread"


def test_wait_policy_spins_only_where_one_process_has_the_cores() -> None:
    assert wait_policy(1) == "ACTIVE"
    assert [wait_policy(2), wait_policy(1, "ray"), wait_policy(1, "local", "ort")] == ["PASSIVE"] * 3
