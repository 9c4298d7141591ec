"""The device graphs of in-place distillation into the smallest submodel (``nefl-wd-distill``,
``coordinator.strategies.InPlaceDistillation``), for a device of submodel ``k > 0``.

The step they compute is the simulated one (``coordinator.torch_training.distill_train``), the sandwich rule's
in-place distillation (Yu & Huang, "Universally Slimmable Networks and Improved Training Techniques", ICCV
2019) with the device's own submodel as teacher: on one batch, the cross-entropy of submodel ``k`` on the
labels plus ``KL(softmax(z_k).detach() || softmax(z_0))`` of the smallest submodel's logits ``z_0``, whose
consistent tensors are the nested prefixes of submodel ``k``'s and whose own tensors (BatchNorm, step sizes)
travel as ``smallest/<name>``; one SGD step (:mod:`nefl_edge.core.sgd`) on the sum.

Two flavours, as for a plain submodel (``export.artifacts``):

- ``ort-training``: the student graph ``distill-training`` (with its ``distill-checkpoint``), the smallest
  submodel's ONNX Runtime training graph whose loss is ``-mean_n sum_c t[n, c] * log_softmax(z_0)[n, c]`` of
  soft targets ``t`` fed as an input. The device runs submodel ``k``'s own training graph, feeds
  ``t = softmax(z_k)`` of that forward pass (the detached teacher: an input has no gradient), adds the
  student's gradients of the shared tensors to the prefixes of submodel ``k``'s and steps both
  (``edge_client.trainer.OrtDistillBackend``). ONNX Runtime's autodiff has no stop-gradient, which is why the
  student is a graph of its own. The loss differs from the KL term by the teacher's entropy, a constant of
  the student: the gradients are the same.
- ``portable``: the whole step in one standard-op graph for stock ``onnxruntime`` (``distill-portable``):
  submodel ``k``'s training graph and the student's, merged (the student reads ``Slice`` prefixes of
  submodel ``k``'s tensors and ``Softmax`` of its logits as targets; each shared tensor's gradient is
  submodel ``k``'s plus the student's, zero-padded), lowered to standard ops and followed by the SGD update
  by ``export.portable.build_portable_step``. Its inputs and outputs are those of a plain portable step plus
  the student's own tensors (``smallest/<name>``, with momentum buffers for the trainable ones).

The device's update is then what the strategy aggregates: submodel ``k``'s tensors and ``smallest/<name>``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from nefl_edge.core.schemas import ArtifactRole
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, param_layout

DISTILL_VERSION = 1
"""Changes whenever the distillation graphs do (it is part of their folder's name, ``artifacts.distill_key``)."""
SMALLEST_PREFIX = "smallest/"
"""Names of the smallest submodel's own tensors in a distillation step (``strategies.SMALLEST_PREFIX``)."""
TARGETS = "targets"
"""The student graph's input of soft targets (the teacher's softmax), ``[batch, classes]``."""


def student_params(config: ModelConfig, big: SubmodelSpec, small: SubmodelSpec) -> tuple[list[str], list[str]]:
    """The smallest submodel's (shared) consistent tensors, each a nested prefix of submodel ``big``'s, and its own
    tensors; ``ValueError`` where the smallest submodel is not nested in ``big``."""
    small_layout, big_layout = param_layout(config, small), param_layout(config, big)
    shared = [n for n, i in small_layout.items() if i.kind == "consistent"]
    for name in shared:
        other = big_layout.get(name)
        shape = small_layout[name].shape
        if other is None or other.kind != "consistent" or any(a > b for a, b in zip(shape, other.shape)):
            raise ValueError(f"in-place distillation needs the smallest submodel nested in the larger one: {name}")
    return shared, [n for n, i in small_layout.items() if i.kind != "consistent"]


def export_student(config: ModelConfig, small: SubmodelSpec, folder: Path) -> None:
    """Write the student training graph and its checkpoint (``distill-training``, ``distill-checkpoint``)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from nefl_edge.edge_client.trainer import training_api
    from nefl_edge.export.training_graph import forward_model, quiet, rewrite_training_graph

    training_api()
    from onnxruntime.training import artifacts

    work = Path(tempfile.mkdtemp(prefix=".student-", dir=folder))
    try:
        model, requires_grad, frozen = forward_model(config, small, work / "forward.onnx")
        graph = model.graph
        graph.input.append(helper.make_tensor_value_info(TARGETS, TensorProto.FLOAT, ["batch", config.num_classes]))
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "kd/axes"))
        graph.node.extend(
            [
                helper.make_node("LogSoftmax", ["logits"], ["kd/log_q"], axis=1),
                helper.make_node("Mul", [TARGETS, "kd/log_q"], ["kd/t_log_q"]),
                helper.make_node("ReduceSum", ["kd/t_log_q", "kd/axes"], ["kd/per_sample"], keepdims=0),
                helper.make_node("ReduceMean", ["kd/per_sample"], ["kd/mean"], keepdims=0),
                helper.make_node("Neg", ["kd/mean"], ["loss"]),
            ]
        )
        logits = graph.output[0]
        del graph.output[:]
        graph.output.extend([helper.make_tensor_value_info("loss", TensorProto.FLOAT, []), logits])
        with quiet():
            artifacts.generate_artifacts(
                model,
                requires_grad=requires_grad,
                frozen_params=frozen,
                loss=None,  # the graph's first output is the loss
                optimizer=artifacts.OptimType.SGD,
                artifact_directory=str(work),
            )
        rewrite_training_graph(work / "training_model.onnx")
        (work / "training_model.onnx").rename(folder / ArtifactRole.DISTILL_TRAINING.file_name)
        (work / "checkpoint").rename(folder / ArtifactRole.DISTILL_CHECKPOINT.file_name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _names(graph: Any) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names - {""}


def merge_distill_graph(
    config: ModelConfig, big: SubmodelSpec, small: SubmodelSpec, big_training: Path, student_training: Path
) -> Any:
    """One ONNX Runtime training graph (``com.microsoft`` ops still in it) of the distillation step: submodel
    ``big``'s training graph, then the student's, renamed under ``smallest/`` and reading ``Slice`` prefixes of
    the shared tensors and ``Softmax(logits)`` as its targets, then per shared tensor ``p``: ``p_grad`` (what the
    accumulator of ``p`` reads) = submodel ``big``'s gradient + the student's, zero-padded to ``big``'s shape.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    shared, _ = student_params(config, big, small)
    big_shapes = {n: i.shape for n, i in param_layout(config, big).items()}
    small_shapes = {n: i.shape for n, i in param_layout(config, small).items()}
    teacher, student = onnx.load(str(big_training)), onnx.load(str(student_training))
    tg, sg = teacher.graph, student.graph

    sliced = {n: f"{SMALLEST_PREFIX}shared/{n}" for n in shared}
    rename: dict[str, str] = {"input": "input", TARGETS: SMALLEST_PREFIX + TARGETS, **sliced}
    for name in _names(sg):
        rename.setdefault(name, SMALLEST_PREFIX + name)

    names_used: list[str] = []

    def renamed(node: Any) -> Any:
        out = onnx.NodeProto()
        out.CopyFrom(node)
        out.name = f"{SMALLEST_PREFIX}{node.name or node.op_type}/{len(names_used)}"  # unique, never empty
        names_used.append(out.name)
        for i, name in enumerate(node.input):
            out.input[i] = rename.get(name, name) if name else ""
        for i, name in enumerate(node.output):
            out.output[i] = rename.get(name, name) if name else ""
        return out

    consts: list[Any] = []

    def const(values: Any, hint: str) -> str:
        name = f"{SMALLEST_PREFIX}const/{hint}/{len(consts)}"
        consts.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    # Submodel big's own gradient of a shared tensor gets another name; p_grad becomes the sum.
    own_grad = {f"{n}_grad": f"{n}_grad/{SMALLEST_PREFIX}teacher" for n in shared}
    teacher_nodes = []
    for node in tg.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if not (node.domain == "com.microsoft" and node.op_type == "InPlaceAccumulatorV2"):
            for i, name in enumerate(node.input):
                copy.input[i] = own_grad.get(name, name)
        for i, name in enumerate(node.output):
            copy.output[i] = own_grad.get(name, name)
        teacher_nodes.append(copy)

    glue = [helper.make_node("Softmax", ["logits"], [rename[TARGETS]], axis=1, name=f"{SMALLEST_PREFIX}teacher")]
    for name in shared:
        shape = small_shapes[name]
        starts, ends, axes = const([0] * len(shape), "starts"), const(shape, "ends"), const(range(len(shape)), "axes")
        glue.append(helper.make_node("Slice", [name, starts, ends, axes], [sliced[name]], name=f"{sliced[name]}/slice"))
    # the student's accumulators of shared tensors go: their gradients join submodel big's (sums below)
    student_nodes = [
        renamed(n)
        for n in sg.node
        if not (n.op_type == "InPlaceAccumulatorV2" and n.input[1].removesuffix("_grad") in sliced)
    ]
    sums = []
    for name in shared:
        pads = [0] * len(small_shapes[name]) + [b - s for b, s in zip(big_shapes[name], small_shapes[name])]
        padded = f"{SMALLEST_PREFIX}{name}_grad/padded"
        sums.append(helper.make_node("Pad", [rename[f"{name}_grad"], const(pads, "pads")], [padded], name=padded))
        sums.append(helper.make_node("Add", [own_grad[f"{name}_grad"], padded], [f"{name}_grad"], name=f"{padded}/sum"))

    def retyped(values: Any) -> list[Any]:
        out = []
        for v in values:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(v)
            copy.name = rename.get(v.name, v.name)
            out.append(copy)
        return out

    drop = {"input", TARGETS, *shared}
    inputs = [*tg.input, *retyped(i for i in sg.input if i.name not in drop)]
    initializers = [*tg.initializer, *consts]
    for init in sg.initializer:
        if init.name in drop:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name]
        initializers.append(copy)
    value_info = [*tg.value_info, *retyped(v for v in sg.value_info if v.name not in drop)]
    graph = helper.make_graph(
        [*teacher_nodes, *glue, *student_nodes, *sums],
        "nefl_distill_step",
        inputs,
        list(tg.output),
        initializers,
        value_info=value_info,
    )
    merged = helper.make_model(graph, opset_imports=list(teacher.opset_import), producer_name="nefl-edge")
    merged.ir_version = teacher.ir_version
    return merged


def export_distill(
    config: ModelConfig, big: SubmodelSpec, small: SubmodelSpec, big_training: Path, folder: Path
) -> None:
    """Write the three distillation files of submodel ``big`` into ``folder``: the student graph and checkpoint,
    and the portable step built from ``big_training`` (submodel ``big``'s ``training`` graph) and the student's."""
    import onnx

    from nefl_edge.export.portable import build_portable_step

    _, own = student_params(config, big, small)
    export_student(config, small, folder)
    merged = merge_distill_graph(config, big, small, big_training, folder / ArtifactRole.DISTILL_TRAINING.file_name)
    big_layout, small_layout = param_layout(config, big), param_layout(config, small)
    trainable = [n for n, i in big_layout.items() if i.trainable]
    trainable += [SMALLEST_PREFIX + n for n in own if small_layout[n].trainable]
    frozen = [n for n, i in big_layout.items() if not i.trainable]
    frozen += [SMALLEST_PREFIX + n for n in own if not small_layout[n].trainable]
    work = Path(tempfile.mkdtemp(prefix=".merged-", dir=folder))
    try:
        onnx.save(merged, str(work / "merged.onnx"))
        build_portable_step(
            work / "merged.onnx",
            folder / ArtifactRole.DISTILL_PORTABLE.file_name,
            trainable,
            frozen,
            config.num_classes,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
