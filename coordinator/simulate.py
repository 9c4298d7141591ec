"""In-process federated simulation (no broker): the same specs, extraction, NeFedAvg and BatchNorm
re-estimation as the real coordinator, with local training in PyTorch (or, with ``trainer="ort"``, through
the exported ONNX Runtime artifacts, the device's own code path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from nefl_edge.coordinator.evaluation import calibrate_bn, evaluate
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.nefedavg import NeFedAvg, Weighting
from nefl_edge.coordinator.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.coordinator.specs import ModelConfig
from nefl_edge.coordinator.strategies import LocalTrainer, Strategy
from nefl_edge.edge_client.data import Dataset
from nefl_edge.edge_client.schemas import TrainConfig

TrainerKind = Literal["torch", "ort"]


@dataclass
class SimResult:
    method: str
    gammas: list[float]
    tier_submodel: list[Optional[int]]
    submodel_gammas: list[float]
    accuracy: list[list[float]]  # per evaluated round (index 0: before training), per submodel
    rounds: list[int]
    seconds: float
    updates: list[int] = field(default_factory=list)

    def tier_accuracy(self, at: int = -1) -> list[Optional[float]]:
        """Accuracy of the model each device tier runs (None: the tier gets no model)."""
        row = self.accuracy[at]
        return [None if k is None else row[k] for k in self.tier_submodel]


def ort_trainer(folder: Path) -> LocalTrainer:
    """Local training through exported artifacts with the edge client's own trainer (``train_local``)."""
    from nefl_edge.edge_client.artifacts import load_manifest, submodel_paths
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
) -> SimResult:
    """``rounds`` rounds of ``strategy``: each round a ``fraction`` of the devices that can train one of
    the method's submodels (at least one) trains its tier's submodel; NeFedAvg aggregates; BatchNorm
    statistics are re-estimated on ``calibration``; every submodel is evaluated on ``test`` before training,
    every ``eval_every`` rounds (0: only at the end) and after the last round."""
    start = time.perf_counter()
    config = strategy.configure(config)
    plan = strategy.plan(config, gammas)
    rng = np.random.default_rng(seed)
    state = init_global_state(config, plan.specs, initial_consistent(config, seed), seed)
    local: LocalTrainer = strategy.local_train
    if trainer == "ort":
        if not strategy.device_trainable:
            raise ValueError(
                f"{strategy.name} trains locally in its own way, which the ONNX Runtime trainer does not do"
            )
        if artifacts is None:
            raise ValueError("trainer 'ort' needs the folder of the method's exported artifacts (artifacts=...)")
        local = ort_trainer(artifacts)
    pool = [c for c, t in enumerate(tiers) if plan.tier_submodel[t] is not None]

    def score() -> list[float]:
        return [evaluate(state, k, test)[0] for k in range(len(plan.specs))]

    result = SimResult(
        strategy.name, list(gammas), plan.tier_submodel, [s.gamma for s in plan.specs], [score()], [0], 0.0
    )
    for r in range(1, rounds + 1):
        count = min(len(pool), max(1, round(fraction * len(pool))))
        chosen = sorted(rng.choice(pool, size=count, replace=False).tolist())
        agg = NeFedAvg(state, weighting)
        for c in chosen:
            index = plan.tier_submodel[tiers[c]]
            assert index is not None
            cfg = train.model_copy(update={"seed": int(rng.integers(1 << 31))})
            agg.add(index, local(state, index, shards[c], cfg), len(shards[c]))
        state = agg.result()
        result.updates.append(agg.updates)
        if calibration is not None and len(calibration):
            for k in range(len(plan.specs)):
                calibrate_bn(state, k, calibration)
        if r == rounds or (eval_every and r % eval_every == 0):
            result.accuracy.append(score())
            result.rounds.append(r)
            if on_round is not None:
                on_round(r, result.accuracy[-1])
    result.seconds = time.perf_counter() - start
    return result
