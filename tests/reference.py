"""The tests' naive forward pass of a submodel, straight from the global state (shared by the test modules that
hold ``SubmodelNet`` and the exported graphs against it; kept here so that no test module imports another).

It reads the network's one description (``core.architecture.describe``), as everything else does, but does its
own arithmetic in float64 numpy: each convolution is a sum over the kernel's offsets of strided input slices
times the weight's column, and every consistent tensor is cut from the full-size global tensor here, by the
channel counts of the description's records (not by ``extract``). Evaluation mode (BatchNorm uses the stored
statistics).
"""

from __future__ import annotations

import numpy as np

from nefl_edge.core.architecture import BatchNorm, Conv, MaxPool, Op, Relu, describe
from nefl_edge.core.nested import GlobalState


def conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    n, _, h, _ = x.shape
    out_channels, _, k, _ = w.shape
    size = (h + 2 * padding - k) // stride + 1
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, size, size, out_channels))
    for i in range(k):
        for j in range(k):
            window = padded[:, :, i : i + stride * size : stride, j : j + stride * size : stride]
            out += np.tensordot(window, w[:, :, i, j], axes=([1], [1]))  # sum over input channels
    return out.transpose(0, 3, 1, 2)


def max_pool(x: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    size = (x.shape[2] + 2 * padding - kernel) // stride + 1
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    out = np.full((*x.shape[:2], size, size), -np.inf)
    for i in range(kernel):
        for j in range(kernel):
            out = np.maximum(out, padded[:, :, i : i + stride * size : stride, j : j + stride * size : stride])
    return out


def naive_forward(state: GlobalState, index: int, x: np.ndarray) -> np.ndarray:
    """Logits of submodel ``index`` of ``state`` on ``x`` (N, C, H, W), evaluation mode, in float64."""
    arch = describe(state.config, state.specs[index])
    own = state.inconsistent[index]

    def tensor(name: str, *cut: int) -> np.ndarray:
        """A consistent tensor's leading ``cut`` block of the global tensor, or the submodel's own tensor."""
        if name in own:
            return own[name].astype(np.float64)
        return state.consistent[name][tuple(slice(0, c) for c in cut)].astype(np.float64)

    def run(ops: tuple[Op, ...], h: np.ndarray) -> np.ndarray:
        for op in ops:
            if isinstance(op, Relu):
                h = np.maximum(h, 0.0)
            elif isinstance(op, MaxPool):
                h = max_pool(h, op.kernel, op.stride, op.padding)
            elif isinstance(op, Conv):
                h = conv2d(h, tensor(f"{op.name}.weight", op.c_out, op.c_in), op.stride, op.padding)
            elif isinstance(op, BatchNorm):
                mean, var = tensor(f"{op.name}.running_mean"), tensor(f"{op.name}.running_var")
                scale, shift = tensor(f"{op.name}.weight", op.channels), tensor(f"{op.name}.bias", op.channels)
                per_channel = (1, -1, 1, 1)
                h = (h - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + op.eps)
                h = h * scale.reshape(per_channel) + shift.reshape(per_channel)
        return h

    h = x.astype(np.float64)
    if arch.input_mean:
        h = (h - np.array(arch.input_mean)[None, :, None, None]) / np.array(arch.input_std)[None, :, None, None]
    h = run(arch.stem, h)
    for block in arch.blocks():
        skip = run(block.shortcut, h)
        h = skip + tensor(block.step.name)[0] * run(block.body, h)
        if block.relu_after:
            h = np.maximum(h, 0.0)
    h = run(arch.tail, h)
    pooled = h.mean(axis=(2, 3))
    head = arch.head
    return pooled @ tensor(f"{head.name}.weight", head.c_out, head.c_in).T + tensor(f"{head.name}.bias", head.c_out)
