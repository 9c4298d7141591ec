"""The NeFL ResNet family in PyTorch.

``SubmodelNet`` is a standalone network for one spec whose ``state_dict`` keys are the names of
:func:`coordinator.specs.param_layout` (the global model's names), so export, ONNX and aggregation speak
one naming. ``global_forward`` runs the global state in a submodel's configuration by slicing the global
tensors on the fly: an independent second implementation that the tests hold ``SubmodelNet`` against.

Each block computes ``shortcut(x) + s * f(x)`` with a learnable step size ``s`` (the ODE reading of a
residual block; skipping a block is a bigger step for the others). A config with input statistics
(``normalize``) starts with ``(x - mean) / std`` per channel (:func:`normalize_input`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nefl_edge.core.nested import GlobalState, Tensors, extract
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, has_shortcut, param_layout, scaled, stage_stride

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


class Shortcut(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Block(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, stride: int, shortcut: bool, preact: bool, learned_step: bool = True
    ) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in if preact else c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.shortcut: Optional[Shortcut] = Shortcut(c_in, c_out, stride) if shortcut else None
        self.step = nn.Parameter(torch.ones(1), requires_grad=learned_step)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x) if self.shortcut is not None else x
        if self.preact:
            f = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
            return skip + self.step * f
        f = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(skip + self.step * f)


class Stem(nn.Module):
    def __init__(self, c_in: int, c_out: int, preact: bool, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn: Optional[nn.BatchNorm2d] = None if preact else nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = x if self.bn is None else F.relu(self.bn(x))
        return F.max_pool2d(x, 3, 2, 1) if self.pool else x


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
    """The network of one submodel spec (the global model is the full spec)."""

    def __init__(self, config: ModelConfig, spec: SubmodelSpec) -> None:
        super().__init__()
        self.config, self.spec = config, spec
        width = spec.width
        c_in = scaled(config.stage_widths[0], width)
        self.stem = Stem(config.in_channels, c_in, config.preact, config.stem_pool)
        self.stages = nn.ModuleList()
        for s, (n_blocks, stage_width) in enumerate(zip(config.stage_blocks, config.stage_widths, strict=True)):
            c_out = scaled(stage_width, width)
            blocks = nn.ModuleDict()
            for b in range(n_blocks):
                if b in spec.blocks[s]:
                    block_in, stride = (c_in, stage_stride(s)) if b == 0 else (c_out, 1)
                    blocks[str(b)] = Block(
                        block_in, c_out, stride, has_shortcut(s, b), config.preact, config.learned_step
                    )
            self.stages.append(blocks)
            c_in = c_out
        self.final_bn = nn.BatchNorm2d(c_in, eps=BN_EPS, momentum=BN_MOMENTUM) if config.preact else None
        self.head = nn.Linear(c_in, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = normalize_input(self.config, x)
        x = self.stem(x)
        for blocks in self.stages:
            assert isinstance(blocks, nn.ModuleDict)
            for block in blocks.values():
                x = block(x)
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
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
    from nefl_edge.core.specs import full_spec

    torch.manual_seed(seed)
    net = SubmodelNet(config, full_spec(config))
    layout = param_layout(config, full_spec(config))
    return {k: v for k, v in net.tensors().items() if layout[k].kind == "consistent" or k.startswith("head.")}


def _bn(x: Tensor, sub: dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(
        x,
        sub[f"{prefix}.running_mean"],
        sub[f"{prefix}.running_var"],
        sub[f"{prefix}.weight"],
        sub[f"{prefix}.bias"],
        training=False,
        eps=BN_EPS,
    )


def global_forward(state: GlobalState, index: int, x: Tensor) -> Tensor:
    """Evaluation-mode forward pass of the global model in submodel ``index``'s configuration, slicing the
    full-size global tensors on the fly (written independently of ``SubmodelNet``)."""
    config, spec = state.config, state.specs[index]
    g = {k: torch.from_numpy(v) for k, v in state.consistent.items()}
    sub = {k: torch.from_numpy(v) for k, v in state.inconsistent[index].items()}
    w = spec.width
    c_prev = scaled(config.stage_widths[0], w)
    if config.input_mean:
        x = torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(config.input_mean, config.input_std))], 1)
    h = F.conv2d(x, g["stem.conv.weight"][:c_prev], padding=1)
    if not config.preact:
        h = F.relu(_bn(h, sub, "stem.bn"))
    if config.stem_pool:
        h = F.max_pool2d(h, 3, 2, 1)
    for s, n_blocks in enumerate(config.stage_blocks):
        c = scaled(config.stage_widths[s], w)
        for b in range(n_blocks):
            if b not in spec.blocks[s]:
                continue
            p = f"stages.{s}.{b}"
            c_in = c_prev if b == 0 else c
            stride = stage_stride(s) if b == 0 else 1
            w1 = g[f"{p}.conv1.weight"][:c, :c_in]
            w2 = g[f"{p}.conv2.weight"][:c, :c]
            skip = h
            if f"{p}.shortcut.conv.weight" in g:
                skip = _bn(
                    F.conv2d(h, g[f"{p}.shortcut.conv.weight"][:c, :c_in], stride=stride), sub, f"{p}.shortcut.bn"
                )
            if config.preact:
                f = F.conv2d(F.relu(_bn(h, sub, f"{p}.bn1")), w1, stride=stride, padding=1)
                f = F.conv2d(F.relu(_bn(f, sub, f"{p}.bn2")), w2, padding=1)
                h = skip + sub[f"{p}.step"] * f
            else:
                f = F.relu(_bn(F.conv2d(h, w1, stride=stride, padding=1), sub, f"{p}.bn1"))
                f = _bn(F.conv2d(f, w2, padding=1), sub, f"{p}.bn2")
                h = F.relu(skip + sub[f"{p}.step"] * f)
        c_prev = c
    if config.preact:
        h = F.relu(_bn(h, sub, "final_bn"))
    pooled = h.mean(dim=(2, 3))
    return F.linear(pooled, g["head.weight"][:, :c_prev], g["head.bias"])
