"""The one description of a submodel's network, as data: which layers, how wide, in which order they run.

:func:`describe` turns a model config and a submodel spec into an :class:`Architecture`, a tree of plain
records (convolutions, BatchNorms, ReLUs, a max pool, residual blocks, the classifier) with every channel
count and feature-map size already worked out for the spec's width and kept blocks. Everything that needs the
network's shape reads it from here and walks it once:

- ``specs.param_layout`` (tensor names, shapes and kinds) and ``specs.param_count``;
- ``specs.mflops`` (each record's multiply-adds);
- ``coordinator.models.SubmodelNet`` (one torch module per record, run in the records' order);
- the tests' naive forward pass (``tests/reference.py``), which reads the same records and does its own
  arithmetic in float64 numpy.

It is pure Python (no torch), so the device side and the manifest writer can import it.

The family is the residual network of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016)
with BasicBlocks and 1x1 projection shortcuts where the shape changes, or their pre-activation form (He et al.,
"Identity Mappings in Deep Residual Networks", ECCV 2016), as the NeFL paper uses it (Kang et al., arXiv
2308.07761). Where it departs from He et al.'s ImageNet networks, it follows NeFL: every block scales its
residual branch by a step size (``shortcut(x) + step * f(x)``); the stem is a 3x3 stride-1 convolution (the
CIFAR form, optionally followed by the paper code's 3x3 stride-2 max pool) instead of 7x7 stride 2; and width
scaling keeps the first ``ceil(w * C)`` channels of every layer (:func:`scaled`).

Names are the contract with the torch side and the checkpoints: the stem's layers are ``stem.*``, block ``b``
of stage ``s`` is ``stages.<s>.<b>`` (its projection ``stages.<s>.<b>.shortcut.*``), the tail's layers are
named at the top level (``final_bn``) and the classifier is ``head``; ``SubmodelNet`` mirrors this tree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, Union

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class Shape(Protocol):
    """What :func:`describe` reads of a model config (``specs.ModelConfig``, which imports this module)."""

    @property
    def stage_blocks(self) -> tuple[int, ...]: ...
    @property
    def stage_widths(self) -> tuple[int, ...]: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def preact(self) -> bool: ...
    @property
    def stem_pool(self) -> bool: ...
    @property
    def input_mean(self) -> tuple[float, ...]: ...
    @property
    def input_std(self) -> tuple[float, ...]: ...


class Cut(Protocol):
    """What :func:`describe` reads of a submodel spec (``specs.SubmodelSpec``)."""

    @property
    def width(self) -> float: ...
    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]: ...


def scaled(channels: int, width: float) -> int:
    """Channels a layer of ``channels`` keeps at width ratio ``width``: ``ceil(width * channels)``, at least 1
    (rounded to 6 decimals first, so that 0.3 * 10 is 3 and not 4)."""
    return max(1, math.ceil(round(width * channels, 6)))


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class Conv:
    """A square 2-d convolution without bias, weight named ``<name>.weight``; ``size`` is its input's height
    (= width)."""

    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    size: int

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in, self.kernel, self.kernel)

    @property
    def out_size(self) -> int:
        return _out_size(self.size, self.kernel, self.stride, self.padding)

    @property
    def macs(self) -> int:
        """Multiply-adds of one sample: one per weight per output position."""
        return self.out_size**2 * math.prod(self.weight_shape)


@dataclass(frozen=True)
class BatchNorm:
    """BatchNorm over ``channels``: affine ``<name>.weight`` and ``.bias``, statistics ``.running_mean`` and
    ``.running_var``."""

    name: str
    channels: int
    eps: float = BN_EPS
    momentum: float = BN_MOMENTUM


@dataclass(frozen=True)
class Relu:
    """The rectifier, max(x, 0); no parameters."""


@dataclass(frozen=True)
class MaxPool:
    """Square max pooling (padding counts as -inf); no parameters."""

    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class Linear:
    """A fully connected layer with bias (``<name>.weight`` of shape (c_out, c_in), ``<name>.bias``)."""

    name: str
    c_in: int
    c_out: int

    @property
    def macs(self) -> int:
        return self.c_in * self.c_out


@dataclass(frozen=True)
class Step:
    """A residual block's step size, the tensor ``<name>`` of shape (1,)."""

    name: str


Layer = Union[Conv, BatchNorm]
"""An operation with tensors of its own, inside a sequence of operations."""
Op = Union[Conv, BatchNorm, Relu, MaxPool]
"""One operation of a sequence, run on the output of the one before."""
Tensored = Union[Conv, BatchNorm, Step, Linear]
"""A record that owns tensors, as :meth:`Architecture.layers` yields them."""


@dataclass(frozen=True)
class Residual:
    """A residual block ``name`` (``stages.<stage>.<index>``): ``out = skip + step * body(x)``, then a ReLU when
    ``relu_after``; ``skip`` is the ``shortcut`` ops run on ``x`` (none: ``x`` itself).

    ``layers`` are the body's layers in the order they are declared (tensor names, and the torch module's
    registration order); ``body`` the order they run in, which differs for pre-activation blocks (BatchNorm
    before its convolution). The shortcut's layers run and are declared in the same order, after the body's.
    """

    name: str
    stage: int
    index: int
    layers: tuple[Layer, ...]
    body: tuple[Op, ...]
    shortcut: tuple[Layer, ...]
    relu_after: bool

    @property
    def step(self) -> Step:
        return Step(f"{self.name}.step")

    @property
    def out_size(self) -> int:
        """Height (= width) of the block's output: that of its last convolution."""
        return [op for op in self.body if isinstance(op, Conv)][-1].out_size


@dataclass(frozen=True)
class Architecture:
    """A submodel's network: ``stem`` (a sequence of ops named ``stem.*``), the kept residual blocks of every
    stage in order, the ``tail`` ops (named at the top level), global average pooling and the ``head``."""

    in_channels: int
    image_size: int
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    stem: tuple[Op, ...]
    stages: tuple[tuple[Residual, ...], ...]
    tail: tuple[Op, ...]
    head: Linear

    def blocks(self) -> Iterator[Residual]:
        for stage in self.stages:
            yield from stage

    def layers(self) -> Iterator[Tensored]:
        """Every record that owns tensors, in declaration order (the order of ``param_layout``)."""
        yield from _layers(self.stem)
        for block in self.blocks():
            yield from block.layers
            yield from block.shortcut
            yield block.step
        yield from _layers(self.tail)
        yield self.head

    def convs(self) -> Iterator[Conv]:
        return (layer for layer in self.layers() if isinstance(layer, Conv))


def _layers(ops: tuple[Op, ...]) -> Iterator[Layer]:
    return (op for op in ops if isinstance(op, (Conv, BatchNorm)))


def describe(config: Shape, spec: Cut) -> Architecture:
    """The network of submodel ``spec`` of ``config`` (the global model is the full spec). Assumes a valid spec
    (``specs.param_layout`` checks it and says what is wrong).

    Channels: the stem and every stage keep ``scaled(width, spec.width)`` channels; a stage's first block takes
    the previous stage's channels, downsamples by stride 2 (except in stage 0) and has a 1x1 projection
    shortcut (except in stage 0, whose input is already as wide: the stem is as wide as stage 0). Only the
    blocks in ``spec.blocks[stage]`` exist; a skipped block is the identity.
    """
    preact = config.preact
    size = config.image_size
    c_in = scaled(config.stage_widths[0], spec.width)
    conv = Conv("stem.conv", config.in_channels, c_in, 3, 1, 1, size)
    stem: list[Op] = [conv] if preact else [conv, BatchNorm("stem.bn", c_in), Relu()]
    size = conv.out_size
    if config.stem_pool:
        pool = MaxPool(3, 2, 1)
        stem.append(pool)
        size = _out_size(size, pool.kernel, pool.stride, pool.padding)
    stages = []
    for s, (n_blocks, stage_width) in enumerate(zip(config.stage_blocks, config.stage_widths, strict=True)):
        c_out = scaled(stage_width, spec.width)
        blocks = []
        for b in range(n_blocks):
            if b not in spec.blocks[s]:
                continue
            block = _basic_block(f"stages.{s}.{b}", s, b, c_in if b == 0 else c_out, c_out, size, preact)
            blocks.append(block)
            size = block.out_size
        stages.append(tuple(blocks))
        c_in = c_out
    tail: tuple[Op, ...] = (BatchNorm("final_bn", c_in), Relu()) if preact else ()
    return Architecture(
        in_channels=config.in_channels,
        image_size=config.image_size,
        input_mean=config.input_mean,
        input_std=config.input_std,
        stem=tuple(stem),
        stages=tuple(stages),
        tail=tail,
        head=Linear("head", c_in, config.num_classes),
    )


def _basic_block(name: str, stage: int, index: int, c_in: int, c_out: int, size: int, preact: bool) -> Residual:
    """A BasicBlock: two 3x3 convolutions; the first of a stage's first block strides (stage > 0)."""
    stride = 2 if index == 0 and stage > 0 else 1
    conv1 = Conv(f"{name}.conv1", c_in, c_out, 3, stride, 1, size)
    conv2 = Conv(f"{name}.conv2", c_out, c_out, 3, 1, 1, conv1.out_size)
    bn1 = BatchNorm(f"{name}.bn1", c_in if preact else c_out)
    bn2 = BatchNorm(f"{name}.bn2", c_out)
    shortcut: tuple[Layer, ...] = ()
    if stride != 1 or c_in != c_out:
        projection = Conv(f"{name}.shortcut.conv", c_in, c_out, 1, stride, 0, size)
        shortcut = (projection, BatchNorm(f"{name}.shortcut.bn", c_out))
    body: tuple[Op, ...] = (bn1, Relu(), conv1, bn2, Relu(), conv2) if preact else (conv1, bn1, Relu(), conv2, bn2)
    return Residual(name, stage, index, (conv1, bn1, conv2, bn2), body, shortcut, relu_after=not preact)
