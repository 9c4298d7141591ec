"""The BatchNorm statistics graph of a submodel: what a device runs for federated BatchNorm re-estimation.

Built from the submodel's eval graph (``eval_model.onnx``: the weights are graph inputs, BatchNorm in eval
mode). Every ``BatchNormalization`` is replaced by the same normalisation with the batch's own statistics
(PyTorch's train mode: biased variance in the normalisation), and the graph's outputs become, per BatchNorm
layer ``<p>`` (named as in the layout, ``<p>.running_mean``), the batch mean ``<p>.batch_mean`` and the
unbiased batch variance ``<p>.batch_var`` (what PyTorch's train mode folds into ``running_var``). Nodes
and inputs that no output needs (the head, the loss, the labels, the running statistics) are dropped.

Standard operators only, opset 17: stock ``onnxruntime`` and the training build both run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MEAN_SUFFIX, VAR_SUFFIX = ".batch_mean", ".batch_var"


def build_stats_graph(eval_path: Path, out: Path) -> list[str]:
    """Write the statistics graph of the eval graph at ``eval_path`` to ``out``; return the BatchNorm
    layer prefixes (``stem.bn``, ``stages.0.0.bn1``, ...) in graph order."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(eval_path))
    graph = model.graph
    nodes: list[Any] = []
    inits: list[Any] = [numpy_helper.from_array(np.array([-1], np.int64), "bnstats/flat")]
    inits.append(numpy_helper.from_array(np.array(1, np.int64), "bnstats/channel_axis"))
    inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "bnstats/one"))
    outputs: list[Any] = []
    prefixes: list[str] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, scale, bias, mean_name, _ = node.input
        prefix = mean_name.removesuffix(".running_mean")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        t = f"bnstats/{prefix}"

        def op(kind: str, inputs: list[str], out: str, **attrs: Any) -> str:
            nodes.append(helper.make_node(kind, inputs, [out], name=f"{out}/node", **attrs))
            return out

        mean_k = op("ReduceMean", [x], f"{t}/mean_k", axes=[0, 2, 3], keepdims=1)
        centred = op("Sub", [x, mean_k], f"{t}/centred")
        var_k = op("ReduceMean", [op("Mul", [centred, centred], f"{t}/sq")], f"{t}/var_k", axes=[0, 2, 3], keepdims=1)
        mean = op("Reshape", [mean_k, "bnstats/flat"], f"{t}/mean")
        biased = op("Reshape", [var_k, "bnstats/flat"], f"{t}/biased")
        # elements per channel m = size(x) / channels; the unbiased variance is biased * m / (m - 1)
        channels = op("Gather", [op("Shape", [x], f"{t}/shape"), "bnstats/channel_axis"], f"{t}/channels")
        per_channel = op("Div", [op("Size", [x], f"{t}/size"), channels], f"{t}/m_int")
        m = op("Cast", [per_channel], f"{t}/m", to=onnx.TensorProto.FLOAT)
        ratio = op("Div", [m, op("Sub", [m, "bnstats/one"], f"{t}/m_1")], f"{t}/ratio")
        op("Mul", [biased, ratio], prefix + VAR_SUFFIX)
        op("Identity", [mean], prefix + MEAN_SUFFIX)
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, scale, bias, mean, biased],
                list(node.output[:1]),
                name=f"{t}/normalise",
                epsilon=eps,
                training_mode=0,
            )
        )
        for suffix in (MEAN_SUFFIX, VAR_SUFFIX):
            outputs.append(helper.make_tensor_value_info(prefix + suffix, onnx.TensorProto.FLOAT, [None]))
        prefixes.append(prefix)
    needed, kept = {o.name for o in outputs}, []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    inputs = [i for i in graph.input if i.name in needed]
    new_graph = helper.make_graph(
        kept,
        "nefl_bn_stats",
        inputs,
        outputs,
        initializer=[*(i for i in graph.initializer if i.name in needed), *inits],
    )
    stats = helper.make_model(new_graph, opset_imports=[helper.make_opsetid("", 17)])
    stats.ir_version = helper.find_min_ir_version_for(list(stats.opset_import))
    onnx.checker.check_model(stats)
    onnx.save(stats, str(out))
    return prefixes
