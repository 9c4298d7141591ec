"""The ONNX Runtime training graph of a submodel, the part of the export that the plain artifacts
(``export.artifacts``) and the distillation step (``export.distill``) share: the PyTorch forward graph, ONNX
Runtime's builder kept quiet, and the rewrite of its slow kernels."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nefl_edge.core.specs import ModelConfig, SubmodelSpec, param_layout
from nefl_edge.export.portable import Builder, conv_input_grad_as_conv, relu_grad

OPSET = 17


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """generate_artifacts prints ~110 lines to the C-level stderr and logs INFO lines on the root logger;
    keep both out of the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            root.setLevel(level)


def forward_model(config: ModelConfig, spec: SubmodelSpec, onnx_path: Path) -> tuple[Any, list[str], list[str]]:
    """The submodel's training-mode forward graph (input -> logits, exported by PyTorch to ``onnx_path``, which
    is removed again), and the names of its trainable and frozen tensors, checked to be all of the layout."""
    import onnx
    import torch

    from nefl_edge.coordinator.models import SubmodelNet

    net = SubmodelNet(config, spec).train()
    layout = param_layout(config, spec)
    dummy = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_batches_tracked.*")
        torch.onnx.export(
            net,
            (dummy,),
            str(onnx_path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamo=False,
        )
    model = onnx.load(str(onnx_path))
    onnx_path.unlink()
    initializers = {i.name for i in model.graph.initializer}
    requires_grad = [n for n, p in layout.items() if p.trainable and n in initializers]
    frozen = [n for n, p in layout.items() if not p.trainable and n in initializers]
    missing = set(layout) - initializers
    if missing:
        raise RuntimeError(f"exported graph lacks tensors {sorted(missing)[:5]}")
    return model, requires_grad, frozen


def rewrite_training_graph(path: Path) -> None:
    """Replace slow ``com.microsoft`` kernels of the training graph by faster standard ops that compute the
    same: ``ReluGrad`` (a per-element branch, 16-22 % of a step) by ``Mul(dY, Cast(Greater(Y, 0)))``, and the
    input gradient of stride-1 ``ConvGrad`` nodes by a ``Conv`` (``ConvGrad`` keeps the weight gradient)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    b = Builder("rewrite")
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type == "ReluGrad":
            relu_grad(b, node.input[0], node.input[1], node.output[0])
            continue
        if node.domain == "com.microsoft" and node.op_type == "ConvGrad" and node.output and node.output[0]:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if conv_input_grad_as_conv(b, node.input[0], node.input[2], node.output[0], attrs):
                node.output[0] = ""
        b.nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    onnx.save(model, str(path))
