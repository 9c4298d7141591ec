"""Local training in PyTorch for ``simulate``: the torch half of the federated methods.

The methods themselves (``coordinator.strategies``: selection, assignment, extraction, aggregation) are
numpy only, so that the round engine, the grids and the registry import no torch. What a simulated client
does with its submodel lives here: SGD over the device's own batches (``train_torch``, what the device's
ONNX Runtime trainer does; the update is the one :mod:`nefl_edge.core.sgd` defines, built by
``sgd_optimizer``), FjORD's ordered dropout (``fjord_train``) and the sandwich rule's in-place distillation
into the smallest submodel (``distill_train``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from nefl_edge.coordinator.models import build_submodel
from nefl_edge.coordinator.training_options import TorchOptions
from nefl_edge.core.data import Dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract, prefix_slice
from nefl_edge.core.schedule import local_batches
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import param_layout

SMALLEST_PREFIX = "smallest/"
"""Names of the smallest submodel's own (inconsistent) tensors in an in-place distillation update."""


def sgd_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    """The local update of :mod:`nefl_edge.core.sgd` in PyTorch: ``torch.optim.SGD`` with the task's lr,
    momentum and weight decay and its defaults otherwise (dampening 0, no Nesterov), which is that update."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return sgd_optimizer([p for p in net.parameters() if p.requires_grad], cfg)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of ``x`` (N, C, H, W) from its zero-padded copy, and a random horizontal flip, per sample."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _step(
    net: torch.nn.Module,
    opt: torch.optim.SGD,
    data: Dataset,
    idx: np.ndarray,
    opts: TorchOptions = TorchOptions(),
    generator: Optional[torch.Generator] = None,
) -> None:
    x = torch.from_numpy(data.x[idx]).to(opts.device)
    if generator is not None:
        x = augment_batch(x, generator)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(data.y[idx]).to(opts.device))
    loss.backward()
    opt.step()


def _generator(opts: TorchOptions, seed: int) -> Optional[torch.Generator]:
    return torch.Generator(opts.device).manual_seed(seed) if opts.augment else None


def train_torch(
    state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
) -> Tensors:
    """Local training of submodel ``index`` in PyTorch with the device's batches and ``torch.optim.SGD``."""
    net = build_submodel(state, index).to(opts.device).train()
    opt = _optimizer(net, cfg)
    generator = _generator(opts, cfg.seed)
    for idx in local_batches(len(data), cfg):
        _step(net, opt, data, idx, opts, generator)
    return net.tensors()


def fjord_train(
    state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
) -> Tensors:
    """FjORD's ordered dropout (``strategies.FjORD``): for every local batch a width drawn uniformly among
    the submodels ``0..index``, trained as a nested prefix of the device's model, plain SGD."""
    if cfg.momentum:
        raise ValueError("FjORD's ordered dropout here supports plain SGD only; set momentum = 0")
    local = state.copy()
    rng = np.random.default_rng(cfg.seed)
    generator = _generator(opts, cfg.seed)
    # All batches first, then the widths, from one generator (the batches are the device's).
    for idx in list(local_batches(len(data), cfg, rng)):
        width = int(rng.integers(0, index + 1))
        net = build_submodel(local, width).to(opts.device).train()
        _step(net, _optimizer(net, cfg), data, idx, opts, generator)
        write_back(local, width, net.tensors())
    return extract(local, index)


def write_back(state: GlobalState, index: int, tensors: Tensors) -> None:
    """Put a submodel's tensors back into ``state`` in place (nested slices and its own copies)."""
    for name, info in param_layout(state.config, state.specs[index]).items():
        if info.kind == "consistent":
            state.consistent[name][prefix_slice(info.shape)] = tensors[name]
        else:
            state.inconsistent[index][name] = tensors[name].copy()


def distill_train(
    state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
) -> Tensors:
    """In-place distillation into the smallest submodel (``strategies.InPlaceDistillation``).

    For every local batch: the cross-entropy of submodel ``index`` on the labels, plus (when ``index > 0``)
    the KL divergence of the smallest submodel's softmax from the detached softmax of submodel ``index``
    (``KL(p_index || p_0)``, temperature 1, batch mean), both on the same (augmented) batch; one SGD step on
    the sum. The smallest submodel's consistent tensors are nested prefixes of submodel ``index``'s (the same
    leaves, so both losses move them); its own inconsistent tensors (BatchNorm, step sizes) are trained too
    and returned under ``SMALLEST_PREFIX``. ``index == 0`` is plain local training (``train_torch``)."""
    if index == 0:
        return train_torch(state, index, data, cfg, opts)
    config = state.config
    small_layout = param_layout(config, state.specs[0])
    big_layout = param_layout(config, state.specs[index])
    shared = {n: info.shape for n, info in small_layout.items() if info.kind == "consistent"}
    for name, shape in shared.items():
        big = big_layout.get(name)
        if big is None or big.kind != "consistent" or any(a > b for a, b in zip(shape, big.shape)):
            raise ValueError(f"in-place distillation needs the smallest submodel nested in submodel {index}: {name}")
    net = build_submodel(state, index).to(opts.device).train()
    small = build_submodel(state, 0).to(opts.device).train()
    params = dict(net.named_parameters())
    own = [p for n, p in small.named_parameters() if n not in shared]
    opt = sgd_optimizer([p for p in net.parameters()] + own, cfg)
    generator = _generator(opts, cfg.seed)
    for idx in local_batches(len(data), cfg):
        x = torch.from_numpy(data.x[idx]).to(opts.device)
        if generator is not None:
            x = augment_batch(x, generator)
        opt.zero_grad()
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.y[idx]).to(opts.device))
        views = {n: params[n][prefix_slice(shape)] for n, shape in shared.items()}
        student = torch.func.functional_call(small, views, (x,), strict=False)
        teacher = torch.nn.functional.softmax(logits.detach(), dim=1)
        kd = torch.nn.functional.kl_div(torch.nn.functional.log_softmax(student, dim=1), teacher, reduction="batchmean")
        (loss + kd).backward()
        opt.step()
    out = net.tensors()
    small_tensors = small.tensors()
    out.update({SMALLEST_PREFIX + n: small_tensors[n] for n in small_layout if n not in shared})
    return out
