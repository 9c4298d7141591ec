"""The grid: what delivers a round's tasks to clients and brings their results back (Flower's ``Grid``).

The round engine (``coordinator.engine``) decides; a grid only delivers. Two grids exist: this module's
:class:`InProcessGrid` trains in the coordinator's process (``nefl-coord simulate``), and
``coordinator.mqtt_grid.MqttGrid`` sends tasks to real devices over MQTT (``nefl-coord serve``). Both yield
one :class:`Outcome` per instruction, so a strategy behaves the same in simulation and on devices.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional, Protocol

from nefl_edge.coordinator.assignment import ClientInfo
from nefl_edge.coordinator.nested import GlobalState, Tensors
from nefl_edge.coordinator.strategies import LocalTrainer
from nefl_edge.edge_client.data import Dataset
from nefl_edge.edge_client.schemas import Metrics, TrainConfig

Status = Literal["updated", "declined", "dropped", "rejected"]


@dataclass(frozen=True)
class Instruction:
    """One client's task in a round: the submodel it trains and how (``train.seed`` orders its batches)."""

    node: str
    submodel: int
    train: TrainConfig


@dataclass
class Outcome:
    """What came back for one instruction. ``tensors`` are set only for ``updated`` (not yet screened)."""

    node: str
    submodel: int
    status: Status
    num_samples: int = 0
    tensors: Optional[Tensors] = None
    metrics: Optional[Metrics] = None
    reason: str = ""
    seconds: float = 0.0
    bytes_in: int = 0


class Grid(Protocol):
    """Delivers tasks and collects results."""

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        """The clients available for a round; waits until at least ``minimum`` are (or raises)."""
        ...

    def run(self, round_: int, state: GlobalState, instructions: list[Instruction]) -> Iterator[Outcome]:
        """Send every instruction with the weights of its submodel in ``state``; yield one outcome per
        instruction as results arrive (``dropped`` for those that did not answer in time)."""
        ...

    @property
    def bytes_out(self) -> int:
        """Bytes sent so far (weights, tasks)."""
        ...

    def rejections(self) -> dict[str, int]:
        """Messages rejected since the last call that belong to no instruction (stale, duplicate, unknown
        sender), by reason."""
        ...


class InProcessGrid:
    """Clients in this process: each has a data shard and a tier; ``trainer`` trains a submodel locally."""

    def __init__(self, shards: dict[str, Dataset], tiers: dict[str, int], trainer: LocalTrainer) -> None:
        self.shards, self.tiers, self.trainer = shards, tiers, trainer

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        return {n: ClientInfo(n, len(d), self.tiers[n]) for n, d in sorted(self.shards.items())}

    def run(self, round_: int, state: GlobalState, instructions: list[Instruction]) -> Iterator[Outcome]:
        for ins in instructions:
            data = self.shards[ins.node]
            start = time.perf_counter()
            tensors = self.trainer(state, ins.submodel, data, ins.train)
            yield Outcome(ins.node, ins.submodel, "updated", len(data), tensors, seconds=time.perf_counter() - start)

    @property
    def bytes_out(self) -> int:
        return 0

    def rejections(self) -> dict[str, int]:
        return {}
