"""The MQTT grid: the coordinator's protocol session (:mod:`coordinator.session`) on an MQTT link, as the
:class:`coordinator.grid.Grid` that ``serve`` runs rounds over. What is sent and what an answer may be are
the session's rules; this module wires them to a broker and chooses how a submodel's weights are cut from
the global state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional, Union

from nefl_edge.coordinator.assignment import ClientInfo
from nefl_edge.coordinator.grid import EvalOutcome, EvalRequest, Instruction, Outcome
from nefl_edge.coordinator.registry import Registry
from nefl_edge.coordinator.session import (
    GRACE_S,
    LOST_GRACE_S,
    CoordinatorSession,
    Extract,
    NotEnoughClients,
)
from nefl_edge.core.link import Inbound
from nefl_edge.core.mqtt import MqttLink
from nefl_edge.core.nested import GlobalState, extract
from nefl_edge.core.schemas import EvalTask, Manifest

__all__ = ["GRACE_S", "LOST_GRACE_S", "MqttGrid", "NotEnoughClients"]


class MqttGrid:
    """Tasks over MQTT. ``open`` publishes the run; ``close`` ends it for the devices and clears what it
    retained on the broker."""

    def __init__(
        self,
        link: MqttLink,
        run: str,
        manifest: Manifest,
        artifacts: Path,
        deadline_s: float,
        wait_clients_s: float,
        registry: Optional[Registry] = None,
        stop: Optional[threading.Event] = None,
        deployed: Extract = extract,
    ) -> None:
        """``deployed`` cuts the weights of a submodel as devices get them outside a training round's own
        extraction (the evaluation step): the strategy's deployed submodel (``Strategy.extract`` at round 0),
        the nested prefix by default."""
        self.link, self.wait_clients_s = link, wait_clients_s
        self.session = CoordinatorSession(link, run, manifest, artifacts, deadline_s, deployed, registry, stop)
        self.registry, self.stop = self.session.registry, self.session.stop

    def open(self) -> None:
        self.session.open()

    def close(self, reason: str) -> None:
        self.session.close(reason)

    @property
    def on_progress(self) -> Optional[Callable[[str], None]]:
        return self.session.on_progress

    @on_progress.setter
    def on_progress(self, value: Optional[Callable[[str], None]]) -> None:
        self.session.on_progress = value

    @property
    def publish_s(self) -> float:
        """Seconds the last round took to publish its weights and tasks."""
        return self.session.publish_s

    # --- Grid ----------------------------------------------------------------------------------------------

    @property
    def bytes_out(self) -> int:
        return self.session.bytes_out

    def rejections(self) -> dict[str, int]:
        return self.session.rejections()

    def offenders(self) -> list[str]:
        """The devices whose refused traffic since the last call is over budget (the engine quarantines them)."""
        return self.session.offenders()

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        return self.session.clients(minimum, self.wait_clients_s)

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """The round's weights as ``extract`` (the strategy's) cuts them; see :meth:`CoordinatorSession.run`."""
        for outcome in self.session.run(round_, state, instructions, extract):
            assert isinstance(outcome, Outcome)  # no task asked for statistics
            yield outcome

    def run_carrying(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Extract,
        bn_max_batches: Optional[int],
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """:meth:`run` whose tasks also ask for the BatchNorm statistics of the weights they ship, over at most
        ``bn_max_batches`` batches of each device's training split: one :class:`EvalOutcome` per device that
        sends them, before its update (the engine's ``bn = "federated"`` statistics of ``state``, carried by the
        next round's tasks instead of a round trip of their own)."""
        return self.session.run(round_, state, instructions, extract, True, bn_max_batches)

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        return self.session.evaluate(round_, state, requests)

    def _evaluation(
        self, round_: int, item: Inbound, pending: dict[str, EvalTask], started: float
    ) -> Optional[EvalOutcome]:
        """:meth:`coordinator.session.Answers.evaluation` (kept for callers of the former method)."""
        return self.session.answers.evaluation(round_, item, pending, started)
