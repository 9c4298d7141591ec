"""The device's side of the federated loop for one run: join it, take tasks, train with ONNX Runtime,
upload, keep the latest weights; evaluate on its held-out split and compute BatchNorm statistics when asked
(``evaluate`` tasks, ``edge_client.evaluate``). :mod:`edge_client.agent` runs one of these per run, run after run.

The protocol's rules (manifest, tasks taken or refused as replays, run end, answers) are the device session's
(:mod:`edge_client.session`); :class:`EdgeClient` wires that session to an MQTT link and does the work a task
asks for."""

from __future__ import annotations

import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from nefl_edge.core.artifacts import ArtifactCache, ArtifactError
from nefl_edge.core.data import DataError, Dataset
from nefl_edge.core.encoding import encode_update
from nefl_edge.core.evaluation import split_dataset
from nefl_edge.core.mqtt import BrokerAddress, MqttLink, Security
from nefl_edge.core.schemas import (
    ArtifactRole,
    BnCount,
    DeviceProfile,
    EvalTask,
    Hello,
    Manifest,
    Message,
    Metrics,
    Status,
    SubmodelEntry,
    SubmodelEval,
    Task,
    Weights,
)
from nefl_edge.core.signing import Keyring, Signer, signer_policy
from nefl_edge.core.wire import (
    ProtocolError,
    Topics,
    encode,
    pack_tensors,
    short,
    tensor_parts,
    unpack_tensors,
)
from nefl_edge.edge_client.evaluate import SubmodelEvaluator
from nefl_edge.edge_client.latest import LatestStore
from nefl_edge.edge_client.profile import device_profile, probe_threads, thread_choice_key
from nefl_edge.edge_client.session import SILENT_S, Admission, CannotTakePart, DeviceSession, RunEnded, Stopped
from nefl_edge.edge_client.trainer import (
    BACKEND_FILES,
    DISTILL_FILES,
    DeadlineMissed,
    ProgressLog,
    TrainerBackend,
    choose_backend,
    create_backend,
    distill_student,
    train_local,
)

log = logging.getLogger(__name__)
UPLOAD_MARGIN_S = 2.0
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code


@dataclass(frozen=True)
class RunOutcome:
    """How :meth:`EdgeClient.serve` returned: ``ended`` (the coordinator's ``control end``), ``stopped``
    (``stop()``: a signal), ``left`` (``leave()``: e.g. the run's manifest was withdrawn), ``silent`` (its
    coordinator sent nothing, not even a heartbeat, for ``session.SILENT_S``), ``no-manifest`` (none
    within the wait) or ``refused`` (its manifest shows this device cannot take part: ``reason`` says why).
    ``ended_at`` is the end message's ``sent_at`` (coordinator clock); for ``silent`` that of the dead
    coordinator's manifest, which is stale from then on."""

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
    silent_s: float = SILENT_S
    """A joined run whose coordinator sent nothing (not even its heartbeat) this long is left as dead."""


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
    ``leave()`` is called; ``run()`` does both (the one-run ``nefl-edge join``). The protocol's rules are the
    :class:`edge_client.session.DeviceSession`'s and the tasks' work :class:`DeviceWork`'s; this class wires
    them to an MQTT link (Last Will, takeover watch) and keeps global weights for ``nefl-edge predict``.

    ``not_before``: manifests sent before this time (coordinator clock) are stale (a run of the same name
    that just ended) and are ignored."""

    def __init__(self, options: ClientOptions, data: Dataset, not_before: float = 0.0) -> None:
        self.opts = options
        self.data = data
        self.not_before = not_before
        self.topics = Topics(options.run)
        self.latest = LatestStore(options.cache / "latest")
        self._global_round: Dict[int, int] = {}  # round of the kept global weights, by submodel
        self.takeovers = TakeoverWatch(options.node)
        self._left: Optional[str] = None
        self.link = self._new_link()
        admission = Admission(options.run, options.keyring, options.coordinator_key_id, self._misfit)
        self.session = DeviceSession(self.link, options.run, options.node, not_before, admission=admission)
        self.session.silent_s = options.silent_s
        self._stop = self.session.stop
        self.work = DeviceWork(options, data, self.session, self._keep_global)

    @property
    def manifest(self) -> Optional[Manifest]:
        """The run's manifest as the session holds it (the newest valid one)."""
        return self.session.manifest

    @property
    def refused(self) -> List[str]:
        """Why tasks were refused (replays), latest last."""
        return self.session.refused

    @property
    def _joined_at(self) -> float:
        return self.session.joined_at

    @_joined_at.setter
    def _joined_at(self, value: float) -> None:
        self.session.joined_at = value

    @property
    def _manifest_at(self) -> float:
        return self.session.manifest_at

    @_manifest_at.setter
    def _manifest_at(self, value: float) -> None:
        self.session.manifest_at = value

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
            sender_of=signer_policy(opts.coordinator_key_id) if opts.keyring is not None else None,
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
        self.link = self.session.link = self._new_link()
        self.session.subscribe_run()
        self.link.connect(timeout_s)

    def serve(self, manifest_timeout_s: Optional[float] = None) -> RunOutcome:
        """Serve the run on the connected link until it ends; then unsubscribe (the persistent session keeps
        nothing queued for a run that is over), say ``offline`` and disconnect."""
        link, node, session = self.link, self.opts.node, self.session
        link.on_connected = session.announce  # after a reconnect (once joined): tell the coordinator we are back
        outcome = RunOutcome("stopped", "stopped")
        ended = False
        try:
            session.status("online")
            manifest = session.wait_manifest(manifest_timeout_s)
            if manifest is None:
                outcome = RunOutcome("no-manifest", f"no manifest within {manifest_timeout_s or 0:.0f} s")
                return outcome
            session.hello = Hello(
                run=self.opts.run,
                node=node,
                profile=self.work.profile(manifest),
                num_samples=len(self.data),
                tier=self.opts.tier,
                instance=self.opts.instance,
            )
            session.announce()
            log.info("joined run %s as %s with %d samples; waiting for tasks", self.opts.run, node, len(self.data))
            session.heard = time.monotonic()
            while not self._stop.is_set():
                item = session.next(1.0)
                if item is not None:
                    self._handle(*item)
                    session.heard = time.monotonic()  # a task's time was not spent listening
                elif session.silent():
                    self._left = str(session.silent())
                    outcome = RunOutcome("silent", self._left, session.manifest_at)
                    break
        except Stopped:
            pass
        except CannotTakePart as refusal:
            outcome = RunOutcome("refused", str(refusal))
        except RunEnded as end:
            ended = True
            log.info("run %s ended: %s", self.opts.run, end)
            outcome = RunOutcome("ended", str(end), end.at)
        finally:
            if self._left and not ended and outcome.state != "silent":
                outcome = RunOutcome("left", self._left)
                log.info("left run %s: %s", self.opts.run, self._left)
            if outcome.state != "stopped":
                session.unsubscribe_run()
            session.status("offline")
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

    def _misfit(self, manifest: Manifest) -> str:
        """Why this device's data does not fit the model of ``manifest``, or ""."""
        try:
            self.data.check_for(manifest.input_shape, manifest.num_classes)
        except DataError as exc:
            return str(exc)
        return ""

    # --- tasks ---------------------------------------------------------------------------------------------

    def _handle(self, stream: str, message: Message, body: bytes) -> None:
        """One inbound message: the session decides (run end, announce, manifest, replays); a task it takes is
        run here, a later broadcast of the followed submodel kept."""
        taken = self.session.handle(stream, message, body)
        if isinstance(taken, Weights):
            self._keep_broadcast(taken, body)
        elif isinstance(taken, EvalTask):
            self._run_evaluation(taken, time.monotonic())
        elif isinstance(taken, Task):
            self._run_task(taken, time.monotonic())

    def _run_task(self, task: Task, received: float) -> None:
        self.work.run_task(task, received)

    def _run_evaluation(self, task: EvalTask, received: float) -> None:
        self.work.run_evaluation(task, received)

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
        if (
            manifest is None
            or message.submodel != self.session.following
            or message.submodel >= len(manifest.submodels)
        ):
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


class DeviceWork:
    """The work a device's tasks ask for, with ONNX Runtime: local training (``edge_client.trainer``) and
    evaluation or BatchNorm statistics (``edge_client.evaluate``) of the manifest's submodels. Artifacts come
    from the content-addressed cache or through the session; trainer backends and evaluators are kept per
    submodel, with the thread count the probe chose (:meth:`profile`); the held-out split is the same every
    round. Answers and declines go out through the session; ``keep(manifest, sub, round, weights)`` is given the
    global weights of every training task (kept for ``nefl-edge predict``)."""

    def __init__(
        self,
        options: ClientOptions,
        data: Dataset,
        session: DeviceSession,
        keep: Callable[[Manifest, SubmodelEntry, int, Dict[str, np.ndarray]], None],
    ) -> None:
        self.opts, self.data, self.session, self.keep = options, data, session, keep
        self.cache = ArtifactCache(options.cache / "artifacts")
        self.backend_kind = choose_backend(options.backend)
        self._backends: Dict[str, TrainerBackend] = {}
        self._threads: Tuple[int, bool] = (options.threads, False)  # (threads, spin-wait); the probe chooses
        self._evaluators: Dict[str, SubmodelEvaluator] = {}
        self._splits: Dict[float, Tuple[Dataset, Dataset]] = {}

    def _fetch_artifacts(
        self, sub: SubmodelEntry, roles: Optional[Tuple[ArtifactRole, ...]] = None
    ) -> Dict[ArtifactRole, Path]:
        roles = roles or BACKEND_FILES[self.backend_kind]
        missing = [r for r in roles if r not in sub.files]
        if missing:
            raise ArtifactError(f"submodel {sub.index} has no {', '.join(missing)} artifact in the manifest")
        for role, entry in sub.files.items():
            if role not in roles or self.cache.has(entry.sha256):
                continue
            body = self.session.artifact(entry.sha256, entry.name, self.opts.fetch_timeout_s)
            self.cache.put(body, entry.sha256)
            log.info("fetched %s artifact of submodel %d (%d KiB)", role, sub.index, len(body) // 1024)
        paths = self.cache.submodel_paths(sub, tuple(roles))
        if paths is None:
            raise ArtifactError(f"artifacts of submodel {sub.index} vanished from the cache {self.cache.folder}")
        return paths

    def _backend(self, manifest: Manifest, sub: SubmodelEntry) -> TrainerBackend:
        student = distill_student(manifest, sub)  # nefl-wd-distill: the step also trains the smallest submodel
        key = sub.key if student is None else f"{sub.key}:distill"
        if key not in self._backends:
            paths = self._fetch_artifacts(sub, None if student is None else DISTILL_FILES[self.backend_kind])
            self._backends[key] = create_backend(
                self.backend_kind, paths, sub.params, manifest.train, *self._threads, student=student
            )
        return self._backends[key]

    def profile(self, manifest: Manifest) -> DeviceProfile:
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

    def run_task(self, task: Task, received: float) -> None:
        manifest = self.session.manifest
        assert manifest is not None
        if task.submodel >= len(manifest.submodels):
            self.session.decline(task, f"submodel {task.submodel} is not in the manifest")
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
            weights = self.session.weights(sub, task.round, task.weights_sha256, remaining, follow=True)
            self.keep(manifest, sub, task.round, weights)
            data = self._split(task.train.eval_fraction)[0]
            if task.bn_stats:
                self._carried_statistics(task, sub, weights, data)
            backend.load(weights, task.train)
            self.session.status("training")
            budget = task.deadline_s - (time.monotonic() - received) - UPLOAD_MARGIN_S
            progress = ProgressLog(log.info, self.opts.progress_every_s, f"round {task.round}: ")
            metrics = train_local(backend, data, task.train, deadline_s=budget, on_progress=progress)
        except DeadlineMissed as exc:
            self.session.decline(task, str(exc))
            return
        except (RunEnded, Stopped):
            raise
        except Exception as exc:
            self._task_failed(task, exc, "training")
            return
        finally:
            self.session.status("online")
        tensors = backend.tensors()
        encoding = task.train.update_encoding
        wire_tensors = tensors if encoding == "float32" else encode_update(tensors, encoding, weights)
        parts = tensor_parts(wire_tensors, keep_dtype=encoding != "float32")
        sent = self.session.send_update(task, sub.index, len(data), metrics, parts)
        log.info(
            "round %d: uploaded %d KiB; loss %.3f -> %.3f, accuracy %.3f in %.1f s",
            task.round,
            sent // 1024,
            metrics.loss_first,
            metrics.loss_last,
            metrics.accuracy,
            metrics.seconds,
        )

    def _carried_statistics(
        self, task: Task, sub: SubmodelEntry, weights: Dict[str, np.ndarray], data: Dataset
    ) -> None:
        """What a training task with ``bn_stats`` asks first: the BatchNorm statistics of the received ``weights``
        on the training split, sent as an ``evaluation`` of the task (as :meth:`run_evaluation` computes them).
        A failure here costs only the statistics (logged), not the training."""
        started = time.monotonic()
        try:
            stats = self._evaluator(sub, (ArtifactRole.STATS,)).bn_stats(
                weights, data.x, task.train.batch_size, task.bn_max_batches
            )
            if not stats.batches:
                return
            body = {f"{sub.index}/{name}": v for name, v in stats.tensors().items()}
            counts = [BnCount(submodel=sub.index, batches=stats.batches)]
            self.session.send_evaluation(task, [], counts, pack_tensors(body))
        except (RunEnded, Stopped):
            raise
        except Exception as exc:
            log.warning("round %d: no BatchNorm statistics sent: %s: %s", task.round, type(exc).__name__, exc)
            return
        log.info(
            "round %d: sent the statistics of the received weights in %.1f s", task.round, time.monotonic() - started
        )

    def _split(self, fraction: float) -> Tuple[Dataset, Dataset]:
        """This device's training part and held-out part for ``fraction`` (the same split every round)."""
        if fraction not in self._splits:
            self._splits = {fraction: split_dataset(self.data, fraction)}
        return self._splits[fraction]

    def _evaluator(self, sub: SubmodelEntry, roles: Tuple[ArtifactRole, ...]) -> SubmodelEvaluator:
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
        self.session.decline(task, f"{type(exc).__name__}: {short(str(exc), 200)}")

    def run_evaluation(self, task: EvalTask, received: float) -> None:
        """Evaluate the task's submodels on the held-out split and/or sum their BatchNorm batch statistics
        over the training split; answer with one ``evaluation`` (or a ``decline``)."""
        manifest = self.session.manifest
        assert manifest is not None
        wanted = ((ArtifactRole.EVAL, task.evaluate), (ArtifactRole.STATS, task.bn_stats))
        roles = tuple(role for role, wanted_role in wanted if wanted_role)
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
                remaining = task.deadline_s - (time.monotonic() - received)
                tensors = self.session.weights(sub, task.round, digest, remaining)
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
        except (RunEnded, Stopped):
            raise
        except Exception as exc:
            self._task_failed(task, exc, "evaluation")
            return
        self.session.send_evaluation(task, results, counts, pack_tensors(body) if body else b"")
        log.info(
            "round %d: evaluated submodels %s (%s) in %.1f s",
            task.round,
            task.submodels,
            ", ".join(f"{r.submodel}: {100 * r.correct / max(1, r.count):.1f} %" for r in results) or "statistics",
            time.monotonic() - received,
        )
