"""Federated methods for heterogeneous devices, as strategy objects over one harness.

Every strategy uses the same machinery as the real coordinator: submodel specs (``coordinator.specs``),
nested extraction (``coordinator.nested``) and streaming aggregation (``coordinator.nefedavg``). What differs
between methods is expressed in three places:

- which submodels exist and which device tier trains which (``plan``);
- what the submodels share (the ``ModelConfig`` switches ``shared_bn``, ``learned_step``, ``shared_head``);
  NeFedAvg then averages shared tensors over every client that covers them and per-submodel tensors only
  within a submodel, so the one aggregator is HeteroFL's, FjORD's and DepthFL's rule as well;
- how a client trains locally (``local_train``; FjORD samples a width per batch).

Device tiers: tier ``t`` is a device that can afford gamma ``gammas[t]`` (parameter ratio) and no more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from nefl_edge.coordinator.models import build_submodel
from nefl_edge.core.data import Dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract, prefix_slice
from nefl_edge.core.schedule import local_batches
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import (
    GAMMA_TOLERANCE,
    ModelConfig,
    ScalingMethod,
    SpecError,
    SubmodelSpec,
    depth_candidates,
    make_specs,
    param_layout,
    with_gamma,
)


@dataclass(frozen=True)
class Plan:
    """The submodels of a method and, per device tier, the submodel it trains and runs (None: the tier
    cannot afford any of the method's submodels; it neither trains nor gets a model)."""

    specs: list[SubmodelSpec]
    tier_submodel: list[Optional[int]]


def _optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class TorchOptions:
    """How the simulator's PyTorch trainer runs: the torch device, and augmentation of the local batches
    (random crop with 4 pixels of zero padding and a horizontal flip, as the paper's CIFAR runs)."""

    device: str = "cpu"
    augment: bool = False


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


LocalTrainer = Callable[[GlobalState, int, Dataset, TrainConfig], Tensors]


@dataclass(frozen=True)
class Strategy:
    """A federated method: its name, where it comes from, and its choices (see the module docstring)."""

    name: str
    reference: str
    scaling: ScalingMethod = "WD"
    shared_bn: bool = False
    learned_step: bool = True
    shared_head: bool = True

    def configure(self, config: ModelConfig) -> ModelConfig:
        return replace(config, shared_bn=self.shared_bn, learned_step=self.learned_step, shared_head=self.shared_head)

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        if self.scaling == "D":
            return _depth_plan(config, gammas)
        return Plan(make_specs(config, gammas, self.scaling), list(range(len(gammas))))

    def setup(self, config: ModelConfig, gammas: tuple[float, ...]) -> tuple[ModelConfig, Plan]:
        """The model family as this method shares it, and its plan: what export, serve and simulate build on."""
        configured = self.configure(config)
        return configured, self.plan(configured, gammas)

    def local_train(
        self, state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
    ) -> Tensors:
        return train_torch(state, index, data, cfg, opts)

    @property
    def device_trainable(self) -> bool:
        """Whether local training is plain SGD on one submodel, as the device's ONNX Runtime trainer does,
        so that the method can run on real devices (``serve``) and with ``simulate --trainer ort``."""
        return type(self).local_train is Strategy.local_train

    def select(self, rng: np.random.Generator, pool: list[str], fraction: float, minimum: int) -> list[str]:
        """The clients that train this round: ``ceil(fraction * len(pool))`` of ``pool``, at least
        ``minimum`` (as many as there are), drawn without replacement; sorted."""
        count = min(len(pool), max(minimum, math.ceil(fraction * len(pool) - 1e-9)))
        return sorted(rng.choice(sorted(pool), size=count, replace=False).tolist()) if count else []

    def assign(self, plan: Plan, tier: int) -> Optional[int]:
        """The submodel a client of capacity ``tier`` (index into the run's gammas) trains, or None."""
        return plan.tier_submodel[min(max(tier, 0), len(plan.tier_submodel) - 1)]


def _depth_plan(config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
    """Depth-only submodels: every tier gets the largest depth-only submodel it can afford (gamma at most
    its own plus the spec tolerance). A shallow model family has few of them (resnet-small's smallest keeps
    one block per stage, gamma 0.44), so the lowest tiers may get none."""
    options = sorted(
        (with_gamma(config, SubmodelSpec(1.0, d)) for d in depth_candidates(config)), key=lambda s: s.gamma
    )
    specs: list[SubmodelSpec] = []
    tiers: list[Optional[int]] = []
    for gamma in gammas:
        affordable = [s for s in options if s.gamma <= gamma + GAMMA_TOLERANCE]
        if not affordable:
            tiers.append(None)
            continue
        spec = affordable[-1]
        if spec not in specs:
            specs.append(spec)
        tiers.append(specs.index(spec))
    if not specs:
        raise SpecError(f"no depth-only submodel of {config.name} fits any of the gammas {gammas}")
    return Plan(specs, tiers)


@dataclass(frozen=True)
class FedAvgSmallest(Strategy):
    """Every device trains and runs the smallest model (the one the weakest tier can afford)."""

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        return Plan(make_specs(config, (min(gammas),), "WD"), [0] * len(gammas))


@dataclass(frozen=True)
class FedAvgFull(Strategy):
    """Only the devices that can afford the full model train it; the others neither train nor get a model."""

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        return Plan(make_specs(config, (1.0,), "W"), [0 if g >= 1.0 else None for g in gammas])


@dataclass(frozen=True)
class FjORD(Strategy):
    """FjORD (Horváth et al., "FjORD: Fair and Accurate Federated Learning under heterogeneous targets with
    Ordered Dropout", NeurIPS 2021). Ordered dropout: for every local batch the device samples a width
    uniformly among the widths it can afford and trains that nested prefix of its model.

    Choices where the paper leaves room: widths are the W specs of the run's gammas (a discrete uniform
    distribution over them); BatchNorm affine parameters are shared as nested slices and statistics are
    re-estimated after aggregation, as for HeteroFL; no knowledge distillation; plain SGD (a momentum buffer
    would not follow the changing width, so momentum is refused)."""

    def local_train(
        self, state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
    ) -> Tensors:
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


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "nefl-wd",
            "Kang et al., NeFL: Nested Model Scaling for Federated Learning with System Heterogeneous Clients, "
            "arXiv 2308.07761 (width and depth)",
        ),
        Strategy("nefl-w", "Kang et al., arXiv 2308.07761 (NeFL-W, width only)", scaling="W"),
        Strategy("nefl-d", "Kang et al., arXiv 2308.07761 (NeFL-D, depth only)", scaling="D"),
        Strategy(
            "heterofl",
            "Diao et al., HeteroFL: Computation and Communication Efficient Federated Learning for Heterogeneous "
            "Clients, ICLR 2021 (width prefixes, shared BN affine, static BN statistics)",
            scaling="W",
            shared_bn=True,
            learned_step=False,
        ),
        FjORD(
            "fjord",
            "Horváth et al., FjORD: Fair and Accurate Federated Learning under heterogeneous targets with Ordered "
            "Dropout, NeurIPS 2021",
            scaling="W",
            shared_bn=True,
            learned_step=False,
        ),
        Strategy(
            "fjord-paper",
            "FjORD as the NeFL paper's code runs it (Kang et al., arXiv 2308.07761, Tables III and VIII): NeFL-W "
            "widths with step sizes fixed at 1 and per-submodel BatchNorm, one width per client, no distillation",
            scaling="W",
            learned_step=False,
        ),
        Strategy(
            "depthfl",
            "Kim et al., DepthFL: Depthwise Federated Learning for Heterogeneous Clients, ICLR 2023 (depth only, a "
            "classifier per depth; blocks are skipped within each stage as in NeFL-D rather than cutting whole "
            "stages, and the optional self-distillation is left out)",
            scaling="D",
            shared_bn=True,
            learned_step=False,
            shared_head=False,
        ),
        Strategy(
            "scalefl",
            "Ilhan et al., ScaleFL: Resource-Adaptive Federated Learning with Heterogeneous Clients, CVPR 2023, as "
            "the NeFL paper's code runs it: NeFL-WD widths and depths, step sizes fixed at 1, BatchNorm affine "
            "shared as nested slices, one classifier, no early exits or distillation",
            shared_bn=True,
            learned_step=False,
        ),
        FedAvgSmallest(
            "fedavg-smallest",
            "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS "
            "2017, on the smallest submodel for every device",
            shared_bn=True,
            learned_step=False,
        ),
        FedAvgFull(
            "fedavg-full",
            "McMahan et al., AISTATS 2017, on the full model for only the devices able to train it",
            shared_bn=True,
            learned_step=False,
        ),
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SpecError(f"unknown method {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
