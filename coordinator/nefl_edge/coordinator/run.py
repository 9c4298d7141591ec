"""One ``serve`` run: its directory, the global state, the rounds over the MQTT grid (the loop of
``coordinator.cadence.run_rounds``, the one ``simulate`` runs too), checkpoints and records. Rendering
(progress bars, tables) is the caller's (``coordinator.render``); this module logs.

After each round the main thread only snapshots what the round left (state, selection generator, quarantine,
registry) and starts the next one; a worker (``coordinator.cadence.Evaluator``) evaluates the rounds due
(``eval_every``, and the last) and writes each round's records and checkpoint, in round order. The
checkpoint therefore trails the round in progress by at most the rounds still being recorded; a resumed
run continues after the last recorded one."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from nefl_edge.coordinator import checkpoint
from nefl_edge.coordinator.cadence import Evaluator, evaluated_model, evaluation_step, run_rounds
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.mqtt_grid import MqttGrid
from nefl_edge.coordinator.records import Records
from nefl_edge.coordinator.registry import Registry
from nefl_edge.core.cli import ROUND_ORDER, event
from nefl_edge.core.errors import BadInput
from nefl_edge.core.files import write_atomic
from nefl_edge.core.mqtt import BrokerAddress, MqttLink, Security
from nefl_edge.core.nested import GlobalState

log = logging.getLogger(__name__)
WAIT_LOG_S = 5.0
RoundCallback = Callable[[RoundReport, list[dict[str, Any]]], None]


def _training_images(data_dir: Optional[Path]) -> Any:
    """The coordinator's copy of the training images, for the input statistics of ``normalize``."""
    from nefl_edge.coordinator.config import ConfigError
    from nefl_edge.core.data import DataError, load_dataset

    try:
        return load_dataset(data_dir, "train").x
    except DataError as exc:
        raise ConfigError(
            f"normalize needs the training data's per-channel statistics: {exc} Or give --input-mean and "
            "--input-std (one value per channel, comma-separated), or --no-normalize"
        ) from None


class MethodNotOnDevices(BadInput):
    """A method whose local training the device backends do not do."""


def check_servable(cfg: RunConfig) -> None:
    """Refuse (exit 2) a run the devices cannot train, before anything is exported or connected."""
    from nefl_edge.coordinator.strategies import get_strategy

    strategy = get_strategy(cfg.method)
    if not strategy.device_trainable:
        raise MethodNotOnDevices(
            f"{cfg.method} trains locally in its own way ({type(strategy).__name__}.local_train), which "
            "the devices' ONNX Runtime trainers do not do; run it with `nefl-coord simulate`"
        )
    if cfg.stem_pool:
        raise MethodNotOnDevices(
            "stem_pool: the devices' ONNX Runtime training graphs have no max-pool gradient; serve with "
            "--no-stem-pool, or run the paper's max-pool stem with `nefl-coord simulate`"
        )


class ServeRun:
    """Prepare (export, state, held-out data), then :meth:`serve` the remaining rounds over ``link``."""

    def __init__(self, cfg: RunConfig, run_dir: Optional[Path] = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir or cfg.runs_dir / f"{cfg.run}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.resume = resume
        self.round = 0
        self.stop = threading.Event()
        self.records = Records(self.run_dir)
        self.registry = Registry()
        self.on_round: Optional[RoundCallback] = None
        self.on_progress: Optional[Callable[[str], None]] = None
        self.stopped_by: Optional[str] = None
        self.evaluated = -1  # the last round whose model was evaluated (and its BatchNorm re-estimated)
        self.disk_full: Optional[checkpoint.DiskFull] = None  # a round's records or checkpoint hit a full disk

    def prepare(self) -> None:
        """Export (or reuse) the method's artifacts, write the resolved config, load or initialise the state."""
        from nefl_edge.coordinator.evaluation import coordinator_data
        from nefl_edge.coordinator.models import initial_consistent
        from nefl_edge.coordinator.strategies import get_strategy
        from nefl_edge.core.nested import init_global_state
        from nefl_edge.export.artifacts import export_set

        cfg = self.cfg
        check_servable(cfg)
        self.strategy = get_strategy(cfg.method)
        if cfg.normalize and not cfg.input_mean:  # measured once, then recorded in config.json for --resume
            cfg = self.cfg = cfg.with_input_stats(_training_images(cfg.data_dir))
        self.config, self.plan = self.strategy.setup(cfg.network(), tuple(cfg.gammas))
        self.test, self.calibration, federated_eval = coordinator_data(
            cfg.evaluation, cfg.bn, cfg.data_dir, cfg.eval_samples, cfg.bn_calibration
        )
        if self.test is not None:
            c = self.config
            self.test.check_for((c.in_channels, c.image_size, c.image_size), c.num_classes)
        saved = checkpoint.load(self.run_dir) if self.resume else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "config.json", cfg.model_dump_json(indent=1), 0o644)
        self.manifest = export_set(
            self.config, self.plan.specs, self.run_dir / "artifacts", cfg.train, log.info, self.plan.distill_smallest
        )
        self.engine = RoundEngine(self.strategy, cfg, self.config, self.plan, self.calibration)
        self.engine.federated_eval = federated_eval
        if saved is not None:
            self._restore(saved)
        else:
            consistent = initial_consistent(self.config, cfg.seed)
            self.state = init_global_state(self.config, self.plan.specs, consistent, cfg.seed)

    def _restore(self, saved: checkpoint.Checkpoint) -> None:
        try:
            self.state = GlobalState.from_flat(self.config, self.plan.specs, saved.state)
            self.engine.rng.bit_generator.state = saved.engine["rng"]
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(
                f"cannot resume {self.run_dir}: its state does not fit the run's configuration ({exc})"
            ) from None
        self.engine.quarantine.restore(saved.engine.get("quarantine"))
        self.registry = Registry.load(saved.registry)
        self.round = saved.round
        self.evaluated = max((r["round"] for r in self.records.metrics() if r["round"] <= self.round), default=-1)
        self.records.truncate(self.round)
        log.info("resuming %s after round %d", self.run_dir, self.round)

    def save(self) -> None:
        checkpoint.save(self.run_dir, self._snapshot(self.round, self.state))

    def _snapshot(self, round_: int, state: GlobalState) -> checkpoint.Checkpoint:
        engine = {"rng": self.engine.rng.bit_generator.state, "quarantine": self.engine.quarantine.dump()}
        return checkpoint.Checkpoint(round_, state.flat(), engine, self.registry.dump())

    def _finish(
        self, report: RoundReport, state: GlobalState, evaluate: bool, last: bool, evaluator: Evaluator
    ) -> None:
        """Hand round ``report.round`` to ``evaluator``: evaluate ``state`` if ``evaluate`` (a copy of it,
        unless ``last``: then the state itself, whose re-estimated statistics the checkpoint keeps), write the
        round's records (metrics rows only for an evaluated round) and checkpoint it."""
        model = evaluated_model(state, evaluate, last)
        saved = self._snapshot(report.round, model)
        if evaluate:
            self.evaluated = report.round

        fields = {
            "round": report.round, "rounds": self.cfg.rounds, "updates": report.updates,
            "selected": report.selected, "declined": report.declined, "dropped": report.dropped,
            "seconds": round(report.seconds, 3),
        }  # fmt: skip
        mark = ROUND_ORDER.hold() if evaluator.background else None  # later rounds' lines wait for this one

        def job() -> None:
            try:
                record()
            except checkpoint.DiskFull as exc:
                # end the round in progress now, not when the next round hands its job over (Evaluator
                # raises a job's error only then); serve raises it, whatever else the stop interrupted
                self.disk_full = exc
                self.stop.set()
            finally:
                if mark is not None:
                    ROUND_ORDER.release(mark)

        def record() -> None:
            accuracies: list[tuple[float, float]] = []
            if evaluate:
                started = time.monotonic()
                accuracies = [] if self.test is None else evaluation_step(model, self.test, self.calibration)
                report.phases["evaluation"] = time.monotonic() - started
                saved.state = model.flat()
            rows = self.records.write_round(report, accuracies, self.plan)
            checkpoint.save(self.run_dir, saved)
            if rows:
                accuracy = [round(r["accuracy"], 6) for r in rows]
                log.info(
                    self.records.summary_line(report, rows, self.cfg.rounds),
                    extra=event("round", **fields, accuracy=accuracy, rejected=dict(report.rejected)),
                )
            else:
                log.info(
                    "round %d/%d: %d/%d updates, %d declined, %d dropped; %.1f s (not evaluated: eval_every)",
                    report.round,
                    self.cfg.rounds,
                    report.updates,
                    report.selected,
                    report.declined,
                    report.dropped,
                    report.seconds,
                    extra=event("round", **fields, accuracy=None),
                )
            if self.on_round is not None:
                self.on_round(report, rows)

        evaluator.submit(job)

    def serve(self, link: MqttLink) -> Path:
        """Run the remaining rounds; return the run directory (metrics, client records, checkpoint, report).
        SIGINT and SIGTERM end the run after the current round: devices are told, retained messages cleared."""
        from nefl_edge.coordinator.report import write_report

        cfg = self.cfg
        grid = MqttGrid(
            link,
            cfg.run,
            self.manifest,
            self.run_dir / "artifacts",
            cfg.deadline_s,
            cfg.wait_clients_s,
            self.registry,
            self.stop,
            self.strategy.extract,
        )
        grid.on_progress = self.on_progress
        grid.clients = self._saying_who_waits(grid.clients)  # type: ignore[method-assign,assignment]
        evaluator = Evaluator(cfg.eval_background)
        reason = "finished"
        try:
            if self.round == 0 and not self.records.metrics():
                self._finish(RoundReport(0), self.state, True, cfg.rounds == 0, evaluator)
            grid.open()
            finished: list[RoundReport] = []

            def finish(report: RoundReport, state: GlobalState, evaluate: bool, last: bool) -> None:
                report.phases.setdefault("publish", grid.publish_s)  # the engine's own (a deferred round's)
                self.state, self.round = state, report.round
                finished[:] = [report]
                self._finish(report, state, evaluate, last, evaluator)

            with self._signals():
                # an interrupted round is not recorded; the last checkpoint stays the state
                run_rounds(self.engine, grid, self.state, self.round, finish, self.stop)
                evaluator.wait()
                if self.disk_full is not None:
                    raise self.disk_full
                if self.stop.is_set() and self.evaluated < self.round:
                    # the state a stopped run leaves behind carries re-estimated statistics, as a finished one
                    last = replace(finished[0], clients=[]) if finished else RoundReport(self.round)
                    self._finish(last, self.state, True, True, evaluator)
                    evaluator.wait()
                self._publish_final(link)
            if self.stop.is_set():
                reason = f"coordinator stopped ({self.stopped_by or 'interrupted'})"
        except BaseException:
            reason = "coordinator stopped on an error"
            if self.disk_full is not None:
                raise self.disk_full from None
            raise
        finally:
            evaluator.close()
            grid.close(reason)
            try:
                write_report(self.run_dir)
            except OSError as exc:  # a full disk: the error that stopped the run is the one to report
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("no report written: %s", exc.strerror)
        return self.run_dir

    def _saying_who_waits(self, clients: Callable[[int], Any]) -> Callable[[int], Any]:
        """``grid.clients`` that logs, every ``WAIT_LOG_S`` while fewer than ``minimum`` devices are online,
        how many and which have joined (a coordinator that waits says so)."""

        def wait(minimum: int) -> Any:
            done = threading.Event()
            began = time.monotonic()

            def report() -> None:
                while not done.wait(WAIT_LOG_S):
                    try:
                        online = self.registry.online()
                    except RuntimeError:  # the registry changed while it was read; look again next time
                        continue
                    if len(online) < minimum:
                        log.info(
                            "waiting for devices: %d of min_clients=%d online after %.0f s%s",
                            len(online),
                            minimum,
                            time.monotonic() - began,
                            f" ({', '.join(online)})" if online else "",
                        )

            threading.Thread(target=report, name="nefl-waiting", daemon=True).start()
            try:
                return clients(minimum)
            finally:
                done.set()

        return wait

    def _publish_final(self, link: MqttLink) -> None:
        """Broadcast the final model (the checkpointed state, BatchNorm statistics included) of every submodel
        before the run ends, not retained: a device keeps the broadcast of the submodel it trained last for
        ``nefl-edge predict``, so the model on the device is the one ``export-model`` exports (the strategy's
        deployed submodels: the nested prefixes)."""
        from nefl_edge.core.schemas import Weights
        from nefl_edge.core.wire import Topics, pack_tensors

        topics = Topics(self.cfg.run)
        for k in range(len(self.plan.specs)):
            body = pack_tensors(self.strategy.extract(self.state, k))
            link.publish(topics.weights(k), Weights(run=self.cfg.run, round=self.round, submodel=k), body)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            self.stopped_by = signal.Signals(signum).name
            log.warning("%s: finishing after the current round, then telling the devices", self.stopped_by)
            self.stop.set()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


SECURITY_FILE = "security.json"


class Downgrade(BadInput):
    """``--resume`` asked for less security than the run started with."""


@dataclass(frozen=True)
class RunSecurity:
    """How a serve run reaches its broker and who it trusts, recorded in ``<run dir>/security.json`` (paths
    absolute, no secret: the password stays in its file) so that ``--resume`` connects the same way."""

    broker: str
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    username: Optional[str] = None
    password_file: Optional[str] = None
    enrolment_dir: Optional[str] = None
    mqtt_version: str = "3.1.1"
    insecure: bool = False

    @property
    def signed(self) -> bool:
        return self.enrolment_dir is not None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def describe(self) -> str:
        if self.signed and self.tls:
            return "signed, over TLS"
        return "signed, without TLS" if self.signed else "over TLS, unsigned" if self.tls else "unauthenticated"

    def security(self) -> Security:
        def path(value: Optional[str]) -> Optional[Path]:
            return Path(value) if value is not None else None

        tls = (path(self.tls_ca), path(self.tls_cert), path(self.tls_key))
        return Security(*tls, False, self.username, path(self.password_file))

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / SECURITY_FILE, json.dumps(asdict(self), indent=1) + "\n", 0o600)

    @classmethod
    def load(cls, run_dir: Path) -> Optional[RunSecurity]:
        """The record of ``run_dir`` (None for a run started before runs recorded it)."""
        path = Path(run_dir) / SECURITY_FILE
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BadInput(f"{path} cannot be read ({exc}); it records how the run was secured") from None

    def resumed(self, given: dict[str, Any]) -> RunSecurity:
        """This record with the options given on the command line applied (``None``: not given); refuses
        (:class:`Downgrade`) to resume a signed run unsigned, a TLS run without TLS, or with ``--insecure``."""
        merged = replace(self, **{k: v for k, v in given.items() if v is not None and k != "insecure"})
        if given.get("insecure") and (self.signed or self.tls):
            raise Downgrade(f"this run was started {self.describe()}; --resume keeps that, so drop --insecure")
        return replace(merged, insecure=self.insecure)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (an unresolvable name is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


def require_security(sec: RunSecurity) -> None:
    """Secure by default: against a broker that is not on loopback, refuse to run without TLS and
    enrolment unless ``insecure``; every file named must exist (exit 2, not a broker error)."""
    for option, value in (
        ("--tls-ca", sec.tls_ca), ("--tls-cert", sec.tls_cert), ("--tls-key", sec.tls_key),
        ("--password-file", sec.password_file),
    ):  # fmt: skip
        if value is not None and not Path(value).is_file():
            raise BadInput(f"{option} {value}: no such file")
    if sec.enrolment_dir is not None and not (Path(sec.enrolment_dir) / "devices.json").is_file():
        raise BadInput(f"--enrolment-dir {sec.enrolment_dir} has no devices.json; enrol devices with add-device")
    host = BrokerAddress.parse(sec.broker).host
    if not sec.insecure and not (sec.signed and sec.tls) and not is_loopback(host):
        missing = " and ".join(m for m, ok in (("--tls-ca", sec.tls), ("--enrolment-dir", sec.signed)) if not ok)
        raise BadInput(
            f"broker {host} is not on loopback, so serve runs signed and over TLS: give {missing} (README: "
            "'Deploying to real devices'), or --insecure to run without them"
        )


def probe_broker(sec: RunSecurity, timeout_s: float = 10.0) -> None:
    """Connect once and disconnect, before any export or evaluation, so that a wrong address, certificate
    or password is reported at once and truthfully (``BrokerError``, exit 3: refused, no answer, or the
    broker's own reason)."""
    import paho.mqtt.client as mqtt

    from nefl_edge.core.mqtt import BrokerError

    address = BrokerAddress.parse(sec.broker, 8883 if sec.tls else 1883)
    version = mqtt.MQTTv5 if sec.mqtt_version == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"nefl-probe-{uuid.uuid4().hex[:8]}",
                         protocol=version)  # fmt: skip
    answer: list[Any] = []
    done = threading.Event()

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        answer.append(reason)
        done.set()

    client.on_connect = on_connect
    sec.security().apply(client)
    try:
        client.connect(address.host, address.port, keepalive=10)
    except ConnectionRefusedError:
        raise BrokerError(f"broker {address} refused the connection: nothing listens on that port") from None
    except ssl.SSLError as exc:
        raise BrokerError(f"TLS with broker {address} failed ({exc}); check --tls-ca and the host name") from None
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot reach broker {address}: {exc}") from None
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise BrokerError(f"broker {address} accepted the connection but did not answer within {timeout_s:.0f} s")
        if getattr(answer[0], "is_failure", False):
            raise BrokerError(
                f"broker {address} refused the connection ({answer[0]}): check --username and --password-file"
            )
    finally:
        client.disconnect()
        client.loop_stop()


def coordinator_link(
    cfg: RunConfig,
    broker: str,
    security: Security,
    mqtt_version: str = "3.1.1",
    enrolment_dir: Optional[Path] = None,
) -> MqttLink:
    """The coordinator's MQTT link for a run (a fresh session: a coordinator never resumes an old one).

    With ``enrolment_dir`` every message it publishes is signed with the coordinator's key and every message
    it takes in must be signed by the enrolled device whose node topic it arrives on; without one, nothing
    is authenticated, which is said once, loudly."""
    if mqtt_version not in ("3.1.1", "5"):
        raise BadInput(f"--mqtt-version must be 3.1.1 or 5, got {mqtt_version!r}")
    signer = keyring = sender_of = None
    if enrolment_dir is not None:
        from nefl_edge.coordinator.enrolment import COORDINATOR_KEY_ID, coordinator_keyring, coordinator_signer
        from nefl_edge.core.signing import signer_policy

        signer, keyring = coordinator_signer(enrolment_dir), coordinator_keyring(enrolment_dir)
        sender_of = signer_policy(COORDINATOR_KEY_ID)
        log.info("signed run: %d enrolled devices in %s", len(keyring), enrolment_dir)
    else:
        log.warning(
            "UNAUTHENTICATED RUN: no --enrolment-dir, so messages are neither signed nor verified; anyone who "
            "can publish on this broker can act as a device or as the coordinator. Use it on loopback only "
            "(see 'Deploying to real devices' in the README)."
        )
    return MqttLink(
        f"nefl-coord-{cfg.run}-{uuid.uuid4().hex[:6]}",
        BrokerAddress.parse(broker, 8883 if security.tls_ca else 1883),
        cfg.run,
        security,
        protocol="5" if mqtt_version == "5" else "3.1.1",
        chunk_size=cfg.chunk_size,
        clean=True,
        signer=signer,
        keyring=keyring,
        sender_of=sender_of,
    )
