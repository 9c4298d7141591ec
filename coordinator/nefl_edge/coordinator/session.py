"""The coordinator's side of the protocol, over any :class:`core.link.Link` (``MqttLink`` in ``serve``, the
in-memory link in the protocol tests).

Publishing: the manifest and the artifacts (retained, content-addressed) once per run, again after a
reconnect (a broker restarted without persistence lost them); per round the weights of every assigned
submodel (retained, one broadcast per submodel: the broker fans them out) and one task per device on its
own task topic. Collecting: hello and status feed the registry; updates, evaluations and declines resolve a
device's task (:class:`Answers` holds the rules); a task without an answer is dropped at the deadline, at
once when the device says it left, or after ``LOST_GRACE_S`` of silence after its Last Will while this link
stayed connected (a broker that goes down publishes every device's will, and those devices come back and
answer).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from nefl_edge.coordinator.assignment import ClientInfo
from nefl_edge.coordinator.grid import EvalOutcome, EvalRequest, Instruction, Outcome
from nefl_edge.coordinator.registry import Registry
from nefl_edge.core.encoding import EncodingError, decode_update
from nefl_edge.core.errors import ExitCode, NeflError
from nefl_edge.core.evaluation import EvalResult
from nefl_edge.core.link import Inbound, Link, topic_matches
from nefl_edge.core.nested import GlobalState, Tensors
from nefl_edge.core.schemas import (
    Artifact,
    Control,
    Decline,
    EvalTask,
    Evaluation,
    Manifest,
    ManifestMessage,
    Message,
    Task,
    Update,
    Weights,
)
from nefl_edge.core.wire import LogLimiter, ProtocolError, Topics, pack_tensors, sha256, unpack_tensors

log = logging.getLogger(__name__)
GRACE_S = 5.0  # answers sent just before the deadline are still in flight
HEARTBEAT_S = 10.0  # a control heartbeat this often while the run is open (devices leave after 60 s without one)
REJECTED_BUDGET = 100  # payloads refused (or partial messages evicted) per round beyond which a device is quarantined
LOST_GRACE_S = 10.0
SWITCH_INTERVAL_S = 0.0005
"""The interpreter's thread switch interval while a session is open (Python's default is 5 ms; restored by
:meth:`CoordinatorSession.close`). The network thread makes a few system calls per message, each a GIL
release; while the main thread screens answers, every one of them waited up to the whole interval to run
again (with a CPU-bound thread beside it, 5,000 QoS 1 messages through paho took 4.5-4.8 s at 5 ms and
2.4-3.0 s at 0.5 ms on the 2-core bench host)."""
NEVER_RETAINED = ("hello", "status", "update")
"""Device topics on which the protocol never retains a message (a device's retained status and Last Will are on
``status/chunk/0``); the generated ACL lets the coordinator delete what is retained there."""
GONE_CHECK_S = 0.25  # who is gone is looked at this often, not at every message (O(pending) each)
PendingTask = TypeVar("PendingTask", Task, EvalTask)
OutcomeT = TypeVar("OutcomeT", bound=Union[Outcome, EvalOutcome])
Extract = Callable[[GlobalState, int], Tensors]
"""The weights of submodel ``k`` of a global state, as they are sent (the grid's extraction)."""


class NotEnoughClients(NeflError, TimeoutError):
    exit_code = ExitCode.NO_CLIENTS


def task_ids(count: int) -> list[str]:
    """``count`` fresh random task ids of 16 hex digits, from one draw of the system's randomness: a
    ``uuid4`` per task is a system call that releases the GIL per task, and with the network and evaluation
    threads busy each costs tens of microseconds waiting to get it back (py-spy, 2,000 devices)."""
    raw = os.urandom(8 * count).hex()
    return [raw[16 * i : 16 * (i + 1)] for i in range(count)]


def train_tasks(
    run: str,
    round_: int,
    instructions: list[Instruction],
    digests: dict[int, str],
    deadline_s: float,
    bn_stats: bool = False,
    bn_max_batches: Optional[int] = None,
) -> dict[str, Task]:
    """One training task per instruction, by node, each with a fresh id and the digest of its weights (and, with
    ``bn_stats``, the request for those weights' BatchNorm statistics before training)."""
    return {
        ins.node: Task(
            run=run,
            node=ins.node,
            task_id=task_id,
            round=round_,
            submodel=ins.submodel,
            weights_sha256=digests[ins.submodel],
            train=ins.train,
            deadline_s=deadline_s,
            bn_stats=bn_stats,
            bn_max_batches=bn_max_batches if bn_stats else None,
        )
        for ins, task_id in zip(instructions, task_ids(len(instructions)))
    }


def eval_tasks(
    run: str, round_: int, requests: list[EvalRequest], digests: dict[int, str], deadline_s: float
) -> dict[str, EvalTask]:
    """One ``evaluate`` task per request, by node."""
    return {
        req.node: EvalTask(
            run=run,
            node=req.node,
            task_id=task_id,
            round=round_,
            submodels=list(req.submodels),
            weights_sha256=[digests[k] for k in req.submodels],
            evaluate=req.evaluate,
            bn_stats=req.bn_stats,
            eval_fraction=req.eval_fraction,
            batch_size=req.batch_size,
            bn_max_batches=req.bn_max_batches,
            deadline_s=deadline_s,
        )
        for req, task_id in zip(requests, task_ids(len(requests)))
    }


SplitNames = tuple[tuple[tuple[str, int, str], ...], frozenset[int], str]


def split_names(names: tuple[str, ...]) -> SplitNames:
    """``<k>/<name>`` tensor names of an evaluation's body as (name, k, rest) each, the set of the ``k``, and
    the first name not of that form ("" if none). Cached for up to 64 lists of up to 1,024 names: every
    device of a submodel sends the same names."""
    return _split_names_cached(names) if len(names) <= 1024 else _split_names(names)


def _split_names(names: tuple[str, ...]) -> SplitNames:
    split = []
    for name in names:
        head, _, rest = name.partition("/")
        if not (head.isascii() and head.isdigit()) or not rest:
            return (), frozenset(), name
        split.append((name, int(head), rest))
    return tuple(split), frozenset(k for _, k, _ in split), ""


_split_names_cached = functools.lru_cache(maxsize=64)(_split_names)


class Answers:
    """The rules for what comes back to the pending tasks of a round: which task an answer resolves
    (:meth:`claim`: from its own device's stream, the pending task's id, this round; replays and strays are
    dropped and counted in :attr:`rejections`), and what a claimed answer may carry (:meth:`update`,
    :meth:`evaluation`). Shapes, finite values and bounds are the engine's screening, after this."""

    def __init__(self) -> None:
        self.rejections: Counter[str] = Counter()
        self.by_node: Counter[str] = Counter()  # rejections by the device whose stream they came on
        self.earlier_ids: dict[str, set[str]] = {}
        """Task ids a pending task had before it was asked again (:meth:`CoordinatorSession.ask_again`): an
        answer to one of them is as good (the device may have been training it all along)."""
        self.carried_in: set[str] = set()
        """The devices whose statistics for their training task (``Task.bn_stats``) came in this round."""
        self._log = LogLimiter(log)

    def claim(
        self,
        round_: int,
        stream: str,
        message: Union[Update, Evaluation, Decline],
        pending: dict[str, PendingTask],
        answers: bool = True,
    ) -> Optional[tuple[str, PendingTask]]:
        """The device and the pending task that ``message`` answers, taken out of ``pending``; None (counted)
        when it comes on another device's stream or answers no pending task of this round (``answers``
        False: a kind that cannot answer these tasks)."""
        node = Topics.node_of(stream)
        task = pending.get(node)
        if message.node != node:
            self.reject("unknown_sender", f"{message.kind} for {message.node} on {stream}", node)
            return None
        earlier: set[str] = self.earlier_ids.get(node, set())
        known = task is not None and (message.task_id == task.task_id or message.task_id in earlier)
        if not answers or task is None or not known or message.round != round_:
            detail = f"{message.kind} from {node} for task {message.task_id} of round {message.round}"
            self.reject("stale", detail, node)
            return None
        del pending[node]
        return node, task

    def update(
        self,
        round_: int,
        item: Inbound,
        pending: dict[str, Task],
        started: float,
        reference: Optional[Callable[[int], Tensors]] = None,
    ) -> Optional[Union[Outcome, EvalOutcome]]:
        """The outcome a device's update or decline resolves, or None (not an answer, or one to ignore); an
        ``evaluation`` is the statistics its task carried (:meth:`carried`), which leave the task pending.
        ``reference(k)``: the weights of submodel ``k`` sent this round, which encoded updates are deltas
        against (``core.encoding``)."""
        stream, message, body = item
        if isinstance(message, Evaluation):
            return self.carried(round_, item, pending, started)
        if not isinstance(message, (Update, Decline)):
            return None
        claimed = self.claim(round_, stream, message, pending)
        if claimed is None:
            return None
        node, task = claimed
        seconds = time.monotonic() - started
        if isinstance(message, Decline):
            log.warning("round %d: %s declined: %s", round_, node, message.reason)
            return Outcome(node, task.submodel, "declined", reason=message.reason[:300], seconds=seconds)
        if message.submodel != task.submodel:
            return Outcome(node, task.submodel, "rejected", reason=f"wrong_submodel: {message.submodel}")
        try:
            tensors = unpack_tensors(body)
            encoding = task.train.update_encoding
            if encoding != "float32" and reference is not None:
                tensors = decode_update(tensors, encoding, lambda: reference(task.submodel))
        except (ProtocolError, EncodingError) as exc:
            return Outcome(node, task.submodel, "rejected", reason=f"bad_payload: {exc}", bytes_in=len(body))
        return Outcome(
            node,
            task.submodel,
            "updated",
            message.num_samples,
            tensors,
            message.metrics,
            seconds=seconds,
            bytes_in=len(body),
        )

    def carried(self, round_: int, item: Inbound, pending: dict[str, Task], started: float) -> Optional[EvalOutcome]:
        """The statistics a training task asked for before training (``Task.bn_stats``), read as the answer to an
        ``evaluate`` task of that task's submodel alone with ``bn_max_batches`` (:meth:`read_evaluation`). They
        are bound to the task: its device's stream, its id (or an earlier one), this round, once per task and
        only while its update has not come (the task stays pending); anything else from a device whose task
        asks for statistics is dropped and counted (``unknown_sender``, ``stale``, ``duplicate``), from any other
        device ignored as before tasks carried statistics (e.g. a late answer to the previous evaluation step).
        The task's ``weights_sha256`` names the state they are of."""
        stream, message, body = item
        assert isinstance(message, Evaluation)
        node = Topics.node_of(stream)
        task = pending.get(node)
        if task is None or not task.bn_stats:
            return None
        if message.node != node:
            self.reject("unknown_sender", f"{message.kind} for {message.node} on {stream}", node)
            return None
        earlier = self.earlier_ids.get(node, set())
        if (message.task_id != task.task_id and message.task_id not in earlier) or message.round != round_:
            self.reject("stale", f"statistics from {node} for task {message.task_id} of round {message.round}", node)
            return None
        if node in self.carried_in:
            self.reject("duplicate", f"second statistics from {node} for task {message.task_id}", node)
            return None
        self.carried_in.add(node)
        seconds = time.monotonic() - started
        return self.read_evaluation(node, message, body, [task.submodel], False, True, task.bn_max_batches, seconds)

    def evaluation(
        self, round_: int, item: Inbound, pending: dict[str, EvalTask], started: float
    ) -> Optional[EvalOutcome]:
        """The outcome an ``evaluation`` or decline resolves, or None. An evaluation may claim only what it
        was asked: the task's submodels, each once, results only if asked to evaluate, statistics only if
        asked for them with at most ``bn_max_batches`` batches, a body of readable ``<k>/<name>`` tensors
        of submodels it has statistics for; otherwise it is ``rejected`` whole."""
        stream, message, body = item
        if not isinstance(message, (Evaluation, Decline, Update)):
            return None
        answered = self.claim(round_, stream, message, pending, answers=not isinstance(message, Update))
        if answered is None:
            return None
        node, task = answered
        seconds = time.monotonic() - started
        if isinstance(message, Decline):
            log.warning("round %d: %s declined to evaluate: %s", round_, node, message.reason)
            return EvalOutcome(node, "declined", reason=message.reason[:300], seconds=seconds)
        if not isinstance(message, Evaluation):  # an update never answers an evaluate task: claim refused it
            return None
        return self.read_evaluation(
            node, message, body, task.submodels, task.evaluate, task.bn_stats, task.bn_max_batches, seconds
        )

    def read_evaluation(
        self,
        node: str,
        message: Evaluation,
        body: bytes,
        submodels: list[int],
        evaluate: bool,
        bn_stats: bool,
        bn_max_batches: Optional[int],
        seconds: float,
    ) -> EvalOutcome:
        """The outcome of an ``evaluation`` claimed for a task that asked ``submodels``, ``evaluate`` and/or
        ``bn_stats`` over at most ``bn_max_batches`` batches (:meth:`evaluation`'s rules)."""
        asked = set(submodels)
        claimed = [r.submodel for r in message.results] + [b.submodel for b in message.bn]
        bad = ""
        if not set(claimed) <= asked or len(set(r.submodel for r in message.results)) != len(message.results):
            bad = f"wrong_submodels: {sorted(set(claimed) - asked)[:5]} or repeated"
        elif (message.results and not evaluate) or (message.bn and not bn_stats):
            bad = "unasked: results or statistics that were not asked for"
        elif len(set(b.submodel for b in message.bn)) != len(message.bn):
            bad = "wrong_submodels: repeated statistics"
        elif bn_max_batches is not None and any(b.batches > bn_max_batches for b in message.bn):
            bad = f"bad_counts: more than {bn_max_batches} batches"
        if bad:
            return EvalOutcome(node, "rejected", reason=bad, bytes_in=len(body), seconds=seconds)
        try:
            tensors = unpack_tensors(body) if body else {}
        except ProtocolError as exc:
            return EvalOutcome(node, "rejected", reason=f"bad_payload: {exc}", bytes_in=len(body), seconds=seconds)
        per_submodel: dict[int, dict[str, Any]] = {b.submodel: {} for b in message.bn}
        split, named, wrong = split_names(tuple(tensors))
        if wrong or not named <= per_submodel.keys():
            name = wrong or next(n for n, k, _ in split if k not in per_submodel)
            reason = f"bad_names: {name[:80]}"
            return EvalOutcome(node, "rejected", reason=reason, bytes_in=len(body), seconds=seconds)
        for name, k, rest in split:
            per_submodel[k][rest] = tensors[name]
        return EvalOutcome(
            node,
            "evaluated",
            results={r.submodel: EvalResult(r.loss * r.count, r.correct, r.count) for r in message.results},
            bn_tensors=per_submodel,
            bn_batches={b.submodel: b.batches for b in message.bn},
            seconds=seconds,
            bytes_in=len(body),
        )

    def reject(self, reason: str, detail: str, node: str = "") -> None:
        """Count one refused answer (by reason, and by ``node``, the device whose stream it came on) and log it
        through the rate limiter (a device that floods answers cannot flood the log)."""
        self.rejections[reason] += 1
        if node:
            self.by_node[node] += 1
        self._log.warning(reason, "rejected %s", detail)


class CoordinatorSession:
    """One run of the protocol on ``link``: ``open`` publishes the run, ``run`` / ``evaluate`` send a round's
    tasks and yield their outcomes (the :class:`coordinator.grid.Grid` steps), ``close`` ends the run for the
    devices and clears what it retained. ``extract`` gives the weights of a submodel as they are sent."""

    def __init__(
        self,
        link: Link,
        run: str,
        manifest: Manifest,
        artifacts: Path,
        deadline_s: float,
        extract: Extract,
        registry: Optional[Registry] = None,
        stop: Optional[threading.Event] = None,
    ) -> None:
        self.link, self.run_name, self.manifest, self.artifacts = link, run, manifest, artifacts
        self.deadline_s, self.extract = deadline_s, extract
        self.registry = registry or Registry()
        self.stop = stop or threading.Event()
        self.topics = Topics(run)
        self.answers = Answers()
        self.on_progress: Optional[Callable[[str], None]] = None
        self.bytes_out = 0
        self.publish_s = 0.0  # seconds the last round took to publish its weights and tasks
        self._retained: dict[str, tuple[Message, bytes]] = {}
        self._link_seen: Counter[str] = Counter()
        self._reconnected_at = 0.0
        self.tasked: frozenset[str] = frozenset()
        """The devices sent a task by the latest :meth:`send`: the only ones whose update topics this session
        listens to (subscribed one by one; other devices' answers are not even delivered), and whose partial
        and waiting messages the link's caps keep while another sender holds any."""
        self._node_prefix = f"{self.topics.base}/node/"
        self._offences_seen: Counter[str] = Counter()
        self._offences_at_task: dict[str, int] = {}  # each tasked device's refused traffic when it was tasked
        self.cut_off: set[str] = set()  # tasked devices whose refused traffic passed the budget this round
        self._log = LogLimiter(log)
        link.admit = self._admit
        link.favoured = self._favoured
        link.on_retained = self._retained_by_device
        self._retained_by: Counter[str] = Counter()  # retained messages deleted (_retained_by_device), by node
        self._retained_new = 0  # and how many since the last rejections()
        self._retained_lock = threading.Lock()
        self.heartbeat_s = HEARTBEAT_S
        self._beating = threading.Event()
        self._reask = threading.Event()  # reconnected while tasks were pending: ask them again (collect)
        self._switch_before: Optional[float] = None  # the switch interval open() lowered (SWITCH_INTERVAL_S)
        self._acks_due: Optional[tuple[int, int, str]] = None  # (link.published after send, tasks, their kind)

    # --- the run on the link -------------------------------------------------------------------------------

    def open(self) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:  # process-wide; never raised if someone set it lower
            self._switch_before = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        for kind in ("hello", "status"):  # updates: only those of the devices with a task (send)
            self.link.subscribe(self.topics.all_nodes(kind))
        self.link.connect()
        self.clear_stale()
        for sub in self.manifest.submodels:
            for entry in sub.files.values():
                body = (self.artifacts / entry.name).read_bytes()
                self._publish_retained(
                    self.topics.artifact(entry.sha256), Artifact(run=self.run_name, name=entry.name), body
                )
        self._publish_retained(
            self.topics.manifest, ManifestMessage(run=self.run_name), self.manifest.to_json().encode()
        )
        self.link.publish(self.topics.control, Control(run=self.run_name, action="announce"))
        self.link.on_connected = self._reconnected
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        log.info("run %s: manifest and artifacts published on %s", self.run_name, self.topics.base)

    def clear_stale(self, quiet_s: float = 1.0, limit_s: float = 15.0) -> list[str]:
        """Delete what an earlier coordinator of this run name retained (its manifest, artifacts and weights:
        a coordinator that died never cleared them), before this one publishes its own; the topics deleted.
        They are found with wildcard subscriptions held until the broker acknowledged a publish made after
        them and then until no retained message has arrived for ``quiet_s`` (at most ``limit_s``): a broker
        may acknowledge that publish before it has sent every retained message of a long queue (Mosquitto
        keeps at most 20 QoS 1 messages in flight, and weights come in 1 MiB chunks). Brokers that send
        retained messages only to exact filters (RabbitMQ) show none: there the new manifest replaces the old
        one's chunks, and older artifacts and weights stay."""
        base = self.topics.base
        filters = [f"{base}/manifest/chunk/+", f"{base}/artifact/+/chunk/+", f"{base}/weights/+/chunk/+"]
        # and what any device retained where the protocol never retains, under every run name (issue 22):
        # each arrives flagged retained, so :meth:`_retained_by_device` deletes it and counts its device
        sweep = [f"{self.topics.base.split('/')[0]}/+/node/+/{kind}" for kind in NEVER_RETAINED]
        found: set[str] = set()
        arrived = threading.Event()

        def tap(topic: str, payload: Any) -> bool:
            if payload and any(topic_matches(f, topic) for f in filters):
                found.add(topic)
                arrived.set()
                return True
            return not topic.startswith(base + "/")  # other runs' live traffic, which the sweep lets in

        self.link.on_payload = tap
        try:
            self.link.subscribe_exact(sweep)
            self.link.subscribe_all(filters)
            self.link.flush(5.0)
            end = time.monotonic() + limit_s
            while time.monotonic() < end:
                arrived.clear()
                if not arrived.wait(quiet_s):
                    break
            self.link.unsubscribe_all(filters + sweep)
        finally:
            self.link.on_payload = None
        if found:
            log.warning("run %s: deleting %d retained messages an earlier coordinator left", self.run_name, len(found))
            self.link.clear_topics(sorted(found))
        return sorted(found)

    def _heartbeat(self) -> None:
        """A ``control heartbeat`` every ``heartbeat_s`` until :meth:`close`: devices take a run whose
        coordinator has been silent for ``edge_client.session.SILENT_S`` as dead and leave it. A thread of its
        own, so that a long aggregation or evaluation does not look like a dead coordinator."""
        while not self._beating.wait(self.heartbeat_s):
            try:
                if self.link.connected.is_set():
                    self.link.publish(self.topics.control, Control(run=self.run_name, action="heartbeat"))
            except Exception:  # never end the heartbeat over one failed publish
                log.exception("the heartbeat failed")

    def close(self, reason: str) -> None:
        self._beating.set()
        if self._switch_before is not None and sys.getswitchinterval() == SWITCH_INTERVAL_S:
            sys.setswitchinterval(self._switch_before)  # as it was, unless someone changed it since
        try:
            self.link.publish(self.topics.control, Control(run=self.run_name, action="end", reason=reason))
            for topic in list(self._retained):
                self.link.clear_retained(topic)
            if not self.link.flush(10.0):
                log.warning("the broker did not acknowledge the end of the run in time; retained messages may remain")
        finally:
            self.link.close()

    def _publish_retained(self, topic: str, message: Message, body: bytes) -> int:
        self._retained[topic] = (message, body)
        sent = self.link.publish(topic, message, body, retain=True)
        self.bytes_out += sent
        return sent

    def _reconnected(self) -> None:
        """The broker may have restarted without persistence: publish the retained messages again and ask
        every device to say hello (the broker published their wills when it went down)."""
        self._reconnected_at = time.monotonic()
        self._reask.set()
        log.warning("reconnected to the broker: publishing %d retained messages again", len(self._retained))
        for topic, (message, body) in list(self._retained.items()):
            self.link.publish(topic, message, body, retain=True)
        self.link.publish(self.topics.control, Control(run=self.run_name, action="announce"))

    def _admit(self, stream: str) -> bool:
        """The link's gate: an update topic only of a device with a task (the broker may still deliver what
        was published before an unsubscribe took effect); a device whose refused traffic since its task
        passed ``REJECTED_BUDGET`` is cut off at once (:meth:`cut`), before its flood fills the broker's
        queue for this session."""
        if Topics.kind_of(stream) != "update":
            return True
        node = Topics.node_of(stream)
        if node not in self.tasked:
            return False
        if self.link.rejected_of(node) - self._offences_at_task.get(node, 0) > REJECTED_BUDGET:
            self.cut(node)
            return False
        return True

    def cut(self, node: str) -> None:
        """Stop listening to ``node`` for the rest of its task (unsubscribed; :meth:`gone` drops the task)."""
        self.cut_off.add(node)
        self.tasked = self.tasked - {node}
        self.link.unsubscribe_all([self.topics.node(node, "update")])
        self._log.warning("cut", "%s sent more than %d refused payloads: no longer listened to", node, REJECTED_BUDGET)

    def _retained_by_device(self, topic: str, payload: Any) -> bool:
        """The link's ``on_retained``: a retained message on a device topic where the protocol retains nothing
        (:data:`NEVER_RETAINED`, in any run) is deleted at once and counted as refused traffic of its device
        (``retained`` in :meth:`rejections`; :meth:`offenders` over budget); True for those and for the deletions'
        echoes. Retained statuses (``status/chunk/0``) and the coordinator's own broadcasts are left to the link.
        Over MQTT 5 (Retain As Published) this sees a retained publish as it happens, over 3.1.1 when a
        subscription is made or renewed (:meth:`listen` renews the hello and status ones every round)."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[2] != "node" or parts[4] not in NEVER_RETAINED:
            return False
        if len(payload) == 0:
            return True
        self.link.clear_topics([topic])
        with self._retained_lock:
            self._retained_by[parts[3]] += 1
            self._retained_new += 1
        self._log.warning("retained", "%s retained %d bytes on %s: deleted, refused", parts[3], len(payload), topic)
        return True

    def _favoured(self, sender: str) -> bool:
        return sender.startswith(self._node_prefix) and sender[len(self._node_prefix) :] in self.tasked

    def listen(self, nodes: frozenset[str]) -> None:
        """Listen to the update topics of ``nodes`` only (before their tasks are sent: an answer cannot come
        before the subscription, which the broker takes in order before the tasks)."""
        self.cut_off = set()
        self._offences_at_task = {n: self.link.rejected_of(n) for n in nodes}
        self.link.subscribe_exact([self.topics.all_nodes(kind) for kind in ("hello", "status")])  # retained again
        before, self.tasked = self.tasked, self.tasked | nodes  # both, until the broker has the change
        self.link.subscribe_all([self.topics.node(n, "update") for n in sorted(nodes - before)])
        self.link.unsubscribe_all([self.topics.node(n, "update") for n in sorted(before - nodes)])
        self.tasked = nodes

    def offenders(self, budget: int = REJECTED_BUDGET) -> list[str]:
        """The devices with more than ``budget`` payloads refused by the link or the answer rules (partial
        messages evicted by the caps and retained messages deleted included) since the last call: to be
        quarantined."""
        with self._retained_lock:
            retained = Counter(self._retained_by)
        now = self.link.rejected_by() + self.answers.by_node + retained
        grown = {n: c - self._offences_seen[n] for n, c in now.items()}
        self._offences_seen = now
        return sorted(n for n, c in grown.items() if c > budget)

    def rejections(self) -> dict[str, int]:
        """Messages rejected since the last call: by the answer rules (stale, unknown sender) and by the link
        (bad frames, missing or wrong signatures, ...)."""
        link = self.link.rejections
        out = self.answers.rejections + Counter({k: v - self._link_seen[k] for k, v in link.items()})
        self._link_seen = Counter(link)
        with self._retained_lock:
            out["retained"], self._retained_new = self._retained_new, 0
        self.answers.rejections.clear()
        return {k: v for k, v in out.items() if v > 0}

    def next(self, timeout: float) -> Optional[Inbound]:
        """The next inbound message (noted in the registry), or None after ``timeout``."""
        item = self.link.next(timeout)
        if item is not None:
            self.registry.note(Topics.node_of(item[0]), item[1])
        return item

    def clients(self, minimum: int, wait_s: float) -> dict[str, ClientInfo]:
        """The online devices, once at least ``minimum`` are (``NotEnoughClients`` after ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while len(self.registry.online()) < minimum:
            if time.monotonic() > deadline or self.stop.is_set():
                raise NotEnoughClients(
                    f"only {len(self.registry.online())} of min_clients={minimum} clients joined within "
                    f"{wait_s:.0f} s; start devices with `nefl-edge join --run {self.run_name}`"
                )
            self.next(0.5)
            self._drain(0.5)  # counting sorts the fleet: once per batch of hellos, not once per message
        while self.next(0.0) is not None:  # take in every hello and status already waiting
            pass
        return self.registry.clients()

    def _drain(self, seconds: float) -> None:
        """Take in the messages already waiting, for at most ``seconds`` (a flood cannot hold the caller)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and self.next(0.0) is not None:
            pass

    # --- rounds --------------------------------------------------------------------------------------------

    def publish_weights(
        self, round_: int, state: GlobalState, submodels: set[int], extract: Optional[Extract] = None
    ) -> dict[int, str]:
        """Publish the weights of ``submodels`` as ``extract`` (default: the session's) cuts them (retained, one
        broadcast each); their sha256 by submodel."""
        cut = extract or self.extract
        digests: dict[int, str] = {}
        for k in sorted(submodels):
            body = pack_tensors(cut(state, k))
            digests[k] = sha256(body)
            self._publish_retained(self.topics.weights(k), Weights(run=self.run_name, round=round_, submodel=k), body)
        return digests

    def send(self, tasks: dict[str, PendingTask]) -> None:
        self._reask.clear()  # these are sent on the connection there is now
        self.answers.earlier_ids = {}
        self.answers.carried_in = set()
        self.listen(frozenset(tasks))
        for node, task in tasks.items():
            self.bytes_out += self.link.publish(self.topics.node(node, "task"), task)
        published = getattr(self.link, "published", None)  # MqttLink's count (issue 24's measurements)
        if isinstance(published, int) and tasks:
            self._acks_due = (published, len(tasks), next(iter(tasks.values())).kind)

    def _note_acknowledged(self, round_: int) -> None:
        """Log when the broker has acknowledged every task of the latest :meth:`send` (the time of the latest
        acknowledgement then, ``time.time()``; checked as answers are collected): with the devices' arrival
        times it tells the coordinator's sending from the broker's delivery (``bench.loadgen``)."""
        if self._acks_due is None:
            return
        due, count, kind = self._acks_due
        if getattr(self.link, "acked", 0) >= due:
            self._acks_due = None
            at = getattr(self.link, "acked_at", 0.0)
            log.info("the broker acknowledged the %d %s messages of round %d at %.3f", count, kind, round_, at)

    def run(
        self,
        round_: int,
        state: GlobalState,
        instructions: list[Instruction],
        extract: Optional[Extract] = None,
        bn_stats: bool = False,
        bn_max_batches: Optional[int] = None,
    ) -> Iterator[Union[Outcome, EvalOutcome]]:
        """A training round: the weights as ``extract`` (the round's; default: the session's) cuts them, one
        task per instruction, and the outcomes as :meth:`Answers.update` reads the answers (encoded updates
        decoded against the weights that were sent). With ``bn_stats`` every task also asks for the BatchNorm
        statistics of the weights it ships (over at most ``bn_max_batches`` batches), which come back as an
        :class:`EvalOutcome` per device before its update (:meth:`Answers.carried`)."""
        cut = extract or self.extract
        started = time.monotonic()
        digests = self.publish_weights(round_, state, {ins.submodel for ins in instructions}, cut)
        tasks = train_tasks(self.run_name, round_, instructions, digests, self.deadline_s, bn_stats, bn_max_batches)
        self.send(tasks)
        self.publish_s = time.monotonic() - started

        def progress(answered: int, total: int) -> None:
            if self.on_progress is not None:
                self.on_progress(f"round {round_}: {answered}/{total} clients answered")

        def answer(
            round_: int, item: Inbound, pending: dict[str, Task], started: float
        ) -> Optional[Union[Outcome, EvalOutcome]]:
            return self.answers.update(round_, item, pending, started, lambda k: cut(state, k))

        def dropped(node: str, task: Task, why: str) -> Union[Outcome, EvalOutcome]:
            return Outcome(node, task.submodel, "dropped", reason=why)

        yield from self.collect(round_, tasks, started, answer, dropped, progress)

    def evaluate(self, round_: int, state: GlobalState, requests: list[EvalRequest]) -> Iterator[EvalOutcome]:
        """The evaluation step: one ``evaluate`` task per device (signed like tasks), answered by an
        ``evaluation`` (signed like updates) or a ``decline``; checked by :meth:`Answers.evaluation` for what
        it may claim and by the engine for the rest (shapes, finite values, bounded counts)."""
        started = time.monotonic()
        digests = self.publish_weights(round_, state, {k for req in requests for k in req.submodels})
        tasks = eval_tasks(self.run_name, round_, requests, digests, self.deadline_s)
        self.send(tasks)
        yield from self.collect(
            round_,
            tasks,
            started,
            self.answers.evaluation,
            lambda node, _, why: EvalOutcome(node, "dropped", reason=why),
        )

    def collect(
        self,
        round_: int,
        tasks: dict[str, PendingTask],
        started: float,
        answer: Callable[[int, Inbound, dict[str, PendingTask], float], Optional[OutcomeT]],
        dropped: Callable[[str, PendingTask, str], OutcomeT],
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Iterator[OutcomeT]:
        """The answers to ``tasks`` (sent at ``started``) as ``answer`` reads them, until every task is
        answered, the deadline passes or the run stops; a device that is gone (looked at every
        ``GONE_CHECK_S``) or silent at the deadline yields ``dropped``."""
        pending = dict(tasks)
        deadline = started + self.deadline_s + GRACE_S
        look = 0.0
        while pending and time.monotonic() < deadline and not self.stop.is_set():
            self._note_acknowledged(round_)
            if self._reask.is_set():
                self._reask.clear()
                self.ask_again(round_, pending)
            if time.monotonic() >= look:
                look = time.monotonic() + GONE_CHECK_S
                for node, task, gone in self._drop_gone(pending):
                    log.warning("round %d: %s %s", round_, node, gone)
                    yield dropped(node, task, gone)
            item = self.next(0.25)
            if item is None:
                continue
            outcome = answer(round_, item, pending, started)
            if outcome is not None:
                yield outcome
                if progress is not None:
                    progress(len(tasks) - len(pending), len(tasks))
        if pending:
            log.warning("round %d: deadline passed without answers from %s", round_, sorted(pending))
        for node, task in pending.items():
            yield dropped(node, task, "no answer before the deadline")

    def ask_again(self, round_: int, pending: dict[str, PendingTask]) -> None:
        """Send the ``pending`` tasks again under new ids (in place): after this link reconnected, answers may
        have been lost (a broker restarted without persistence drops what came while this session had no
        subscription there, and devices that were back first answered into the void). A device takes the
        new id as a new task of the same round (``edge_client.session.DeviceSession.refusal``); an answer to
        an earlier id still counts (:attr:`Answers.earlier_ids`: the device may have been training it all
        along), and the first answer resolves the task."""
        for (node, task), task_id in zip(list(pending.items()), task_ids(len(pending))):
            self.answers.earlier_ids.setdefault(node, set()).add(task.task_id)
            pending[node] = again = task.model_copy(update={"task_id": task_id, "sent_at": 0.0})
            self.bytes_out += self.link.publish(self.topics.node(node, "task"), again)
        log.warning("round %d: reconnected: asked %d devices again for their answers", round_, len(pending))

    def _drop_gone(self, pending: dict[str, PendingTask]) -> list[tuple[str, PendingTask, str]]:
        """Take the devices that are gone (:meth:`gone`) out of ``pending``: (node, task, why) each."""
        dropped = []
        for node in list(pending):
            why = self.gone(node)
            if why:
                dropped.append((node, pending.pop(node), why))
        return dropped

    def gone(self, node: str) -> str:
        """Why a device with a task is taken as gone ("" while it may still answer). A device that said it
        leaves is gone at once. Its Last Will (``lost``) counts only after ``LOST_GRACE_S`` during which this
        link stayed connected: a broker that shuts down publishes every device's will, and those devices
        come back and answer once the broker is up again."""
        if node in self.cut_off:
            return f"cut off: more than {REJECTED_BUDGET} refused payloads"
        info = self.registry.nodes.get(node)
        if info is None or info.online:
            return ""
        if info.state != "lost":
            return "left the run"
        quiet = time.monotonic() - max(info.since, self._reconnected_at)
        return (
            f"lost (no sign of it for {quiet:.0f} s)" if quiet > LOST_GRACE_S and self.link.connected.is_set() else ""
        )
