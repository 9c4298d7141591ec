"""How the simulator's PyTorch trainer runs (``coordinator.torch_training``), as plain data: the policy half
(``coordinator.strategies``) names it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TorchOptions:
    """How the simulator's PyTorch trainer runs: the torch device, and augmentation of the local batches
    (random crop with 4 pixels of zero padding and a horizontal flip, as the paper's CIFAR runs)."""

    device: str = "cpu"
    augment: bool = False
