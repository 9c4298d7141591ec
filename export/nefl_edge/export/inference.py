"""Trained models out: submodel ``k`` of a run as a plain ONNX inference model.

The model maps an image batch (``input``: float32 NCHW in [0, 1], as the devices train on) to ``logits``;
BatchNorm runs in eval mode with the run's running statistics, the graph holds no training operators, and
its IR version is the lowest its opset allows (opset 17 -> IR 8), so stock ``onnxruntime`` >= 1.17 reads it.
``metadata_props`` say what it is: run, round, submodel, gamma, width, blocks, accuracy at that round (from
``metrics.jsonl``), model, data set, and the nefl-edge version that wrote it.

A run directory is read as ``--resume`` reads it: ``config.json`` (the run configuration), the checkpoint
(``coordinator.checkpoint.load``: the state file, checked against its sha256) and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nefl_edge.core.errors import BadInput
from nefl_edge.core.nested import GlobalState
from nefl_edge.core.specs import ModelConfig

OPSET = 17
INPUT, OUTPUT = "input", "logits"


class RunDirError(BadInput):
    """A run directory that cannot be exported; the message names the file and what to do."""


@dataclass
class TrainedRun:
    """What a run directory holds: its configuration, the checkpointed global state, and its metrics."""

    run_dir: Path
    config: dict[str, Any]
    model: ModelConfig
    state: GlobalState
    round: int
    metrics: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return str(self.config.get("run", self.run_dir.name))

    def accuracy(self, submodel: int) -> Optional[float]:
        """The submodel's accuracy at the checkpointed round (or the latest recorded before it)."""
        rows = [
            r
            for r in self.metrics
            if r.get("submodel") == submodel and r.get("accuracy") is not None and r.get("round", 0) <= self.round
        ]
        return float(max(rows, key=lambda r: r["round"])["accuracy"]) if rows else None


def load_run(run_dir: Path) -> TrainedRun:
    """Read a run directory written by ``nefl-coord serve`` / ``demo``: its configuration, its verified
    checkpoint (``coordinator.checkpoint.load``, the reader ``--resume`` uses) and its metrics."""
    from nefl_edge.coordinator import checkpoint
    from nefl_edge.coordinator.config import upgraded, validate
    from nefl_edge.coordinator.strategies import get_strategy

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
        cfg = validate(upgraded(raw) if isinstance(raw, dict) else raw)
        model, plan = get_strategy(cfg.method).setup(cfg.network(), tuple(cfg.gammas))
        saved = checkpoint.load(run_dir, purpose="export")
    except checkpoint.CheckpointError as exc:
        raise RunDirError(str(exc)) from None
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: is {run_dir} a run directory (runs/<run>-<time>)?") from None
    except (OSError, ValueError) as exc:  # a damaged file, or a configuration this version cannot build
        raise RunDirError(f"cannot export {run_dir}: {exc}") from None
    try:
        state = GlobalState.from_flat(model, plan.specs, saved.state)
    except (ValueError, KeyError, IndexError) as exc:
        raise RunDirError(f"the state in {run_dir} does not fit the run's configuration: {exc}") from None
    metrics_path = run_dir / "metrics.jsonl"
    metrics = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict):
                metrics.append(row)
    return TrainedRun(run_dir, dict(raw), model, state, saved.round, metrics)


def export_submodel(run: TrainedRun, index: int, out: Path) -> Path:
    """Write submodel ``index`` of ``run`` as an ONNX inference model at ``out``; return the path."""
    import onnx
    import torch

    from nefl_edge.coordinator.models import build_submodel

    if not 0 <= index < len(run.state.specs):
        raise RunDirError(f"submodel {index} does not exist: the run has submodels 0..{len(run.state.specs) - 1}")
    spec = run.state.specs[index]
    net = build_submodel(run.state, index).eval()
    config = run.model
    dummy = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (dummy,),
            str(tmp),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(tmp))
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    accuracy = run.accuracy(index)
    props = {
        "nefl.run": run.name,
        "nefl.round": str(run.round),
        "nefl.submodel": str(index),
        "nefl.gamma": f"{spec.gamma:.4f}",
        "nefl.width": f"{spec.width:.4f}",
        "nefl.blocks": json.dumps([list(b) for b in spec.blocks]),
        "nefl.accuracy": "" if accuracy is None else f"{accuracy:.4f}",
        "nefl.model": config.name,
        "nefl.dataset": str(run.config.get("dataset", "")),
        "nefl.method": str(run.config.get("method", "")),
        "nefl.input": f"float32 NCHW {config.in_channels}x{config.image_size}x{config.image_size} in [0, 1]",
        "nefl.num_classes": str(config.num_classes),
        "nefl.version": _version(),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.doc_string = "nefl-edge export-model", f"NeFL submodel {index} of run {run.name}"
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return out


def export_run(run_dir: Path, out: Path, submodels: Optional[list[int]] = None) -> list[Path]:
    """Export ``submodels`` (default: all) of a run as ``<out>/<run>-submodel-<k>.onnx``."""
    run = load_run(run_dir)
    indices = list(range(len(run.state.specs))) if submodels is None else submodels
    return [export_submodel(run, k, Path(out) / f"{run.name}-submodel-{k}.onnx") for k in indices]


def _version() -> str:
    from nefl_edge.core import __version__

    return str(__version__)
