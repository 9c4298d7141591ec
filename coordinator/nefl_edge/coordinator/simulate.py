"""In-process federated simulation (no broker): the round engine of ``serve`` over an in-process grid, with
local training in PyTorch (or, with ``trainer="ort"``, through the exported ONNX Runtime artifacts, the
device's own code path)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from nefl_edge.coordinator.cadence import Evaluator
from nefl_edge.coordinator.config import ConfigError, RunConfig
from nefl_edge.coordinator.engine import RoundEngine
from nefl_edge.coordinator.evaluation import calibrate_bn, evaluate_all
from nefl_edge.coordinator.grid import InProcessGrid, Instruction, Outcome, client_state
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.strategies import Extract, LocalTrainer, Strategy, TorchOptions, get_strategy
from nefl_edge.core.data import Dataset
from nefl_edge.core.nefedavg import Weighting
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import ModelConfig

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
    from nefl_edge.edge_client.trainer import BACKEND_FILES, TrainerBackend, choose_backend, create_backend, train_local

    manifest = load_manifest(folder)
    kind = choose_backend("auto")
    backends: dict[int, TrainerBackend] = {}  # one ONNX Runtime session per submodel; load() resets it fully

    def train(state: GlobalState, index: int, data: Dataset, cfg: TrainConfig) -> Tensors:
        if index not in backends:
            sub = manifest.submodels[index]
            backends[index] = create_backend(kind, submodel_paths(folder, sub, BACKEND_FILES[kind]), sub.params, cfg, 1)
        backend = backends[index]
        backend.load(extract(state, index), cfg)
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


def evaluate_on(state: GlobalState, data: Dataset, device: str = "cpu", batch: int = 500) -> list[float]:
    """Test accuracy of every submodel of ``state``, computed on ``device``."""
    if device == "cpu":
        return [acc for acc, _ in evaluate_all(state, data)]
    import torch

    from nefl_edge.coordinator.models import build_submodel

    scores = []
    for k in range(len(state.specs)):
        net = build_submodel(state, k).to(device).eval()
        correct = 0
        with torch.no_grad():
            for lo in range(0, len(data), batch):
                logits = net(torch.from_numpy(data.x[lo : lo + batch]).to(device))
                correct += int((logits.argmax(1).cpu() == torch.from_numpy(data.y[lo : lo + batch])).sum())
        scores.append(correct / len(data))
    return scores


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_task(
    method: str, opts: TorchOptions, state: GlobalState, index: int, data: Dataset, train: TrainConfig
) -> tuple[Tensors, float]:
    start = time.perf_counter()
    tensors = get_strategy(method).local_train(state, index, data, train, opts)
    return tensors, time.perf_counter() - start


class ParallelGrid(InProcessGrid):
    """The in-process grid with a round's clients trained at once in ``workers`` processes (PyTorch on the
    CPU, ``threads`` torch threads each). Outcomes are yielded in instruction order, so the aggregate is the
    serial grid's: every client's training depends only on its state, data and seed."""

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
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
        self.pool = ProcessPoolExecutor(workers, context, initializer=_worker_init, initargs=(threads,))

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """The round's clients trained at once in the pool, on what ``extract`` sends each (``client_state``)."""
        jobs = []
        for ins in instructions:
            data = self._split(ins.node, ins.train.eval_fraction)[0]
            sent = extract(state, ins.submodel)
            local = client_state(state, ins.submodel, sent)
            jobs.append((ins, sent, len(data), self.pool.submit(self.task, local, ins.submodel, data, ins.train)))
        for ins, sent, samples, job in jobs:
            tensors, seconds = job.result()
            yield Outcome(
                ins.node, ins.submodel, "updated", samples, self.as_received(sent, ins, tensors), seconds=seconds
            )

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.shutdown(cancel_futures=True)


def client_names(count: int) -> list[str]:
    """Node ids of simulated clients (zero-padded, so that sorting them keeps their order)."""
    width = max(3, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


def simulate(
    strategy: Strategy,
    config: ModelConfig,
    gammas: tuple[float, ...],
    shards: list[Dataset],
    tiers: list[int],
    test: Dataset,
    rounds: int,
    train: TrainConfig,
    fraction: float = 0.1,
    weighting: Weighting = "samples",
    seed: int = 0,
    calibration: Optional[np.ndarray] = None,
    eval_every: int = 0,
    trainer: TrainerKind = "torch",
    artifacts: Optional[Path] = None,
    on_round: Optional[Callable[[int, list[float]], None]] = None,
    cfg: Optional[RunConfig] = None,
    workers: int = 1,
) -> SimResult:
    """``rounds`` rounds of ``strategy`` through the round engine and an in-process grid: device ``i``
    (node ``client_names(...)[i]``) holds ``shards[i]`` and affords ``gammas[tiers[i]]``. Every submodel is
    evaluated on ``test`` before training, every ``eval_every`` rounds (0: only at the end) and after the
    last round. ``cfg`` gives every other rule of the run (selection, coverage, screening); by default the
    run configuration's defaults with this call's arguments and the paper's protocol: every device trains
    the submodel of its own tier (static policy, no coverage moves), BatchNorm statistics re-estimated on
    ``calibration`` where it is given (``bn = "server"``) and the clients' tracked ones otherwise; with a
    ``cfg``, ``calibration`` is used only if ``cfg.bn`` is ``"server"``. ``workers`` > 1 trains each round's
    clients in that many processes (PyTorch trainer on the CPU; the same result as one)."""
    start = time.perf_counter()
    if cfg is None:
        cfg = RunConfig(
            method=strategy.name,  # type: ignore[arg-type]
            gammas=list(gammas),
            rounds=rounds,
            fraction=fraction,
            weighting=weighting,
            seed=seed,
            train=train,
            policy="static",
            cover_submodels=False,
            bn="server" if calibration is not None and len(calibration) else "tracked",
        )
    if cfg.normalize and not config.input_mean:  # the coordinator's statistics of the training data
        stats = cfg.with_input_stats([shard.x for shard in shards])
        config = replace(config, input_mean=tuple(stats.input_mean), input_std=tuple(stats.input_std))
    config, plan = strategy.setup(config, gammas)
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
    if workers > 1:
        if trainer != "torch" or device != "cpu":
            raise ConfigError("workers > 1 needs the PyTorch trainer on the CPU (--trainer torch --device cpu)")
        grid: InProcessGrid = ParallelGrid(
            dict(zip(names, shards)), dict(zip(names, tiers)), strategy.name, opts, workers
        )
    else:
        grid = InProcessGrid(dict(zip(names, shards)), dict(zip(names, tiers)), local)
    engine = RoundEngine(strategy, cfg, config, plan, calibration)
    engine.evaluate_at = lambda r: r == rounds or bool(eval_every and r % eval_every == 0)

    result = SimResult(strategy.name, list(gammas), plan.tier_submodel, [s.gamma for s in plan.specs], [], [], 0.0)

    def score(r: int, model: GlobalState) -> None:  # BatchNorm re-estimation, then evaluation (cadence.py)
        if cfg.bn == "server" and calibration is not None and len(calibration):
            for k in range(len(model.specs)):
                calibrate_bn(model, k, calibration)
        result.accuracy.append(evaluate_on(model, test, device))
        result.rounds.append(r)
        if on_round is not None and r > 0:
            on_round(r, result.accuracy[-1])

    evaluator = Evaluator(cfg.eval_background)  # off the last round: a copy, evaluated while the next round runs
    try:
        evaluator.submit(functools.partial(score, 0, state.copy()))
        for r in range(1, rounds + 1):
            state, report = engine.run_round(r, state, grid)
            result.updates.append(report.updates)
            if r == rounds or (eval_every and r % eval_every == 0):
                evaluator.submit(functools.partial(score, r, state if r == rounds else state.copy()))
        evaluator.wait()
    finally:
        evaluator.close()
        if isinstance(grid, ParallelGrid):
            grid.close()
    result.seconds = time.perf_counter() - start
    result.state = state
    return result
