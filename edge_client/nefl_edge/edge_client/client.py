"""The device's side of the federated loop for one run: join it, take tasks, train with ONNX Runtime,
upload, keep the latest weights; evaluate on its held-out split and compute BatchNorm statistics when asked
(``evaluate`` tasks, ``edge_client.evaluate``). :mod:`edge_client.agent` runs one of these per run, run after run."""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from nefl_edge.core.artifacts import ArtifactCache, ArtifactError, parse_manifest
from nefl_edge.core.data import Dataset
from nefl_edge.core.encoding import encode_update
from nefl_edge.core.evaluation import split_dataset
from nefl_edge.core.mqtt import BrokerAddress, Inbound, MqttLink, Security
from nefl_edge.core.schemas import (
    Artifact,
    BnCount,
    Control,
    Decline,
    DeviceProfile,
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
from nefl_edge.core.signing import Keyring, Signer, signers_by_topic
from nefl_edge.core.wire import (
    ProtocolError,
    Topics,
    encode,
    pack_tensors,
    sha256,
    short,
    tensor_parts,
    unpack_tensors,
)
from nefl_edge.edge_client.evaluate import SubmodelEvaluator
from nefl_edge.edge_client.latest import LatestStore
from nefl_edge.edge_client.profile import device_profile, probe_threads, thread_choice_key
from nefl_edge.edge_client.trainer import (
    BACKEND_FILES,
    DeadlineMissed,
    ProgressLog,
    TrainerBackend,
    choose_backend,
    create_backend,
    train_local,
)

MAX_DEFERRED = 256  # messages kept aside while waiting for one (weights, artifacts)
log = logging.getLogger(__name__)
UPLOAD_MARGIN_S = 2.0
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code


class RunEnded(Exception):
    """The run is over for this device: the coordinator said so (``at``: its ``sent_at``), or the device left."""

    def __init__(self, reason: str, at: float = 0.0) -> None:
        super().__init__(reason)
        self.at = at


class _Stopped(Exception):
    """``stop()`` or ``leave()`` was called while waiting."""


@dataclass(frozen=True)
class RunOutcome:
    """How :meth:`EdgeClient.serve` returned: ``ended`` (the coordinator's ``control end``), ``stopped``
    (``stop()``: a signal), ``left`` (``leave()``: e.g. the run's manifest was withdrawn) or ``no-manifest``
    (none within the wait). ``ended_at`` is the end message's ``sent_at`` (coordinator clock)."""

    state: str
    reason: str = ""
    ended_at: float = 0.0


@dataclass
class ClientOptions:
    broker: BrokerAddress
    node: str
    run: str = "default"
    cache: Path = Path.home() / ".cache" / "nefl-edge"
    security: Security = field(default_factory=Security)
    protocol: str = "3.1.1"
    tier: Optional[int] = None
    threads: int = 0
    fetch_timeout_s: float = 120.0
    backend: str = "auto"
    chunk_size: int = 1 << 20
    keep_latest: bool = True
    """Keep the weights of each finished task under ``<cache>/latest`` for local inference."""
    progress_every_s: float = 10.0
    signer: Optional[Signer] = None
    """Signs everything this device publishes (the enrolled identity's key, key id = ``node``)."""
    keyring: Optional[Keyring] = None
    """The coordinator's key: with it, every message received must carry the coordinator's signature
    (on its topics); ``None``: nothing is verified (the loopback demo)."""
    coordinator_key_id: str = "coordinator"
    instance: str = field(default_factory=lambda: secrets.token_hex(6))
    """Random per process, sent in every hello: the coordinator tells two processes with one identity apart."""


class TakeoverWatch:
    """Notices a broker that keeps knocking this device off: MQTT 5's "Session taken over", or (MQTT 3.1.1
    gives no reason) a connection that failed within ``quick_s`` of connecting and was reconnected within
    ``quick_s`` again, so the broker itself was up (a broker restart or a flaky network reconnects later or
    drops connections that lived longer). ``threshold`` such drops within ``window_s`` mean that another process
    most likely uses the same identity (same broker account and client id): one clear error per ``window_s``."""

    def __init__(
        self,
        node: str,
        quick_s: float = 10.0,
        window_s: float = 120.0,
        threshold: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node, self.quick_s, self.window_s, self.threshold, self.clock = node, quick_s, window_s, threshold, clock
        self._connected_at: Optional[float] = None
        self._dropped: Optional[Tuple[float, str]] = None  # a quick failed session: when it ended, and why
        self._drops: Deque[float] = collections.deque(maxlen=threshold)
        self._reported_at: Optional[float] = None
        self.reports = 0

    def connected(self) -> None:
        now, dropped = self.clock(), self._dropped
        self._connected_at, self._dropped = now, None
        if dropped is not None and now - dropped[0] < self.quick_s:
            self._count(now, dropped[1])

    def disconnected(self, reason: Any) -> None:
        """Note a disconnect with paho's reason code."""
        now, since = self.clock(), self._connected_at
        self._connected_at = None
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._count(now, str(reason))
        elif since is not None and now - since < self.quick_s and getattr(reason, "is_failure", False):
            self._dropped = (now, str(reason))

    def _count(self, now: float, reason: str) -> None:
        self._drops.append(now)
        if len(self._drops) < self.threshold or now - self._drops[0] > self.window_s:
            return
        if self._reported_at is not None and now - self._reported_at < self.window_s:
            return
        self._reported_at = now
        self.reports += 1
        log.error(
            "the broker dropped this device's connection %d times right after it connected (last: %s): most likely "
            "another process uses the identity %s (same broker account and client id: a second service, or a copied "
            "state dir); stop it, or give each device its own state dir (`nefl-edge identity` shows the node id)",
            len(self._drops),
            reason,
            self.node,
        )


class EdgeClient:
    """A device in one run: ``connect()`` then ``serve()``, which blocks until the run ends, ``stop()`` or
    ``leave()`` is called; ``run()`` does both (the one-run ``nefl-edge join``).

    ``not_before``: manifests sent before this time (coordinator clock) are stale (a run of the same name
    that just ended) and are ignored."""

    def __init__(self, options: ClientOptions, data: Dataset, not_before: float = 0.0) -> None:
        self.opts = options
        self.data = data
        self.not_before = not_before
        self.topics = Topics(options.run)
        self.cache = ArtifactCache(options.cache / "artifacts")
        self.latest = LatestStore(options.cache / "latest")
        self.manifest: Optional[Manifest] = None
        self.backend_kind = choose_backend(options.backend)
        self._backends: Dict[str, TrainerBackend] = {}
        self._threads: Tuple[int, bool] = (options.threads, False)  # (threads, spin-wait); the probe chooses
        self._evaluators: Dict[str, SubmodelEvaluator] = {}
        self._splits: Dict[float, Tuple[Dataset, Dataset]] = {}
        self._deferred: Deque[Inbound] = deque(maxlen=MAX_DEFERRED)  # the oldest go first when full
        self._done_tasks: set[str] = set()
        self._joined_at = 0.0  # sent_at of the manifest this client joined with (coordinator clock)
        self._manifest_at = 0.0  # sent_at of the newest manifest since (a coordinator republishes after a reconnect)
        self._highest: Optional[Tuple[int, float]] = None  # (round, sent_at) of the last task taken
        self.refused: List[str] = []  # why tasks were refused, latest last (bounded)
        self._following: Optional[int] = None  # the submodel whose global broadcasts are kept (the last trained)
        self._global_round: Dict[int, int] = {}  # round of the kept global weights, by submodel
        self.takeovers = TakeoverWatch(options.node)
        self._stop = threading.Event()
        self._left: Optional[str] = None
        self._hello: Optional[Hello] = None
        self._run_topics = (self.topics.manifest + "/#", self.topics.node(options.node, "task"), self.topics.control)
        self.link = self._new_link()

    def _new_link(self) -> MqttLink:
        opts = self.opts
        lost = encode(Status(run=opts.run, node=opts.node, state="lost"))  # the Last Will
        link = MqttLink(
            f"nefl-{opts.run}-{opts.node}",
            opts.broker,
            opts.run,
            opts.security,
            protocol="5" if opts.protocol == "5" else "3.1.1",
            will=(self.topics.node(opts.node, "status"), lost),
            chunk_size=opts.chunk_size,
            signer=opts.signer,
            keyring=opts.keyring,
            sender_of=signers_by_topic(opts.coordinator_key_id) if opts.keyring is not None else None,
        )
        self._watch_takeovers(link)
        return link

    def _watch_takeovers(self, link: MqttLink) -> None:
        """Feed the link's connects and disconnects to :attr:`takeovers`."""
        watch = self.takeovers

        def session(connected: bool, reason: Any) -> None:
            if connected:
                watch.connected()
            else:
                watch.disconnected(reason)

        link.on_session.append(session)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        """Connect (``BrokerError`` after 15 s) and serve the run until it ends."""
        self.connect()
        return self.serve()

    def connect(self, timeout_s: float = 15.0) -> None:
        """One attempt to reach the broker (a fresh session object each time); raises ``BrokerError``."""
        self.link = self._new_link()
        for topic in self._run_topics:
            self.link.subscribe(topic)
        self.link.connect(timeout_s)

    def serve(self, manifest_timeout_s: Optional[float] = None) -> RunOutcome:
        """Serve the run on the connected link until it ends; then unsubscribe (the persistent session keeps
        nothing queued for a run that is over), say ``offline`` and disconnect."""
        link, node = self.link, self.opts.node
        link.on_connected = self._on_reconnect
        outcome = RunOutcome("stopped", "stopped")
        ended = False
        try:
            self._publish_status("online")
            manifest = self._wait_manifest(manifest_timeout_s)
            if manifest is None:
                outcome = RunOutcome("no-manifest", f"no manifest within {manifest_timeout_s or 0:.0f} s")
                return outcome
            self.manifest = manifest
            self._check_data(self.manifest)
            self._hello = Hello(
                run=self.opts.run,
                node=node,
                profile=self._profile(self.manifest),
                num_samples=len(self.data),
                tier=self.opts.tier,
                instance=self.opts.instance,
            )
            self._announce()
            log.info("joined run %s as %s with %d samples; waiting for tasks", self.opts.run, node, len(self.data))
            while not self._stop.is_set():
                item = self._next(1.0)
                if item is not None:
                    self._handle(*item)
        except _Stopped:
            pass
        except RunEnded as end:
            ended = True
            log.info("run %s ended: %s", self.opts.run, end)
            outcome = RunOutcome("ended", str(end), end.at)
        finally:
            if self._left and not ended:
                outcome = RunOutcome("left", self._left)
                log.info("left run %s: %s", self.opts.run, self._left)
            if outcome.state != "stopped":
                for topic in self._run_topics:
                    link.unsubscribe(topic)
                if self._following is not None:
                    link.unsubscribe(self.topics.weights(self._following) + "/#")
            self._publish_status("offline")
            time.sleep(0.2)
            link.close()
        return outcome

    def stop(self) -> None:
        """Leave at the next chance (a signal); callable from any thread."""
        self._stop.set()

    def leave(self, reason: str) -> None:
        """Leave this run for good (e.g. its manifest was withdrawn); callable from any thread."""
        self._left = reason
        self._stop.set()

    def _on_reconnect(self) -> None:
        if self._hello is not None:  # after a reconnect: tell the coordinator we are back
            self._announce()

    def _announce(self) -> None:
        assert self._hello is not None
        self._publish_status("online")
        self.link.publish(self.topics.node(self.opts.node, "hello"), self._hello)

    def _publish_status(self, state: str) -> None:
        status = Status(run=self.opts.run, node=self.opts.node, state=state)  # type: ignore[arg-type]
        self.link.publish(self.topics.node(self.opts.node, "status"), status, retain=True)

    # --- inbox ---------------------------------------------------------------------------------------------

    def _next(self, timeout: float) -> Optional[Inbound]:
        if self._deferred:
            return self._deferred.popleft()
        try:
            return self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_for(self, what: str, match: Callable[[Message, bytes], bool], timeout: float) -> tuple[Message, bytes]:
        """Wait for one message; others are kept for the main loop, except that a run end stops the wait."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                stream, message, body = self.link.inbox.get(timeout=min(1.0, deadline - time.monotonic()))
            except (queue.Empty, ValueError):
                continue
            if match(message, body):
                return message, body
            if self._is_end(message):
                assert isinstance(message, Control)
                raise RunEnded(message.reason, message.sent_at)
            self._deferred.append((stream, message, body))
        if self._stop.is_set():
            raise _Stopped()
        raise TimeoutError(f"no {what} within {timeout:.0f} s")

    def _fresh_manifest(self, message: Message) -> bool:
        if not isinstance(message, ManifestMessage):
            return False
        if message.sent_at < self.not_before:
            log.info("ignored the manifest of an earlier run %s (sent before it ended)", self.opts.run)
            return False
        return True

    def _wait_manifest(self, timeout_s: Optional[float] = None) -> Optional[Manifest]:
        log.info("waiting for the run's manifest on %s", self.topics.manifest)
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set():
            wait = 30.0 if give_up is None else min(30.0, give_up - time.monotonic())
            if wait <= 0:
                return None
            try:
                message, body = self._wait_for("manifest", lambda m, b: self._fresh_manifest(m), wait)
            except TimeoutError:
                log.info("no manifest yet; is the coordinator of run %r up?", self.opts.run)
                continue
            try:
                manifest = parse_manifest(body.decode(), "the manifest from the broker")
                self._joined_at = self._manifest_at = message.sent_at
                return manifest
            except (ArtifactError, UnicodeDecodeError) as exc:
                log.warning("ignored a bad manifest: %s", exc)
        raise _Stopped()

    def _check_data(self, manifest: Manifest) -> None:
        self.data.check_for(manifest.input_shape, manifest.num_classes)

    # --- artifacts and profile -----------------------------------------------------------------------------

    def _fetch_artifacts(self, sub: SubmodelEntry, roles: Optional[Tuple[str, ...]] = None) -> Dict[str, Path]:
        roles = roles or BACKEND_FILES[self.backend_kind]
        missing = [r for r in roles if r not in sub.files]
        if missing:
            raise ArtifactError(f"submodel {sub.index} has no {', '.join(missing)} artifact in the manifest")
        for role, entry in sub.files.items():
            if role not in roles or self.cache.has(entry.sha256):
                continue
            topic = self.topics.artifact(entry.sha256)
            self.link.subscribe(topic + "/#")
            try:
                _, body = self._wait_for(
                    f"artifact {entry.name}",
                    lambda m, b, d=entry.sha256: isinstance(m, Artifact) and sha256(b) == d,  # type: ignore[misc]
                    self.opts.fetch_timeout_s,
                )
            finally:
                self.link.unsubscribe(topic + "/#")
            self.cache.put(body, entry.sha256)
            log.info("fetched %s artifact of submodel %d (%d KiB)", role, sub.index, len(body) // 1024)
        paths = self.cache.submodel_paths(sub, tuple(roles))
        if paths is None:
            raise ArtifactError(f"artifacts of submodel {sub.index} vanished from the cache {self.cache.folder}")
        return paths

    def _backend(self, manifest: Manifest, sub: SubmodelEntry) -> TrainerBackend:
        if sub.key not in self._backends:
            paths = self._fetch_artifacts(sub)
            self._backends[sub.key] = create_backend(
                self.backend_kind, paths, sub.params, manifest.train, *self._threads
            )
        return self._backends[sub.key]

    def _profile(self, manifest: Manifest) -> DeviceProfile:
        probe = min(manifest.submodels, key=lambda s: s.mflops)
        paths = self._fetch_artifacts(probe)
        choice = probe_threads(
            lambda threads, spin: create_backend(self.backend_kind, paths, probe.params, manifest.train, threads, spin),
            manifest.input_shape,
            manifest.num_classes,
            self.opts.threads,
            self.opts.cache / "threads.json",
            thread_choice_key(self.backend_kind, probe.key),
        )
        if (choice.threads, choice.spin) != self._threads:
            self._backends.clear()
            self._evaluators.clear()
        self._threads = (choice.threads, choice.spin)
        profile = device_profile(self.backend_kind, choice.samples_per_s, probe.mflops)
        log.info(
            "profile: %s; training threads %s (samples/s tried: %s)",
            profile.model_dump_json(),
            choice.label,
            choice.tried,
        )
        return profile

    # --- tasks ---------------------------------------------------------------------------------------------

    def _is_end(self, message: Message) -> bool:
        """A ``control end`` of this run; one sent before the manifest this client joined with is an old one
        (replayed, or of an earlier run of the same name) and is ignored."""
        if not (isinstance(message, Control) and message.action == "end"):
            return False
        if message.sent_at < self._joined_at:
            log.warning("ignored a control end sent before this run's manifest (a replay of an earlier run's end)")
            return False
        return True

    def _handle(self, stream: str, message: Message, body: bytes) -> None:
        if isinstance(message, Control):
            if self._is_end(message):
                raise RunEnded(message.reason or "the coordinator finished", message.sent_at)
            if message.action == "announce":
                self._announce()  # a (re)started coordinator asks who is there
            return
        if isinstance(message, ManifestMessage):
            if not self._fresh_manifest(message):
                return
            try:
                self.manifest = parse_manifest(body.decode(), "the manifest from the broker")
                self._manifest_at = max(self._manifest_at, message.sent_at)
            except (ArtifactError, UnicodeDecodeError) as exc:
                log.warning("ignored a bad manifest: %s", exc)
            return
        if isinstance(message, Weights):
            self._keep_broadcast(message, body)
            return
        if isinstance(message, (Task, EvalTask)):
            if message.node != self.opts.node:
                return
            refusal = self._refusal(message)
            if refusal:
                self.refused = [*self.refused[-31:], refusal]
                log.warning("refused task %s of round %d: %s; not training it", message.task_id, message.round, refusal)
                return
            self._done_tasks.add(message.task_id)
            self._highest = (message.round, message.sent_at)
            if isinstance(message, EvalTask):
                self._run_evaluation(message, time.monotonic())
            else:
                self._run_task(message, time.monotonic())

    def _refusal(self, task: Union[Task, EvalTask]) -> str:
        """Why ``task`` must not be trained (a replay), or "". Times are the coordinator's ``sent_at`` (signed
        with the message), compared only with each other: no clock on the device is trusted."""
        if task.task_id in self._done_tasks:
            return "this task was done already (a replay)"
        if task.sent_at < self._joined_at:
            return "it was sent before this run's manifest (a task of an earlier run, replayed)"
        highest = self._highest
        if highest is not None and task.round < highest[0]:
            # a coordinator started afresh under the same run name sends round 1 again, after a new manifest
            restarted = task.sent_at > self._manifest_at > highest[1]
            if not restarted:
                return f"round {task.round} is older than round {highest[0]}, already seen in this run (a replay)"
        return ""

    def _run_task(self, task: Task, received: float) -> None:
        manifest = self.manifest
        assert manifest is not None
        topic = self.topics.node(self.opts.node, "update")
        if task.submodel >= len(manifest.submodels):
            self._decline(task, f"submodel {task.submodel} is not in the manifest")
            return
        sub = manifest.submodels[task.submodel]
        log.info(
            "round %d: training submodel %d (gamma %.2f) for at most %.0f s",
            task.round,
            sub.index,
            sub.gamma,
            task.deadline_s,
        )
        try:
            backend = self._backend(manifest, sub)
            remaining = task.deadline_s - (time.monotonic() - received)
            weights = self._weights(sub, task.round, task.weights_sha256, remaining, follow=True)
            self._keep_global(manifest, sub, task.round, weights)
            backend.load(weights, task.train)
            self._publish_status("training")
            budget = task.deadline_s - (time.monotonic() - received) - UPLOAD_MARGIN_S
            progress = ProgressLog(log.info, self.opts.progress_every_s, f"round {task.round}: ")
            data = self._split(task.train.eval_fraction)[0]
            metrics = train_local(backend, data, task.train, deadline_s=budget, on_progress=progress)
        except DeadlineMissed as exc:
            self._decline(task, str(exc))
            return
        except (RunEnded, _Stopped):
            raise
        except Exception as exc:
            self._task_failed(task, exc, "training")
            return
        finally:
            self._publish_status("online")
        update = Update(
            run=self.opts.run,
            node=self.opts.node,
            task_id=task.task_id,
            round=task.round,
            submodel=sub.index,
            num_samples=len(data),
            metrics=metrics,
        )
        tensors = backend.tensors()
        encoding = task.train.update_encoding
        wire_tensors = tensors if encoding == "float32" else encode_update(tensors, encoding, weights)
        sent = self.link.publish(topic, update, tensor_parts(wire_tensors, keep_dtype=encoding != "float32"))
        log.info(
            "round %d: uploaded %d KiB; loss %.3f -> %.3f, accuracy %.3f in %.1f s",
            task.round,
            sent // 1024,
            metrics.loss_first,
            metrics.loss_last,
            metrics.accuracy,
            metrics.seconds,
        )

    def _split(self, fraction: float) -> Tuple[Dataset, Dataset]:
        """This device's training part and held-out part for ``fraction`` (the same split every round)."""
        if fraction not in self._splits:
            self._splits = {fraction: split_dataset(self.data, fraction)}
        return self._splits[fraction]

    def _weights(
        self, sub: SubmodelEntry, round_: int, digest: str, timeout: float, follow: bool = False
    ) -> Dict[str, np.ndarray]:
        """The weights of ``sub`` with sha256 ``digest`` from the round's retained broadcast. ``follow``: stay
        subscribed to its broadcasts (and leave those of the submodel followed before), so that the device
        keeps its later global weights, up to the final model of the run (:meth:`_keep_broadcast`)."""
        weights_topic = self.topics.weights(sub.index)
        if follow and self._following not in (None, sub.index):
            self.link.unsubscribe(self.topics.weights(self._following) + "/#")
        if follow:
            self._following = sub.index
        self.link.subscribe(weights_topic + "/#")
        try:
            _, body = self._wait_for(
                f"weights of submodel {sub.index} for round {round_}",
                lambda m, b: isinstance(m, Weights) and m.submodel == sub.index and sha256(b) == digest,
                max(1.0, timeout),
            )
        finally:
            if self._following != sub.index:
                self.link.unsubscribe(weights_topic + "/#")
        tensors = unpack_tensors(body)
        missing = [p.name for p in sub.params if p.name not in tensors]
        if missing:
            raise ProtocolError(f"weights lack {missing[:3]}")
        misshapen = [p.name for p in sub.params if tuple(tensors[p.name].shape) != tuple(p.shape)]
        if misshapen:  # ONNX Runtime would raise its own exception (not a decline) on them
            raise ProtocolError(f"weights of the wrong shape: {misshapen[:3]}")
        return tensors

    def _evaluator(self, sub: SubmodelEntry, roles: Tuple[str, ...]) -> SubmodelEvaluator:
        key = f"{sub.key}:{','.join(roles)}"
        if key not in self._evaluators:
            self._evaluators[key] = SubmodelEvaluator(self._fetch_artifacts(sub, roles), *self._threads)
        return self._evaluators[key]

    def _task_failed(self, task: Union[Task, EvalTask], exc: Exception, what: str) -> None:
        """Decline ``task`` that failed with ``exc``; the device stays in the run. Errors we expect (no
        weights in time, bad artifacts or input, a diverged loss) are named; anything else, such as ONNX
        Runtime's own exceptions, is logged with its traceback as well."""
        if not isinstance(exc, (TimeoutError, ArtifactError, ProtocolError, FloatingPointError, ValueError)):
            log.exception("round %d: %s failed", task.round, what)
        self._decline(task, f"{type(exc).__name__}: {short(str(exc), 200)}")

    def _run_evaluation(self, task: EvalTask, received: float) -> None:
        """Evaluate the task's submodels on the held-out split and/or sum their BatchNorm batch statistics
        over the training split; answer with one ``evaluation`` (or a ``decline``)."""
        manifest = self.manifest
        assert manifest is not None
        roles = tuple(r for r, wanted in (("eval", task.evaluate), ("stats", task.bn_stats)) if wanted)
        results: List[SubmodelEval] = []
        counts: List[BnCount] = []
        body: Dict[str, np.ndarray] = {}
        train, held = self._split(task.eval_fraction)
        try:
            if len(task.submodels) != len(task.weights_sha256) or len(set(task.submodels)) != len(task.submodels):
                raise ValueError("submodels and weights do not match one to one")
            for k, digest in zip(task.submodels, task.weights_sha256):
                if k >= len(manifest.submodels):
                    raise ValueError(f"submodel {k} is not in the manifest")
                sub = manifest.submodels[k]
                evaluator = self._evaluator(sub, roles)
                tensors = self._weights(sub, task.round, digest, task.deadline_s - (time.monotonic() - received))
                if task.bn_stats:
                    stats = evaluator.bn_stats(tensors, train.x, task.batch_size, task.bn_max_batches)
                    if stats.batches:
                        counts.append(BnCount(submodel=k, batches=stats.batches))
                        body.update({f"{k}/{name}": v for name, v in stats.tensors().items()})
                if task.evaluate and len(held):
                    result = evaluator.evaluate(tensors, held, task.batch_size)
                    results.append(
                        SubmodelEval(submodel=k, loss=result.loss, correct=result.correct, count=result.count)
                    )
        except (RunEnded, _Stopped):
            raise
        except Exception as exc:
            self._task_failed(task, exc, "evaluation")
            return
        answer = Evaluation(
            run=self.opts.run, node=self.opts.node, task_id=task.task_id, round=task.round, results=results, bn=counts
        )
        self.link.publish(self.topics.node(self.opts.node, "update"), answer, pack_tensors(body) if body else b"")
        log.info(
            "round %d: evaluated submodels %s (%s) in %.1f s",
            task.round,
            task.submodels,
            ", ".join(f"{r.submodel}: {100 * r.correct / max(1, r.count):.1f} %" for r in results) or "statistics",
            time.monotonic() - received,
        )

    def _decline(self, task: Union[Task, EvalTask], reason: str) -> None:
        log.warning("round %d: declining task %s: %s", task.round, task.task_id, reason)
        decline = Decline(run=self.opts.run, node=self.opts.node, task_id=task.task_id, round=task.round, reason=reason)
        self.link.publish(self.topics.node(self.opts.node, "update"), decline)

    def _keep_global(
        self,
        manifest: Manifest,
        sub: SubmodelEntry,
        round_: int,
        tensors: Dict[str, np.ndarray],
        metrics: Optional[Metrics] = None,
    ) -> None:
        """Keep global weights of ``sub`` (``round_``) for ``nefl-edge predict`` (``edge_client.latest``)."""
        if not self.opts.keep_latest or round_ < self._global_round.get(sub.index, -1):
            return
        try:
            path = self.latest.save(self.opts.run, round_, manifest, sub, tensors, metrics)
            self._global_round[sub.index] = round_
            log.debug("kept the global weights of submodel %d (round %d) in %s", sub.index, round_, path)
        except OSError as exc:
            log.warning("could not keep the global weights for local inference: %s", exc)

    def _keep_broadcast(self, message: Weights, body: bytes) -> None:
        """A broadcast of the followed submodel outside a task (a later round, or the run's final model):
        keep it when it fits the manifest; anything else is ignored."""
        manifest = self.manifest
        if manifest is None or message.submodel != self._following or message.submodel >= len(manifest.submodels):
            return
        sub = manifest.submodels[message.submodel]
        try:
            tensors = unpack_tensors(body)
        except ProtocolError as exc:
            log.warning("ignored a broadcast of submodel %d: %s", sub.index, exc)
            return
        if any(p.name not in tensors or tuple(tensors[p.name].shape) != tuple(p.shape) for p in sub.params):
            log.warning("ignored a broadcast of submodel %d whose tensors do not fit the manifest", sub.index)
            return
        self._keep_global(manifest, sub, message.round, tensors)
