"""Local SGD: the one definition of the update that every training runtime of nefl-edge applies.

One step on a trainable tensor ``w`` with gradient ``g`` (of the batch's mean cross-entropy), under a task's
:class:`~nefl_edge.core.schemas.TrainConfig` (learning rate ``lr``, ``momentum``, ``weight_decay``)::

    d = g + weight_decay * w                   weight decay as an L2 term on the gradient (coupled)
    b = d                                      on a task's first step (no buffer yet)
    b = momentum * b_previous + d              on the steps after it
    w = w - lr * b                             with momentum 0: w = w - lr * d, and no buffer is kept

This is ``torch.optim.SGD`` with ``dampening=0``, ``nesterov=False``, ``maximize=False`` (the algorithm box of
https://pytorch.org/docs/stable/generated/torch.optim.SGD.html: momentum in the form of Sutskever et al.,
ICML 2013, with the learning rate applied to the buffer). It departs from AdamW-style decoupled decay (the
decay is scaled by ``lr`` through the buffer, not applied to ``w`` apart) and from Nesterov momentum.

- It applies to every trainable tensor of a submodel (conv and linear weights, BatchNorm scales and shifts,
  NeFL's step sizes); BatchNorm running statistics are not trained, they follow the batches.
- The buffer starts afresh with every task (a backend's ``load``), as a new ``torch.optim.SGD`` does.

Three runtimes apply it, because each holds the tensors in its own place and one cannot call another:

- :func:`sgd_step` below, numpy: the ``ort-training`` backend (``edge_client.trainer.OrtTrainingBackend``).
  ONNX Runtime's training graph gives the gradients; its optimizer graph has plain SGD only (no momentum, no
  weight decay), so the update is done here.
- the update nodes appended to the portable step graph (``export.portable.build_portable_step``), run by the
  ``portable`` backend (``edge_client.portable``) with stock ``onnxruntime``: the whole step is one graph and
  the tensors stay in ONNX Runtime between steps. Its inputs are named :data:`SGD_INPUTS`. It starts from a
  zero buffer, which gives ``b = d`` on the first step, as above.
- ``torch.optim.SGD`` built by ``coordinator.torch_training.sgd_optimizer``: simulation trains in PyTorch on
  autograd tensors (and a GPU when asked).

``tests/test_sgd.py`` checks all three against one naive step written in the test.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from nefl_edge.core.schemas import TrainConfig

SGD_INPUTS = ("lr", "momentum", "weight_decay")
"""The scalar inputs of the portable step graph, named as the :class:`TrainConfig` fields they take."""


def sgd_step(
    weight: np.ndarray, grad: np.ndarray, buffer: Optional[np.ndarray], cfg: TrainConfig
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One step of the update above on one tensor: ``(new weight as float32, new momentum buffer)``; the
    buffer is ``None`` when ``cfg.momentum`` is 0 (none is kept). ``buffer`` is the previous step's, or
    ``None`` on a task's first step. The inputs are not changed."""
    direction = grad + cfg.weight_decay * weight if cfg.weight_decay else grad
    if cfg.momentum:
        direction = direction.copy() if buffer is None else cfg.momentum * buffer + direction
        buffer = direction
    else:
        buffer = None
    return (weight - cfg.lr * direction).astype(np.float32), buffer
