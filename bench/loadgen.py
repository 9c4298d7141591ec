"""Load generator: many lightweight simulated devices that speak the real protocol to a real coordinator.

Each virtual device does what ``nefl-edge join`` does on the wire, without training: it says ``online``
(retained status), waits for the run's manifest, says hello (its tier, sample count and profile), and for
every task it waits for the round's weights broadcast of its submodel (checked against the task's sha256),
says ``training``, then ``online``, and uploads an update whose tensors are the broadcast weights
themselves: real-sized, in the submodel's exact layout, and within the coordinator's screening bounds.
Messages are built with the device's own schemas and framing (``edge_client.schemas``, ``wire.encode``,
``wire.frames``) and parsed with its receiver (``edge_client.mqtt.Receiver``).

Many devices share a few MQTT connections (``connections``, each one paho network thread and one sender
thread); only the first connection takes the broadcasts (manifest, weights, control). Devices are not
authenticated: run it against a local broker without ACLs.

:func:`measure` starts a Mosquitto and ``nefl-coord serve`` (a subprocess with its own run directory), runs
a fleet for some rounds and returns per-round timings, the coordinator's CPU seconds per round and its peak
RSS. ``python -m bench.loadgen --devices 500 --rounds 3`` prints them.

Round overhead (what :func:`measure` reports per round): from the coordinator taking in the last update of
round r (the end of its collecting loop: ``ended_at`` of its metrics row less the phases after it,
aggregation and the evaluation step's ``bn_statistics`` and ``federated_evaluation``) until the last task of
round r+1 arrives at the load generator. With ``bn = federated`` the statistics of round r normally come with
round r+1's tasks (``coordinator.engine``: the virtual devices answer them at once, before their update), off
the overhead: ``bn_carried_s`` is from those tasks going out to the last statistics in; only the last round
(which has no overhead) and runs with robust aggregation or federated evaluation keep a statistics round trip
of their own after aggregation (``bn_s``, then inside the overhead). The overhead also includes the broker's
delivery and the load generator decoding every device's task, which a real fleet does in parallel: spread the
devices over ``processes`` load-generator processes; ``handed_out_s`` ends instead when the coordinator has
handed the last task of round r+1 to its MQTT client (from its metrics row: the end of its ``publish`` phase).
On a shared host the wall times follow the load; ``overhead_cpu_s`` is the coordinator's CPU seconds (all its
threads) in the same window, from samples of its ``/proc`` CPU time every 0.1 s, and ``bn_cpu_s`` the same over
a statistics round trip (``bn_s``). With a round trip, ``bn_tasks_out_s`` and ``bn_answers_out_s`` are from the
round's first ``evaluate`` task arriving here to its last one arriving and to the last answer handed to paho.

Where the tasks' way out goes (issue 24): ``acked_s`` ends when the broker has acknowledged the last task of
round r+1 to the coordinator (its log line, :data:`ACKED`), so ``handed_out_s`` -> ``acked_s`` is the
coordinator's MQTT client sending them and ``acked_s`` -> ``overhead_s`` the broker delivering them and the load
generator decoding them; ``broker_overhead_cpu_s`` and ``loadgen_overhead_cpu_s`` are the broker's and every
load-generator process's CPU seconds in the overhead window (``coordinator_overhead_cpu_s`` is
``overhead_cpu_s``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import json
import logging
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import paho.mqtt.client as mqtt

from nefl_edge.core.mqtt import CHUNK_MARK, MAX_INFLIGHT, Receiver
from nefl_edge.core.schemas import (
    BnCount,
    Control,
    DeviceProfile,
    EvalTask,
    Evaluation,
    Hello,
    ManifestMessage,
    Message,
    Metrics,
    Status,
    SubmodelEval,
    Task,
    Update,
    Weights,
)
from nefl_edge.core.wire import DEFAULT_CHUNK_SIZE, Topics, encode, frames, pack_tensors, sha256, unpack_tensors

log = logging.getLogger(__name__)
PROFILE = DeviceProfile(
    arch="x86_64", system="Linux", python="3.11", cores=4, memory_mb=4096, onnxruntime="none", backend="loadgen"
)
SWITCH_INTERVAL_S = 0.0005  # this process's thread switch interval (Python's default: 5 ms)
WINDOW = 8  # updates in flight per connection before the sender waits for the broker's acknowledgement
STORE_BYTES = "$SYS/broker/store/messages/bytes"  # Mosquitto: bytes of the messages it stores (sys_interval)
AFTER_COLLECTING = ("aggregation", "bn_statistics", "federated_evaluation")
"""The phases of a metrics row that run between the end of the collecting loop and ``ended_at``."""
ACKED = re.compile(r"the broker acknowledged the (\d+) (task|evaluate) messages of round (\d+) at ([\d.]+)")
"""The coordinator's log line (``coordinator.session``) when the broker has acknowledged a round's tasks."""


@dataclass
class RoundTiming:
    """What the load generator saw of one round (``time.time()`` seconds; 0: not seen)."""

    round: int
    tasks: int = 0
    first_task_at: float = 0.0
    last_task_at: float = 0.0
    last_update_at: float = 0.0  # the broker acknowledged the round's last update
    first_eval_task_at: float = 0.0  # the round's first evaluate task (federated statistics) arrived
    last_eval_task_at: float = 0.0  # ... and its last
    last_eval_answer_at: float = 0.0  # the last answer to one was handed to paho
    coordinator_cpu_s: float = 0.0  # the coordinator's process CPU seconds when its last task arrived


@dataclass
class _Connection:
    client: mqtt.Client
    receiver: Receiver
    nodes: list[str]
    due: list[tuple[float, int, Union[Task, EvalTask]]] = field(default_factory=list)  # (answer at, seq, task)
    wake: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False
    connected: threading.Event = field(default_factory=threading.Event)

    def put(self, at: float, seq: int, task: Union[Task, EvalTask]) -> None:
        with self.wake:
            heapq.heappush(self.due, (at, seq, task))
            self.wake.notify()

    def take(self) -> Optional[Union[Task, EvalTask]]:
        """The next task whose answer is due (waits for it), or None once closed."""
        with self.wake:
            while not self.closed:
                now = time.monotonic()
                if self.due and self.due[0][0] <= now:
                    return heapq.heappop(self.due)[2]
                self.wake.wait(min(self.due[0][0] - now, 1.0) if self.due else 1.0)
            return None

    def idle(self) -> bool:
        with self.wake:
            return not self.due or self.due[0][0] > time.monotonic()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify_all()


def carried_request(task: Task) -> EvalTask:
    """The statistics a training task asks for before training (``Task.bn_stats``), as the ``evaluate`` task
    whose answer they are (same id and round: the coordinator binds them to the task)."""
    return EvalTask.model_construct(
        run=task.run,
        node=task.node,
        task_id=task.task_id,
        round=task.round,
        submodels=[task.submodel],
        weights_sha256=[task.weights_sha256],
        evaluate=False,
        bn_stats=True,
        eval_fraction=task.train.eval_fraction,
        batch_size=task.train.batch_size,
        bn_max_batches=task.bn_max_batches,
        deadline_s=task.deadline_s,
        sent_at=task.sent_at,
    )


class LoadGen:
    """``devices`` virtual devices over ``connections`` MQTT connections to ``broker`` (HOST:PORT) for run
    ``run``. Device ``i`` is node ``<prefix>-<i>`` of tier ``i % tiers`` with ``samples`` samples (``first``
    and ``total``: devices ``first`` to ``first + devices - 1`` of a fleet of ``total`` spread over several
    load-generator processes, :func:`fleet_part`). A task is
    answered ``delay_s`` (plus up to ``jitter_s``) after it arrived (at the earliest once its weights did); the
    statistics a task asks for first (``Task.bn_stats``) ``bn_delay_s`` after it arrived (0: at once).
    ``expected_tasks`` per round marks when a round's tasks are all out (then ``cpu_of`` is sampled: e.g. the
    coordinator's CPU time). While the broker stores more than ``hold_mb`` of messages (its
    ``$SYS/broker/store/messages/bytes``: a coordinator that takes in slower than the fleet answers) the
    senders wait; ``held_s`` adds up how long."""

    def __init__(
        self,
        broker: str,
        run: str,
        devices: int,
        connections: int = 4,
        tiers: int = 5,
        samples: int = 600,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        statuses: bool = True,
        prefix: str = "lg",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        expected_tasks: Optional[int] = None,
        cpu_of: Optional[Any] = None,
        hold_mb: Optional[float] = None,
        first: int = 0,
        total: Optional[int] = None,
        bn_delay_s: float = 0.0,
    ) -> None:
        host, port = broker.rsplit(":", 1)
        self.host, self.port, self.run = host, int(port), run
        # many network and sender threads in one process: hand the GIL over often (as coordinator.session does)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.topics = Topics(run)
        self.tiers, self.samples, self.delay_s, self.jitter_s = tiers, samples, delay_s, jitter_s
        self.bn_delay_s = bn_delay_s
        self.statuses, self.chunk_size = statuses, chunk_size
        self.expected_tasks = devices if expected_tasks is None else expected_tasks
        self.cpu_of = cpu_of
        self.hold_bytes = None if hold_mb is None else hold_mb * 2**20
        self.broker_bytes = self.broker_bytes_max = 0  # what the broker says it stores, if it says
        self.held_s = 0.0
        width = len(str((total or devices) - 1))
        names = [f"{prefix}-{i:0{width}d}" for i in range(first, first + devices)]
        self.tier_of = {n: (first + i) % tiers for i, n in enumerate(names)}
        count = max(1, min(connections, devices))
        self.connections = [self._connection(c, names[c::count]) for c in range(count)]
        self.manifest = threading.Event()
        self.ended = threading.Event()
        self.end_reason = ""
        self.rounds: dict[int, RoundTiming] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.updates_sent = 0
        self.bytes_sent = 0
        self._weights: dict[int, tuple[int, str, bytes]] = {}  # submodel -> (round, sha256, body)
        # (submodel, weights sha256, batches) -> the statistics tensors every virtual device sends for them
        self._bn_bodies: dict[tuple[int, str, int], dict[str, np.ndarray]] = {}
        self._bn_blobs: dict[tuple[tuple[int, str, int], ...], bytes] = {}  # packed, by the keys of _bn_bodies
        self._lock = threading.Condition()
        self._senders: list[threading.Thread] = []
        self._seq = 0

    def _connection(self, index: int, nodes: list[str]) -> _Connection:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"loadgen-{self.run}-{index}-{os.getpid()}", clean_session=True
        )
        client.max_queued_messages_set(0)
        conn = _Connection(client, Receiver(self.run), nodes)
        client.on_connect = lambda c, u, f, reason, p: self._on_connect(index, conn, reason)
        client.on_message = lambda c, u, msg: self._on_message(conn, msg.topic, bytes(msg.payload))
        return conn

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0, alive: Optional[Callable[[], bool]] = None) -> None:
        """Connect, wait for the run's manifest (while ``alive()``, e.g. the coordinator runs), then say online
        and hello for every device."""
        for conn in self.connections:
            conn.client.connect_async(self.host, self.port, keepalive=60)
            conn.client.loop_start()
        deadline = time.monotonic() + timeout_s
        for conn in self.connections:
            if not conn.connected.wait(max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"the load generator could not connect to {self.host}:{self.port}")
        while not self.manifest.wait(0.5):
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise TimeoutError(f"no manifest of run {self.run} within {timeout_s:.0f} s")
        for conn in self.connections:
            for node in conn.nodes:
                self._status(conn, node, "online")
                hello = Hello(
                    run=self.run, node=node, profile=PROFILE, num_samples=self.samples, tier=self.tier_of[node]
                )
                self._publish(conn, self.topics.node(node, "hello"), hello)
            sender = threading.Thread(target=self._sender, args=(conn,), name="loadgen-sender", daemon=True)
            sender.start()
            self._senders.append(sender)

    def wait_end(self, timeout_s: float) -> bool:
        """Until the coordinator ends the run (True) or ``timeout_s`` passed (False)."""
        return self.ended.wait(timeout_s)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        for sender in self._senders:
            sender.join(10)
        for conn in self.connections:
            for node in conn.nodes:
                with contextlib.suppress(Exception):
                    self._status(conn, node, "offline")
            conn.client.disconnect()
            conn.client.loop_stop()

    # --- receiving -----------------------------------------------------------------------------------------

    def _on_connect(self, index: int, conn: _Connection, reason: Any) -> None:
        if reason.is_failure:
            log.error("broker refused load generator connection %d: %s", index, reason)
            return
        subs = [(self.topics.node(n, "task"), 1) for n in conn.nodes]
        if index == 0:
            base = self.topics.base
            subs += [(f"{base}/manifest", 1), (f"{base}/manifest/#", 1), (f"{base}/weights/#", 1)]
            subs += [(f"{base}/control", 1), (STORE_BYTES, 0)]
        for lo in range(0, len(subs), 200):
            conn.client.subscribe(subs[lo : lo + 200])
        conn.connected.set()

    def _on_message(self, conn: _Connection, topic: str, payload: bytes) -> None:
        try:
            if topic == STORE_BYTES:
                self.broker_bytes = int(payload)
                self.broker_bytes_max = max(self.broker_bytes_max, self.broker_bytes)
                return
            item = conn.receiver.receive(topic, payload)
            if item is None:
                if conn.receiver.last_rejection is not None:
                    self.rejected[conn.receiver.last_rejection[0]] += 1
                    conn.receiver.last_rejection = None
                return
            _, message, body = item
            self._handle(conn, message, body)
        except Exception:  # never kill paho's thread
            log.exception("load generator: failed to handle a message on %s", topic)

    def _handle(self, conn: _Connection, message: Message, body: bytes) -> None:
        now = time.time()
        if isinstance(message, ManifestMessage):
            self.manifest.set()
        elif isinstance(message, Weights):
            with self._lock:
                self._weights[message.submodel] = (message.round, sha256(body), body)
                self._lock.notify_all()
        elif isinstance(message, Control) and message.action == "end":
            self.end_reason = message.reason
            self.ended.set()
            with self._lock:
                self._lock.notify_all()
        elif isinstance(message, Task):
            with self._lock:
                timing = self.rounds.setdefault(message.round, RoundTiming(message.round))
                timing.tasks += 1
                timing.first_task_at = timing.first_task_at or now
                timing.last_task_at = now
                if timing.tasks == self.expected_tasks and self.cpu_of is not None:
                    timing.coordinator_cpu_s = self.cpu_of()
            if message.bn_stats:  # the statistics of the received weights, first (before "training")
                self._seq += 1
                conn.put(time.monotonic() + self.bn_delay_s, self._seq, carried_request(message))
            self._seq += 1
            wait = self.delay_s + (random.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
            conn.put(time.monotonic() + wait, self._seq, message)
        elif isinstance(message, EvalTask):  # answered at once: the statistics pass is short beside training
            with self._lock:
                timing = self.rounds.setdefault(message.round, RoundTiming(message.round))
                timing.first_eval_task_at = timing.first_eval_task_at or now
                timing.last_eval_task_at = now
            self._seq += 1
            conn.put(time.monotonic(), self._seq, message)

    # --- answering -----------------------------------------------------------------------------------------

    def _sender(self, conn: _Connection) -> None:
        window: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        while True:
            task = conn.take()
            if task is None:
                return
            if self._hold():
                since = time.monotonic()
                while self._hold() and not conn.closed:
                    time.sleep(0.05)
                with self._lock:
                    self.held_s += time.monotonic() - since
            try:
                if isinstance(task, EvalTask):
                    window.extend(self._evaluation(conn, task))
                    with self._lock:
                        timing = self.rounds[task.round]
                        timing.last_eval_answer_at = max(timing.last_eval_answer_at, time.time())
                    continue
                body = self._weights_for(task)
                if body is None:
                    continue
                if self.statuses:
                    self._status(conn, task.node, "training")
                    self._status(conn, task.node, "online")
                metrics = Metrics(loss_first=2.3, loss_last=2.0, accuracy=0.3, steps=1, seconds=self.delay_s)
                update = Update(
                    run=self.run,
                    node=task.node,
                    task_id=task.task_id,
                    round=task.round,
                    submodel=task.submodel,
                    num_samples=self.samples,
                    metrics=metrics,
                )
                window.extend(self._publish(conn, self.topics.node(task.node, "update"), update, body))
                while len(window) > WINDOW:
                    window.popleft().wait_for_publish(60)
                if conn.idle():
                    while window:
                        window.popleft().wait_for_publish(60)
                with self._lock:
                    self.updates_sent += 1
                    timing = self.rounds[task.round]
                    timing.last_update_at = max(timing.last_update_at, time.time())
            except Exception:
                log.exception("load generator: could not answer task %s of %s", task.task_id, task.node)

    def _hold(self) -> bool:
        return self.hold_bytes is not None and self.broker_bytes > self.hold_bytes

    def _evaluation(self, conn: _Connection, task: EvalTask) -> list[mqtt.MQTTMessageInfo]:
        """A plausible answer to an ``evaluate`` task, with statistics of the real layer shapes: what a device
        sends for federated evaluation and BatchNorm re-estimation, without computing it."""
        held = max(1, int(self.samples * task.eval_fraction))
        batches = max(1, min(task.bn_max_batches or self.samples, self.samples // task.batch_size))
        results, counts, parts = [], [], []  # parts: (key, tensors) each
        for k, digest in zip(task.submodels, task.weights_sha256):
            if task.evaluate:
                results.append(SubmodelEval(submodel=k, loss=2.0, correct=held // 3, count=held))
            if task.bn_stats:
                weights = self._weights_of(k, digest, task.deadline_s, task.round)
                if weights is None:
                    continue
                counts.append(BnCount(submodel=k, batches=batches))
                parts.append(((k, digest, batches), self._bn_body(k, digest, batches, weights)))
        answer = Evaluation(
            run=self.run, node=task.node, task_id=task.task_id, round=task.round, results=results, bn=counts
        )
        return self._publish(conn, self.topics.node(task.node, "update"), answer, self._bn_packed(parts))

    def _bn_packed(self, parts: list[tuple[tuple[int, str, int], dict[str, np.ndarray]]]) -> bytes:
        """The packed statistics body of ``parts`` (key and tensors of :meth:`_bn_body` each), packed once per
        broadcast and set of submodels rather than once per device: the load generator shares the host's
        cores with the coordinator it measures."""
        if not parts:
            return b""
        keys = tuple(key for key, _ in parts)
        with self._lock:
            packed = self._bn_blobs.get(keys)
            if packed is None:
                body: dict[str, np.ndarray] = {}
                for _, tensors in parts:
                    body.update(tensors)
                if len(self._bn_blobs) >= 64:  # older broadcasts
                    self._bn_blobs.clear()
                packed = self._bn_blobs[keys] = pack_tensors(body)
        return packed

    def _bn_body(self, k: int, digest: str, batches: int, weights: bytes) -> dict[str, np.ndarray]:
        """The statistics tensors of submodel ``k`` (zero means, variance sums of ``batches``), the same for
        every virtual device: built once per broadcast, so that the load generator's own cost does not grow
        with the fleet's statistics answers."""
        key = (k, digest, batches)
        with self._lock:
            held = self._bn_bodies.get(key)
        if held is None:
            held = {}
            for name, value in unpack_tensors(weights).items():
                if name.endswith(".running_mean"):
                    layer = name[: -len(".running_mean")]
                    held[f"{k}/{layer}.mean_sum"] = np.zeros_like(value)
                    held[f"{k}/{layer}.var_sum"] = np.full_like(value, float(batches))
            with self._lock:
                self._bn_bodies = {c: v for c, v in self._bn_bodies.items() if c[0] != k}  # older broadcasts
                self._bn_bodies[key] = held
        return held

    def _weights_for(self, task: Task) -> Optional[bytes]:
        return self._weights_of(task.submodel, task.weights_sha256, task.deadline_s, task.round)

    def _weights_of(self, submodel: int, digest: str, deadline_s: float, round_: int) -> Optional[bytes]:
        deadline = time.monotonic() + deadline_s
        with self._lock:
            while not self.ended.is_set():
                held = self._weights.get(submodel)
                if held is not None and held[1] == digest:
                    return held[2]
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("no weights of submodel %d for round %d", submodel, round_)
                    return None
                self._lock.wait(min(left, 1.0))
        return None

    def _status(self, conn: _Connection, node: str, state: str) -> None:
        status = Status(run=self.run, node=node, state=state)  # type: ignore[arg-type]
        self._publish(conn, self.topics.node(node, "status"), status, retain=True)

    def _publish(
        self, conn: _Connection, topic: str, message: Message, body: bytes = b"", retain: bool = False
    ) -> list[mqtt.MQTTMessageInfo]:
        parts = frames(encode(message, body), self.chunk_size)
        out = []
        for i, frame in enumerate(parts):
            out.append(conn.client.publish(f"{topic}{CHUNK_MARK}{i}" if retain else topic, frame, qos=1, retain=retain))
        with self._lock:
            self.bytes_sent += sum(len(p) for p in parts)
        return out


# --- several load-generator processes ----------------------------------------------------------------------


def fleet_part(args: argparse.Namespace) -> None:
    """One load-generator process of a fleet spread over several (``python -m bench.loadgen --part``): its
    slice of the devices until the run ends, then its per-round timings as JSON in ``args.out``. A real
    fleet's devices each decode their own task; one Python process decoding 10,000 of them after another
    (and acknowledging each QoS 1 delivery from one GIL) is a bench artefact the parts spread over processes."""
    gen = LoadGen(
        args.broker, args.run, args.devices, args.connections, delay_s=args.delay_s, jitter_s=args.jitter_s,
        bn_delay_s=args.bn_delay_s,
        hold_mb=args.hold_mb, first=args.first, total=args.total,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda signum, frame: gen.ended.set())
    try:
        gen.start(timeout_s=args.timeout_s)
        gen.wait_end(args.timeout_s)
    finally:
        gen.close()
        result = {
            "rounds": {r: asdict(t) for r, t in gen.rounds.items()},
            "updates_sent": gen.updates_sent,
            "bytes_sent": gen.bytes_sent,
            "rejected": dict(gen.rejected),
            "held_s": gen.held_s,
        }
        Path(args.out).write_text(json.dumps(result))


def merge_parts(gen: LoadGen, parts: list[dict[str, Any]]) -> None:
    """Fold the timings of other load-generator processes into ``gen``'s: task counts add up, first times are
    the earliest seen anywhere and last times the latest."""
    for part in parts:
        gen.updates_sent += part["updates_sent"]
        gen.bytes_sent += part["bytes_sent"]
        gen.held_s += part["held_s"]
        gen.rejected.update(part["rejected"])
        for key, seen in part["rounds"].items():
            mine = gen.rounds.setdefault(int(key), RoundTiming(int(key)))
            mine.tasks += seen["tasks"]
            for name in ("first_task_at", "first_eval_task_at"):
                values = [v for v in (getattr(mine, name), seen[name]) if v]
                setattr(mine, name, min(values) if values else 0.0)
            for name in ("last_task_at", "last_update_at", "last_eval_task_at", "last_eval_answer_at"):
                setattr(mine, name, max(getattr(mine, name), seen[name]))


# --- measuring a real coordinator ----------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """The resident set size of process ``pid`` now (VmRSS), MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The CPU seconds of ``samples`` ((time, CPU seconds), in time order) at ``when``, linearly
    interpolated (clamped to the first and last sample)."""
    times = [t for t, _ in samples]
    return float(np.interp(when, times, [c for _, c in samples]))


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of process ``pid`` so far (VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def coordinator_acks(log_text: str) -> dict[tuple[int, str], float]:
    """When the broker had acknowledged each round's tasks, by (round, kind: ``task`` or ``evaluate``), from the
    coordinator's log (:data:`ACKED`; the first such line of a round and kind)."""
    out: dict[tuple[int, str], float] = {}
    for match in ACKED.finditer(log_text):
        out.setdefault((int(match.group(3)), match.group(2)), float(match.group(4)))
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def measure(
    devices: int,
    rounds: int = 3,
    model: str = "resnet-small",
    connections: int = 4,
    eval_every: int = 1,
    eval_background: bool = True,
    extra: tuple[str, ...] = (),
    folder: Optional[Path] = None,
    timeout_s: float = 600.0,
    delay_s: float = 0.0,
    jitter_s: float = 0.0,
    profile: Optional[Path] = None,
    broker_queue: Optional[int] = None,
    broker_mb: float = 3072.0,
    processes: int = 1,
    bn_delay_s: float = 0.0,
) -> dict[str, Any]:
    """One ``nefl-coord serve`` run of ``rounds`` rounds with ``devices`` virtual devices, every device
    selected every round (fraction 1, tiers round-robin over the 5 default submodels); returns the settings,
    per-round timings (overhead, coordinator CPU seconds, phases) and the coordinator's peak RSS. With
    ``profile``, ``py-spy`` (installed separately) samples the coordinator's threads into that file (collapsed
    stacks, one line per distinct stack with its sample count). ``broker_queue``: Mosquitto's
    ``max_queued_messages`` (QoS 1 messages it holds for a client that reads slower than they come; beyond
    it they are dropped); default the larger of 10,000 (what ``broker-config`` writes) and 4 per device, so
    that a coordinator that falls behind a burst of updates (2 statuses and 1 update per device) loses none.
    While the broker stores more than ``broker_mb`` of messages the virtual devices hold their answers (a
    fleet of large models would otherwise pile gigabytes into it for a coordinator that takes in slower);
    ``answers_held_s`` in the result says how long. ``processes``: the devices are spread over this many
    load-generator processes (this one and ``processes - 1`` children, :func:`fleet_part`), each with
    ``connections`` connections; their timings are merged (:func:`merge_parts`) and the coordinator's CPU at a
    round's last task is then read from the 0.1 s samples. ``bn_delay_s``: the virtual devices send the statistics
    a training task asks for this long after it came (a real device's forward pass over its batches; 0: at once)."""
    from nefl_edge.coordinator.broker import LocalBroker

    folder = Path(folder or tempfile.mkdtemp(prefix="nefl-loadgen-"))
    folder.mkdir(parents=True, exist_ok=True)
    run = f"lg{devices}"
    settings = {
        "devices": devices,
        "rounds": rounds,
        "model": model,
        "connections": connections,
        "eval_every": eval_every,
        "eval_background": eval_background,
        "fraction": 1.0,
        "policy": "static (device i declares tier i % 5: submodels 0-4 in equal shares)",
        "extra": list(extra),
        "broker_queue": broker_queue or max(10_000, 4 * devices),
        "answer_delay_s": [delay_s, delay_s + jitter_s],
        "statistics_delay_s": bn_delay_s,
        "broker_mb": broker_mb,
        "loadgen_processes": processes,
    }
    queue_line = f"max_queued_messages {settings['broker_queue']}"
    inflight_line = f"max_inflight_messages {MAX_INFLIGHT}"  # as `nefl-coord broker-config` writes it
    settings["broker_inflight"] = MAX_INFLIGHT
    config = (queue_line, inflight_line, "sys_interval 1")
    with LocalBroker("mosquitto", folder / "broker", extra_config=config) as broker:
        args = [
            sys.executable, "-m", "nefl_edge.coordinator", "serve", "--broker", broker.address,
            "--runs-dir", str(folder / "runs"), "--run", run, "--model", model, "--rounds", str(rounds),
            "--min-clients", str(devices), "--fraction", "1.0", "--policy", "static", "--deadline-s", str(timeout_s),
            "--wait-clients-s", str(timeout_s), "--eval-every", str(eval_every),
            "--eval-background" if eval_background else "--no-eval-background", *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
        with (folder / "coordinator.log").open("ab") as out:
            coord = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        spy = None
        if profile is not None:
            spy_args = ["py-spy", "record", "--pid", str(coord.pid), "--format", "raw", "--rate", "50"]
            spy_args += ["--nonblocking", "--threads", "-o", str(profile)]
            spy = subprocess.Popen(spy_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        broker_pid = broker.proc.pid if broker.proc is not None else -1
        bounds = [devices * p // processes for p in range(processes + 1)]
        children = []
        for p in range(1, processes):
            part = [
                sys.executable, "-m", "bench.loadgen", "--part", "--broker", broker.address, "--run", run,
                "--devices", str(bounds[p + 1] - bounds[p]), "--first", str(bounds[p]), "--total", str(devices),
                "--connections", str(connections), "--delay-s", str(delay_s), "--jitter-s", str(jitter_s),
                "--bn-delay-s", str(bn_delay_s),
                "--hold-mb", str(broker_mb), "--timeout-s", str(timeout_s), "--out", str(folder / f"part{p}.json"),
            ]  # fmt: skip
            with (folder / f"part{p}.log").open("ab") as out:
                root = Path(__file__).resolve().parents[1]
                children.append(subprocess.Popen(part, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root))
        gen = LoadGen(
            broker.address, run, bounds[1], connections, delay_s=delay_s, jitter_s=jitter_s, bn_delay_s=bn_delay_s,
            cpu_of=lambda: process_cpu(coord.pid), hold_mb=broker_mb, total=devices,
            expected_tasks=None if processes == 1 else -1,
        )  # fmt: skip
        peak = broker_peak = 0.0
        started = time.monotonic()
        cpu_samples: list[tuple[float, float]] = []  # (time.time(), the coordinator's CPU seconds), every 0.1 s
        own_samples: list[tuple[float, float]] = []  # the same of the load-generator processes, all of them
        broker_samples: list[tuple[float, float]] = []  # and of the broker
        pids = [os.getpid()] + [child.pid for child in children]
        try:
            gen.start(timeout_s=300, alive=lambda: coord.poll() is None)
            while not gen.wait_end(0.1):
                if coord.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    cpu_samples.append((time.time(), process_cpu(coord.pid)))
                    own_samples.append((time.time(), sum(process_cpu(pid) for pid in pids)))
                    broker_samples.append((time.time(), process_cpu(broker_pid)))
                peak = max(peak, peak_rss_mb(coord.pid))
                broker_peak = max(broker_peak, rss_mb(broker_pid))
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"the run did not end within {timeout_s:.0f} s; see {folder}")
            with contextlib.suppress(OSError):
                peak = max(peak, peak_rss_mb(coord.pid))
            cpu_total = process_cpu(coord.pid) if coord.poll() is None else None
            code = coord.wait(120)
        finally:
            gen.close()
            for child in children:
                try:
                    child.wait(120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(10)
            if coord.poll() is None:
                coord.kill()
                coord.wait(10)
            if spy is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)  # py-spy writes its file once the coordinator has exited
    if code != 0:
        raise RuntimeError(f"nefl-coord serve exited with {code}: {(folder / 'coordinator.log').read_text()[-2000:]}")
    if processes > 1:
        missing = [p for p in range(1, processes) if not (folder / f"part{p}.json").is_file()]
        if missing:
            raise RuntimeError(f"load-generator parts {missing} wrote no timings; see {folder}/part*.log")
        merge_parts(gen, [json.loads((folder / f"part{p}.json").read_text()) for p in range(1, processes)])
        for timing in gen.rounds.values():
            if timing.last_task_at and len(cpu_samples) > 1:
                timing.coordinator_cpu_s = cpu_at(cpu_samples, timing.last_task_at)
    acked = coordinator_acks((folder / "coordinator.log").read_text(errors="replace"))
    run_dirs = sorted((folder / "runs").glob(f"{run}-*"))
    metrics = {r["round"]: r for r in read_jsonl(run_dirs[-1] / "metrics.jsonl") if r["submodel"] == 0}
    per_round = []
    for r in range(1, rounds + 1):
        row, timing = metrics.get(r), gen.rounds.get(r)
        nxt = gen.rounds.get(r + 1)
        entry: dict[str, Any] = {"round": r, "tasks": timing.tasks if timing else 0}
        collected = timing.last_update_at if timing is not None else 0.0  # without a metrics row: acknowledged
        if row is not None:
            entry["phases"] = row["phases"]
            entry["updates"] = row["updates"]
            entry["rejected"] = row["rejected"]
            entry["collect_s"] = row["phases"].get("training", 0.0)
            collected = row["ended_at"] - sum(row["phases"].get(p, 0.0) for p in AFTER_COLLECTING)
            entry["collected_at"] = collected
            if "bn_statistics" in row["phases"]:
                entry["bn_s"] = row["phases"]["bn_statistics"]
            if "bn_statistics_carried" in row["phases"]:  # came with the next round's tasks, off the overhead
                entry["bn_carried_s"] = row["phases"]["bn_statistics_carried"]
            if timing is not None and timing.last_update_at:
                entry["take_in_lag_s"] = collected - timing.last_update_at  # last update acknowledged -> taken in
        entry["overhead_from"] = "coordinator" if row is not None else "load generator"
        if nxt is not None and nxt.tasks and collected:
            entry["overhead_s"] = nxt.last_task_at - collected
            entry["tasks_out_s"] = nxt.last_task_at - nxt.first_task_at
        after = metrics.get(r + 1)
        if row is not None and after is not None:  # the coordinator had handed round r+1's tasks to paho
            phases = after["phases"]
            handed = after["ended_at"] - sum(phases.get(p, 0.0) for p in AFTER_COLLECTING)
            entry["handed_out_s"] = handed - phases.get("training", 0.0) + phases.get("publish", 0.0) - collected
        if timing is not None and nxt is not None and nxt.coordinator_cpu_s and timing.coordinator_cpu_s:
            entry["coordinator_cpu_s"] = nxt.coordinator_cpu_s - timing.coordinator_cpu_s
        if "overhead_s" in entry and nxt is not None and len(cpu_samples) > 1:  # CPU spent in the overhead window
            end = nxt.last_task_at
            entry["overhead_cpu_s"] = cpu_at(cpu_samples, end) - cpu_at(cpu_samples, collected)
            entry["loadgen_overhead_cpu_s"] = cpu_at(own_samples, end) - cpu_at(own_samples, collected)
            entry["broker_overhead_cpu_s"] = cpu_at(broker_samples, end) - cpu_at(broker_samples, collected)
        if collected and (r + 1, "task") in acked:  # the broker acknowledged round r+1's last task
            entry["acked_s"] = acked[(r + 1, "task")] - collected
        if "bn_s" in entry and len(cpu_samples) > 1:  # CPU spent in the statistics round trip alone
            entry["bn_cpu_s"] = cpu_at(cpu_samples, collected + entry["bn_s"]) - cpu_at(cpu_samples, collected)
        if timing is not None and timing.first_eval_task_at and timing.last_eval_answer_at:
            entry["bn_tasks_out_s"] = timing.last_eval_task_at - timing.first_eval_task_at
            entry["bn_answers_out_s"] = timing.last_eval_answer_at - timing.first_eval_task_at
        per_round.append(entry)
    overheads = [e["overhead_s"] for e in per_round if "overhead_s" in e]
    cpus = [e["coordinator_cpu_s"] for e in per_round if "coordinator_cpu_s" in e]
    overhead_cpus = [e["overhead_cpu_s"] for e in per_round if "overhead_cpu_s" in e]
    bn_cpus = [e["bn_cpu_s"] for e in per_round if "bn_cpu_s" in e]
    bns = [e["bn_s"] for e in per_round if "bn_s" in e and "overhead_s" in e]
    handed = [e["handed_out_s"] for e in per_round if "handed_out_s" in e]
    acks = [e["acked_s"] for e in per_round if "acked_s" in e]
    loadgen_cpus = [e["loadgen_overhead_cpu_s"] for e in per_round if "loadgen_overhead_cpu_s" in e]
    broker_cpus = [e["broker_overhead_cpu_s"] for e in per_round if "broker_overhead_cpu_s" in e]
    carried = [e["bn_carried_s"] for e in per_round if "bn_carried_s" in e]
    return {
        "settings": settings,
        "rounds": per_round,
        "timings": [asdict(t) for _, t in sorted(gen.rounds.items())],
        "overhead_s": statistics.median(overheads) if overheads else None,
        "overhead_max_s": max(overheads) if overheads else None,
        "bn_s": statistics.median(bns) if bns else None,
        "handed_out_s": statistics.median(handed) if handed else None,
        "acked_s": statistics.median(acks) if acks else None,
        "loadgen_overhead_cpu_s": statistics.median(loadgen_cpus) if loadgen_cpus else None,
        "broker_overhead_cpu_s": statistics.median(broker_cpus) if broker_cpus else None,
        "bn_carried_s": statistics.median(carried) if carried else None,
        "coordinator_cpu_s_per_round": statistics.median(cpus) if cpus else None,
        "overhead_cpu_s": statistics.median(overhead_cpus) if overhead_cpus else None,
        "bn_cpu_s": statistics.median(bn_cpus) if bn_cpus else None,
        "coordinator_cpu_s_total": cpu_total,
        "peak_rss_mb": peak,
        "updates_sent": gen.updates_sent,
        "mb_sent": gen.bytes_sent / 1e6,
        "loadgen_rejected": dict(gen.rejected),
        "answers_held_s": gen.held_s,
        "broker_peak_rss_mb": broker_peak,
        "broker_stored_mb_max": gen.broker_bytes_max / 2**20,
        "seconds": time.monotonic() - started,
        "folder": str(folder),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="resnet-small")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--sync-eval", action="store_true", help="evaluate on the coordinator's main thread")
    parser.add_argument("--jitter-s", type=float, default=0.0, help="answers spread over this many seconds")
    parser.add_argument("--delay-s", type=float, default=0.0, help="answers at the earliest this long after a task")
    parser.add_argument("--bn-delay-s", type=float, default=0.0, help="a task's statistics this long after it came")
    parser.add_argument("--serve-options", default="", help='more options of serve, e.g. "--bn server"')
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the coordinator into this file")
    parser.add_argument("--processes", type=int, default=1, help="spread the devices over this many processes")
    parser.add_argument("--part", action="store_true", help="(internal) one process of a spread fleet")
    parser.add_argument("--broker", help="(--part) HOST:PORT")
    parser.add_argument("--run", help="(--part) the run name")
    parser.add_argument("--first", type=int, default=0, help="(--part) index of its first device")
    parser.add_argument("--total", type=int, default=None, help="(--part) devices in the whole fleet")
    parser.add_argument("--hold-mb", type=float, default=3072.0, help="(--part) see measure's broker_mb")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="(--part) give up after this long")
    parser.add_argument("--out", type=Path, help="(--part) where its timings go")
    args = parser.parse_args(argv)
    if args.part:
        logging.basicConfig(level=logging.WARNING)
        fleet_part(args)
        return
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the broker and serve too
    result = measure(
        args.devices,
        args.rounds,
        args.model,
        args.connections,
        args.eval_every,
        not args.sync_eval,
        extra=tuple(shlex.split(args.serve_options)),
        folder=args.folder,
        delay_s=args.delay_s,
        jitter_s=args.jitter_s,
        bn_delay_s=args.bn_delay_s,
        profile=args.profile,
        processes=args.processes,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
