"""The grid: what delivers a round's tasks to clients and brings their results back (Flower's ``Grid``).

The round engine (``coordinator.engine``) decides; a grid only delivers. Two grids exist: this module's
:class:`InProcessGrid` trains in the coordinator's process (``nefl-coord simulate``), and
``coordinator.mqtt_grid.MqttGrid`` sends tasks to real devices over MQTT (``nefl-coord serve``). Both yield
one :class:`Outcome` per instruction, so a strategy behaves the same in simulation and on devices.

Beside training, a grid runs the evaluation step (:meth:`Grid.evaluate`): clients evaluate submodels of the
aggregated model on their held-out split and/or compute its BatchNorm batch statistics on their training
split (``edge_client.evaluate``), one :class:`EvalOutcome` per :class:`EvalRequest`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, Union

from nefl_edge.coordinator.assignment import ClientInfo
from nefl_edge.coordinator.strategies import Extract, LocalTrainer
from nefl_edge.core.data import Dataset
from nefl_edge.core.encoding import decode_update, encode_update
from nefl_edge.core.evaluation import EvalResult, split_dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract
from nefl_edge.core.schemas import Metrics, TrainConfig
from nefl_edge.core.specs import param_layout

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


@dataclass(frozen=True)
class EvalRequest:
    """One client's part of an evaluation step: the submodels, and what to do with each of them."""

    node: str
    submodels: tuple[int, ...]
    evaluate: bool
    bn_stats: bool
    eval_fraction: float
    batch_size: int = 32
    bn_max_batches: Optional[int] = None


@dataclass
class EvalOutcome:
    """What came back for one :class:`EvalRequest` (not yet screened): per submodel its evaluation, and
    its BatchNorm sums as they travel (``edge_client.evaluate.BnStats.tensors``) with their batch count."""

    node: str
    status: Literal["evaluated", "declined", "dropped", "rejected"]
    results: dict[int, EvalResult] = field(default_factory=dict)
    bn_tensors: dict[int, Tensors] = field(default_factory=dict)
    bn_batches: dict[int, int] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0
    bytes_in: int = 0


class Grid(Protocol):
    """Delivers tasks and collects results."""

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        """The clients available for a round; waits until at least ``minimum`` are (or raises)."""
        ...

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """Send every instruction with the weights of its submodel in ``state`` as the round's ``extract``
        (the strategy's, ``Strategy.extract``) makes them; yield one outcome per instruction as results
        arrive (``dropped`` for those that did not answer in time)."""
        ...

    def run_carrying(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Extract,
        bn_max_batches: Optional[int],
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """:meth:`run` whose tasks also ask for the BatchNorm statistics of the weights they ship (``state``,
        the previous round's aggregate), over at most ``bn_max_batches`` batches of each client's training
        split, computed before the client trains: one :class:`EvalOutcome` per client that sends them, before
        its update (``engine`` module docstring: statistics carried by the next round)."""
        ...

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        """Send every request with the weights of its deployed submodels in ``state`` (nested prefixes); yield
        one outcome per request (``dropped`` for those that did not answer in time)."""
        ...

    @property
    def bytes_out(self) -> int:
        """Bytes sent so far (weights, tasks)."""
        ...

    @property
    def publish_s(self) -> Optional[float]:
        """Seconds the last round took to publish its weights and tasks (``None``: a grid that publishes
        nothing, whose rounds have no ``publish`` phase)."""
        ...

    def rejections(self) -> dict[str, int]:
        """Messages rejected since the last call that belong to no instruction (stale, duplicate, unknown
        sender), by reason."""
        ...

    def offenders(self) -> list[str]:
        """The clients whose refused traffic since the last call is over budget (the engine quarantines them)."""
        ...


def carried_requests(instructions: list[Instruction], bn_max_batches: Optional[int]) -> list[EvalRequest]:
    """The statistics requests a round's tasks carry (:meth:`Grid.run_carrying`): each client's, on the
    submodel it is about to train, over its training split as the task splits it."""
    return [
        EvalRequest(i.node, (i.submodel,), False, True, i.train.eval_fraction, i.train.batch_size, bn_max_batches)
        for i in instructions
    ]


def client_state(state: GlobalState, index: int, sent: Tensors) -> GlobalState:
    """What a simulated client holds: a global state made of the tensors ``sent`` to it for submodel
    ``index`` (consistent ones at the submodel's size, its own inconsistent copy), so that
    ``extract(client_state(...), index)`` is ``sent`` whatever the strategy's extraction, and a narrower
    nested submodel ``j < index`` is a prefix of it (FjORD's ordered dropout). The inconsistent copies of the
    other submodels are ``state``'s own objects (not copied: local trainers do not modify the state)."""
    layout = param_layout(state.config, state.specs[index])
    consistent = {name: sent[name] for name, info in layout.items() if info.kind == "consistent"}
    own = {name: sent[name] for name, info in layout.items() if info.kind != "consistent"}
    inconsistent = [own if k == index else t for k, t in enumerate(state.inconsistent)]
    return GlobalState(state.config, list(state.specs), consistent, inconsistent)


class InProcessGrid:
    """Clients in this process: each has a data shard and a tier; ``trainer`` trains a submodel locally."""

    def __init__(self, shards: dict[str, Dataset], tiers: dict[str, int], trainer: LocalTrainer) -> None:
        self.shards, self.tiers, self.trainer = shards, tiers, trainer
        self._splits: dict[tuple[str, float], tuple[Dataset, Dataset]] = {}

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        """Every simulated client, always available."""
        return {n: ClientInfo(n, len(d), self.tiers[n]) for n, d in sorted(self.shards.items())}

    def _split(self, node: str, fraction: float) -> tuple[Dataset, Dataset]:
        """A client's training part and held-out part, as the device splits its data."""
        key = (node, fraction)
        if key not in self._splits:
            self._splits[key] = split_dataset(self.shards[node], fraction)
        return self._splits[key]

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """Each client trains what ``extract`` sends it (``client_state``) on its training split, in turn."""
        for ins in instructions:
            data = self._split(ins.node, ins.train.eval_fraction)[0]
            start = time.perf_counter()
            sent = extract(state, ins.submodel)
            trained = self.trainer(client_state(state, ins.submodel, sent), ins.submodel, data, ins.train)
            tensors = self.as_received(sent, ins, trained)
            yield Outcome(ins.node, ins.submodel, "updated", len(data), tensors, seconds=time.perf_counter() - start)

    def run_carrying(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Extract,
        bn_max_batches: Optional[int],
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """Every client's carried statistics request (:func:`carried_requests`) answered by :meth:`evaluate`,
        then :meth:`run`: what a device computes before it trains, in the same order of results."""
        yield from self.evaluate(round_ - 1, state, carried_requests(instructions, bn_max_batches))
        yield from self.run(round_, state, instructions, extract)

    @staticmethod
    def as_received(sent: Tensors, ins: Instruction, tensors: Tensors) -> Tensors:
        """A client's trained tensors as the coordinator receives them: through the round trip of the task's
        ``update_encoding`` against the weights it was ``sent`` (so that its accuracy cost shows in
        simulation)."""
        encoding = ins.train.update_encoding
        if encoding == "float32":
            return tensors
        return decode_update(encode_update(tensors, encoding, sent), encoding, lambda: sent)

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        """What devices compute, in PyTorch: evaluation on the held-out split, BatchNorm sums on the training
        split, of the deployed submodels."""
        from nefl_edge.coordinator.evaluation import bn_batch_stats, evaluate_sums

        for req in requests:
            start = time.perf_counter()
            train, held = self._split(req.node, req.eval_fraction)
            outcome = EvalOutcome(req.node, "evaluated")
            for k in req.submodels:
                if req.evaluate and len(held):
                    outcome.results[k] = evaluate_sums(state, k, held)
                if req.bn_stats:
                    stats = bn_batch_stats(state, k, train.x, req.batch_size, req.bn_max_batches)
                    if stats.batches:
                        outcome.bn_tensors[k], outcome.bn_batches[k] = stats.tensors(), stats.batches
            outcome.seconds = time.perf_counter() - start
            yield outcome

    @property
    def bytes_out(self) -> int:
        """Nothing travels."""
        return 0

    @property
    def publish_s(self) -> Optional[float]:
        """Nothing is published."""
        return None

    def rejections(self) -> dict[str, int]:
        """Nothing is ever rejected in process."""
        return {}

    def offenders(self) -> list[str]:
        """No traffic is refused in process."""
        return []


def wait_policy(workers: int, engine: str = "local", trainer: str = "torch") -> str:
    """The OpenMP wait policy (``OMP_WAIT_POLICY``) of a simulation's own process, which GNU OpenMP reads
    once, when torch is imported (``cli.simulate`` sets it before that; this module imports no torch):
    ``ACTIVE`` when this process alone trains, with PyTorch on all the cores it pins (``workers`` = 1, the
    local engine, the torch trainer), ``PASSIVE`` otherwise. A process that has the cores to itself loses
    most where its threads sleep: a training step of the small conv net is many short parallel regions, and
    a passive thread is woken for each (2 rounds of the Flower benchmark's job, serial: 44 s passive, 41 s
    active; with the evaluation inline, 36 s and 28 s, as fast as ``--workers 2``). Where processes share
    the cores (``--workers``, Ray, the coordinator beside them), a spinning thread takes the core a
    neighbour needs: spinning threads on a loaded host made 2 threads 10x slower than 1 in the device
    benchmark (``bench/device.py``). The ONNX Runtime trainer keeps ``PASSIVE``: idle torch threads must not
    spin beside its own thread pool."""
    return "ACTIVE" if workers == 1 and engine == "local" and trainer == "torch" else "PASSIVE"


def no_training(state: GlobalState, index: int, data: Dataset, cfg: TrainConfig) -> Tensors:
    """The trainer of a grid whose training runs elsewhere (a pool, Ray): it is never called."""
    raise AssertionError("an evaluation task trains nothing")


def evaluate_one(round_: int, state: GlobalState, shard: Dataset, request: EvalRequest) -> EvalOutcome:
    """One client's part of the evaluation step, alone (what a worker process or a Ray task runs):
    :meth:`InProcessGrid.evaluate` over that client, so a pool gives the serial grid's outcome."""
    grid = InProcessGrid({request.node: shard}, {request.node: 0}, no_training)
    return next(iter(grid.evaluate(round_, state, [request])))
