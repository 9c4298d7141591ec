"""The device's side of the protocol for one run, over any :class:`core.link.Link` (``MqttLink`` on a real
device, the in-memory link in the protocol tests): the state machine that the trainer is driven by.

- **Manifest**: the run's retained manifest is the join; one sent before ``not_before`` (coordinator clock: the
  end of an earlier run of the same name) is stale and ignored, a newer one (a coordinator that republished,
  or restarted under the same run name) replaces it.
- **Admission** (:class:`Admission`): a run this device cannot take part in ends the session with
  :class:`CannotTakePart`, whenever its manifest comes (retained before the device started, or announced
  later): not enrolled in a signed run, enrolled but facing a manifest its coordinator did not sign, a model
  its data does not fit. After the join, a manifest the device cannot verify is a hostile message and is only
  rejected; a newer valid one is checked again.
- **Tasks**: a task or evaluate task for this device is taken unless it is a replay (:meth:`refusal`): a task
  id already done, a task sent before the manifest this device joined with, or a round older than one already
  taken (unless a newer manifest says the coordinator started afresh). Times are the coordinator's signed
  ``sent_at``, compared only with each other: no clock on the device is trusted.
- **Control**: ``end`` ends the run (unless sent before the join: a replayed end of an earlier run);
  ``announce`` (a restarted coordinator asks who is there) is answered with status and hello; ``heartbeat``
  (every 10 s) only says the coordinator is alive.
- **Liveness**: a joined run from whose coordinator nothing came for ``silent_s`` (default ``SILENT_S``,
  60 s: six missed heartbeats) is taken as dead (:meth:`DeviceSession.silent`); the client leaves it. Time
  spent on a task does not count (the device was not listening).
- **Answers**: an update, an evaluation or a decline on the device's own update topic, for the task it answers.
- **Broadcasts**: the weights of the submodel the device trained last stay subscribed (``follow``), and
  :meth:`DeviceSession.handle` hands their later broadcasts to the device (it keeps the global model).
- **Waiting** for one message (the round's weights, an artifact) keeps the others for the main loop (at most
  ``MAX_DEFERRED``, the oldest dropped first), except that a run end stops the wait.

What a task does (training, evaluation with ONNX Runtime) is the caller's: :meth:`DeviceSession.handle`
returns the task to run; ``edge_client.client.EdgeClient`` runs it and answers through the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nefl_edge.core.artifacts import ArtifactError, parse_manifest
from nefl_edge.core.errors import ExitCode, NeflError
from nefl_edge.core.link import Inbound, Link, Receiver, split_chunk_topic
from nefl_edge.core.schemas import (
    Artifact,
    BnCount,
    Control,
    Decline,
    EvalTask,
    Evaluation,
    Hello,
    Manifest,
    ManifestMessage,
    Message,
    Metrics,
    Status,
    SubmodelEntry,
    SubmodelEval,
    Task,
    Update,
    Weights,
)
from nefl_edge.core.signing import Keyring, signer_policy
from nefl_edge.core.wire import Buffer, LogLimiter, ProtocolError, Topics, sha256, unpack_tensors

MAX_DEFERRED = 256  # messages kept aside while waiting for one (weights, artifacts)
SILENT_S = 60.0  # a joined run whose coordinator sent nothing (not even its 10 s heartbeat) this long is dead
MAX_REFUSALS = 32  # why tasks were refused, the latest kept
log = logging.getLogger(__name__)
AnyTask = Union[Task, EvalTask]


class RunEnded(Exception):
    """The run is over for this device: the coordinator said so (``at``: its ``sent_at``), or the device left."""

    def __init__(self, reason: str, at: float = 0.0) -> None:
        super().__init__(reason)
        self.at = at


class Stopped(Exception):
    """The session's ``stop`` event was set while waiting."""


class CannotTakePart(NeflError):
    """The run, as its manifest shows it, is one this device cannot take part in; the message says why and
    what to do. ``nefl-edge join`` and a pinned ``agent --run`` exit 2 with it; a discovering agent skips the run."""

    exit_code = ExitCode.BAD_INPUT


SIGNATURE_REASONS = ("unsigned", "unknown_key", "bad_signature", "wrong_signer", "envelope")
ENROL_HINT = (
    "(`nefl-edge identity`, `nefl-coord add-device`, `nefl-edge enrol BUNDLE`; README: 'Deploying to real devices')"
)


class Admission:
    """Whether this device can take part in ``run``, read from the run's manifest as it arrives.

    - An enrolled device (``keyring``: its coordinator's key, id ``key_id``) takes only what that coordinator
      signed, so its link rejects a manifest signed otherwise or not at all and the device would wait for
      ever. :meth:`tap`, the link's raw tap (``Link.on_payload``), verifies each manifest payload with a
      receiver of its own and keeps why the latest one fails (:meth:`before_join`).
    - A device that is not enrolled accepts anything, but the coordinator of a signed run refuses what it
      sends; :meth:`tap` notes whether the latest manifest was signed (by a key this device does not know).
    - ``fits(manifest)`` says why the device's data does not fit the run's model ("" when it does).

    Where this departs from the rest of the receive path: a manifest that fails verification is not only
    rejected, it stops a device that has not joined yet. Whoever may publish a retained manifest on the run's
    topic (the broker's ACL gives that to the coordinator's account) can thus send waiting devices away.
    """

    def __init__(
        self, run: str, keyring: Optional[Keyring], key_id: str, fits: Optional[Callable[[Manifest], str]] = None
    ) -> None:
        self.run, self.enrolled, self.fits = run, keyring is not None, fits
        # an empty keyring turns any signature into "unknown_key", none into "unsigned": the verdict for a device
        # that is not enrolled
        self.probe = Receiver(run, keyring=keyring or Keyring(), sender_of=signer_policy(key_id), log_burst=0)
        self.stream = Topics(run).manifest
        self.signed = False  # the latest manifest was signed (what a device that is not enrolled needs to know)
        self.unverified = ""  # why the latest manifest fails verification (an enrolled device), else ""
        self._lock = threading.Lock()

    def tap(self, topic: str, payload: Buffer) -> bool:
        """Look at a payload on the run's manifest topic (its chunks); take none (False): the link's receiver
        still checks and delivers it. Never raises (a raising tap would cost the link its payload)."""
        try:
            if split_chunk_topic(topic)[0] == self.stream:
                self._look(topic, payload)
        except Exception:
            log.exception("the manifest check failed on %s", topic)
        return False

    def _look(self, topic: str, payload: Buffer) -> None:
        with self._lock:  # transports deliver on one thread; the in-memory broker on the publishers'
            if not payload:
                if split_chunk_topic(topic)[1] in (0, None):  # the manifest was withdrawn
                    self.signed, self.unverified = False, ""
                return
            before = sum(self.probe.rejections[r] for r in SIGNATURE_REASONS)
            item = self.probe.receive(topic, payload)
            rejected = sum(self.probe.rejections[r] for r in SIGNATURE_REASONS) > before
            if item is None and not rejected:
                return  # a chunk of a longer manifest, or a fault that is not the signature's
            reason, text = self.probe.last_rejection or ("", "")
            if self.enrolled:
                self.unverified = text if rejected else ""
            else:
                self.signed = rejected and reason == "unknown_key"

    def before_join(self) -> str:
        """Why this device cannot take part, from a manifest it cannot verify (an enrolled device), or ""."""
        if not self.unverified:
            return ""
        return (
            f"the manifest of run {self.run} is not signed by the coordinator this device is enrolled with "
            f"({self.unverified}), so it would never take a task: check --run and the broker, or enrol it with "
            f"that coordinator {ENROL_HINT}"
        )

    def check(self, manifest: Manifest) -> str:
        """Why this device cannot take part in the run of ``manifest`` (fresh and valid), or ""."""
        if not self.enrolled and self.signed:
            return (
                f"run {self.run} is signed by its coordinator and this device is not enrolled, so the coordinator "
                f"refuses everything it sends: enrol it first {ENROL_HINT}"
            )
        misfit = self.fits(manifest) if self.fits is not None else ""
        if misfit:
            return f"run {self.run} trains a model this device's data does not fit: {misfit}"
        return ""


class DeviceSession:
    """One device (``node``) in one run on ``link``. ``link`` may be replaced (a fresh connection) before the
    run is served; the state (join time, tasks taken) lives as long as the session."""

    def __init__(
        self,
        link: Link,
        run: str,
        node: str,
        not_before: float = 0.0,
        stop: Optional[threading.Event] = None,
        admission: Optional[Admission] = None,
    ) -> None:
        self.link, self.run, self.node, self.not_before = link, run, node, not_before
        self.admission = admission
        """Checks each manifest (:class:`Admission`); ``None``: every valid manifest is joined."""
        self.stop = stop or threading.Event()
        self.topics = Topics(run)
        self.manifest: Optional[Manifest] = None
        self.hello: Optional[Hello] = None
        self.joined_at = 0.0  # sent_at of the manifest this device joined with (coordinator clock)
        self.manifest_at = 0.0  # sent_at of the newest manifest since (a coordinator republishes after a reconnect)
        self.highest: Optional[Tuple[int, float]] = None  # (round, sent_at) of the last task taken
        self.done_tasks: set[str] = set()
        self.refused: List[str] = []  # why tasks were refused, latest last (bounded)
        self.following: Optional[int] = None  # the submodel whose weight broadcasts stay subscribed (the last trained)
        self._deferred: Deque[Inbound] = deque(maxlen=MAX_DEFERRED)  # the oldest go first when full
        self.silent_s = SILENT_S
        self.heard = time.monotonic()  # when the coordinator was last heard from (or the device last listened)
        self._log = LogLimiter(log)  # lines a replayed or hostile message causes: rate-limited

    @property
    def run_topics(self) -> Tuple[str, ...]:
        """What the device listens to for the whole run: the manifest, its own tasks, the run's control."""
        return (self.topics.manifest, self.topics.node(self.node, "task"), self.topics.control)

    def subscribe_run(self) -> None:
        """Listen to the run (on the current link, whose raw tap the :attr:`admission` check takes)."""
        if self.admission is not None:
            self.link.on_payload = self.admission.tap
        for topic in self.run_topics:
            self.link.subscribe(topic)

    def unsubscribe_run(self) -> None:
        """Stop listening to the run (so that a persistent session queues nothing for a run that is over)."""
        for topic in self.run_topics:
            self.link.unsubscribe(topic)
        if self.following is not None:
            self.link.unsubscribe(self.topics.weights(self.following))

    # --- what the device says ------------------------------------------------------------------------------

    def status(self, state: str) -> None:
        status = Status(run=self.run, node=self.node, state=state)  # type: ignore[arg-type]
        self.link.publish(self.topics.node(self.node, "status"), status, retain=True)

    def announce(self) -> None:
        """Say ``online`` and hello (once joined: :attr:`hello` is set)."""
        if self.hello is None:
            return
        self.status("online")
        self.link.publish(self.topics.node(self.node, "hello"), self.hello)

    def send_update(
        self, task: Task, submodel: int, num_samples: int, metrics: Metrics, body: Union[Buffer, Sequence[Buffer]]
    ) -> int:
        """Answer ``task`` with the trained weights of ``submodel`` (``body``); the bytes sent."""
        update = Update(
            run=self.run,
            node=self.node,
            task_id=task.task_id,
            round=task.round,
            submodel=submodel,
            num_samples=num_samples,
            metrics=metrics,
        )
        return self.link.publish(self.topics.node(self.node, "update"), update, body)

    def send_evaluation(
        self, task: AnyTask, results: List[SubmodelEval], counts: List[BnCount], body: Buffer = b""
    ) -> int:
        """Answer ``task`` with an ``evaluation``: an evaluate task's, or the statistics a training task asks for
        before training (``Task.bn_stats``)."""
        answer = Evaluation(
            run=self.run, node=self.node, task_id=task.task_id, round=task.round, results=results, bn=counts
        )
        return self.link.publish(self.topics.node(self.node, "update"), answer, body)

    def decline(self, task: AnyTask, reason: str) -> None:
        log.warning("round %d: declining task %s: %s", task.round, task.task_id, reason)
        decline = Decline(run=self.run, node=self.node, task_id=task.task_id, round=task.round, reason=reason)
        self.link.publish(self.topics.node(self.node, "update"), decline)

    # --- what the device hears -----------------------------------------------------------------------------

    def next(self, timeout: float) -> Optional[Inbound]:
        """A message kept aside by a wait, else the link's next one."""
        if self._deferred:
            return self._deferred.popleft()
        item = self.link.next(timeout)
        if item is not None:
            self.heard = time.monotonic()
        return item

    def silent(self) -> Optional[str]:
        """Why the run is taken as dead (its coordinator silent for :attr:`silent_s`), or None."""
        quiet = time.monotonic() - self.heard
        return f"the coordinator was silent for {quiet:.0f} s" if quiet > self.silent_s else None

    def wait_for(self, what: str, match: Callable[[Message, bytes], bool], timeout: float) -> Tuple[Message, bytes]:
        """Wait for one message; others are kept for the main loop, except that a run end stops the wait
        (``RunEnded``). ``Stopped`` when :attr:`stop` is set, ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            item = self.link.next(min(1.0, max(0.0, deadline - time.monotonic())))
            if item is None:
                continue
            self.heard = time.monotonic()
            _, message, body = item
            if match(message, body):
                return message, body
            if self.is_end(message):
                assert isinstance(message, Control)
                raise RunEnded(message.reason, message.sent_at)
            self._deferred.append(item)
        if self.stop.is_set():
            raise Stopped()
        raise TimeoutError(f"no {what} within {timeout:.0f} s")

    def fetch(self, topic: str, what: str, match: Callable[[Message, bytes], bool], timeout: float) -> bytes:
        """The body of the retained message on ``topic`` that ``match`` accepts (subscribed for the wait)."""
        self.link.subscribe(topic)
        try:
            return self.wait_for(what, match, timeout)[1]
        finally:
            self.link.unsubscribe(topic)

    def fresh_manifest(self, message: Message) -> bool:
        if not isinstance(message, ManifestMessage):
            return False
        if message.sent_at < self.not_before:
            self._log.warning(
                "old_manifest", "ignored a manifest of run %s sent before it ended (an earlier run)", self.run
            )
            return False
        return True

    def wait_manifest(self, timeout_s: Optional[float] = None) -> Optional[Manifest]:
        """Join: the run's first fresh, valid manifest (``None`` after ``timeout_s``; ``None``: wait forever).
        ``CannotTakePart`` as soon as the manifest shows that this device cannot take part (:attr:`admission`)."""
        log.info("waiting for the run's manifest on %s", self.topics.manifest)
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while not self.stop.is_set():
            self._admit(self.admission.before_join() if self.admission is not None else "")
            wait = 1.0 if give_up is None else min(1.0, give_up - time.monotonic())  # 1 s: the admission is polled
            if wait <= 0:
                return None
            try:
                message, body = self.wait_for("manifest", lambda m, b: self.fresh_manifest(m), wait)
            except TimeoutError:
                if time.monotonic() - quiet_since >= 30.0:
                    log.info("no manifest yet; is the coordinator of run %r up?", self.run)
                    quiet_since = time.monotonic()
                continue
            try:
                manifest = parse_manifest(body.decode(), "the manifest from the broker")
            except (ArtifactError, UnicodeDecodeError) as exc:
                self._log.warning("bad_manifest", "ignored a bad manifest: %s", exc)
                continue
            self._admit(self.admission.check(manifest) if self.admission is not None else "")
            self.manifest = manifest
            self.joined_at = self.manifest_at = message.sent_at
            return self.manifest
        raise Stopped()

    def _admit(self, refusal: str) -> None:
        if refusal:
            raise CannotTakePart(refusal)

    def is_end(self, message: Message) -> bool:
        """A ``control end`` of this run; one sent before the manifest this client joined with is an old one
        (replayed, or of an earlier run of the same name) and is ignored."""
        if not (isinstance(message, Control) and message.action == "end"):
            return False
        if message.sent_at < self.joined_at:
            self._log.warning("old_end", "ignored a control end sent before this run's manifest (a replayed end)")
            return False
        return True

    def handle(self, stream: str, message: Message, body: bytes) -> Optional[Union[Task, EvalTask, Weights]]:
        """One step of the state machine: the task to run now (taken: it will not be run again), a weights
        broadcast of the followed submodel (a later global model, for the device to keep), or None. Raises
        ``RunEnded`` on the run's end, ``CannotTakePart`` for a newer manifest this device cannot take part in."""
        if isinstance(message, Control):
            if self.is_end(message):
                raise RunEnded(message.reason or "the coordinator finished", message.sent_at)
            if message.action == "announce":
                self.announce()  # a (re)started coordinator asks who is there
            return None
        if isinstance(message, ManifestMessage):
            if not self.fresh_manifest(message):
                return None
            try:
                manifest = parse_manifest(body.decode(), "the manifest from the broker")
            except (ArtifactError, UnicodeDecodeError) as exc:
                self._log.warning("bad_manifest", "ignored a bad manifest: %s", exc)
                return None
            self._admit(self.admission.check(manifest) if self.admission is not None else "")
            self.manifest = manifest
            self.manifest_at = max(self.manifest_at, message.sent_at)
            return None
        if isinstance(message, Weights):
            return message if message.submodel == self.following else None
        if not isinstance(message, (Task, EvalTask)) or message.node != self.node:
            return None
        refusal = self.refusal(message)
        if refusal:
            self.refused = [*self.refused[-(MAX_REFUSALS - 1) :], refusal]
            self._log.warning(
                "refused", "refused task %s of round %d: %s; not training it", message.task_id, message.round, refusal
            )
            return None
        self.done_tasks.add(message.task_id)
        self.highest = (message.round, message.sent_at)
        return message

    def refusal(self, task: AnyTask) -> str:
        """Why ``task`` must not be run (a replay), or "". Times are the coordinator's ``sent_at`` (signed
        with the message), compared only with each other: no clock on the device is trusted."""
        if task.task_id in self.done_tasks:
            return "this task was done already (a replay)"
        if task.sent_at < self.joined_at:
            return "it was sent before this run's manifest (a task of an earlier run, replayed)"
        highest = self.highest
        if highest is not None and task.round < highest[0]:
            # a coordinator started afresh under the same run name sends round 1 again, after a new manifest
            restarted = task.sent_at > self.manifest_at > highest[1]
            if not restarted:
                return f"round {task.round} is older than round {highest[0]}, already seen in this run (a replay)"
        return ""

    # --- what a task needs ---------------------------------------------------------------------------------

    def artifact(self, sha: str, name: str, timeout: float) -> bytes:
        """The artifact with sha256 ``sha`` from its retained, content-addressed topic."""
        return self.fetch(
            self.topics.artifact(sha),
            f"artifact {name}",
            lambda m, b: isinstance(m, Artifact) and sha256(b) == sha,
            timeout,
        )

    def weights(
        self, sub: SubmodelEntry, round_: int, digest: str, timeout: float, follow: bool = False
    ) -> Dict[str, np.ndarray]:
        """The weights of ``sub`` with sha256 ``digest`` from the round's retained broadcast, checked to hold
        every parameter of ``sub`` at its shape (``ProtocolError`` otherwise). ``follow``: stay subscribed to
        its broadcasts (and leave those of the submodel followed before), so that :meth:`handle` hands the
        device its later global weights, up to the final model of the run."""
        topic = self.topics.weights(sub.index)
        if follow and self.following not in (None, sub.index):
            self.link.unsubscribe(self.topics.weights(self.following))
        if follow:
            self.following = sub.index
        self.link.subscribe(topic)
        try:
            _, body = self.wait_for(
                f"weights of submodel {sub.index} for round {round_}",
                lambda m, b: isinstance(m, Weights) and m.submodel == sub.index and sha256(b) == digest,
                max(1.0, timeout),
            )
        finally:
            if self.following != sub.index:
                self.link.unsubscribe(topic)
        tensors = unpack_tensors(body)
        missing = [p.name for p in sub.params if p.name not in tensors]
        if missing:
            raise ProtocolError(f"weights lack {missing[:3]}")
        misshapen = [p.name for p in sub.params if tuple(tensors[p.name].shape) != tuple(p.shape)]
        if misshapen:  # ONNX Runtime would raise its own exception (not a decline) on them
            raise ProtocolError(f"weights of the wrong shape: {misshapen[:3]}")
        return tensors
