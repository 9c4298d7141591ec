"""Model shapes, submodel specs, and the parameter layout they imply.

Everything here is pure Python: no torch, so the manifest writer, the aggregator and the tests can use it
without building a network.

A NeFL submodel (Kang et al., "NeFL: Nested Model Scaling for Federated Learning with System
Heterogeneous Clients", arXiv 2308.07761) is a width ratio plus a set of kept residual blocks. Width
scaling keeps the first ``ceil(w * C)`` channels of every layer (nested prefixes, as HeteroFL); depth
scaling skips blocks. Departure from the paper's code: a stage's first block (the one that changes channel
count and stride) is always kept, and depth scaling keeps a prefix of each stage's blocks. This keeps every
submodel's tensor shapes well defined without the paper's special cases for skipped downsampling blocks.
:func:`make_specs` nests the submodels (each contains the smaller ones); ``ModelConfig.specs == "paper"``
gives the paper code's own specs where this layout can express them (:func:`paper_specs`; its ResNet34
specs keep non-prefix block sets, which the layout allows as long as each stage keeps its first block).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from nefl_edge.core.architecture import BatchNorm, Conv, Step, describe
from nefl_edge.core.architecture import scaled as scaled
from nefl_edge.core.errors import BadInput

ParamKind = Literal["consistent", "inconsistent"]
ScalingMethod = Literal["WD", "W", "D"]
DEFAULT_GAMMAS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
GAMMA_TOLERANCE = 0.03
DEPTH_SHARE = 0.25


class SpecError(BadInput):
    """A model name, gamma or spec that cannot be built."""


@dataclass(frozen=True)
class ModelConfig:
    """A ResNet shape that NeFL can slice (BasicBlocks with a learnable step size per block)."""

    name: str
    stage_blocks: tuple[int, ...]
    stage_widths: tuple[int, ...]
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    preact: bool = False
    # What is shared between submodels (NeFL's choices are the defaults; baselines change them):
    shared_bn: bool = False  # BatchNorm affine as nested slices of one global tensor (HeteroFL, FjORD)
    learned_step: bool = True  # a learnable step size per block and submodel; False: fixed at 1
    shared_head: bool = True  # one classifier sliced along its inputs; False: one per submodel (DepthFL)
    # The paper's ResNet18/34 for 32x32 inputs: MaxPool(3, 2, 1) after the stem (halves the feature map).
    stem_pool: bool = False
    # Initial step sizes: "ode" (blocks in the stage / kept blocks) or "one" (1 for every kept block, the paper's).
    step_init: str = "ode"
    # Submodel specs of make_specs: "nested" (ours) or "paper" (the NeFL paper's code, see paper_specs).
    specs: str = "nested"
    # Per-channel input normalisation (x - mean) / std, the first operation of every submodel (and so of every
    # exported graph: devices feed [0, 1] inputs). Empty: none.
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.input_mean or self.input_std:
            check_normalization(self.input_mean, self.input_std, self.in_channels)

    def to_dict(self) -> dict[str, object]:
        """The config as JSON-ready values; the defaults of ``specs`` and the input statistics are left out, so
        that the architecture keys of configs from before they existed stay the same."""
        data = asdict(self)
        if self.specs == "nested":
            del data["specs"]
        if not self.input_mean:
            del data["input_mean"], data["input_std"]
        return data


def check_normalization(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> None:
    """Raise :class:`SpecError` unless ``mean`` and ``std`` give one finite value per input channel, std > 0."""
    if len(mean) != channels or len(std) != channels:
        raise SpecError(f"input normalisation needs {channels} mean and std values, got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        raise SpecError(f"input normalisation needs finite means and positive stds, got {mean} / {std}")


_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet-small": ((2, 2, 2), (16, 32, 64)),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512)),
}
_INPUTS: dict[str, tuple[int, int]] = {"fmnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32)}


def model_names() -> list[str]:
    shapes = sorted(_SHAPES)
    return shapes + [f"preact-{s}" for s in shapes]


def get_model_config(name: str, dataset: str = "fmnist", num_classes: int | None = None) -> ModelConfig:
    """Look up a model shape by name (``resnet-small``, ``resnet18``, ``resnet34``; ``preact-`` prefix
    for pre-activation blocks) for a data set's input shape."""
    preact = name.startswith("preact-")
    base = name.removeprefix("preact-")
    if base not in _SHAPES:
        raise SpecError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    if dataset not in _INPUTS:
        raise SpecError(f"unknown data set {dataset!r}; choose one of: {', '.join(sorted(_INPUTS))}")
    in_channels, size = _INPUTS[dataset]
    classes = num_classes if num_classes is not None else (100 if dataset == "cifar100" else 10)
    blocks, widths = _SHAPES[base]
    return ModelConfig(name, blocks, widths, in_channels, size, classes, preact)


@dataclass(frozen=True)
class SubmodelSpec:
    """One nested submodel: a width ratio and the kept blocks of every stage (block 0 always kept)."""

    width: float
    blocks: tuple[tuple[int, ...], ...]
    gamma: float = field(default=1.0, compare=False)

    def describe(self) -> str:
        return " ".join("".join("1" if i in kept else "0" for i in range(max(kept) + 1)) for kept in self.blocks)


def full_spec(config: ModelConfig) -> SubmodelSpec:
    return SubmodelSpec(1.0, tuple(tuple(range(n)) for n in config.stage_blocks), 1.0)


@dataclass(frozen=True)
class ParamInfo:
    """One tensor of a submodel: its shape (a prefix slice of the global tensor) and its kind."""

    shape: tuple[int, ...]
    kind: ParamKind
    trainable: bool


def param_layout(config: ModelConfig, spec: SubmodelSpec) -> dict[str, ParamInfo]:
    """Every tensor of the submodel, named as in the global model's ``state_dict``, in the order of
    :meth:`architecture.Architecture.layers` (the network's one description, :func:`architecture.describe`).

    Conv and linear weights are consistent (nested slices of one global tensor); BatchNorm parameters and
    statistics and the per-block step sizes are inconsistent (one copy per submodel). The classifier is
    consistent, sliced along its input features, as in the paper's code. The config's ``shared_bn``,
    ``learned_step`` and ``shared_head`` switch these choices for the baselines of ``coordinator.strategies``.
    """
    _check_spec(config, spec)
    affine: ParamKind = "consistent" if config.shared_bn else "inconsistent"
    head: ParamKind = "consistent" if config.shared_head else "inconsistent"
    layout: dict[str, ParamInfo] = {}
    for layer in describe(config, spec).layers():
        if isinstance(layer, Conv):
            layout[f"{layer.name}.weight"] = ParamInfo(layer.weight_shape, "consistent", True)
        elif isinstance(layer, BatchNorm):
            for name, kind, trainable in (
                ("weight", affine, True),
                ("bias", affine, True),
                ("running_mean", "inconsistent", False),
                ("running_var", "inconsistent", False),
            ):
                layout[f"{layer.name}.{name}"] = ParamInfo((layer.channels,), kind, trainable)
        elif isinstance(layer, Step):
            layout[layer.name] = ParamInfo((1,), "inconsistent", config.learned_step)
        else:
            layout[f"{layer.name}.weight"] = ParamInfo((layer.c_out, layer.c_in), head, True)
            layout[f"{layer.name}.bias"] = ParamInfo((layer.c_out,), head, True)
    return layout


def _check_spec(config: ModelConfig, spec: SubmodelSpec) -> None:
    if not 0.0 < spec.width <= 1.0:
        raise SpecError(f"width ratio must be in (0, 1], got {spec.width}")
    if len(spec.blocks) != len(config.stage_blocks):
        raise SpecError(f"spec has {len(spec.blocks)} stages, model {config.name} has {len(config.stage_blocks)}")
    for s, (kept, n) in enumerate(zip(spec.blocks, config.stage_blocks, strict=True)):
        if 0 not in kept or any(not 0 <= i < n for i in kept):
            raise SpecError(f"stage {s}: kept blocks {list(kept)} must include 0 and lie in 0..{n - 1}")


def param_count(config: ModelConfig, spec: SubmodelSpec) -> int:
    """Learnable parameters (running statistics excluded), the paper's measure of model size."""
    return sum(math.prod(p.shape) for p in param_layout(config, spec).values() if p.trainable)


def mflops(config: ModelConfig, spec: SubmodelSpec) -> float:
    """Multiply-adds of one forward pass, in millions (convolutions and the classifier; BatchNorm, ReLU, pooling
    and the residual sums are not counted)."""
    _check_spec(config, spec)
    arch = describe(config, spec)
    return (sum(conv.macs for conv in arch.convs()) + arch.head.macs) / 1e6


def depth_candidates(config: ModelConfig) -> list[tuple[tuple[int, ...], ...]]:
    """Every depth choice: a prefix of at least one block in each stage."""
    per_stage = [[tuple(range(k)) for k in range(1, n + 1)] for n in config.stage_blocks]
    return [tuple(c) for c in itertools.product(*per_stage)]


def _fit_width(config: ModelConfig, blocks: tuple[tuple[int, ...], ...], target: int) -> SubmodelSpec:
    """Largest width (to 1e-4) whose parameter count does not exceed ``target``, or the nearest above."""
    lo, hi = 1e-4, 1.0
    if param_count(config, SubmodelSpec(hi, blocks)) <= target:
        return SubmodelSpec(hi, blocks)
    for _ in range(40):
        mid = (lo + hi) / 2
        if param_count(config, SubmodelSpec(mid, blocks)) <= target:
            lo = mid
        else:
            hi = mid
    below = SubmodelSpec(math.floor(lo * 1e4) / 1e4, blocks)
    above = SubmodelSpec(math.ceil(hi * 1e4) / 1e4, blocks)
    err_below = target - param_count(config, below)
    err_above = param_count(config, above) - target
    return below if err_below <= err_above else above


def with_gamma(config: ModelConfig, spec: SubmodelSpec) -> SubmodelSpec:
    """The spec with its gamma (parameter ratio to the full model) filled in."""
    gamma = param_count(config, spec) / param_count(config, full_spec(config))
    return SubmodelSpec(spec.width, spec.blocks, round(gamma, 4))


def _contains(outer: tuple[tuple[int, ...], ...], inner: tuple[tuple[int, ...], ...]) -> bool:
    """Whether every block kept in ``inner`` is kept in ``outer``."""
    return all(set(i) <= set(o) for o, i in zip(outer, inner, strict=True))


def make_specs(
    config: ModelConfig, gammas: tuple[float, ...] = DEFAULT_GAMMAS, method: ScalingMethod = "WD"
) -> list[SubmodelSpec]:
    """Pick one submodel per requested gamma (parameter ratio to the global model), nested: every block a
    submodel keeps is kept by every larger one, and its width is at least theirs, so each submodel is a
    sub-network of the next and its compute (:func:`mflops`) grows with gamma.

    ``W`` scales width only (the paper's NeFL-W; width about sqrt(gamma)), ``D`` depth only (NeFL-D),
    ``WD`` both: among the depth choices (a prefix of each stage's blocks) it takes the one whose own
    parameter ratio is closest to gamma^(1/4) (:data:`DEPTH_SHARE`), so that depth takes about a quarter of
    the reduction in log-parameters and width the rest (width about gamma^(3/8)), and fits the width to the
    rest. Gammas are served from the smallest up; a larger gamma only chooses among depths that contain the
    smaller submodel's blocks and widths at least its width (so the smallest submodel is the same whatever
    the other gammas are, and ``fedavg-smallest`` trains the same model as NeFL's smallest).

    Departure from the paper (Kang et al., arXiv 2308.07761; its code ``get_submodel_info``): the paper
    lists its specs by hand per model, and its depth-only (``DD``) and ResNet34 ``WD`` specs are not nested
    (a larger submodel may skip a block that a smaller one keeps). ``config.specs == "paper"`` gives the
    paper's own specs instead (:func:`paper_specs`).
    Raises :class:`SpecError` for a gamma that no spec reaches within 0.03 (and 25 % of gamma).
    """
    if not gammas:
        raise SpecError("give at least one gamma")
    for gamma in gammas:
        if not 0.0 < gamma <= 1.0:
            raise SpecError(f"gamma must be in (0, 1], got {gamma}")
    if method not in ("WD", "W", "D"):
        raise SpecError(f"unknown scaling method {method!r}; choose WD, W or D")
    if config.specs == "paper":
        return paper_specs(config, gammas, method)
    total = param_count(config, full_spec(config))
    depth_options = depth_candidates(config)
    ratios = {d: param_count(config, SubmodelSpec(1.0, d)) / total for d in depth_options}
    chosen: dict[float, SubmodelSpec] = {}
    smaller: SubmodelSpec | None = None
    for gamma in sorted(set(gammas)):
        target = round(gamma * total)
        options = [d for d in depth_options if smaller is None or _contains(d, smaller.blocks)]
        if method == "W":
            candidates = [_fit_width(config, full_spec(config).blocks, target)]
        elif method == "D":
            candidates = [SubmodelSpec(1.0, d) for d in options]
        else:
            usable = [d for d in options if ratios[d] >= gamma - GAMMA_TOLERANCE] or [full_spec(config).blocks]
            ranked = sorted(
                usable, key=lambda d: (abs(math.log(ratios[d]) - DEPTH_SHARE * math.log(gamma)), -ratios[d])
            )
            fitted = (_fit_width(config, d, target) for d in ranked)
            nested = next((c for c in fitted if smaller is None or c.width >= smaller.width), None)
            # None: no depth that contains the smaller submodel reaches gamma at its width or wider
            candidates = [nested or SubmodelSpec(smaller.width if smaller else 1.0, ranked[0])]
        spec = min((with_gamma(config, c) for c in candidates), key=lambda c: abs(c.gamma - gamma))
        if abs(spec.gamma - gamma) > min(GAMMA_TOLERANCE, 0.25 * gamma):
            raise SpecError(
                f"no {method} submodel of {config.name} has gamma {gamma} (nearest: {spec.gamma:.3f}); "
                f"choose gammas the model can reach, e.g. {', '.join(map(str, DEFAULT_GAMMAS))}"
            )
        chosen[gamma] = smaller = spec
    return [chosen[g] for g in gammas]


PAPER_WD_SPECS: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    "resnet18": (
        (0.34, 0.4, 0.6, 0.8, 1.0),
        ("11 11 11 10", "11 11 11 11", "11 11 11 11", "11 11 11 11", "11 11 11 11"),
    ),
    "resnet34": (
        (0.378296187, 0.625390289, 0.770943105, 0.899800797, 1.0),
        (
            "111 1001 100001 101",
            "111 1001 111001 101",
            "111 1111 111101 101",
            "111 1111 111001 111",
            "111 1111 111111 111",
        ),
    ),
}
"""The NeFL paper's WD submodels for gammas 0.2, 0.4, 0.6, 0.8, 1.0 (its code, ``utils/getData.py::
get_submodel_info``, method ``WD``): the squared width ratios ``ps**2`` and the kept blocks per stage
(``s2D``, 1 = kept). ResNet18 is NeFL-W's widths with ``layer4.1`` dropped from the smallest submodel only
(gamma 0.198); ResNet34's submodel 3 has gamma 0.559, not 0.6, and its submodels are not nested in depth."""


def _mask(text: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(i for i, bit in enumerate(stage) if bit == "1") for stage in text.split())


def paper_specs(
    config: ModelConfig, gammas: tuple[float, ...] = DEFAULT_GAMMAS, method: ScalingMethod = "WD"
) -> list[SubmodelSpec]:
    """The submodels of the NeFL paper's code (Kang et al., arXiv 2308.07761; ``get_submodel_info`` of
    github.com/honggkang/nested-federated-learning), where our layout can express them.

    - ``W``: width ratio exactly sqrt(gamma) at full depth (the code's ``ps``; :func:`make_specs` fits the
      width to the parameter count instead, a difference below 0.01 in gamma).
    - ``WD``, resnet18 and resnet34: :data:`PAPER_WD_SPECS`, for gammas among 0.2, 0.4, 0.6, 0.8, 1.0.
      Gammas are what the specs give (ResNet34's 0.6 is 0.559), not checked against the request.
    - ``WD``, resnet-small (not in the paper): ResNet18's rule carried over: widths sqrt(gamma) at full depth,
      except the smallest of several gammas (or the only one below 1, as ``fedavg-smallest`` asks for it),
      which drops the last block of the last stage and fits its width to the parameter count.
    - ``D``: the paper's depth-only specs skip stages' first blocks (ResNet18 submodel 1 keeps no block of
      stages 2 and 4), which our layout cannot express: our nested depth-only specs instead.
    """
    nested = replace(config, specs="nested")
    if method == "D":
        return make_specs(nested, gammas, "D")
    full = full_spec(config).blocks
    if method == "W":
        return [with_gamma(config, SubmodelSpec(round(math.sqrt(g), 6), full)) for g in gammas]
    base = config.name.removeprefix("preact-")
    if base in PAPER_WD_SPECS:
        shares, masks = PAPER_WD_SPECS[base]
        specs = []
        for gamma in gammas:
            if not any(math.isclose(gamma, g) for g in DEFAULT_GAMMAS):
                raise SpecError(
                    f"the paper's WD specs of {config.name} are for gammas {', '.join(map(str, DEFAULT_GAMMAS))}; "
                    f"got {gamma}"
                )
            k = min(range(len(DEFAULT_GAMMAS)), key=lambda i: abs(DEFAULT_GAMMAS[i] - gamma))
            specs.append(with_gamma(config, SubmodelSpec(round(math.sqrt(shares[k]), 6), _mask(masks[k]))))
        return specs
    cut = (*full[:-1], full[-1][:-1] or full[-1])
    total = param_count(config, full_spec(config))
    smallest = min(gammas)
    specs = []
    for gamma in gammas:
        if gamma == smallest and gamma < 1.0:
            specs.append(with_gamma(config, _fit_width(config, cut, round(gamma * total))))
        else:
            specs.append(with_gamma(config, SubmodelSpec(round(math.sqrt(gamma), 6), full)))
    return specs
