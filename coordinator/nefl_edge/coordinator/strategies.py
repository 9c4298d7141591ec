"""Federated methods for heterogeneous devices, as strategy objects over one harness: the policy half.

Every strategy uses the same machinery as the real coordinator: submodel specs (``core.specs``), nested
extraction (``core.nested``) and streaming aggregation (``core.nefedavg``). What differs between methods is
expressed in four places:

- which submodels exist and which device tier trains which (``plan``);
- what the submodels share (the ``ModelConfig`` switches ``shared_bn``, ``learned_step``, ``shared_head``);
  NeFedAvg then averages shared tensors over every client that covers them and per-submodel tensors only
  within a submodel, so the one aggregator is HeteroFL's, FjORD's and DepthFL's rule as well;
- which global elements a client's submodel is made of in a round, and how the round's results fold back
  (``extract`` and ``aggregator``: nested prefixes and NeFedAvg by default; FedRolex rolls a window);
- how a client trains locally (``local_train``; FjORD samples a width per batch).

This module is numpy only: the round engine, the grids and the registry import it without torch. Local
training in PyTorch (``simulate``) is its torch half, ``coordinator.torch_training``, imported when a
strategy first trains.

Device tiers: tier ``t`` is a device that can afford gamma ``gammas[t]`` (parameter ratio) and no more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional, Protocol

import numpy as np

from nefl_edge.coordinator.training_options import TorchOptions
from nefl_edge.core.data import Dataset
from nefl_edge.core.nefedavg import NeFedAvg, Weighting
from nefl_edge.core.nested import GlobalState, Tensors, extract
from nefl_edge.core.robust import RobustOptions, RobustReport
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import (
    GAMMA_TOLERANCE,
    ModelConfig,
    ScalingMethod,
    SpecError,
    SubmodelSpec,
    depth_candidates,
    full_spec,
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
    distill_smallest: bool = False
    """Whether a client of a submodel other than 0 also trains submodel 0 (in-place distillation): its task
    then costs the forward MFLOPs of both (``assignment.task_mflops``)."""


def train_torch(
    state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
) -> Tensors:
    """Local training of submodel ``index`` in PyTorch with the device's batches and ``torch.optim.SGD``
    (``coordinator.torch_training.train_torch``; imports torch when first called)."""
    from nefl_edge.coordinator.torch_training import train_torch as train

    return train(state, index, data, cfg, opts)


LocalTrainer = Callable[[GlobalState, int, Dataset, TrainConfig], Tensors]
Extract = Callable[[GlobalState, int], Tensors]
"""A round's extraction: (global state, submodel index) -> the tensors a client of that submodel receives."""


class Aggregator(Protocol):
    """Folds one round's updates into a new global state, one update at a time (``core.nefedavg.NeFedAvg``
    is one); ``robust_report`` says afterwards whom a robust aggregation clipped, capped or left out."""

    @property
    def updates(self) -> int:
        """Updates folded in so far."""
        ...

    @property
    def robust_report(self) -> RobustReport:
        """Whom a robust aggregation clipped, capped or left out (empty otherwise)."""
        ...

    def add(self, index: int, tensors: Tensors, num_samples: int, node: str = "") -> None:
        """Fold in one client's trained submodel ``index`` (screened: every tensor of its layout)."""
        ...

    def result(self) -> GlobalState:
        """The aggregated global state (a new object)."""
        ...


@dataclass(frozen=True)
class Strategy:
    """A federated method: its name, where it comes from, and its choices (see the module docstring)."""

    name: str
    reference: str
    scaling: ScalingMethod = "WD"
    shared_bn: bool = False
    learned_step: bool = True
    shared_head: bool = True
    tracked_bn: bool = True
    """Whether the devices' tracked running statistics (``bn = tracked``) describe the deployed submodels;
    False for a method whose channel window moves every round (FedRolex: an untrained submodel's statistics
    would be those of the previous window)."""

    def configure(self, config: ModelConfig) -> ModelConfig:
        """The model family with this method's sharing switches (BN, step sizes, classifier)."""
        return replace(config, shared_bn=self.shared_bn, learned_step=self.learned_step, shared_head=self.shared_head)

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        """One submodel per gamma, scaled as ``scaling`` says (tier ``t`` trains submodel ``t``); depth-only
        methods get the depth-only submodels each tier can afford (``_depth_plan``)."""
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
        """A simulated client's local training of submodel ``index`` of ``state`` (``state`` holds what the
        round's ``extract`` sent it, see ``grid.client_state``): plain SGD in PyTorch, as on a device."""
        return train_torch(state, index, data, cfg, opts)

    def extract(self, state: GlobalState, index: int, round_: int = 0) -> Tensors:
        """The tensors of submodel ``index`` that a client trains in round ``round_`` (what the grid sends it and
        what its update is screened against). Round 0 means the deployed submodel, what evaluation, export and
        inference run: for every method the nested prefix (``core.nested.extract``). Default: that prefix
        in every round (the NeFL paper, HeteroFL, FjORD, DepthFL, ScaleFL)."""
        return extract(state, index)

    def aggregator(
        self, state: GlobalState, weighting: Weighting, round_: int, robust: Optional[RobustOptions] = None
    ) -> Aggregator:
        """What folds round ``round_``'s updates into ``state`` (each update in the coordinates this round's
        ``extract`` gave it). Default: NeFedAvg (``core.nefedavg``) over nested prefixes, robust with
        ``robust`` options."""
        return NeFedAvg(state, weighting, robust)

    def keep(self, state: GlobalState, round_: int) -> GlobalState:
        """The global state after round ``round_`` when it aggregated nothing (fewer than ``min_updates``
        valid updates): ``state`` itself by default (FedRolex moves it to the round's window)."""
        return state

    def update_shapes(self, config: ModelConfig, plan: Plan, index: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the update a client of submodel ``index`` returns (what screening expects):
        by default the submodel's layout."""
        return {n: p.shape for n, p in param_layout(config, plan.specs[index]).items()}

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
        """The smallest gamma's submodel for every tier."""
        return Plan(make_specs(config, (min(gammas),), "WD"), [0] * len(gammas))


@dataclass(frozen=True)
class FedAvgFull(Strategy):
    """Only the devices that can afford the full model train it; the others neither train nor get a model."""

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        """The full model for the tiers that afford it, nothing for the others."""
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
        """Ordered dropout over the widths ``0..index`` (``torch_training.fjord_train``)."""
        from nefl_edge.coordinator.torch_training import fjord_train

        return fjord_train(state, index, data, cfg, opts)


@dataclass(frozen=True)
class FedRolex(Strategy):
    """FedRolex (Alam et al., "FedRolex: Model-Heterogeneous Federated Learning with Rolling Sub-Model
    Extraction", NeurIPS 2022, arXiv 2212.01548): HeteroFL's width submodels, but in round ``r`` a
    submodel of width ``n`` along a hidden axis of ``C`` channels is made of the channels
    ``(r + i) mod C, i < n`` instead of the prefix ``0..n-1``; the window rolls by one channel a round, so
    that every global channel is trained by every device tier over the rounds. The devices are unchanged:
    they train tensors of the same shapes as HeteroFL's.

    Where the state's coordinates depart from the paper's presentation. The paper keeps the global model
    in fixed channel order and gathers window ``r`` out of it. Here the global state after round ``r`` is
    kept in the coordinates of window ``r``: element ``i`` of a hidden axis of ``C`` channels is the
    paper's channel ``(r + i) mod C`` (the state is ``roll_hidden(paper_state, r)``; round 0, before
    training, is the paper's order). Round ``r``'s extraction is then the nested prefix of the state rolled
    by one more channel (``roll_hidden(state, 1)``), and its aggregation is NeFedAvg on that rolled state,
    kept in the new coordinates instead of rolled back. This is the paper's algorithm: a roll is one
    permutation of the channels of each hidden axis, applied alike to a layer's outputs, the next layer's
    inputs, the shortcut and the shared BatchNorm affine parameters, so the full network computes the same
    function, and every round sends, averages and keeps exactly the global elements the paper's window
    ``(r + i) mod C`` does (``tests/test_fedrolex.py`` checks it against a naive window loop in the paper's
    order). Why: the nested prefix of the state, the submodel that evaluation, checkpoints,
    ``export-model``, ``predict`` and the final broadcast deploy, is then the last round's window, the
    channels the small clients trained together, rather than the paper's channels ``0..n-1`` of every axis,
    which the clients of that width trained together only in rounds that are multiples of every hidden size.
    Nothing downstream needs to know the method.

    The roll offset is the round, so a checkpoint's round says it (``--resume`` needs nothing more): a
    round that aggregates nothing (fewer than ``min_updates`` updates) still moves the state to its window
    (``keep``, a relabelling that changes no value). Its deployed prefix then holds, per hidden axis, one
    channel its window did not train, until the next round. A hidden axis is one that width scaling cuts
    (``hidden_axes``); the input image channels, the kernel and the classes are never rolled. The
    per-submodel BatchNorm statistics are in submodel coordinates and are not rolled.

    BatchNorm as in the paper's code and as our ``heterofl``: affine parameters shared and windowed like the
    convolutions, statistics not tracked into the model but re-estimated for the aggregated weights (the
    code's static BN, ``track_running_stats=False``; here the run's ``bn = server`` or ``federated``). With
    ``bn = tracked`` the statistics of a submodel no client trained in a round would stay those of the
    previous window while the state moves on, so the engine refuses it (``tracked_bn``).

    Where this departs from the paper's code (``resnet_server.py``): the window starts at channel ``r mod C``
    and advances (the code's ``torch.roll`` takes channel ``-r mod C`` first: the same rotation, run
    backwards); a full-width submodel is rolled too, as in the code (a permutation of its channels); shared
    elements are averaged with the run's ``weighting`` (the code: unweighted for convolutions); no ``Scaler``
    layer and no label-split masking of the classifier (as our ``heterofl``)."""

    def extract(self, state: GlobalState, index: int, round_: int = 0) -> Tensors:
        """Submodel ``index`` of training round ``round_ >= 1`` from the state after round ``round_ - 1``
        (window ``round_ - 1`` coordinates): along hidden axes of ``C`` channels, the state's channels
        ``(1 + i) mod C``, which are the paper's ``(round_ + i) mod C``. Round 0: the deployed submodel, the
        state's nested prefix (the last round's window)."""
        step = _step(round_)
        if not step:
            return extract(state, index)
        hidden = hidden_axes(state.config)
        out: Tensors = {}
        for name, info in param_layout(state.config, state.specs[index]).items():
            if info.kind != "consistent":
                out[name] = state.inconsistent[index][name].copy()
                continue
            full = state.consistent[name]
            part = full[tuple(slice(None) if h else slice(0, n) for n, h in zip(info.shape, hidden[name]))]
            for axis, (g, n, h) in enumerate(zip(full.shape, info.shape, hidden[name])):
                if h:  # one gather per hidden axis (faster than an open mesh over all axes at once)
                    part = np.take(part, _window(g, n, step), axis=axis)
            out[name] = part if part.base is None else part.copy()
        return out

    def aggregator(
        self, state: GlobalState, weighting: Weighting, round_: int, robust: Optional[RobustOptions] = None
    ) -> Aggregator:
        """NeFedAvg (robust with ``robust``) on the state rolled to round ``round_``'s window, whose
        coordinates the result keeps."""
        return NeFedAvg(roll_hidden(state, _step(round_)), weighting, robust)

    def keep(self, state: GlobalState, round_: int) -> GlobalState:
        """The state moved to round ``round_``'s window without a value changed (see the class docstring)."""
        return roll_hidden(state, _step(round_))


def _step(round_: int) -> int:
    """Channels the state rolls from the previous round's window to round ``round_``'s: one, none at 0."""
    return 1 if round_ > 0 else 0


def _window(channels: int, width: int, start: int) -> np.ndarray:
    """An index window of FedRolex: ``(start + i) mod channels`` for ``i < width``."""
    return (start + np.arange(width)) % channels


@functools.lru_cache(maxsize=32)
def hidden_axes(config: ModelConfig) -> dict[str, tuple[bool, ...]]:
    """Per consistent tensor of the full model, which of its axes run over hidden channels: those that width
    scaling cuts, found from ``param_layout`` at the smallest width (every hidden axis has one channel
    there; an axis of one channel in the full model is never rolled, which is the same)."""
    full = full_spec(config)
    thin = param_layout(config, SubmodelSpec(1e-9, full.blocks))
    return {
        name: tuple(a != b for a, b in zip(info.shape, thin[name].shape))
        for name, info in param_layout(config, full).items()
        if info.kind == "consistent"
    }


def roll_hidden(state: GlobalState, shift: int) -> GlobalState:
    """``state`` with every consistent tensor rolled by ``-shift`` along its hidden axes, so that element
    ``i`` of a hidden axis of ``C`` channels is ``state``'s channel ``(shift + i) mod C`` (a new state; the
    inconsistent copies are ``state``'s objects: they live in submodel coordinates and are not rolled)."""
    hidden = hidden_axes(state.config)
    consistent = {}
    for name, tensor in state.consistent.items():
        axes = tuple(a for a, h in enumerate(hidden[name]) if h)
        consistent[name] = np.roll(tensor, [-shift] * len(axes), axes) if axes else tensor.copy()
    return GlobalState(state.config, list(state.specs), consistent, state.inconsistent)


SMALLEST_PREFIX = "smallest/"
"""Names of the smallest submodel's own tensors in an in-place distillation update and task (the same value
as ``torch_training.SMALLEST_PREFIX``, which this numpy-only module does not import)."""


@dataclass(frozen=True)
class InPlaceDistillation(Strategy):
    """NeFL-WD with in-place distillation into the smallest submodel: the sandwich rule of slimmable networks
    (Yu & Huang, "Universally Slimmable Networks and Improved Training Techniques", ICCV 2019), in federated
    form. A client that trains submodel ``k > 0`` also trains submodel 0 in the same local step: the loss is
    the cross-entropy of submodel ``k`` plus ``KL(softmax(z_k).detach() || softmax(z_0))`` of the smallest
    submodel's logits ``z_0`` on the same batch, one SGD step on the sum (``torch_training.distill_train``).
    The smallest submodel's consistent tensors are prefixes of submodel ``k``'s (nested specs), so its update
    is the usual one; the update also carries submodel 0's own (inconsistent) tensors, BatchNorm and step
    sizes (``smallest/<name>``), and those are averaged among every client that trained them this round, its
    own clients and the distilling ones (``_DistillAggregator``). So the parameters only the smallest
    submodel has are trained by every device, not by the tenth that draws it.

    Sources and where this departs from them. Yu & Huang train the largest width on the labels and the
    smallest plus two random widths on the largest's soft outputs, summing gradients before one step; here
    the teacher is the device's own submodel (not the global largest), there are no random middle widths
    (a device with a deadline pays for one extra forward/backward of the smallest submodel only; the
    deadline projection prices it, ``assignment.task_mflops``), and the student gets no label loss (as
    theirs). FjORD (Horváth et al., NeurIPS 2021, section 4) distils, on a device, from its largest width to
    the sampled ordered-dropout width ("self-distillation"); we distil to a fixed width (the smallest), the
    one the weakest devices deploy. ScaleFL (Ilhan et al., CVPR 2023) distils from the deepest exit to the
    early exits with a KL term on temperature-scaled logits beside the label loss; we use temperature 1 and
    no label loss on the student, and have no early exits (the smallest is a separate nested submodel). No
    source averages the student's own normalisation layers over the distilling clients: that is ours.
    On devices (``serve``, ``simulate --trainer ort``) the same step runs in ONNX Runtime: the export adds to
    every submodel above 0 the smallest submodel's student graph and the whole step as one portable graph
    (``export.distill``), and the device's trainer runs them (``edge_client.trainer.OrtDistillBackend``, or the
    portable backend on stock ``onnxruntime``)."""

    @property
    def device_trainable(self) -> bool:
        """The devices run this step too (``export.distill``'s graphs)."""
        return True

    def plan(self, config: ModelConfig, gammas: tuple[float, ...]) -> Plan:
        """NeFL-WD's plan, with the smallest submodel distilled by every other client."""
        return replace(super().plan(config, gammas), distill_smallest=True)

    def local_train(
        self, state: GlobalState, index: int, data: Dataset, cfg: TrainConfig, opts: TorchOptions = TorchOptions()
    ) -> Tensors:
        """``torch_training.distill_train``: submodel ``index`` on the labels, submodel 0 on its outputs."""
        from nefl_edge.coordinator.torch_training import distill_train

        return distill_train(state, index, data, cfg, opts)

    def extract(self, state: GlobalState, index: int, round_: int = 0) -> Tensors:
        """Submodel ``index``'s tensors and, in a training round (``round_ > 0``) of a submodel other than 0,
        submodel 0's own tensors under ``smallest/`` (the norm bound's reference for them)."""
        out = extract(state, index)
        if round_ > 0 and index > 0:
            small = param_layout(state.config, state.specs[0])
            out.update(
                {
                    SMALLEST_PREFIX + n: state.inconsistent[0][n].copy()
                    for n, i in small.items()
                    if i.kind != "consistent"
                }
            )
        return out

    def update_shapes(self, config: ModelConfig, plan: Plan, index: int) -> dict[str, tuple[int, ...]]:
        """Submodel ``index``'s layout and, for ``index > 0``, submodel 0's own tensors under ``smallest/``."""
        out = super().update_shapes(config, plan, index)
        if index > 0:
            small = param_layout(config, plan.specs[0])
            out.update({SMALLEST_PREFIX + n: i.shape for n, i in small.items() if i.kind != "consistent"})
        return out

    def aggregator(
        self, state: GlobalState, weighting: Weighting, round_: int, robust: Optional[RobustOptions] = None
    ) -> Aggregator:
        """NeFedAvg of the submodels, and submodel 0's own tensors over everyone who trained them."""
        return _DistillAggregator(state, weighting, robust)


class _DistillAggregator:
    """NeFedAvg (robust or not) of the round's updates as they are, and a second NeFedAvg of submodel 0 alone
    fed by every update: a client of submodel 0 as it is, a distilling client as submodel 0's nested prefix
    of its consistent tensors with its ``smallest/`` tensors. The result takes submodel 0's own tensors from
    the second (its consistent tensors are the first's: each element averaged once, over its covering
    clients)."""

    def __init__(self, state: GlobalState, weighting: Weighting, robust: Optional[RobustOptions]) -> None:
        self._main = NeFedAvg(state, weighting, robust)
        self._small = NeFedAvg(state, weighting, robust)
        self._layout = param_layout(state.config, state.specs[0])

    @property
    def updates(self) -> int:
        return self._main.updates

    @property
    def robust_report(self) -> RobustReport:
        return self._main.robust_report

    def add(self, index: int, tensors: Tensors, num_samples: int, node: str = "") -> None:
        main = {n: t for n, t in tensors.items() if not n.startswith(SMALLEST_PREFIX)}
        self._main.add(index, main, num_samples, node)
        if index == 0:
            self._small.add(0, main, num_samples, node)
            return
        small = {}
        for name, info in self._layout.items():
            if info.kind == "consistent":
                small[name] = main[name][tuple(slice(0, n) for n in info.shape)]
            else:
                small[name] = tensors[SMALLEST_PREFIX + name]
        self._small.add(0, small, num_samples, node)

    def result(self) -> GlobalState:
        out = self._main.result()
        if self._small.updates:
            out.inconsistent[0] = self._small.result().inconsistent[0]
        return out


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "nefl-wd",
            "Kang et al., NeFL: Nested Model Scaling for Federated Learning with System Heterogeneous Clients, "
            "arXiv 2308.07761 (width and depth)",
        ),
        InPlaceDistillation(
            "nefl-wd-distill",
            "Kang et al., arXiv 2308.07761 (NeFL-WD), with the sandwich rule's in-place distillation into the "
            "smallest submodel (Yu & Huang, Universally Slimmable Networks and Improved Training Techniques, "
            "ICCV 2019); not in the NeFL paper",
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
        FedRolex(
            "fedrolex",
            "Alam et al., FedRolex: Model-Heterogeneous Federated Learning with Rolling Sub-Model Extraction, "
            "NeurIPS 2022 (width windows rolling one channel a round, shared BN affine, static BN statistics)",
            scaling="W",
            shared_bn=True,
            learned_step=False,
            tracked_bn=False,
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
    """The method called ``name``; :class:`SpecError` (a clear exit 2 from the CLI) for an unknown one."""
    if name not in STRATEGIES:
        raise SpecError(f"unknown method {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
