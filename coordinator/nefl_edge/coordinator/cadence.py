"""The loop around the round, and when and where the global model is evaluated: every ``eval_every`` rounds
and after the last one, on a worker thread while the next round runs.

:func:`run_rounds` is the one loop of both ``serve`` (``coordinator.run``) and ``simulate``
(``coordinator.simulate``): the round engine's rounds one after the other over the caller's grid, each
handed to the caller's ``finish`` with whether it is evaluated (``config.evaluates``, the engine's own
cadence, so that ``bn = "federated"`` statistics and federated evaluation come on the same rounds). What a
finished round leads to (records and checkpoints, or a simulation's accuracy rows) is the caller's.

An evaluation step re-estimates every submodel's BatchNorm statistics on the held-out calibration images
(``coordinator.evaluation.calibrate_bn``; skipped without calibration images) and then evaluates every
submodel (``evaluate_all``). Off the last round it works on a copy of the state, so the statistics it
computes never reach the rounds that follow: the rounds train the same weights whether evaluation runs in
the background, inline, or not at all (BatchNorm trains on batch statistics, and screening leaves the
statistics out). The last round's step runs on the final state itself, so that what is checkpointed and
exported carries the re-estimated statistics.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np

    from nefl_edge.coordinator.engine import RoundEngine, RoundReport
    from nefl_edge.coordinator.grid import Grid
    from nefl_edge.core.data import Dataset
    from nefl_edge.core.nested import GlobalState

log = logging.getLogger(__name__)
Finish = Callable[["RoundReport", "GlobalState", bool, bool], None]
"""What the caller does with a finished round: ``finish(report, state, evaluate, last)``."""


def run_rounds(
    engine: RoundEngine,
    grid: Grid,
    state: GlobalState,
    done: int,
    finish: Finish,
    stop: Optional[threading.Event] = None,
) -> GlobalState:
    """Rounds ``done + 1`` to ``cfg.rounds`` of ``engine`` over ``grid``, starting from ``state``; returns the
    state after the last finished round. After each round, ``finish(report, state, evaluate, last)``: whether
    the round is evaluated (``engine.evaluate_at``, by default ``config.evaluates``: the engine ran its
    evaluation step on the same rounds) and whether it is the run's last. A set ``stop`` ends the loop before
    the next round; a round that ``stop`` interrupted is not finished and its state is dropped (the caller's
    last finished state stays the run's). Round 0 (the model before training) is the caller's to evaluate.

    An evaluated round whose ``bn = "federated"`` statistics the next round's tasks carry
    (``RoundEngine.owes``: see ``coordinator.engine``) is finished once the next round has collected them, just
    before that round itself; a serve run therefore checkpoints it then (with the selection state after the
    next round's draw), and a run stopped in between finishes it with the statistics that came."""
    rounds = engine.cfg.rounds
    engine.carry_statistics = True
    waiting: Optional[tuple[RoundReport, GlobalState, bool, bool]] = None  # a round that owes its statistics
    try:
        while done < rounds and not (stop is not None and stop.is_set()):
            r = done + 1
            after, report = engine.run_round(r, state, grid, stop)
            if waiting is not None:  # round r brought its statistics (all that came)
                finish(*waiting)
                waiting = None
            if stop is not None and stop.is_set():
                break
            state, done = after, r
            if engine.owes(r):
                waiting = (report, state, True, r == rounds)
            else:
                finish(report, state, engine.evaluate_at(r), r == rounds)
        if waiting is not None:
            finish(*waiting)
    finally:
        engine.carry_statistics = False
        engine.owed = None
    return state


def evaluation_step(
    state: GlobalState, test: Dataset, calibration: Optional[np.ndarray], device: str = "cpu"
) -> list[tuple[float, float]]:
    """Re-estimate the BatchNorm statistics of every submodel of ``state`` in place when ``calibration``
    holds images (``bn = "server"``: ``evaluation.recalibrate``), then return every submodel's test accuracy
    and loss (computed on the torch ``device``)."""
    from nefl_edge.coordinator.evaluation import evaluate_all, recalibrate

    recalibrate(state, calibration)
    return evaluate_all(state, test, device)


def evaluated_model(state: GlobalState, evaluate: bool, last: bool) -> GlobalState:
    """The model a finished round hands to its evaluation job: the state itself for the last round (its
    re-estimated statistics are the run's result) or a round not evaluated, otherwise a copy (the statistics
    an evaluation computes never reach the rounds that follow)."""
    return state if last or not evaluate else state.copy()


class Evaluator:
    """Runs jobs one at a time in the order they were submitted: on one worker thread (``background``) or
    inline. At most ``max_pending`` jobs wait or run at once; :meth:`submit` waits for the oldest beyond that
    (each job holds a copy of the model). A job's exception is raised by the next :meth:`submit` or
    :meth:`wait`."""

    def __init__(self, background: bool = True, max_pending: int = 4) -> None:
        self.background = background
        self.max_pending = max_pending
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nefl-eval") if background else None
        )
        self._jobs: deque[Future[None]] = deque()

    def submit(self, job: Callable[[], None]) -> None:
        self._reap(block=False)
        if self._pool is None:
            job()
            return
        while len(self._jobs) >= self.max_pending:
            self._jobs.popleft().result()
        self._jobs.append(self._pool.submit(job))

    def wait(self) -> None:
        """Until every submitted job has finished; raise the first error of one."""
        self._reap(block=True)

    def close(self) -> None:
        """Wait for the jobs (errors are logged, not raised) and stop the worker."""
        try:
            self.wait()
        except Exception:
            log.exception("an evaluation job failed")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _reap(self, block: bool) -> None:
        while self._jobs and (block or self._jobs[0].done()):
            self._jobs.popleft().result()
