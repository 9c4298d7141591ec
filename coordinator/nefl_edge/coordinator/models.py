"""The NeFL ResNet family in PyTorch, built from the network's one description (:mod:`core.architecture`).

``SubmodelNet`` is a standalone network for one spec: one torch module per record of
:func:`core.architecture.describe`, run in the records' order, so its ``state_dict`` keys are the names of
:func:`core.specs.param_layout` (the global model's names) and export, ONNX and aggregation speak one naming.
Nothing here restates the family's shape: channels, strides, which blocks exist and in which order the
operations run all come from the description. The tests hold ``SubmodelNet`` against a naive numpy forward
pass that reads the same description (``tests/reference.py``).

Each block computes ``shortcut(x) + s * f(x)`` with a learnable step size ``s`` (the ODE reading of a
residual block; skipping a block is a bigger step for the others). A config with input statistics
(``normalize``) starts with ``(x - mean) / std`` per channel (:func:`normalize_input`).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nefl_edge.core.architecture import (
    Architecture,
    BatchNorm,
    Conv,
    Layer,
    Linear,
    MaxPool,
    Op,
    Relu,
    Residual,
    describe,
)
from nefl_edge.core.nested import GlobalState, Tensors, extract
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, full_spec, param_layout


def _module(layer: Union[Layer, Linear]) -> nn.Module:
    if isinstance(layer, Conv):
        return nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, bias=False)
    if isinstance(layer, BatchNorm):
        return nn.BatchNorm2d(layer.channels, eps=layer.eps, momentum=layer.momentum)
    return nn.Linear(layer.c_in, layer.c_out)


def _local(name: str, prefix: str) -> str:
    """The attribute a layer named ``name`` has in the module whose tensors are named ``prefix.*``."""
    return name.removeprefix(f"{prefix}.") if prefix else name


def _add_layers(owner: nn.Module, prefix: str, layers: tuple[Layer, ...]) -> None:
    for layer in layers:
        owner.add_module(_local(layer.name, prefix), _module(layer))


def _run(owner: nn.Module, prefix: str, ops: tuple[Op, ...], x: Tensor) -> Tensor:
    """Run ``ops`` in order on ``x``; layers are ``owner``'s modules, called inside ``owner``'s forward (so the
    ONNX node names are ``/<owner path>/<layer>/<Op>``)."""
    for op in ops:
        if isinstance(op, Relu):
            x = F.relu(x)
        elif isinstance(op, MaxPool):
            x = F.max_pool2d(x, op.kernel, op.stride, op.padding)
        else:
            x = owner.get_submodule(_local(op.name, prefix))(x)
    return x


class Chain(nn.Module):
    """A sequence of operations with a module of its own: the stem, a block's projection shortcut."""

    def __init__(self, prefix: str, ops: tuple[Op, ...]) -> None:
        super().__init__()
        self.prefix, self.ops = prefix, ops
        _add_layers(self, prefix, tuple(op for op in ops if isinstance(op, (Conv, BatchNorm))))

    def forward(self, x: Tensor) -> Tensor:
        return _run(self, self.prefix, self.ops, x)


class Block(nn.Module):
    """A residual block (:class:`core.architecture.Residual`): ``skip + step * body(x)``, then a ReLU if asked."""

    def __init__(self, block: Residual, learned_step: bool = True) -> None:
        super().__init__()
        self.name, self.body, self.relu_after = block.name, block.body, block.relu_after
        _add_layers(self, block.name, block.layers)
        self.shortcut = Chain(f"{block.name}.shortcut", block.shortcut) if block.shortcut else None
        self.step = nn.Parameter(torch.ones(1), requires_grad=learned_step)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x) if self.shortcut is not None else x
        out = skip + self.step * _run(self, self.name, self.body, x)
        return F.relu(out) if self.relu_after else out


def normalize_input(config: ModelConfig, x: Tensor) -> Tensor:
    """``(x - mean) / std`` per channel with the config's input statistics (none: ``x`` as it is). Part of
    the network, so every exported graph (training, evaluation, statistics, the portable step, export-model)
    starts with it and devices feed their [0, 1] samples unchanged."""
    if not config.input_mean:
        return x
    mean = torch.tensor(config.input_mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(config.input_std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


class SubmodelNet(nn.Module):
    """The network of one submodel spec (the global model is the full spec), as :func:`describe` gives it."""

    def __init__(self, config: ModelConfig, spec: SubmodelSpec) -> None:
        super().__init__()
        self.config, self.spec = config, spec
        arch: Architecture = describe(config, spec)
        self.tail = arch.tail
        self.stem = Chain("stem", arch.stem)
        self.stages = nn.ModuleList()
        for stage in arch.stages:
            self.stages.append(nn.ModuleDict({str(b.index): Block(b, config.learned_step) for b in stage}))
        _add_layers(self, "", tuple(op for op in arch.tail if isinstance(op, (Conv, BatchNorm))))
        self.head = _module(arch.head)  # named "head" in the description too

    def forward(self, x: Tensor) -> Tensor:
        x = normalize_input(self.config, x)
        x = self.stem(x)
        for blocks in self.stages:
            assert isinstance(blocks, nn.ModuleDict)
            for block in blocks.values():
                x = block(x)
        x = _run(self, "", self.tail, x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def load_tensors(self, tensors: Tensors) -> None:
        """Load numpy tensors named as in the layout (strict: every tensor, right shapes)."""
        own = self.state_dict()
        missing = [k for k in own if not k.endswith("num_batches_tracked") and k not in tensors]
        if missing:
            raise ValueError(f"tensors missing for this submodel: {missing[:5]}")
        for name, value in own.items():
            if name in tensors:
                value.copy_(torch.from_numpy(np.asarray(tensors[name], dtype=np.float32)).reshape(value.shape))

    def tensors(self) -> Tensors:
        """The submodel's tensors as numpy arrays, named as in the layout."""
        return {
            k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in self.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }


def build_submodel(state: GlobalState, index: int) -> SubmodelNet:
    net = SubmodelNet(state.config, state.specs[index])
    net.load_tensors(extract(state, index))
    return net


def initial_consistent(config: ModelConfig, seed: int) -> Tensors:
    """PyTorch's default initialisation of the full model's consistent tensors, seeded."""
    torch.manual_seed(seed)
    net = SubmodelNet(config, full_spec(config))
    layout = param_layout(config, full_spec(config))
    return {k: v for k, v in net.tensors().items() if layout[k].kind == "consistent" or k.startswith("head.")}
