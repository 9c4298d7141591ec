"""One ``serve`` run: its directory, the global state, the round loop over the MQTT grid, checkpoints and
records. Rendering (progress bars, tables) is the caller's (``coordinator.render``); this module logs."""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from nefl_edge.coordinator import checkpoint
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.engine import RoundEngine, RoundReport
from nefl_edge.coordinator.mqtt_grid import MqttGrid
from nefl_edge.coordinator.nested import GlobalState
from nefl_edge.coordinator.records import Records
from nefl_edge.coordinator.registry import Registry
from nefl_edge.edge_client.errors import BadInput
from nefl_edge.edge_client.files import write_atomic
from nefl_edge.edge_client.mqtt import BrokerAddress, MqttLink, Security

log = logging.getLogger(__name__)
RoundCallback = Callable[[RoundReport, list[dict[str, Any]]], None]


class MethodNotOnDevices(BadInput):
    """A method whose local training the device backends do not do."""


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

    def prepare(self) -> None:
        """Export (or reuse) the method's artifacts, write the resolved config, load or initialise the state."""
        from nefl_edge.coordinator.evaluation import held_out
        from nefl_edge.coordinator.models import initial_consistent
        from nefl_edge.coordinator.nested import init_global_state
        from nefl_edge.coordinator.specs import get_model_config
        from nefl_edge.coordinator.strategies import get_strategy
        from nefl_edge.edge_client.data import load_dataset
        from nefl_edge.export.artifacts import export_set

        cfg = self.cfg
        self.strategy = get_strategy(cfg.method)
        if not self.strategy.device_trainable:
            raise MethodNotOnDevices(
                f"{cfg.method} trains locally in its own way ({type(self.strategy).__name__}.local_train), which "
                "the devices' ONNX Runtime trainers do not do; run it with `nefl-coord simulate`"
            )
        self.config, self.plan = self.strategy.setup(get_model_config(cfg.model, cfg.dataset), tuple(cfg.gammas))
        saved = checkpoint.load(self.run_dir) if self.resume else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "config.json", cfg.model_dump_json(indent=1), 0o644)
        self.manifest = export_set(self.config, self.plan.specs, self.run_dir / "artifacts", cfg.train, log=log.info)
        test = load_dataset(cfg.data_dir, "test")
        test.check_for(self.manifest.input_shape, self.manifest.num_classes)
        self.test, calibration = held_out(test, cfg.eval_samples, cfg.bn_calibration)
        self.engine = RoundEngine(self.strategy, cfg, self.config, self.plan, calibration)
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
        self.records.truncate(self.round)
        log.info("resuming %s after round %d", self.run_dir, self.round)

    def save(self) -> None:
        engine = {"rng": self.engine.rng.bit_generator.state, "quarantine": self.engine.quarantine.dump()}
        checkpoint.save(
            self.run_dir, checkpoint.Checkpoint(self.round, self.state.flat(), engine, self.registry.dump())
        )

    def serve(self, link: MqttLink) -> Path:
        """Run the remaining rounds; return the run directory (metrics, client records, checkpoint, report).
        SIGINT and SIGTERM end the run after the current round: devices are told, retained messages cleared."""
        from nefl_edge.coordinator.evaluation import evaluate_all
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
        )
        grid.on_progress = self.on_progress
        if self.round == 0 and not self.records.metrics():
            self.records.write_round(RoundReport(0), evaluate_all(self.state, self.test), self.plan)
            self.save()
        grid.open()
        reason = "finished"
        try:
            with self._signals():
                while self.round < self.cfg.rounds and not self.stop.is_set():
                    r = self.round + 1
                    state, report = self.engine.run_round(r, self.state, grid, self.stop)
                    if self.stop.is_set():
                        break  # an interrupted round is not recorded; the last checkpoint stays the state
                    self.state = state
                    evaluating = time.monotonic()
                    accuracies = evaluate_all(self.state, self.test)
                    report.phases["evaluation"] = time.monotonic() - evaluating
                    rows = self.records.write_round(report, accuracies, self.plan)
                    self.round = r
                    self.save()
                    log.info(self.records.summary_line(report, rows, self.cfg.rounds))
                    if self.on_round is not None:
                        self.on_round(report, rows)
            if self.stop.is_set():
                reason = f"coordinator stopped ({self.stopped_by or 'interrupted'})"
        except BaseException:
            reason = "coordinator stopped on an error"
            raise
        finally:
            grid.close(reason)
            write_report(self.run_dir)
        return self.run_dir

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
        from nefl_edge.edge_client.signing import signers_by_topic

        signer, keyring = coordinator_signer(enrolment_dir), coordinator_keyring(enrolment_dir)
        sender_of = signers_by_topic(COORDINATOR_KEY_ID)
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
