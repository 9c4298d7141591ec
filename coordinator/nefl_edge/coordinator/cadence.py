"""When and where the global model is evaluated: every ``eval_every`` rounds and after the last one, on a
worker thread while the next round runs.

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
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np

    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.core.data import Dataset
    from nefl_edge.core.nested import GlobalState

log = logging.getLogger(__name__)
EVALUATIONS_PER_RUN = 20
"""With ``eval_every = 0`` a run is evaluated about this many times (and after its last round)."""


def eval_every(cfg: RunConfig) -> int:
    """The evaluation period in rounds: ``cfg.eval_every``, or for 0 ``max(1, rounds // 20)``."""
    return cfg.eval_every or max(1, cfg.rounds // EVALUATIONS_PER_RUN)


def evaluates(cfg: RunConfig, round_: int) -> bool:
    """Whether round ``round_`` is evaluated: round 0 (before training), every ``eval_every(cfg)`` rounds,
    and the last round."""
    return round_ % eval_every(cfg) == 0 or round_ >= cfg.rounds


def evaluation_step(state: GlobalState, test: Dataset, calibration: Optional[np.ndarray]) -> list[tuple[float, float]]:
    """Re-estimate the BatchNorm statistics of every submodel of ``state`` in place (when ``calibration``
    holds images), then return every submodel's test accuracy and loss."""
    from nefl_edge.coordinator.evaluation import calibrate_bn, evaluate_all

    if calibration is not None and len(calibration):
        for k in range(len(state.specs)):
            calibrate_bn(state, k, calibration)
    return evaluate_all(state, test)


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
