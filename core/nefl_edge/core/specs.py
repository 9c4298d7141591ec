"""Model shapes, submodel specs, and the parameter layout they imply.

Everything here is pure Python: no torch, so the manifest writer, the aggregator and the tests can use it
without building a network.

A NeFL submodel (Kang et al., "NeFL: Nested Model Scaling for Federated Learning with System
Heterogeneous Clients", arXiv 2308.07761) is a width ratio plus a set of kept residual blocks. Width
scaling keeps the first ``ceil(w * C)`` channels of every layer (nested prefixes, as HeteroFL); depth
scaling skips blocks. Departure from the paper's code: a stage's first block (the one that changes channel
count and stride) is always kept, and depth scaling keeps a prefix of each stage's blocks. This keeps every
submodel's tensor shapes well defined without the paper's special cases for skipped downsampling blocks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        return cls(
            name=str(data["name"]),
            stage_blocks=tuple(int(b) for b in data["stage_blocks"]),  # type: ignore[attr-defined]
            stage_widths=tuple(int(w) for w in data["stage_widths"]),  # type: ignore[attr-defined]
            in_channels=int(data["in_channels"]),  # type: ignore[call-overload]
            image_size=int(data["image_size"]),  # type: ignore[call-overload]
            num_classes=int(data["num_classes"]),  # type: ignore[call-overload]
            preact=bool(data["preact"]),
            shared_bn=bool(data.get("shared_bn", False)),
            learned_step=bool(data.get("learned_step", True)),
            shared_head=bool(data.get("shared_head", True)),
            stem_pool=bool(data.get("stem_pool", False)),
            step_init=str(data.get("step_init", "ode")),
        )


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

    def to_dict(self) -> dict[str, object]:
        return {"width": self.width, "blocks": [list(b) for b in self.blocks], "gamma": self.gamma}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SubmodelSpec:
        blocks = tuple(tuple(int(i) for i in stage) for stage in data["blocks"])  # type: ignore[attr-defined]
        return cls(float(data["width"]), blocks, float(data.get("gamma", 1.0)))  # type: ignore[arg-type]

    def describe(self) -> str:
        return " ".join("".join("1" if i in kept else "0" for i in range(max(kept) + 1)) for kept in self.blocks)


def full_spec(config: ModelConfig) -> SubmodelSpec:
    return SubmodelSpec(1.0, tuple(tuple(range(n)) for n in config.stage_blocks), 1.0)


def scaled(channels: int, width: float) -> int:
    return max(1, math.ceil(round(width * channels, 6)))


@dataclass(frozen=True)
class ParamInfo:
    """One tensor of a submodel: its shape (a prefix slice of the global tensor) and its kind."""

    shape: tuple[int, ...]
    kind: ParamKind
    trainable: bool


def _bn(layout: dict[str, ParamInfo], prefix: str, channels: int, shared: bool = False) -> None:
    affine: ParamKind = "consistent" if shared else "inconsistent"
    for name, kind, trainable in (
        ("weight", affine, True),
        ("bias", affine, True),
        ("running_mean", "inconsistent", False),
        ("running_var", "inconsistent", False),
    ):
        layout[f"{prefix}.{name}"] = ParamInfo((channels,), kind, trainable)


def param_layout(config: ModelConfig, spec: SubmodelSpec) -> dict[str, ParamInfo]:
    """Every tensor of the submodel, named as in the global model's ``state_dict``.

    Conv and linear weights are consistent (nested slices of one global tensor); BatchNorm parameters and
    statistics and the per-block step sizes are inconsistent (one copy per submodel). The classifier is
    consistent, sliced along its input features, as in the paper's code. The config's ``shared_bn``,
    ``learned_step`` and ``shared_head`` switch these choices for the baselines of ``coordinator.strategies``.
    """
    _check_spec(config, spec)
    w = spec.width
    layout: dict[str, ParamInfo] = {}
    c_in = scaled(config.stage_widths[0], w)
    layout["stem.conv.weight"] = ParamInfo((c_in, config.in_channels, 3, 3), "consistent", True)
    if not config.preact:
        _bn(layout, "stem.bn", c_in, config.shared_bn)
    for s, (n_blocks, width) in enumerate(zip(config.stage_blocks, config.stage_widths, strict=True)):
        c_out = scaled(width, w)
        for b in range(n_blocks):
            if b not in spec.blocks[s]:
                continue
            p = f"stages.{s}.{b}"
            block_in = c_in if b == 0 else c_out
            layout[f"{p}.conv1.weight"] = ParamInfo((c_out, block_in, 3, 3), "consistent", True)
            _bn(layout, f"{p}.bn1", block_in if config.preact else c_out, config.shared_bn)
            layout[f"{p}.conv2.weight"] = ParamInfo((c_out, c_out, 3, 3), "consistent", True)
            _bn(layout, f"{p}.bn2", c_out, config.shared_bn)
            if has_shortcut(s, b):
                layout[f"{p}.shortcut.conv.weight"] = ParamInfo((c_out, block_in, 1, 1), "consistent", True)
                _bn(layout, f"{p}.shortcut.bn", c_out, config.shared_bn)
            layout[f"{p}.step"] = ParamInfo((1,), "inconsistent", config.learned_step)
        c_in = c_out
    if config.preact:
        _bn(layout, "final_bn", c_in, config.shared_bn)
    head: ParamKind = "consistent" if config.shared_head else "inconsistent"
    layout["head.weight"] = ParamInfo((config.num_classes, c_in), head, True)
    layout["head.bias"] = ParamInfo((config.num_classes,), head, True)
    return layout


def has_shortcut(stage: int, block: int) -> bool:
    """Whether a block needs a projection shortcut: the first block of every stage after the first
    (the stem is as wide as stage 0, so only later stages change shape)."""
    return block == 0 and stage > 0


def stage_stride(stage: int) -> int:
    return 1 if stage == 0 else 2


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
    """Multiply-adds of one forward pass, in millions (convolutions and the classifier)."""
    layout = param_layout(config, spec)
    size = config.image_size
    macs = size * size * math.prod(layout["stem.conv.weight"].shape)
    if config.stem_pool:
        size = math.ceil(size / 2)
    for s, n_blocks in enumerate(config.stage_blocks):
        out_size = math.ceil(size / stage_stride(s))
        for b in range(n_blocks):
            p = f"stages.{s}.{b}"
            if f"{p}.conv1.weight" not in layout:
                continue
            macs += out_size**2 * math.prod(layout[f"{p}.conv1.weight"].shape)
            macs += out_size**2 * math.prod(layout[f"{p}.conv2.weight"].shape)
            if f"{p}.shortcut.conv.weight" in layout:
                macs += out_size**2 * math.prod(layout[f"{p}.shortcut.conv.weight"].shape)
        size = out_size
    macs += math.prod(layout["head.weight"].shape)
    return macs / 1e6


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


def make_specs(
    config: ModelConfig, gammas: tuple[float, ...] = DEFAULT_GAMMAS, method: ScalingMethod = "WD"
) -> list[SubmodelSpec]:
    """Pick one submodel per requested gamma (parameter ratio to the global model).

    ``W`` scales width only (the paper's NeFL-W; width about sqrt(gamma)), ``D`` depth only (NeFL-D),
    ``WD`` both: among the depth choices it takes the one whose own parameter ratio is closest to
    sqrt(gamma), so that width and depth share the reduction, and fits the width to the rest.
    Raises :class:`SpecError` for a gamma that no spec reaches within 0.03 (and 25 % of gamma).
    """
    if not gammas:
        raise SpecError("give at least one gamma")
    total = param_count(config, full_spec(config))
    depth_options = depth_candidates(config)
    full_depth = full_spec(config).blocks
    specs: list[SubmodelSpec] = []
    for gamma in gammas:
        if not 0.0 < gamma <= 1.0:
            raise SpecError(f"gamma must be in (0, 1], got {gamma}")
        target = round(gamma * total)
        if method == "W":
            candidates = [_fit_width(config, full_depth, target)]
        elif method == "D":
            candidates = [SubmodelSpec(1.0, d) for d in depth_options]
        elif method == "WD":
            ratios = {d: param_count(config, SubmodelSpec(1.0, d)) / total for d in depth_options}
            usable = [d for d in depth_options if ratios[d] >= gamma - GAMMA_TOLERANCE]
            best = min(usable, key=lambda d: (abs(math.log(ratios[d]) - DEPTH_SHARE * math.log(gamma)), -ratios[d]))
            candidates = [_fit_width(config, best, target)]
        else:
            raise SpecError(f"unknown scaling method {method!r}; choose WD, W or D")
        spec = min((with_gamma(config, c) for c in candidates), key=lambda c: abs(c.gamma - gamma))
        if abs(spec.gamma - gamma) > min(GAMMA_TOLERANCE, 0.25 * gamma):
            raise SpecError(
                f"no {method} submodel of {config.name} has gamma {gamma} (nearest: {spec.gamma:.3f}); "
                f"choose gammas the model can reach, e.g. {', '.join(map(str, DEFAULT_GAMMAS))}"
            )
        specs.append(spec)
    return specs
