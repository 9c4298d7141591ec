"""The latest GLOBAL weights of each submodel the device received, and local inference with them.

The device keeps the run's global model, not what it trained itself: its own weights are one device's step
on its own data, with BatchNorm statistics that belong to the weights it started from (on a device that
trained submodel 4 they scored 11 % where the run's model scored 76 %). What it keeps is the global submodel
of each task it was sent (the weights it trained from) and every later broadcast of the submodel it trained
last, up to the broadcast of the run's final model that the coordinator sends before it ends the run: the
same weights, BatchNorm statistics included, that ``nefl-coord export-model`` exports from the checkpoint.

Files: ``<cache>/latest/submodel-<k>.safetensors`` (the submodel's tensors, named as in the manifest) and
``submodel-<k>.json`` (run, round, gamma, architecture, the sha256 of the submodel's ``eval`` graph in the
artifact cache, and the metrics of this device's last training of it, if any). ``predict`` runs that eval
graph with those weights in stock ONNX Runtime: BatchNorm in eval mode with the kept statistics. Records of
schema ``nefl.latest/1`` (locally trained weights, before this change) are not used.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from nefl_edge.core.errors import BadInput
from nefl_edge.core.files import write_atomic
from nefl_edge.core.schemas import ArtifactRole, Manifest, Metrics, SubmodelEntry

LATEST_SCHEMA = "nefl.latest/2"


class NoLatestWeights(BadInput):
    """No kept weights (or their eval graph) on this device; the message says what to do."""


@dataclass(frozen=True)
class LatestInfo:
    """The record next to a kept weights file (``round``: the round of the global model it holds)."""

    submodel: int
    run: str
    round: int
    gamma: float
    width: float
    blocks: List[List[int]]
    input_shape: List[int]
    num_classes: int
    eval_sha256: str
    saved_at: float
    metrics: Dict[str, Any]
    weights: Path


class LatestStore:
    """``submodel-<k>.{safetensors,json}`` files under one folder, written atomically (weights first)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def save(
        self,
        run: str,
        round_: int,
        manifest: Manifest,
        sub: SubmodelEntry,
        tensors: Dict[str, np.ndarray],
        metrics: Optional[Metrics] = None,
    ) -> Path:
        """Keep ``tensors``, the global weights of ``sub`` at round ``round_`` (``metrics``: this device's last
        training of it; kept from the previous record when not given)."""
        from safetensors.numpy import save

        self.folder.mkdir(parents=True, exist_ok=True)
        weights = self.folder / f"submodel-{sub.index}.safetensors"
        previous = self.folder / f"submodel-{sub.index}.json"
        if metrics is not None:
            kept_metrics: Dict[str, Any] = metrics.model_dump()
        else:
            try:
                kept_metrics = dict(json.loads(previous.read_text()).get("metrics") or {})
            except (OSError, ValueError, AttributeError):
                kept_metrics = {}
        write_atomic(weights, save({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())}), 0o644)
        record = {
            "schema": LATEST_SCHEMA,
            "submodel": sub.index,
            "run": run,
            "round": round_,
            "gamma": sub.gamma,
            "width": sub.width,
            "blocks": sub.blocks,
            "input_shape": list(manifest.input_shape),
            "num_classes": manifest.num_classes,
            "eval_sha256": sub.files[ArtifactRole.EVAL].sha256,
            "saved_at": time.time(),
            "metrics": kept_metrics,
        }
        write_atomic(self.folder / f"submodel-{sub.index}.json", json.dumps(record, indent=1).encode(), 0o644)
        return weights

    def all(self) -> List[LatestInfo]:
        """Every kept submodel, smallest index first; unreadable records are skipped."""
        out = []
        for path in sorted(self.folder.glob("submodel-*.json")):
            try:
                raw = json.loads(path.read_text())
                if raw.get("schema") != LATEST_SCHEMA:
                    continue
                raw.pop("schema")
                info = LatestInfo(weights=path.with_suffix(".safetensors"), **raw)
            except (OSError, ValueError, TypeError):
                continue
            if info.weights.is_file():
                out.append(info)
        return sorted(out, key=lambda i: i.submodel)

    def get(self, submodel: Optional[int] = None) -> LatestInfo:
        """The kept weights of ``submodel``, or by default of the most recently saved one."""
        kept = self.all()
        if not kept:
            raise NoLatestWeights(
                f"no global weights under {self.folder}; the device keeps those of each task it is sent and "
                "the run's final model (nefl-edge agent / join with the same --cache)"
            )
        if submodel is None:
            return max(kept, key=lambda i: i.saved_at)
        for info in kept:
            if info.submodel == submodel:
                return info
        have = ", ".join(str(i.submodel) for i in kept)
        raise NoLatestWeights(f"no global weights of submodel {submodel} under {self.folder} (kept: {have})")


class LocalModel:
    """Inference with kept weights through the submodel's eval graph (stock ``onnxruntime``)."""

    def __init__(self, info: LatestInfo, artifacts: Path, threads: int = 0) -> None:
        import onnxruntime as ort
        from safetensors.numpy import load_file

        graph = Path(artifacts) / info.eval_sha256
        if not graph.is_file():
            raise NoLatestWeights(f"the eval graph of submodel {info.submodel} ({graph}) is not in the cache")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.info = info
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        tensors = load_file(str(info.weights))
        names = [i.name for i in self.session.get_inputs() if i.name not in ("input", "labels")]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise NoLatestWeights(f"{info.weights} lacks tensors {missing[:3]} of the eval graph")
        self._weights = {n: tensors[n] for n in names}
        self._outputs = [o.name for o in self.session.get_outputs()]

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits of a float32 NCHW batch in [0, 1] (the training data's scale)."""
        out = []
        for lo in range(0, len(x), batch_size):
            part = np.ascontiguousarray(x[lo : lo + batch_size], np.float32)
            feed = {"input": part, "labels": np.zeros(len(part), np.int64), **self._weights}
            values = dict(zip(self._outputs, self.session.run(None, feed)))
            out.append(values["logits"])
        return np.concatenate(out) if out else np.zeros((0, self.info.num_classes), np.float32)
