"""Versioned, validated schemas shared by the device and the coordinator: the artifact manifest and the
headers of every wire message. Pydantic rejects anything that does not fit, with a message that names the
field; nothing from the network is trusted before it passes through here.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, ClassVar, Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_SCHEMA = "nefl.manifest/1"
WIRE_SCHEMA = "nefl.wire/4"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class Strict(BaseModel):
    """Base of every schema: unknown fields are refused and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the artifact manifest ---------------------------------------------------------------------------------


class ArtifactRole(str, Enum):
    """What one artifact file of a submodel is for: the one vocabulary of the exporter (``export.artifacts``
    writes a file per role), the manifest (``SubmodelEntry.files`` is keyed by role), the coordinator (which
    publishes them) and the device (whose training backends and evaluator load them by role). The values are
    the manifest's keys on the wire; a member equals its value as a string, so ``files["eval"]`` still works.
    """

    TRAINING = "training"
    """ONNX Runtime's training graph (loss and gradients; ``com.microsoft`` ops): the ``ort-training`` backend."""
    EVAL = "eval"
    """The eval graph (loss and logits, BatchNorm in eval mode): evaluation, and both backends' ``evaluate``."""
    CHECKPOINT = "checkpoint"
    """ONNX Runtime's training checkpoint (the tensors' names and kinds): the ``ort-training`` backend."""
    PORTABLE = "portable"
    """One whole SGD step in standard ONNX ops (``export.portable``): the ``portable`` backend."""
    STATS = "stats"
    """Per-batch BatchNorm statistics (``export.stats``): federated BatchNorm re-estimation."""
    DISTILL_TRAINING = "distill-training"
    """In-place distillation (``nefl-wd-distill``, submodels above 0 only): the smallest submodel's ONNX Runtime
    training graph on the soft targets of the device's submodel (``export.distill``): ``ort-training``."""
    DISTILL_CHECKPOINT = "distill-checkpoint"
    """The checkpoint of that student graph: ``ort-training``."""
    DISTILL_PORTABLE = "distill-portable"
    """The whole distillation step (both losses, one SGD step) in standard ONNX ops: ``portable``."""

    def __str__(self) -> str:
        return self.value

    @property
    def file_name(self) -> str:
        """The file's name in a submodel's export folder. The training, eval and checkpoint names are the ones
        ONNX Runtime's ``generate_artifacts`` writes."""
        return _ARTIFACT_FILE_NAMES[self]


_ARTIFACT_FILE_NAMES = {
    ArtifactRole.TRAINING: "training_model.onnx",
    ArtifactRole.EVAL: "eval_model.onnx",
    ArtifactRole.CHECKPOINT: "checkpoint",
    ArtifactRole.PORTABLE: "portable_step.onnx",
    ArtifactRole.STATS: "bn_stats.onnx",
    ArtifactRole.DISTILL_TRAINING: "student_training.onnx",
    ArtifactRole.DISTILL_CHECKPOINT: "student_checkpoint",
    ArtifactRole.DISTILL_PORTABLE: "distill_step.onnx",
}
SUBMODEL_ROLES = (
    ArtifactRole.TRAINING,
    ArtifactRole.EVAL,
    ArtifactRole.CHECKPOINT,
    ArtifactRole.PORTABLE,
    ArtifactRole.STATS,
)
"""The files every submodel has."""
DISTILL_ROLES = (ArtifactRole.DISTILL_TRAINING, ArtifactRole.DISTILL_CHECKPOINT, ArtifactRole.DISTILL_PORTABLE)
"""The files a submodel above 0 has in addition when its clients also distil into the smallest submodel: their
presence in ``SubmodelEntry.files`` is what tells a device that a task on it is a distillation step."""


class FileEntry(Strict):
    """One artifact file: its name in the artifact folder, sha256 and size."""

    name: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class ParamEntry(Strict):
    """One tensor of a submodel: shape, consistent (nested slice of a global tensor) or inconsistent (per submodel),
    trainable or not."""

    name: str
    shape: Tuple[int, ...]
    kind: Literal["consistent", "inconsistent"]
    trainable: bool


class SubmodelEntry(Strict):
    """One submodel of the manifest: architecture (width, kept blocks), size, cost, files and tensors."""

    index: int = Field(ge=0)
    key: str = Field(pattern=SHA256_PATTERN, description="hash of the architecture; names the artifact folder")
    width: float
    blocks: List[List[int]]
    gamma: float
    mflops: float
    param_count: int
    files: Dict[ArtifactRole, FileEntry]
    params: List[ParamEntry]


class TrainConfig(Strict):
    """Local training hyper-parameters, with ``torch.optim.SGD``'s meaning."""

    lr: float = Field(0.1, gt=0, description="local SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="local SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="local SGD weight decay")
    batch_size: int = Field(32, ge=1, le=4096, description="local batch size")
    epochs: int = Field(1, ge=1, le=1000, description="local epochs per task")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps even mid-epoch")
    partial_batch: bool = Field(
        False,
        description="train each epoch's last, smaller batch too (if it has >= 2 samples), as the paper's code",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="share of each device's data held out (seeded, never trained on) for federated evaluation",
    )
    seed: int = 0
    update_encoding: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description="how a device sends its trained tensors: float32, float16, or int8 deltas against the weights "
        "it received (edge_client.encoding)",
    )


class InputNormalization(Strict):
    """Per-channel input statistics of a run (computed by the coordinator from its training data): every
    submodel computes ``(x - mean) / std`` as its first operation, inside each exported graph, so devices feed
    their [0, 1] samples as they are. Listed here so that a reader of the manifest (or a device with its own
    runtime) knows what the graphs expect."""

    mean: List[float] = Field(min_length=1, max_length=16)
    std: List[float] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _sane(self) -> InputNormalization:
        if len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} means but {len(self.std)} stds")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            raise ValueError("means must be finite and stds finite and positive")
        return self


class Manifest(Strict):
    """What a run's devices need before any task: input shape, classes, default training settings and every submodel."""

    schema_: Literal["nefl.manifest/1"] = Field("nefl.manifest/1", alias="schema")
    model: Dict[str, object]
    input_shape: Tuple[int, int, int]
    input_dtype: Literal["float32"] = "float32"
    label_dtype: Literal["int64"] = "int64"
    num_classes: int
    loss: Literal["cross_entropy"] = "cross_entropy"
    optimizer: Literal["sgd"] = "sgd"
    train: TrainConfig
    opset: int
    submodels: List[SubmodelEntry]
    normalize: Optional[InputNormalization] = Field(
        None, description="input statistics every graph applies first (absent: the inputs are not normalised)"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        # Without normalisation the manifest is written as before the field existed (older devices read it).
        return self.model_dump_json(by_alias=True, indent=1, exclude={"normalize"} if self.normalize is None else None)


# --- wire messages -----------------------------------------------------------------------------------------


class DeviceProfile(Strict):
    """What a device says about itself at hello: hardware, runtime, backend and measured training throughput."""

    arch: str
    system: str
    python: str
    cores: int
    memory_mb: int
    onnxruntime: str
    backend: str
    samples_per_s: Optional[float] = Field(None, description="measured training throughput on the probe submodel")
    probe_mflops: Optional[float] = Field(None, description="forward MFLOPs of the submodel that was timed")


Origin = Literal["device", "coordinator"]


class Message(Strict):
    """Header fields every wire message carries (``schema``, ``run``, ``sent_at``); ``kind`` names the message.

    ``origin`` (a class attribute of each kind, not a field) says which side sends it: in a signed run the
    coordinator signs what it sends, and a device signs what it sends with its own key, as the ``node`` it
    names (``core.signing.signer_policy``)."""

    origin: ClassVar[Origin]
    schema_: Literal["nefl.wire/4"] = Field("nefl.wire/4", alias="schema")
    run: str = Field(pattern=NAME_PATTERN)
    sent_at: float = 0.0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NodeMessage(Message):
    """A message about one device: ``node`` names it (the sender of what devices send, the addressee of tasks)."""

    node: str = Field(pattern=NAME_PATTERN)


class TaskMessage(NodeMessage):
    """A task or an answer to one: ``task_id`` and ``round`` tie the answer to its task."""

    task_id: str = Field(pattern=NAME_PATTERN)
    round: int = Field(ge=0)


class Hello(NodeMessage):
    """device -> coordinator: join the run with this profile, sample count and (optional) declared tier."""

    origin: ClassVar[Origin] = "device"
    kind: Literal["hello"] = "hello"
    profile: DeviceProfile
    num_samples: int = Field(ge=0)
    tier: Optional[int] = Field(None, ge=0)
    instance: Optional[str] = Field(
        None,
        pattern=r"^[0-9a-f]{6,32}$",
        description="random per device process: two processes that use one identity say hello with two",
    )


class Status(NodeMessage):
    """device -> coordinator (retained): online, training, offline (left) or lost (its Last Will)."""

    origin: ClassVar[Origin] = "device"
    kind: Literal["status"] = "status"
    state: Literal["online", "offline", "training", "lost"] = Field(
        description="offline: the device left; lost: its Last Will (the broker lost it, or went down itself)"
    )


class Task(TaskMessage):
    """coordinator -> one device: train ``submodel`` from the weights with ``weights_sha256`` and answer within
    ``deadline_s``. With ``bn_stats``, first answer with an ``evaluation`` of this task's id holding the
    BatchNorm statistics of those weights (as an ``evaluate`` task of ``submodels = [submodel]``,
    ``batch_size = train.batch_size`` and ``bn_max_batches`` asks them), then train."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["task"] = "task"
    submodel: int = Field(ge=0)
    weights_sha256: str = Field(pattern=SHA256_PATTERN)
    train: TrainConfig
    deadline_s: float = Field(gt=0, description="seconds from receipt by which the update must be sent")
    bn_stats: bool = Field(
        False,
        description="before training, send the BatchNorm statistics of the received weights (an ``evaluation`` "
        "with this task's id: the federated statistics of the state they are, carried by the next round's task)",
    )
    bn_max_batches: Optional[int] = Field(None, ge=1, description="bn_stats: at most this many training batches")


class Metrics(Strict):
    """What local training measured: first and last loss, training accuracy, steps and seconds."""

    loss_first: float
    loss_last: float
    accuracy: float
    steps: int
    seconds: float


class Update(TaskMessage):
    """device -> coordinator: the trained tensors of a task (body: safetensors) and how training went."""

    origin: ClassVar[Origin] = "device"
    kind: Literal["update"] = "update"
    submodel: int = Field(ge=0)
    num_samples: int = Field(gt=0)
    metrics: Metrics


class EvalTask(TaskMessage):
    """coordinator -> one device: for each of ``submodels`` (weights: the matching ``weights_sha256``),
    ``evaluate`` on the held-out split (``eval_fraction`` of its data) and/or compute ``bn_stats`` (sums of
    batch statistics over at most ``bn_max_batches`` batches of ``batch_size`` of its training split);
    answer with an ``evaluation`` within ``deadline_s``."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["evaluate"] = "evaluate"
    submodels: List[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=64)
    weights_sha256: List[Annotated[str, Field(pattern=SHA256_PATTERN)]] = Field(min_length=1, max_length=64)
    evaluate: bool = True
    bn_stats: bool = False
    eval_fraction: float = Field(0.0, ge=0, le=0.5)
    batch_size: int = Field(32, ge=2, le=4096)
    bn_max_batches: Optional[int] = Field(None, ge=1)
    deadline_s: float = Field(gt=0)


class SubmodelEval(Strict):
    """One submodel's evaluation on a device's held-out split: mean loss, correct predictions, samples."""

    submodel: int = Field(ge=0)
    loss: float = Field(ge=0)
    correct: int = Field(ge=0)
    count: int = Field(ge=0)


class BnCount(Strict):
    """How many batches a submodel's BatchNorm sums (in the body) are over."""

    submodel: int = Field(ge=0)
    batches: int = Field(ge=1)


class Evaluation(TaskMessage):
    """device -> coordinator: the answer to an ``evaluate`` task. ``results``: per submodel evaluated;
    ``bn``: per submodel with statistics, whose sums travel in the body (safetensors, ``<k>/<layer>.mean_sum``
    and ``<k>/<layer>.var_sum``)."""

    origin: ClassVar[Origin] = "device"
    kind: Literal["evaluation"] = "evaluation"
    results: List[SubmodelEval] = Field(default_factory=list, max_length=64)
    bn: List[BnCount] = Field(default_factory=list, max_length=64)


class Decline(TaskMessage):
    """device -> coordinator: the device will not answer this task, and why."""

    origin: ClassVar[Origin] = "device"
    kind: Literal["decline"] = "decline"
    reason: str


class Weights(Message):
    """coordinator -> all (retained, one per submodel): the round's weights of a submodel (body: safetensors)."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["weights"] = "weights"
    round: int = Field(ge=0)
    submodel: int = Field(ge=0)


class Artifact(Message):
    """coordinator -> all (retained, content-addressed): one artifact file (body: the file)."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["artifact"] = "artifact"
    name: str


class ManifestMessage(Message):
    """coordinator -> all (retained): the run's manifest (body: its JSON)."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["manifest"] = "manifest"


class Control(Message):
    """coordinator -> all: ``announce`` (devices say hello again), ``end`` (the run is over) or ``heartbeat``
    (the coordinator is alive: sent every ``coordinator.session.HEARTBEAT_S``; devices leave a run silent for
    ``edge_client.session.SILENT_S``)."""

    origin: ClassVar[Origin] = "coordinator"
    kind: Literal["control"] = "control"
    action: Literal["end", "announce", "heartbeat"]
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        Hello,
        Status,
        Task,
        Update,
        Decline,
        Weights,
        Artifact,
        ManifestMessage,
        Control,
        EvalTask,
        Evaluation,
    )
}
