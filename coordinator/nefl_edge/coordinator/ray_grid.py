"""Simulation on Ray (``nefl-coord simulate --engine ray``, the optional extra ``nefl-edge[ray]``).

:class:`RayGrid` is the in-process grid (``coordinator.grid.InProcessGrid``) with a round's clients trained as
Ray tasks, on a local Ray started for the run (as many CPUs as this machine has) or on an existing cluster
(``--ray-address``). It plugs in at the grid seam, so the round engine, the strategies and the aggregate are
those of every other grid: outcomes are yielded in instruction order, and each client's training depends only
on the weights it is sent, its data and its seed, so the final state is the serial one (``tests/test_ray.py``).

What goes through Ray's object store, and how often:

- each client's data shard: once per run (``ray.put`` the first time the client is selected or evaluated);
- the global state: once per round (its tasks' carried statistics pass included), and once per evaluation
  step of its own (the aggregated state);
- the weights of each submodel the round trains (the strategy's ``extract``): once per round and submodel;
- never per client: a task gets object references, which Ray resolves from shared memory on its node
  (numpy arrays without a copy) or fetches once per node.

This follows Flower's simulation engine (``flwr[simulation]``: virtual clients as Ray workers with a CPU and GPU
share each, https://flower.ai/docs/framework/how-to-run-simulations.html) with two departures: clients are
stateless tasks rather than a pool of actors (Ray schedules them wherever a shard already lives, and a node
that joins the cluster is used from the next round), and the per-round payload is put once, not sent with each
client's instruction. The evaluation step (federated BatchNorm statistics, federated evaluation) runs as tasks
too, one per request, with the exact code of ``InProcessGrid.evaluate``.

Start-up (issue 24: Ray was 6.6 % slower than ``--workers 2`` on the Flower benchmark's job): a local Ray gets
the workers' environment (``OMP_WAIT_POLICY``) from the driver's, which its processes inherit, not as a job
``runtime_env``. ``ray.init`` prestarts a worker per CPU, but a job with a runtime environment gets workers
started for it on its first tasks (Ray 2.60, at nice 19 on the shared 2-core host: two trivial first tasks took
0.19 s on the two prestarted workers without one, 0.82 s on a single new worker with ``env_vars`` only; Ray's
own release test ``benchmark_worker_startup.py`` times worker start-up with and without a runtime env). Not
done, as it would not pay: warm-up tasks when the grid is made (the first round's tasks follow within
milliseconds and do the same imports; the coordinator's own set-up, loading the data, is over by then).

Ray is imported only when a :class:`RayGrid` is made, so that the CLI starts without it.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from nefl_edge.coordinator.config import ConfigError
from nefl_edge.coordinator.grid import (
    EvalOutcome,
    EvalRequest,
    InProcessGrid,
    Instruction,
    Outcome,
    carried_requests,
    client_state,
    evaluate_one,
    no_training,
)
from nefl_edge.coordinator.strategies import Extract, get_strategy
from nefl_edge.coordinator.training_options import TorchOptions
from nefl_edge.core.data import Dataset
from nefl_edge.core.evaluation import split_dataset
from nefl_edge.core.nested import GlobalState, Tensors, extract
from nefl_edge.core.schemas import TrainConfig

INSTALL_HINT = "pip install 'nefl-edge[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how the clients run: ``address`` of an existing cluster (``None``: a local Ray started for
    the run with this machine's CPUs; ``"auto"``: the cluster this machine belongs to), and the CPU and GPU
    share each client task reserves (Flower's ``num_cpus`` / ``num_gpus`` per virtual client). A task runs
    PyTorch with ``max(1, floor(client_cpus))`` threads, and on its GPU when ``client_gpus`` > 0."""

    address: Optional[str] = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        if not self.client_cpus > 0:
            raise ConfigError(f"client_cpus must be above 0, got {self.client_cpus}")
        if self.client_gpus < 0:
            raise ConfigError(f"client_gpus must be 0 or more, got {self.client_gpus}")

    @property
    def threads(self) -> int:
        """PyTorch intra-op threads of one client task."""
        return max(1, math.floor(self.client_cpus))


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray, which is not installed here ({INSTALL_HINT})") from e
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A :class:`ConfigError` unless something accepts TCP connections at ``address`` (``host:port``; ``auto``
    and ``ray://`` addresses are left to Ray). Ray itself retries an address where nothing listens for
    minutes."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: give host:port (the head node's GCS port), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e})") from e


def _pinned(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    # Arrays resolved from the object store are read-only; PyTorch warns when it wraps one (it never writes it).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _train_task(
    method: str,
    opts: TorchOptions,
    threads: int,
    state: GlobalState,
    sent: Tensors,
    index: int,
    shard: Dataset,
    train: TrainConfig,
) -> tuple[Tensors, float, str]:
    """One client's local training in a Ray worker: what ``InProcessGrid.run`` does for one instruction; also
    the id of the Ray node it ran on."""
    import ray

    _pinned(threads)
    start = time.perf_counter()
    data = split_dataset(shard, train.eval_fraction)[0]
    tensors = get_strategy(method).local_train(client_state(state, index, sent), index, data, train, opts)
    return tensors, time.perf_counter() - start, ray.get_runtime_context().get_node_id()


def _evaluate_task(threads: int, round_: int, state: GlobalState, shard: Dataset, request: EvalRequest) -> EvalOutcome:
    """One client's evaluation step in a Ray worker: ``InProcessGrid.evaluate`` over this client alone."""
    _pinned(threads)
    return evaluate_one(round_, state, shard, request)


class RayGrid(InProcessGrid):
    """The in-process grid with a round's clients trained (and evaluated) as Ray tasks. Make it with the
    clients' shards and tiers, the method's name and trainer options; :meth:`close` gives Ray back (shuts
    it down if this grid started it)."""

    def __init__(
        self,
        shards: dict[str, Dataset],
        tiers: dict[str, int],
        method: str,
        opts: TorchOptions,
        ray_options: RayOptions = RayOptions(),
    ) -> None:
        super().__init__(shards, tiers, no_training)
        self.method, self.ray_options = method, ray_options
        # A task sees a GPU only where it reserved a share of one: the coordinator's --device is not the workers'.
        self.opts = replace(opts, device="cuda" if ray_options.client_gpus > 0 else "cpu")
        ray = self.ray = import_ray()
        self.started = False
        self._shards: dict[str, Any] = {}  # node -> object reference of its shard, put once per run
        if not ray.is_initialized():
            self._connect(ray, ray_options.address)
        resources = {"num_cpus": ray_options.client_cpus, "num_gpus": ray_options.client_gpus}
        self._train = ray.remote(**resources)(_train_task)
        self._evaluate = ray.remote(**resources)(_evaluate_task)
        self.puts = 0
        """Objects this grid put into the object store (shards, states, submodel weights)."""
        self.nodes: Counter[str] = Counter()
        """Client trainings per Ray node id: where the cluster ran them."""

    def _connect(self, ray: Any, address: Optional[str]) -> None:
        # Usage statistics would be reported to Ray's servers from a cluster we start: off unless the user says.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # OpenMP threads of an idle PyTorch worker wait passively: spinning ones take the CPU of the task beside.
        # A local Ray's processes inherit it from this one's environment (its prestarted workers then serve the
        # first tasks); a cluster's workers get it as the job's runtime environment.
        policy = os.environ.get("OMP_WAIT_POLICY")
        try:
            if address is None:
                os.environ["OMP_WAIT_POLICY"] = policy or "PASSIVE"
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="WARNING")
            else:
                check_reachable(address)
                runtime_env = {"env_vars": {"OMP_WAIT_POLICY": policy or "PASSIVE"}}
                ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
        except ConnectionError as e:
            raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({e})") from e
        finally:
            if policy is None:  # this process's own OpenMP read its policy when torch was imported
                os.environ.pop("OMP_WAIT_POLICY", None)
        self.started = True
        cluster = ray.cluster_resources()
        if cluster.get("CPU", 0) < self.ray_options.client_cpus or cluster.get("GPU", 0) < self.ray_options.client_gpus:
            self.close()
            raise ConfigError(
                f"the Ray cluster has {cluster.get('CPU', 0):g} CPU(s) and {cluster.get('GPU', 0):g} GPU(s), less than "
                f"one client's share (--client-cpus {self.ray_options.client_cpus:g}, "
                f"--client-gpus {self.ray_options.client_gpus:g})"
            )

    def _put(self, value: Any) -> Any:
        self.puts += 1
        return self.ray.put(value)

    def _shard(self, node: str) -> Any:
        if node not in self._shards:
            self._shards[node] = self._put(self.shards[node])
        return self._shards[node]

    def run(
        self, round_: int, state: GlobalState, instructions: list[Instruction], extract: Extract = extract
    ) -> Iterator[Outcome]:
        """The round's clients as Ray tasks: the state and each trained submodel's weights put once, every
        client's task started at once (Ray runs as many as the cluster has room for); outcomes in order."""
        yield from self._outcomes(self._submit(self._put(state), state, instructions, extract))

    def run_carrying(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Extract,
        bn_max_batches: Optional[int],
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """``InProcessGrid.run_carrying`` with every client's statistics task and training task started at once
        (no worker waits for the last statistics before training starts) and the state put once for both; the
        same outcomes in the same order."""
        state_ref = self._put(state)
        statistics = [
            self._evaluate.remote(self.ray_options.threads, round_ - 1, state_ref, self._shard(a.node), a)
            for a in carried_requests(instructions, bn_max_batches)
        ]
        jobs = self._submit(state_ref, state, instructions, extract)
        for job in statistics:
            yield self.ray.get(job)
        yield from self._outcomes(jobs)

    def _submit(
        self, state_ref: Any, state: GlobalState, instructions: list[Instruction], extract: Extract
    ) -> list[tuple[Instruction, Tensors, Any]]:
        """Start every instruction's training task (each trained submodel's weights put once); per task its
        instruction, the weights sent and the task's reference."""
        sent: dict[int, tuple[Tensors, Any]] = {}
        jobs = []
        for ins in instructions:
            if ins.submodel not in sent:
                weights = extract(state, ins.submodel)
                sent[ins.submodel] = (weights, self._put(weights))
            job = self._train.remote(
                self.method,
                self.opts,
                self.ray_options.threads,
                state_ref,
                sent[ins.submodel][1],
                ins.submodel,
                self._shard(ins.node),
                ins.train,
            )
            jobs.append((ins, sent[ins.submodel][0], job))
        return jobs

    def _outcomes(self, jobs: list[tuple[Instruction, Tensors, Any]]) -> Iterator[Outcome]:
        for ins, weights, job in jobs:
            tensors, seconds, node = self.ray.get(job)
            self.nodes[node] += 1
            samples = len(self._split(ins.node, ins.train.eval_fraction)[0])
            received = self.as_received(weights, ins, tensors)
            yield Outcome(ins.node, ins.submodel, "updated", samples, received, seconds=seconds)

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        """The evaluation step as one Ray task per request (the state put once); outcomes in order."""
        if not requests:
            return
        state_ref = self._put(state)
        jobs = [
            self._evaluate.remote(self.ray_options.threads, round_, state_ref, self._shard(req.node), req)
            for req in requests
        ]
        for job in jobs:
            yield self.ray.get(job)

    def close(self) -> None:
        """Drop this run's objects; shut Ray down if this grid started or joined it."""
        self._shards.clear()
        if self.started:
            self.started = False
            self.ray.shutdown()
