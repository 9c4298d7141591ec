"""Local training on the device with ONNX Runtime, and the loop that runs a task's epochs.

The training-build backend drives ``onnxruntime.training.api``: the training graph computes the loss and
the gradients; the SGD update (momentum, weight decay: :mod:`nefl_edge.core.sgd`, ``torch.optim.SGD``'s
formula) is applied in numpy by :func:`~nefl_edge.core.sgd.sgd_step`, because ORT's optimizer graph only has
plain SGD.

Samples are fed as loaded ([0, 1]): a run's per-channel input normalisation (``Manifest.normalize``) is the
first operation of every exported graph, so this trainer, evaluation, statistics and prediction all apply it
exactly as the coordinator's PyTorch model does (tests/test_normalize.py).
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np

from nefl_edge.core.data import Dataset
from nefl_edge.core.schedule import local_batches, planned_steps
from nefl_edge.core.schemas import (
    DISTILL_ROLES,
    ArtifactRole,
    Manifest,
    Metrics,
    ParamEntry,
    SubmodelEntry,
    TrainConfig,
)
from nefl_edge.core.sgd import sgd_step
from nefl_edge.edge_client.runtime import keep_torch_out, session_options

Tensors = Dict[str, np.ndarray]
keep_torch_out()


class BackendUnavailable(RuntimeError):
    """The requested training backend is not installed on this device."""


def training_api() -> Any:
    """Import ``onnxruntime.training.api`` without loading torch.

    ``onnxruntime/training/__init__.py`` imports torch-dependent modules; registering a bare package for
    ``onnxruntime.training`` first keeps torch out of the device process (ORT 1.19.2, measured), and
    :func:`~nefl_edge.edge_client.runtime.keep_torch_out` keeps ``import onnxruntime`` itself from loading it.
    """
    keep_torch_out()
    if "onnxruntime.training" not in sys.modules:
        import onnxruntime

        folder = Path(onnxruntime.__file__).parent / "training"
        if not (folder / "api").is_dir():
            raise BackendUnavailable(
                "this onnxruntime has no training API; install onnxruntime-training-cpu==1.19.2 "
                "(Linux x86_64, Windows, macOS arm64, Python <= 3.12)"
            )
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(folder)]
        sys.modules["onnxruntime.training"] = package
    return importlib.import_module("onnxruntime.training.api")


def has_training_build() -> bool:
    try:
        training_api()
    except (BackendUnavailable, ImportError):
        return False
    return True


class TrainerBackend(Protocol):
    """Local training of one submodel on the device (``ort-training`` or ``portable``)."""

    name: str

    def load(self, tensors: Tensors, train: Optional[TrainConfig] = None) -> None:
        """Start from these weights (and statistics), with fresh optimizer state and ``train``'s settings."""
        ...

    def step(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        """One SGD step on a batch; return its loss and the number of correct predictions."""
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        """Loss and correct predictions of the current weights on a batch (eval mode, no update)."""
        ...

    def tensors(self) -> Tensors:
        """Every tensor of the submodel as it is now (the update a device sends)."""
        ...


class OrtTrainingBackend:
    """Training with the ``onnxruntime-training`` build (the ``training``, ``eval`` and ``checkpoint``
    artifacts of one submodel)."""

    name = "ort-training"

    def __init__(
        self,
        files: Dict[ArtifactRole, Path],
        params: List[ParamEntry],
        train: Optional[TrainConfig] = None,
        threads: int = 0,
        spin: bool = False,
    ) -> None:
        api = training_api()
        import onnxruntime

        options = session_options(onnxruntime, threads, spin)
        self._state = api.CheckpointState.load_checkpoint(str(files[ArtifactRole.CHECKPOINT]))
        self._module = api.Module(
            str(files[ArtifactRole.TRAINING]), self._state, str(files[ArtifactRole.EVAL]), session_options=options
        )
        self._params = {p.name: p for p in params}
        self._trainable = [p.name for p in params if p.trainable]
        self._cfg = train or TrainConfig()
        self._momentum: Dict[str, np.ndarray] = {}

    def load(self, tensors: Tensors, train: Optional[TrainConfig] = None) -> None:
        """Set every tensor of the submodel (and the task's hyper-parameters); momentum starts afresh."""
        if train is not None:
            self._cfg = train
        for name in self._params:
            self._state.parameters[name] = np.asarray(tensors[name], dtype=np.float32)
        self._momentum.clear()

    def step(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        loss, logits = self.forward_backward(x, y)
        self.apply_sgd()
        return loss, int((np.argmax(logits, axis=1) == y).sum())

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
        """The loss and logits of one training-mode pass; the gradients wait in the state for :meth:`apply_sgd`."""
        self._module.train()
        loss, logits = self._module(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64))
        return float(loss), logits

    def apply_sgd(self, extra: Optional[Tensors] = None) -> None:
        """One SGD step of every trainable tensor on its gradient (plus ``extra``'s, added to the gradient's
        leading corner: a nested submodel's gradient of the same tensor), then the gradients are reset."""
        for name in self._trainable:
            param = self._state.parameters[name]
            grad = param.grad
            if extra is not None and name in extra:
                grad = np.array(grad, dtype=np.float32)
                grad[tuple(slice(0, n) for n in extra[name].shape)] += extra[name]
            weight, buffer = sgd_step(param.data, grad, self._momentum.get(name), self._cfg)
            if buffer is not None:
                self._momentum[name] = buffer
            self._state.parameters[name] = weight
        self._module.lazy_reset_grad()

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        self._module.eval()
        loss, logits = self._module(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64))
        return float(loss), int((np.argmax(logits, axis=1) == y).sum())

    def tensors(self) -> Tensors:
        return {name: np.array(self._state.parameters[name].data, dtype=np.float32) for name in self._params}

    def momentum_buffers(self) -> Tensors:
        """SGD momentum buffers by parameter name (empty before the first step or without momentum)."""
        return {name: buf.copy() for name, buf in self._momentum.items()}


SMALLEST_PREFIX = "smallest/"
"""Names of the smallest submodel's own tensors in a distillation step's weights and update
(``coordinator.strategies.SMALLEST_PREFIX``)."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.ascontiguousarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


class OrtDistillBackend:
    """The in-place distillation step of ``nefl-wd-distill`` (``coordinator.strategies.InPlaceDistillation``)
    with the training build, for a task on submodel ``k > 0``: submodel ``k``'s training graph on the labels,
    the smallest submodel's student graph (``ArtifactRole.DISTILL_TRAINING``, ``export.distill``) on
    ``softmax`` of submodel ``k``'s logits of the same pass (detached: it is an input), with the shared
    tensors the nested prefixes of submodel ``k``'s as they are before the step; then one SGD step of
    submodel ``k``'s tensors on the sum of both gradients and of the smallest submodel's own tensors
    (``smallest/<name>`` in the weights and the update) on theirs: ``torch_training.distill_train``'s step."""

    name = "ort-training"

    def __init__(
        self,
        files: Dict[ArtifactRole, Path],
        params: List[ParamEntry],
        student: List[ParamEntry],
        train: Optional[TrainConfig] = None,
        threads: int = 0,
        spin: bool = False,
    ) -> None:
        api = training_api()
        import onnxruntime

        self._teacher = OrtTrainingBackend(files, params, train, threads, spin)
        options = session_options(onnxruntime, threads, spin)
        self._state = api.CheckpointState.load_checkpoint(str(files[ArtifactRole.DISTILL_CHECKPOINT]))
        self._module = api.Module(str(files[ArtifactRole.DISTILL_TRAINING]), self._state, session_options=options)
        self._shared = {p.name: tuple(p.shape) for p in student if p.kind == "consistent"}
        self._own = {p.name: p for p in student if p.kind != "consistent"}
        self._cfg = train or TrainConfig()
        self._momentum: Dict[str, np.ndarray] = {}

    def load(self, tensors: Tensors, train: Optional[TrainConfig] = None) -> None:
        """Submodel ``k``'s tensors and the smallest submodel's own ones (``smallest/<name>``, a ``ValueError``
        when missing or misshapen); momentum starts afresh."""
        for name, entry in self._own.items():
            value = tensors.get(SMALLEST_PREFIX + name)
            if value is None or tuple(np.shape(value)) != tuple(entry.shape):
                raise ValueError(f"the weights lack the smallest submodel's {name} at {tuple(entry.shape)}")
        self._teacher.load(tensors, train)
        if train is not None:
            self._cfg = train
        for name in self._own:
            self._state.parameters[name] = np.asarray(tensors[SMALLEST_PREFIX + name], dtype=np.float32)
        self._momentum.clear()

    def step(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        """One distillation step; the loss reported is submodel ``k``'s cross-entropy."""
        loss, logits = self._teacher.forward_backward(x, y)
        teacher = self._teacher._state.parameters
        for name, shape in self._shared.items():
            self._state.parameters[name] = np.ascontiguousarray(teacher[name].data[tuple(slice(0, n) for n in shape)])
        self._module.train()
        self._module(np.ascontiguousarray(x, np.float32), _softmax(logits))
        params = self._state.parameters
        self._teacher.apply_sgd({name: np.asarray(params[name].grad) for name in self._shared})
        for name, entry in self._own.items():
            if entry.trainable:
                weight, buffer = sgd_step(params[name].data, params[name].grad, self._momentum.get(name), self._cfg)
                if buffer is not None:
                    self._momentum[name] = buffer
                params[name] = weight
        self._module.lazy_reset_grad()
        return loss, int((np.argmax(logits, axis=1) == y).sum())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, int]:
        return self._teacher.evaluate(x, y)

    def tensors(self) -> Tensors:
        out = self._teacher.tensors()
        out.update({SMALLEST_PREFIX + n: np.array(self._state.parameters[n].data, np.float32) for n in self._own})
        return out

    def momentum_buffers(self) -> Tensors:
        """SGD momentum buffers by parameter name (``smallest/<name>`` for the smallest submodel's own)."""
        out = self._teacher.momentum_buffers()
        out.update({SMALLEST_PREFIX + n: b.copy() for n, b in self._momentum.items()})
        return out


def distill_student(manifest: Manifest, sub: SubmodelEntry) -> Optional[List[ParamEntry]]:
    """The smallest submodel's tensors when a task on ``sub`` is an in-place distillation step (the manifest
    lists ``sub``'s distillation files, ``ArtifactRole.DISTILL_*``), else ``None``."""
    if not any(role in sub.files for role in DISTILL_ROLES) or sub.index == 0:
        return None
    return list(manifest.submodels[0].params)


BACKENDS = ("ort-training", "portable")
BACKEND_FILES: Dict[str, Tuple[ArtifactRole, ...]] = {
    "ort-training": (ArtifactRole.TRAINING, ArtifactRole.EVAL, ArtifactRole.CHECKPOINT),
    "portable": (ArtifactRole.PORTABLE, ArtifactRole.EVAL),
}
"""The artifacts each training backend loads."""
DISTILL_FILES: Dict[str, Tuple[ArtifactRole, ...]] = {
    "ort-training": (*BACKEND_FILES["ort-training"], ArtifactRole.DISTILL_TRAINING, ArtifactRole.DISTILL_CHECKPOINT),
    "portable": (ArtifactRole.DISTILL_PORTABLE, ArtifactRole.EVAL),
}
"""The artifacts each training backend loads for an in-place distillation step (:func:`distill_student`)."""


def choose_backend(requested: str = "auto") -> str:
    """``auto``: the training build when ``onnxruntime.training`` is importable, else the portable graph."""
    if requested == "auto":
        return "ort-training" if has_training_build() else "portable"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    if requested == "ort-training" and not has_training_build():
        raise BackendUnavailable("backend ort-training needs onnxruntime-training-cpu; use --backend portable")
    return requested


def create_backend(
    kind: str,
    files: Dict[ArtifactRole, Path],
    params: List[ParamEntry],
    train: Optional[TrainConfig] = None,
    threads: int = 0,
    spin: bool = False,
    student: Optional[List[ParamEntry]] = None,
) -> TrainerBackend:
    """A ``kind`` backend on one submodel's files, with ``threads`` intra-op threads and spin-waiting
    ``spin`` (see :func:`session_options`). With ``student`` (the smallest submodel's tensors,
    :func:`distill_student`), the in-place distillation step on the files of :data:`DISTILL_FILES`: the
    portable flavour is one graph whose tensors are the submodel's and ``smallest/<name>`` of the smallest
    submodel's own."""
    if kind == "portable":
        from nefl_edge.edge_client.portable import PortableBackend

        if student is not None:
            own = [p.model_copy(update={"name": SMALLEST_PREFIX + p.name}) for p in student if p.kind != "consistent"]
            step = {
                ArtifactRole.PORTABLE: files[ArtifactRole.DISTILL_PORTABLE],
                ArtifactRole.EVAL: files[ArtifactRole.EVAL],
            }
            return PortableBackend(step, [*params, *own], train, threads, spin)
        return PortableBackend(files, params, train, threads, spin)
    if student is not None:
        return OrtDistillBackend(files, params, student, train, threads, spin)
    return OrtTrainingBackend(files, params, train, threads, spin)


class DeadlineMissed(RuntimeError):
    """Local training cannot finish before the task's deadline."""


PACE_MIN_STEPS = 5
"""Steps after the warm-up step that must be timed before the pace may decline a task ..."""
PACE_MIN_SECONDS = 2.0
"""... or this many seconds of them, whichever comes first (a slow device decides sooner in steps)."""
PACE_TOLERANCE = 0.10
"""Safety margin against declining a task the device would finish: the projection at the measured pace may
exceed the training budget by this share before the device declines. The budget itself already keeps
``UPLOAD_MARGIN_S`` for the upload, and a pace measured over >= 5 steps varies by a few percent."""


@dataclass
class Progress:
    """Where local training stands after ``step`` of ``total`` steps."""

    step: int
    total: int
    loss: float
    elapsed_s: float = 0.0
    projected_s: Optional[float] = None
    """Projected duration of the whole task at the measured pace (``None`` until the pace is measured)."""


def measured_pace(step: int, elapsed_s: float, first_step_s: float) -> Optional[float]:
    """Seconds per step after the warm-up step, or ``None`` while too few steps were timed (fewer than
    ``PACE_MIN_STEPS`` and less than ``PACE_MIN_SECONDS`` of them). The first step is left out: it pays for
    ONNX Runtime's lazy initialisation and memory allocation, and is often several times slower."""
    timed = step - 1
    timed_s = elapsed_s - first_step_s
    if timed < 1 or (timed < PACE_MIN_STEPS and timed_s < PACE_MIN_SECONDS):
        return None
    return max(0.0, timed_s) / timed


def projected_seconds(step: int, total: int, elapsed_s: float, first_step_s: float) -> Optional[float]:
    """The whole task's projected duration: time so far plus the remaining steps at the measured pace."""
    pace = measured_pace(step, elapsed_s, first_step_s)
    return None if pace is None else elapsed_s + (total - step) * pace


def pace_verdict(step: int, total: int, elapsed_s: float, first_step_s: float, budget_s: float) -> Optional[str]:
    """Why the task cannot finish within ``budget_s`` seconds, or ``None`` while it still can.

    Declines only on evidence: when the time already spent exceeds the budget (with ``PACE_TOLERANCE``), or
    when the pace measured over the steps after the warm-up step projects a finish beyond it. Called after
    every step, so that a pace that worsens later is still caught."""
    if step >= total:
        return None
    limit = budget_s * (1.0 + PACE_TOLERANCE)
    if elapsed_s > limit:
        return f"after {step}/{total} steps {elapsed_s:.1f} s have passed; the deadline of {budget_s:.0f} s is missed"
    projected = projected_seconds(step, total, elapsed_s, first_step_s)
    if projected is None or projected <= limit:
        return None
    pace = (elapsed_s - first_step_s) / (step - 1)
    return (
        f"after {step}/{total} steps in {elapsed_s:.1f} s ({pace:.3f} s/step after the first step) the projected "
        f"{projected:.0f} s exceed the deadline of {budget_s:.0f} s"
    )


class ProgressLog:
    """Throttles progress lines through ``emit``: the first once the pace is measured, then one every
    ``every_s`` seconds, and the last step."""

    def __init__(self, emit: Callable[[str], None], every_s: float = 10.0, prefix: str = "") -> None:
        self.emit, self.every_s, self.prefix = emit, every_s, prefix
        self._last: Optional[float] = None

    def __call__(self, p: Progress) -> None:
        if self._last is None:
            due = p.projected_s is not None or p.elapsed_s >= self.every_s
        else:
            due = p.elapsed_s - self._last >= self.every_s
        if not due and p.step < p.total:
            return
        self._last = p.elapsed_s
        projected = "" if p.projected_s is None else f", projected {p.projected_s:.0f} s"
        self.emit(f"{self.prefix}step {p.step}/{p.total}, loss {p.loss:.3f}, {p.elapsed_s:.1f} s{projected}")


def train_local(
    backend: TrainerBackend,
    data: Dataset,
    cfg: TrainConfig,
    deadline_s: Optional[float] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
) -> Metrics:
    """Run the task's epochs (shuffled with ``cfg.seed``; a last batch smaller than 2 is skipped, as
    BatchNorm cannot train on one sample). With ``deadline_s``, raises :class:`DeadlineMissed` as soon as
    :func:`pace_verdict` says the task cannot finish within that many seconds from the start, so that a late
    device says so instead of sending late. ``on_progress`` is called after every step.
    """
    total = planned_steps(len(data), cfg)
    if total == 0:
        raise ValueError(f"{data.name}: {len(data)} samples are too few to train on")
    start = time.monotonic()
    losses: List[float] = []
    correct = seen = 0
    step = 0
    first_step_s = 0.0
    for idx in local_batches(len(data), cfg):
        loss, hits = backend.step(data.x[idx], data.y[idx])
        if not np.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {loss}; lower the learning rate")
        losses.append(loss)
        correct, seen, step = correct + hits, seen + len(idx), step + 1
        elapsed = time.monotonic() - start
        if step == 1:
            first_step_s = elapsed
        if on_progress is not None:
            on_progress(Progress(step, total, loss, elapsed, projected_seconds(step, total, elapsed, first_step_s)))
        if deadline_s is not None:
            reason = pace_verdict(step, total, elapsed, first_step_s, deadline_s)
            if reason is not None:
                raise DeadlineMissed(reason)
    return Metrics(
        loss_first=losses[0],
        loss_last=float(np.mean(losses[-max(1, len(losses) // 10) :])),
        accuracy=correct / max(1, seen),
        steps=step,
        seconds=time.monotonic() - start,
    )
