"""Federated evaluation and BatchNorm statistics on the device, with stock ``onnxruntime``: a submodel's eval
graph gives its loss sum, correct predictions and count on the device's held-out split (eval-mode BatchNorm
with the statistics in the weights it was sent); its statistics graph (``nefl_edge.export.stats``) gives each
batch's mean and unbiased variance per BatchNorm layer, summed into a :class:`~nefl_edge.core.evaluation.BnStats`.
The arithmetic both sides share is in :mod:`nefl_edge.core.evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from nefl_edge.core.data import Dataset
from nefl_edge.core.evaluation import BnStats, EvalResult, Tensors, stats_batches
from nefl_edge.core.schemas import ArtifactRole
from nefl_edge.edge_client.runtime import session_options

MEAN_SUFFIX, VAR_SUFFIX = ".batch_mean", ".batch_var"


class SubmodelEvaluator:
    """Evaluation (``eval`` graph) and BatchNorm statistics (``stats`` graph) of one submodel, run by stock
    ``onnxruntime`` (also present in the training build)."""

    def __init__(self, files: Dict[ArtifactRole, Path], threads: int = 0, spin: bool = False) -> None:
        import onnxruntime as ort

        options = session_options(ort, threads, spin)
        self._sessions: Dict[ArtifactRole, Any] = {
            role: ort.InferenceSession(str(files[role]), options, providers=["CPUExecutionProvider"])
            for role in (ArtifactRole.EVAL, ArtifactRole.STATS)
            if role in files
        }

    def _feed(self, role: ArtifactRole, tensors: Tensors) -> Dict[str, np.ndarray]:
        names = [i.name for i in self._sessions[role].get_inputs()]
        return {n: np.ascontiguousarray(tensors[n], np.float32) for n in names if n in tensors}

    def evaluate(self, tensors: Tensors, data: Dataset, batch_size: int = 256) -> EvalResult:
        """Loss sum, correct predictions and count of the submodel with ``tensors`` on ``data``."""
        session = self._sessions[ArtifactRole.EVAL]
        feed = self._feed(ArtifactRole.EVAL, tensors)
        result = EvalResult()
        for lo in range(0, len(data), batch_size):
            x, y = data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]
            feed.update({"input": np.ascontiguousarray(x, np.float32), "labels": np.ascontiguousarray(y, np.int64)})
            loss, logits = session.run(None, feed)
            result.loss_sum += float(loss) * len(y)
            result.correct += int((np.argmax(logits, axis=1) == y).sum())
            result.count += len(y)
        return result

    def bn_stats(self, tensors: Tensors, x: np.ndarray, batch_size: int, max_batches: Optional[int] = None) -> BnStats:
        """Sums of the per-batch means and unbiased variances of every BatchNorm layer over
        :func:`stats_batches` of ``x``, under ``tensors``."""
        session = self._sessions[ArtifactRole.STATS]
        names = [o.name for o in session.get_outputs()]
        feed = self._feed(ArtifactRole.STATS, tensors)
        stats = BnStats()
        for idx in stats_batches(len(x), batch_size, max_batches):
            feed["input"] = np.ascontiguousarray(x[idx], np.float32)
            values = dict(zip(names, session.run(None, feed)))
            batch = BnStats(
                {n.removesuffix(MEAN_SUFFIX): v for n, v in values.items() if n.endswith(MEAN_SUFFIX)},
                {n.removesuffix(VAR_SUFFIX): v for n, v in values.items() if n.endswith(VAR_SUFFIX)},
                1,
            )
            stats.add(batch)
        return stats
