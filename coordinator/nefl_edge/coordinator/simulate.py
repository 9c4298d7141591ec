"""In-process federated simulation (no broker): the round engine of ``serve`` over an in-process grid, with
local training in PyTorch (or, with ``trainer="ort"``, through the exported ONNX Runtime artifacts, the
device's own code path)."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np

from nefl_edge.coordinator.cadence import Evaluator, evaluated_model, evaluation_step, run_rounds
from nefl_edge.coordinator.config import ConfigError, RunConfig, load_config
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.grid import (
    EvalOutcome,
    EvalRequest,
    InProcessGrid,
    Instruction,
    Outcome,
    carried_requests,
    client_state,
    evaluate_one,
)
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.strategies import Extract, LocalTrainer, TorchOptions, get_strategy
from nefl_edge.core.data import Dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig

if TYPE_CHECKING:
    from nefl_edge.coordinator.ray_grid import RayOptions

TrainerKind = Literal["torch", "ort"]


@dataclass
class SimResult:
    """What a simulated run gives: per evaluated round the accuracy of every submodel, the final state."""

    method: str
    gammas: list[float]
    tier_submodel: list[Optional[int]]
    submodel_gammas: list[float]
    accuracy: list[list[float]]  # per evaluated round (index 0: before training), per submodel
    rounds: list[int]
    seconds: float
    updates: list[int] = field(default_factory=list)
    state: Optional[GlobalState] = field(default=None, repr=False)

    def tier_accuracy(self, at: int = -1) -> list[Optional[float]]:
        """Accuracy of the model each device tier runs (None: the tier gets no model)."""
        row = self.accuracy[at]
        return [None if k is None else row[k] for k in self.tier_submodel]


def ort_trainer(folder: Path) -> LocalTrainer:
    """Local training through exported artifacts with the edge client's own trainer (``train_local``)."""
    from nefl_edge.core.artifacts import load_manifest, submodel_paths
    from nefl_edge.edge_client.trainer import (
        BACKEND_FILES,
        DISTILL_FILES,
        SMALLEST_PREFIX,
        TrainerBackend,
        choose_backend,
        create_backend,
        distill_student,
        train_local,
    )

    manifest = load_manifest(folder)
    kind = choose_backend("auto")
    backends: dict[int, TrainerBackend] = {}  # one ONNX Runtime session per submodel; load() resets it fully

    def train(state: GlobalState, index: int, data: Dataset, cfg: TrainConfig) -> Tensors:
        sub = manifest.submodels[index]
        student = distill_student(manifest, sub)  # nefl-wd-distill: also the smallest submodel's own tensors
        if index not in backends:
            roles = (BACKEND_FILES if student is None else DISTILL_FILES)[kind]
            backends[index] = create_backend(
                kind, submodel_paths(folder, sub, roles), sub.params, cfg, 1, student=student
            )
        backend = backends[index]
        sent = extract(state, index)
        if student is not None:
            own = (p.name for p in student if p.kind != "consistent")
            sent.update({SMALLEST_PREFIX + n: state.inconsistent[0][n] for n in own})
        backend.load(sent, cfg)
        train_local(backend, data, cfg)
        return backend.tensors()

    return train


def torch_device(requested: str) -> str:
    """The torch device for ``auto`` (cuda when available), ``cpu`` or ``cuda`` (refused without a GPU)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda: this torch build sees no CUDA GPU (install the torch build for your CUDA version, "
            "see the README) or use --device cpu"
        )
    return requested


def _worker_init(threads: int) -> None:
    pin_torch_threads(threads)


def _train_task(
    method: str, opts: TorchOptions, state: GlobalState, index: int, data: Dataset, train: TrainConfig
) -> tuple[Tensors, float]:
    start = time.perf_counter()
    tensors = get_strategy(method).local_train(state, index, data, train, opts)
    return tensors, time.perf_counter() - start


_Job = tuple[Instruction, Tensors, int, "Future[tuple[Tensors, float]]"]
"""A training submitted to the pool: its instruction, the weights sent, its training samples, the result."""


class ParallelGrid(InProcessGrid):
    """The in-process grid with a round's clients trained at once in ``workers`` processes (PyTorch on the
    CPU, ``threads`` torch threads each), and the evaluation step (``bn = "federated"`` statistics, federated
    evaluation) spread over the same processes, one request per client. Outcomes are yielded in instruction
    (request) order, so the aggregate and the combined statistics are the serial grid's: every client's
    training depends only on its state, data and seed, and its statistics only on the aggregated state and
    its data."""

    def __init__(
        self,
        shards: dict[str, Dataset],
        tiers: dict[str, int],
        method: str,
        opts: TorchOptions,
        workers: int,
        threads: Optional[int] = None,
    ) -> None:
        super().__init__(shards, tiers, functools.partial(get_strategy(method).local_train, opts=opts))
        self.task = functools.partial(_train_task, method, opts)
        threads = threads or default_threads(workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
        self.pool = ProcessPoolExecutor(workers, context, initializer=_worker_init, initargs=(threads,))

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """The round's clients trained at once in the pool, on what ``extract`` sends each (``client_state``)."""
        yield from self._outcomes(self._submit(state, instructions, extract))

    def run_carrying(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Extract,
        bn_max_batches: Optional[int],
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """``InProcessGrid.run_carrying`` with the statistics requests and the trainings submitted to the pool
        together (no worker waits for the last statistics before training starts); the same outcomes in the
        same order."""
        asks = carried_requests(instructions, bn_max_batches)
        statistics = [self.pool.submit(evaluate_one, round_ - 1, state, self.shards[a.node], a) for a in asks]
        jobs = self._submit(state, instructions, extract)
        for job in statistics:
            yield job.result()
        yield from self._outcomes(jobs)

    def _submit(self, state: GlobalState, instructions: list[Instruction], extract: Extract) -> list[_Job]:
        jobs = []
        for ins in instructions:
            data = self._split(ins.node, ins.train.eval_fraction)[0]
            sent = extract(state, ins.submodel)
            local = client_state(state, ins.submodel, sent)
            jobs.append((ins, sent, len(data), self.pool.submit(self.task, local, ins.submodel, data, ins.train)))
        return jobs

    def _outcomes(self, jobs: list[_Job]) -> Iterator[Outcome]:
        for ins, sent, samples, job in jobs:
            tensors, seconds = job.result()
            yield Outcome(
                ins.node, ins.submodel, "updated", samples, self.as_received(sent, ins, tensors), seconds=seconds
            )

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        """The clients' evaluation requests at once in the pool (what ``InProcessGrid.evaluate`` computes for
        each, in request order)."""
        jobs = [self.pool.submit(evaluate_one, round_, state, self.shards[req.node], req) for req in requests]
        for job in jobs:
            yield job.result()

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.shutdown(cancel_futures=True)


def default_threads(workers: int) -> int:
    """PyTorch intra-op threads of each of ``workers`` training processes: this machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // workers)


def pin_torch_threads(threads: int) -> None:
    """Set this process's PyTorch intra-op threads to ``threads`` and its inter-op pool to 1 (possible only
    before its first inter-op work; an eager training step does not use it), as ``bench/device.py`` pins its
    PyTorch contender: never PyTorch's default, which follows the cores and not the load of a shared host."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set or started in this process
        torch.set_num_interop_threads(1)


@contextlib.contextmanager
def pinned_threads(threads: int, workers: int) -> Iterator[None]:
    """For one simulation: PyTorch's OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless the
    caller set a policy) in the worker processes it starts, whose environment is this one's, and this
    process runs ``threads`` intra-op threads (when it trains: ``workers`` = 1); both restored afterwards.
    OpenMP reads the policy once, when torch is imported: ``nefl-coord simulate`` sets this process's own
    before that (``grid.wait_policy``), so the worker processes (1 thread each, or Ray's) get that one."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    before = torch.get_num_threads()
    if workers == 1:
        pin_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def client_names(count: int) -> list[str]:
    """Node ids of simulated clients (zero-padded, so that sorting them keeps their order)."""
    width = max(3, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


def fleet_config(overrides: dict[str, Any]) -> RunConfig:
    """The run configuration of ``nefl-coord simulate`` from its options (``None``: not given): every
    simulated device trains the submodel of its declared tier (``policy = "static"``, ``min_clients = 1``),
    and ``fedavg-full`` without ``gammas`` simulates a fleet where every device affords the full model
    (``gammas = 1.0``; with the default five gammas only one device in five could train it). Given
    ``gammas`` keep their meaning: a tier whose gamma is below 1 gets no model under ``fedavg-full``."""
    given = dict(overrides)
    if given.get("method") == "fedavg-full" and given.get("gammas") is None:
        given["gammas"] = [1.0]
    return load_config(None, {**given, "policy": "static", "min_clients": 1})


def simulate(
    cfg: RunConfig,
    shards: list[Dataset],
    tiers: list[int],
    test: Dataset,
    calibration: Optional[np.ndarray] = None,
    *,
    trainer: TrainerKind = "torch",
    artifacts: Optional[Path] = None,
    on_round: Optional[Callable[[int, list[float]], None]] = None,
    workers: int = 1,
    threads: Optional[int] = None,
    ray: Optional[RayOptions] = None,
) -> SimResult:
    """The run ``cfg`` (method, model, gammas, rounds, local training, selection, BatchNorm, evaluation
    cadence, seed: every rule a ``serve`` run has) through the round engine and the loop of ``serve``
    (``cadence.run_rounds``) over an in-process grid. What only a simulation has: device ``i`` (node
    ``client_names(...)[i]``) holds ``shards[i]`` and declares tier ``tiers[i]`` (affords
    ``cfg.gammas[tiers[i]]``); every submodel is evaluated on ``test`` before training, every
    ``cfg.eval_every`` rounds (``config.evaluates``) and after the last round; with ``bn = "server"``
    the BatchNorm statistics are re-estimated on the ``calibration`` images first (required then, ignored
    otherwise). ``trainer`` ``ort`` trains through the exported ONNX Runtime ``artifacts`` (the device's
    code path). ``workers`` > 1 trains each round's clients, and runs the evaluation step, in that many
    processes (PyTorch trainer on the CPU; the same result as one); ``threads`` are PyTorch's intra-op
    threads of each training process (default: this machine's cores over ``workers``, :func:`pinned_threads`;
    OpenMP's wait policy: ``grid.wait_policy``). The evaluation on ``test`` runs on a background thread
    (``cfg.eval_background``) except where this process trains on the CPU. ``ray`` trains them as Ray tasks instead
    (``coordinator.ray_grid``; the same result too). ``on_round(r, accuracies)`` is called for every
    evaluated round after round 0."""
    start = time.perf_counter()
    strategy = get_strategy(cfg.method)
    gammas = tuple(cfg.gammas)
    if cfg.bn != "server":
        calibration = None
    elif calibration is None or not len(calibration):
        raise ConfigError(
            "bn = server re-estimates BatchNorm statistics on the coordinator's held-out images, and simulate "
            "was given none (calibration); use bn = federated or tracked, or pass calibration images"
        )
    cfg = cfg.with_input_stats([shard.x for shard in shards])  # normalize: the clients' data, when not given
    config, plan = strategy.setup(cfg.network(), gammas)
    state = init_global_state(config, plan.specs, initial_consistent(config, cfg.seed), cfg.seed)
    device = torch_device(cfg.device)
    opts = TorchOptions(device, cfg.augment)

    def local(state: GlobalState, index: int, data: Dataset, train: TrainConfig) -> Tensors:
        return strategy.local_train(state, index, data, train, opts)

    if trainer == "ort":
        if not strategy.device_trainable:
            raise ValueError(
                f"{strategy.name} trains locally in its own way, which the ONNX Runtime trainer does not do"
            )
        if artifacts is None:
            raise ValueError("trainer 'ort' needs the folder of the method's exported artifacts (artifacts=...)")
        local = ort_trainer(artifacts)  # type: ignore[assignment]
    names = client_names(len(shards))
    threads = threads or default_threads(workers)
    if ray is not None:  # the round's clients as Ray tasks (coordinator.ray_grid; the same result as serial)
        from nefl_edge.coordinator.ray_grid import RayGrid

        if trainer != "torch" or workers > 1:
            raise ConfigError("--engine ray trains with the PyTorch trainer and no --workers (Ray runs the clients)")
        grid: InProcessGrid = RayGrid(dict(zip(names, shards)), dict(zip(names, tiers)), strategy.name, opts, ray)
    elif workers > 1:
        if trainer != "torch" or device != "cpu":
            raise ConfigError("workers > 1 needs the PyTorch trainer on the CPU (--trainer torch --device cpu)")
        grid = ParallelGrid(dict(zip(names, shards)), dict(zip(names, tiers)), strategy.name, opts, workers, threads)
    else:
        grid = InProcessGrid(dict(zip(names, shards)), dict(zip(names, tiers)), local)
    engine = RoundEngine(strategy, cfg, config, plan, calibration)

    result = SimResult(strategy.name, list(gammas), plan.tier_submodel, [s.gamma for s in plan.specs], [], [], 0.0)

    def score(r: int, model: GlobalState) -> None:  # BatchNorm re-estimation (bn = server), then evaluation
        result.accuracy.append([accuracy for accuracy, _ in evaluation_step(model, test, calibration, device)])
        result.rounds.append(r)
        if on_round is not None and r > 0:
            on_round(r, result.accuracy[-1])

    def finish(report: RoundReport, state: GlobalState, evaluate: bool, last: bool) -> None:
        result.updates.append(report.updates)
        if evaluate:
            evaluator.submit(functools.partial(score, r=report.round, model=evaluated_model(state, evaluate, last)))

    # Off the last round: a copy, evaluated while the next round runs; inline where this process trains on
    # the CPU, whose cores its training threads already take (a background evaluation only oversubscribes them).
    trains_here = ray is None and workers == 1 and device == "cpu"
    evaluator = Evaluator(cfg.eval_background and not trains_here)
    try:
        with pinned_threads(threads, workers if ray is None else 0):
            evaluator.submit(functools.partial(score, 0, state.copy()))
            state = run_rounds(engine, grid, state, 0, finish)
            evaluator.wait()
    finally:
        evaluator.close()
        close = getattr(grid, "close", None)  # the process pool, Ray
        if close is not None:
            close()
    result.seconds = time.perf_counter() - start
    result.state = state
    return result
