"""Training with stock ``onnxruntime`` (no training build): runs the portable step graph that
``export/portable.py`` writes, one whole SGD step per call (the update of :mod:`nefl_edge.core.sgd`).
Weights, momentum buffers and BatchNorm statistics stay in ONNX Runtime as ``OrtValue``s between steps (IO
binding); numpy sees only the batch, the loss and the logits."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from nefl_edge.core.schemas import ArtifactRole, ParamEntry, TrainConfig
from nefl_edge.core.sgd import SGD_INPUTS
from nefl_edge.edge_client.runtime import session_options

Tensors = Dict[str, np.ndarray]


class PortableBackend:
    name = "portable"

    def __init__(
        self,
        files: Dict[ArtifactRole, Path],
        params: List[ParamEntry],
        train: Optional[TrainConfig] = None,
        threads: int = 0,
        spin: bool = False,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        options = session_options(ort, threads, spin)
        providers = ["CPUExecutionProvider"]
        self._step = ort.InferenceSession(str(files[ArtifactRole.PORTABLE]), options, providers=providers)
        self._eval = ort.InferenceSession(str(files[ArtifactRole.EVAL]), options, providers=providers)
        self._outputs = [o.name for o in self._step.get_outputs()]
        self._eval_inputs = [i.name for i in self._eval.get_inputs()]
        self._params = [p.name for p in params]
        self._trainable = [p.name for p in params if p.trainable]
        self._frozen = [p.name for p in params if not p.trainable]
        self._cfg = train or TrainConfig()
        self._values: Dict[str, ort.OrtValue] = {}
        # Unlike the training build's checkpoint, the portable flavour ships no weights: zeros stand in until
        # the first task's load(), so that the throughput probe can run before any weights have arrived.
        self.load({p.name: np.zeros(p.shape, np.float32) for p in params})

    def _value(self, array: np.ndarray) -> object:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def load(self, tensors: Tensors, train: Optional[TrainConfig] = None) -> None:
        """Set every tensor of the submodel (and the task's hyper-parameters); momentum starts afresh."""
        missing = [name for name in self._params if name not in tensors]
        if missing:  # e.g. a distillation step's smallest/<name> (edge_client.trainer.distill_student)
            raise ValueError(f"the weights lack {', '.join(missing[:3])}")
        if train is not None:
            self._cfg = train
        self._values = {name: self._value(tensors[name]) for name in self._params}
        for name in self._trainable:
            self._values[f"{name}.momentum"] = self._value(np.zeros(np.shape(tensors[name]), np.float32))

    def step(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        binding = self._step.io_binding()
        binding.bind_cpu_input("input", np.ascontiguousarray(x, np.float32))
        binding.bind_cpu_input("labels", np.ascontiguousarray(y, np.int64))
        for key in SGD_INPUTS:
            binding.bind_cpu_input(key, np.array(getattr(self._cfg, key), np.float32))
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._step.run_with_iobinding(binding)
        # The outputs live as long as their binding (onnxruntime 1.32): keep it until the next step has run.
        self._binding = binding
        outs = dict(zip(self._outputs, binding.get_outputs()))
        for name in self._trainable:
            self._values[name] = outs[f"{name}.new"]
            self._values[f"{name}.momentum"] = outs[f"{name}.momentum.new"]
        for name in self._frozen:
            self._values[name] = outs[f"{name}.new"]
        logits = outs["logits"].numpy()
        return float(outs["loss"].numpy()), int((np.argmax(logits, axis=1) == y).sum())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        feed = {name: self._values[name].numpy() for name in self._eval_inputs if name in self._values}  # type: ignore[attr-defined]
        feed.update({"input": np.ascontiguousarray(x, np.float32), "labels": np.ascontiguousarray(y, np.int64)})
        loss, logits = self._eval.run(None, feed)
        return float(loss), int((np.argmax(logits, axis=1) == y).sum())

    def tensors(self) -> Tensors:
        return {name: np.array(self._values[name].numpy(), dtype=np.float32) for name in self._params}  # type: ignore[attr-defined]

    def momentum_buffers(self) -> Tensors:
        """SGD momentum buffers by parameter name (zeros before the first step)."""
        return {name: np.array(self._values[f"{name}.momentum"].numpy()) for name in self._trainable}  # type: ignore[attr-defined]
