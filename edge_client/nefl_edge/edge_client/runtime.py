"""ONNX Runtime on the device: session options for training, and keeping torch out of the device process
where ``onnxruntime-training`` and torch are both installed.

``import onnxruntime`` of the training build imports ``onnxruntime.training.ortmodule`` (the PyTorch
front-end, +1.25 s and +220 MB) only to learn whether it is a training package, and ``onnxruntime.training``'s
own ``__init__`` imports torch-dependent modules. The device needs neither: :func:`keep_torch_out` makes
those imports fail with ``ImportError`` while ``onnxruntime`` itself initialises (ONNX Runtime treats that
as "no ORTModule" and goes on), and ``trainer.training_api`` imports the training API past that
``__init__``. After ``onnxruntime`` has initialised, nothing is blocked.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any, Optional, Sequence


class _NoTrainingPackageDuringOrtInit(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> None:
        if fullname == "onnxruntime.training" or fullname.startswith("onnxruntime.training."):
            ort = sys.modules.get("onnxruntime")
            if getattr(getattr(ort, "__spec__", None), "_initializing", False):
                raise ImportError(f"{fullname} is not imported on the device (it would load torch)")
        return None


def keep_torch_out() -> None:
    """Install the import guard (once per process; cheap, imports nothing)."""
    if not any(isinstance(f, _NoTrainingPackageDuringOrtInit) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTrainingPackageDuringOrtInit())


def session_options(ort: Any, threads: int = 0, spin: bool = False) -> Any:
    """ONNX Runtime session options for training: ``threads`` intra-op threads (0: ``NEFL_THREADS``, else
    ORT's default of one per core), and whether idle pool threads spin-wait (ORT's default; it cost a factor
    of 3 when anything else ran on the device, so it is off unless measured to pay, see
    :func:`~nefl_edge.edge_client.profile.choose_threads`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("NEFL_THREADS", "0") or 0)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3
    return options
