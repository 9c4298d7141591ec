"""In-process federated simulation (no broker): the round engine of ``serve`` over an in-process grid, with
local training in PyTorch (or, with ``trainer="ort"``, through the exported ONNX Runtime artifacts, the
device's own code path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.engine import RoundEngine
from nefl_edge.coordinator.evaluation import evaluate_all
from nefl_edge.coordinator.grid import InProcessGrid
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.nefedavg import Weighting
from nefl_edge.coordinator.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.coordinator.specs import ModelConfig
from nefl_edge.coordinator.strategies import LocalTrainer, Strategy, TorchOptions
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
    state: Optional[GlobalState] = field(default=None, repr=False)

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


def torch_device(requested: str) -> str:
    """The torch device for ``auto`` (cuda when available), ``cpu`` or ``cuda`` (refused without a GPU)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
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
) -> SimResult:
    """``rounds`` rounds of ``strategy`` through the round engine and an in-process grid: device ``i``
    (node ``client_names(...)[i]``) holds ``shards[i]`` and affords ``gammas[tiers[i]]``. Every submodel is
    evaluated on ``test`` before training, every ``eval_every`` rounds (0: only at the end) and after the
    last round. ``cfg`` gives every other rule of the run (selection, coverage, screening); by default the
    run configuration's defaults with this call's arguments and the paper's protocol: every device trains
    the submodel of its own tier (static policy, no coverage moves)."""
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
        )
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
    grid = InProcessGrid(dict(zip(names, shards)), dict(zip(names, tiers)), local)
    engine = RoundEngine(strategy, cfg, config, plan, calibration)

    def score() -> list[float]:
        return evaluate_on(state, test, device)

    result = SimResult(
        strategy.name, list(gammas), plan.tier_submodel, [s.gamma for s in plan.specs], [score()], [0], 0.0
    )
    for r in range(1, rounds + 1):
        state, report = engine.run_round(r, state, grid)
        result.updates.append(report.updates)
        if r == rounds or (eval_every and r % eval_every == 0):
            result.accuracy.append(score())
            result.rounds.append(r)
            if on_round is not None:
                on_round(r, result.accuracy[-1])
    result.seconds = time.perf_counter() - start
    result.state = state
    return result
