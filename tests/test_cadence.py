"""Evaluation cadence: which rounds are evaluated, jobs in order off the main thread, and evaluation in the
background giving the same results as evaluation inline."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nefl_edge.coordinator.cadence import Evaluator
from nefl_edge.coordinator.config import RunConfig, eval_every, evaluates


@pytest.mark.parametrize(
    ("rounds", "every", "expected"),
    [(10, 3, [0, 3, 6, 9, 10]), (4, 1, [0, 1, 2, 3, 4]), (100, 0, [0, *range(5, 101, 5)]), (7, 0, list(range(8)))],
)
def test_rounds_evaluated_every_k_and_at_the_last(rounds: int, every: int, expected: list[int]) -> None:
    cfg = RunConfig(rounds=rounds, eval_every=every)

    evaluated = [r for r in range(rounds + 1) if evaluates(cfg, r)]

    assert evaluated == expected
    assert eval_every(cfg) == (every or max(1, rounds // 20))


def test_background_jobs_run_in_order_off_the_calling_thread() -> None:
    evaluator = Evaluator(background=True, max_pending=2)
    done: list[int] = []
    threads: set[str] = set()

    def job(i: int) -> None:
        threads.add(threading.current_thread().name)
        done.append(i)

    for i in range(10):
        evaluator.submit(lambda i=i: job(i))
    evaluator.close()

    assert done == list(range(10))
    assert threading.current_thread().name not in threads


def test_a_failed_job_is_raised_by_the_next_wait() -> None:
    evaluator = Evaluator(background=True)

    def fail() -> None:
        raise ValueError("evaluation broke")

    evaluator.submit(fail)

    with pytest.raises(ValueError, match="evaluation broke"):
        evaluator.wait()
    evaluator.close()


def test_background_evaluation_gives_the_results_of_inline_evaluation() -> None:
    from nefl_edge.coordinator.evaluation import held_out
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.simulate import simulate
    from nefl_edge.core.data import load_dataset
    from nefl_edge.core.schemas import TrainConfig

    train_data = load_dataset(None, "train")
    keep = np.random.default_rng(0).permutation(len(train_data))[:600]
    train_data.x, train_data.y = train_data.x[keep], train_data.y[keep]
    shards = split_dataset(train_data, make_partitioner("iid", 3, 0.5, 0).split(train_data.y))
    test, calibration = held_out(load_dataset(None, "test"), 300, 200)
    train = TrainConfig(batch_size=50, max_steps=2)
    results = []
    for background in (True, False):
        cfg = RunConfig(
            method="nefl-wd", gammas=[0.4, 1.0], rounds=3, eval_every=2, eval_background=background,
            bn="server", policy="static", cover_submodels=False, train=train,
        )  # fmt: skip
        results.append(simulate(cfg, shards, [0, 1, 1], test, calibration))

    off_path, inline = results
    assert off_path.rounds == inline.rounds == [0, 2, 3]
    assert off_path.accuracy == inline.accuracy
    assert off_path.state is not None and inline.state is not None
    for name, value in inline.state.flat().items():
        np.testing.assert_array_equal(off_path.state.flat()[name], value, err_msg=name)
