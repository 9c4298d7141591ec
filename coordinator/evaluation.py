"""Evaluating submodels of the global state, and re-estimating their BatchNorm statistics.

Why re-estimate: NeFedAvg averages the shared (consistent) weights of clients that trained different
submodels, so the running statistics a client measured no longer fit the averaged weights. Measured on the
demo (resnet-small, 5 devices, round 8): the smallest submodel scored 19.6 % with its client-reported
statistics and 78.7 % with batch statistics. Like HeteroFL's static BatchNorm (Diao et al., ICLR 2021), the
coordinator recomputes the statistics of every submodel after aggregation on unlabeled held-out samples
(``bn_calibration`` in the run config; 0 keeps the paper's averaged client statistics).
"""

from __future__ import annotations

import numpy as np
import torch

from nefl_edge.coordinator.models import build_submodel
from nefl_edge.coordinator.nested import GlobalState
from nefl_edge.edge_client.data import Dataset


def evaluate(state: GlobalState, index: int, data: Dataset, batch: int = 500) -> tuple[float, float]:
    """Test accuracy and loss of submodel ``index`` (eval mode, its own BatchNorm statistics)."""
    net = build_submodel(state, index).eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for lo in range(0, len(data), batch):
            x, y = torch.from_numpy(data.x[lo : lo + batch]), torch.from_numpy(data.y[lo : lo + batch])
            logits = net(x)
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(data), loss / len(data)


def calibrate_bn(state: GlobalState, index: int, x: np.ndarray, batch: int = 250) -> None:
    """Replace submodel ``index``'s BatchNorm running statistics (in ``state``) by their average over
    ``x`` under the current weights. Labels are not used."""
    net = build_submodel(state, index)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches
    net.train()
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            if len(x[lo : lo + batch]) > 1:
                net(torch.from_numpy(x[lo : lo + batch]))
    tensors = net.tensors()
    for name in state.inconsistent[index]:
        if name.endswith(("running_mean", "running_var")):
            state.inconsistent[index][name] = tensors[name]


def held_out(test: Dataset, eval_samples: int, bn_calibration: int, seed: int = 12345) -> tuple[Dataset, np.ndarray]:
    """Two disjoint parts of ``test`` in a fixed shuffled order: ``eval_samples`` labeled samples that
    evaluate every submodel, and the next ``bn_calibration`` unlabeled images for BatchNorm re-estimation
    (fewer when the set is too small; the evaluated part never overlaps the calibration part)."""
    order = np.random.default_rng(seed).permutation(len(test))
    evaluation = order[: min(eval_samples, len(test))]
    calibration = order[len(evaluation) : len(evaluation) + bn_calibration]
    return Dataset(test.x[evaluation], test.y[evaluation], test.name), test.x[calibration]


def evaluate_all(state: GlobalState, data: Dataset) -> list[tuple[float, float]]:
    """Accuracy and loss of every submodel of ``state``."""
    return [evaluate(state, k, data) for k in range(len(state.specs))]
