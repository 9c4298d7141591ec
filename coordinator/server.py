"""``nefl-coord serve``: federated rounds over MQTT with deadlines, NeFedAvg, checkpoints and metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.evaluation import calibrate_bn, evaluate
from nefl_edge.coordinator.nefedavg import NeFedAvg
from nefl_edge.coordinator.nested import GlobalState, Tensors, extract, init_global_state
from nefl_edge.coordinator.report import read_metrics, truncate_metrics, write_report
from nefl_edge.coordinator.specs import ModelConfig, get_model_config, make_specs, param_layout
from nefl_edge.edge_client.data import Dataset, load_dataset
from nefl_edge.edge_client.mqtt import BrokerAddress, MqttLink, Security
from nefl_edge.edge_client.schemas import (
    Artifact,
    Control,
    Decline,
    DeviceProfile,
    Hello,
    Manifest,
    ManifestMessage,
    Message,
    Status,
    Task,
    Update,
    Weights,
)
from nefl_edge.edge_client.wire import ProtocolError, Topics, pack_tensors, sha256, unpack_tensors

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.json"


@dataclass
class NodeInfo:
    node: str
    num_samples: int
    tier: Optional[int]
    profile: dict[str, Any]
    online: bool = True


@dataclass
class RoundStats:
    round: int
    selected: int = 0
    updates: int = 0
    declined: int = 0
    dropped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    aggregated: bool = False


def assign_submodel(info: NodeInfo, manifest: Manifest, cfg: RunConfig) -> int:
    """The submodel a client trains this round.

    ``static``: the device's declared tier (capped at the largest submodel; no tier: the smallest).
    ``deadline``: the largest submodel whose estimated local training time (from the measured throughput,
    scaled by MFLOPs) fits in 80 % of the round deadline; the smallest if none does.
    """
    subs = manifest.submodels
    if cfg.policy == "static":
        return min(info.tier, len(subs) - 1) if info.tier is not None else 0
    profile = DeviceProfile.model_validate(info.profile)
    if not profile.samples_per_s or not profile.probe_mflops:
        return 0
    steps = math.ceil(info.num_samples / cfg.train.batch_size) * cfg.train.epochs
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    samples = steps * cfg.train.batch_size
    best = 0
    for sub in subs:
        speed = profile.samples_per_s * profile.probe_mflops / sub.mflops
        if samples / speed <= 0.8 * cfg.deadline_s:
            best = max(best, sub.index)
    return best


class UpdateRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def validate_update(update: Update, body: bytes, task: Task, layout_shapes: dict[str, tuple[int, ...]]) -> Tensors:
    """Check an update against its task and the submodel's layout; return its tensors."""
    if update.task_id != task.task_id or update.round != task.round:
        raise UpdateRejected(
            "stale", f"task {update.task_id} round {update.round}, expected {task.task_id} round {task.round}"
        )
    if update.submodel != task.submodel:
        raise UpdateRejected("wrong_submodel", f"submodel {update.submodel}, assigned {task.submodel}")
    if update.num_samples > 10_000_000:
        raise UpdateRejected("bad_samples", f"sample count {update.num_samples} is implausible")
    try:
        tensors = unpack_tensors(body)
    except ProtocolError as exc:
        raise UpdateRejected("bad_payload", str(exc)) from None
    if set(tensors) != set(layout_shapes):
        extra, missing = sorted(set(tensors) - set(layout_shapes)), sorted(set(layout_shapes) - set(tensors))
        raise UpdateRejected("bad_names", f"unexpected {extra[:3]}, missing {missing[:3]}")
    for name, value in tensors.items():
        if value.dtype != np.float32:
            raise UpdateRejected("bad_dtype", f"{name} is {value.dtype}, expected float32")
        if tuple(value.shape) != layout_shapes[name]:
            raise UpdateRejected("bad_shape", f"{name} has shape {tuple(value.shape)}, expected {layout_shapes[name]}")
        if not np.isfinite(value).all():
            raise UpdateRejected("not_finite", f"{name} holds NaN or Inf")
    return tensors


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Coordinator:
    """One run: owns the global state, the MQTT link, the registry and the run directory."""

    def __init__(
        self,
        cfg: RunConfig,
        broker: BrokerAddress,
        security: Security = Security(),
        run_dir: Optional[Path] = None,
        protocol: str = "3.1.1",
        on_round: Optional[Callable[[RoundStats, list[dict[str, Any]]], None]] = None,
    ) -> None:
        self.cfg = cfg
        self.config: ModelConfig = get_model_config(cfg.model, cfg.dataset)
        self.specs = make_specs(self.config, tuple(cfg.gammas), cfg.method)
        self.topics = Topics(cfg.run)
        self.resuming = run_dir is not None and (run_dir / CHECKPOINT).is_file()
        self.run_dir = run_dir or cfg.runs_dir / f"{cfg.run}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.on_round = on_round
        self.registry: dict[str, NodeInfo] = {}
        self.rng = np.random.default_rng(cfg.seed)
        self.round = 0
        self.state: GlobalState
        self.stop_event = threading.Event()
        self.link = MqttLink(
            f"nefl-coord-{cfg.run}-{uuid.uuid4().hex[:6]}",
            broker,
            cfg.run,
            security,
            protocol="5" if protocol == "5" else "3.1.1",
            chunk_size=cfg.chunk_size,
            clean=True,
        )
        self._retained: dict[str, tuple[Message, bytes]] = {}
        self.on_progress: Optional[Callable[[str], None]] = None
        self._test: Optional[Dataset] = None
        self._calibration: Optional[np.ndarray] = None

    # --- set-up --------------------------------------------------------------------------------------------

    def prepare(self) -> Manifest:
        """Export (or reuse) artifacts, write the resolved config, load or initialise the global state."""
        from nefl_edge.coordinator.models import initial_consistent
        from nefl_edge.export.artifacts import export_set

        (self.run_dir / "config.json").write_text(self.cfg.model_dump_json(indent=1))
        self.manifest = export_set(self.config, self.specs, self.run_dir / "artifacts", self.cfg.train, log=log.info)
        if self.resuming:
            self._load_checkpoint()
        else:
            consistent = initial_consistent(self.config, self.cfg.seed)
            self.state = init_global_state(self.config, self.specs, consistent, self.cfg.seed)
        test = load_dataset(self.cfg.data_dir, "test")
        test.check_for(self.manifest.input_shape, self.manifest.num_classes)
        order = np.random.default_rng(12345).permutation(len(test))
        evaluation = order[: self.cfg.eval_samples]
        self._test = Dataset(test.x[evaluation], test.y[evaluation], test.name)
        calibration = order[self.cfg.eval_samples : self.cfg.eval_samples + self.cfg.bn_calibration]
        self._calibration = test.x[calibration]
        return self.manifest

    def _publish_retained(self, topic: str, message: Message, body: bytes) -> int:
        self._retained[topic] = (message, body)
        return self.link.publish(topic, message, body, retain=True)

    def _republish(self) -> None:
        """After a reconnect: the broker may have restarted without persistence and lost every retained
        message (manifest, artifacts, this round's weights), so publish them again."""
        log.warning("reconnected to the broker: publishing %d retained messages again", len(self._retained))
        for topic, (message, body) in list(self._retained.items()):
            self.link.publish(topic, message, body, retain=True)

    def connect(self) -> None:
        link = self.link
        for kind in ("hello", "status", "update"):
            link.subscribe(self.topics.all_nodes(kind))
        link.connect()
        folder = self.run_dir / "artifacts"
        for sub in self.manifest.submodels:
            for entry in sub.files.values():
                self._publish_retained(
                    self.topics.artifact(entry.sha256),
                    Artifact(run=self.cfg.run, name=entry.name),
                    (folder / entry.name).read_bytes(),
                )
        self._publish_retained(
            self.topics.manifest, ManifestMessage(run=self.cfg.run), self.manifest.to_json().encode()
        )
        link.publish(self.topics.control, Control(run=self.cfg.run, action="announce"))
        link.on_connected = self._republish
        log.info("run %s: manifest and artifacts published on %s", self.cfg.run, self.topics.base)

    def close(self, reason: str = "finished") -> None:
        try:
            self.link.publish(self.topics.control, Control(run=self.cfg.run, action="end", reason=reason))
            for topic in list(self._retained):
                self.link.clear_retained(topic)
            time.sleep(0.3)
        finally:
            self.link.close()

    # --- registry ------------------------------------------------------------------------------------------

    def _note(self, stream: str, message: Message) -> None:
        """Registry bookkeeping for hello / status messages."""
        node = Topics.node_of(stream)
        if isinstance(message, Hello) and message.node == node:
            known = self.registry.get(node)
            self.registry[node] = NodeInfo(node, message.num_samples, message.tier, message.profile.model_dump())
            if known is None or not known.online:
                log.info(
                    "client %s joined (%d samples, tier %s, %s samples/s)",
                    node,
                    message.num_samples,
                    message.tier,
                    message.profile.samples_per_s,
                )
        elif isinstance(message, Status) and message.node == node and node in self.registry:
            online = message.state != "offline"
            if self.registry[node].online and not online:
                log.warning("client %s went offline", node)
            self.registry[node].online = online

    def online(self) -> list[str]:
        return sorted(n for n, info in self.registry.items() if info.online)

    def _drain(self, timeout: float) -> Optional[tuple[str, Message, bytes]]:
        try:
            stream, message, body = self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        self._note(stream, message)
        return stream, message, body

    def wait_for_clients(self) -> list[str]:
        deadline = time.monotonic() + self.cfg.wait_clients_s
        while len(self.online()) < self.cfg.min_clients:
            if time.monotonic() > deadline or self.stop_event.is_set():
                raise TimeoutError(
                    f"only {len(self.online())} of min_clients={self.cfg.min_clients} clients joined within "
                    f"{self.cfg.wait_clients_s:.0f} s; start devices with `nefl-edge join --run {self.cfg.run}`"
                )
            self._drain(0.5)
        return self.online()

    # --- one round -----------------------------------------------------------------------------------------

    def run_round(self, r: int) -> tuple[RoundStats, list[dict[str, Any]]]:
        started = time.monotonic()
        stats = RoundStats(r)
        online = self.wait_for_clients()
        count = min(len(online), max(self.cfg.min_clients, math.ceil(self.cfg.fraction * len(online))))
        selected = sorted(self.rng.choice(online, size=count, replace=False).tolist())
        stats.selected = len(selected)
        assignment = {n: assign_submodel(self.registry[n], self.manifest, self.cfg) for n in selected}
        weights_sha: dict[int, str] = {}
        for k in sorted(set(assignment.values())):
            body = pack_tensors(extract(self.state, k))
            weights_sha[k] = sha256(body)
            stats.bytes_out += self._publish_retained(
                self.topics.weights(k), Weights(run=self.cfg.run, round=r, submodel=k), body
            )
        tasks: dict[str, Task] = {}
        for node, k in assignment.items():
            task = Task(
                run=self.cfg.run,
                node=node,
                task_id=uuid.uuid4().hex[:16],
                round=r,
                submodel=k,
                weights_sha256=weights_sha[k],
                train=self.cfg.train,
                deadline_s=self.cfg.deadline_s,
            )
            tasks[node] = task
            stats.bytes_out += self.link.publish(self.topics.node(node, "task"), task)
        log.info("round %d: %d clients, submodels %s", r, len(selected), dict(sorted(assignment.items())))
        layouts = {k: {n: p.shape for n, p in param_layout(self.config, self.specs[k]).items()} for k in weights_sha}
        agg = NeFedAvg(self.state, self.cfg.weighting)
        pending = set(selected)
        deadline = time.monotonic() + self.cfg.deadline_s + 5.0
        client_metrics: list[dict[str, Any]] = []
        while pending and time.monotonic() < deadline and not self.stop_event.is_set():
            item = self._drain(0.25)
            for node in list(pending):
                if not self.registry[node].online:
                    pending.discard(node)
                    stats.dropped += 1
                    log.warning("round %d: %s dropped out", r, node)
            if item is None:
                continue
            stream, message, body = item
            node = Topics.node_of(stream)
            if not isinstance(message, (Update, Decline)):
                continue
            if node not in tasks or message.node != node:
                stats.rejected["unknown_sender"] = stats.rejected.get("unknown_sender", 0) + 1
                log.warning("round %d: rejected %s from unexpected sender %s", r, message.kind, node or stream)
                continue
            if isinstance(message, Decline):
                if message.task_id == tasks[node].task_id and node in pending:
                    pending.discard(node)
                    stats.declined += 1
                    log.warning("round %d: %s declined: %s", r, node, message.reason)
                continue
            if node not in pending:
                stats.rejected["duplicate"] = stats.rejected.get("duplicate", 0) + 1
                continue
            try:
                tensors = validate_update(message, body, tasks[node], layouts[tasks[node].submodel])
            except UpdateRejected as exc:
                stats.rejected[exc.reason] = stats.rejected.get(exc.reason, 0) + 1
                log.warning("round %d: rejected update from %s: %s", r, node, exc)
                continue
            agg.add(message.submodel, tensors, message.num_samples)
            pending.discard(node)
            stats.updates += 1
            if self.on_progress is not None:
                self.on_progress(f"round {r}: {stats.updates}/{len(selected)} clients reported")
            stats.bytes_in += len(body)
            client_metrics.append({"node": node, "submodel": message.submodel, **message.metrics.model_dump()})
        if pending:
            log.warning("round %d: deadline passed without updates from %s", r, sorted(pending))
        if stats.updates >= self.cfg.min_updates:
            self.state = agg.result()
            stats.aggregated = True
            if self._calibration is not None and len(self._calibration):
                for k in range(len(self.specs)):
                    calibrate_bn(self.state, k, self._calibration)
        else:
            log.warning(
                "round %d: %d valid updates < min_updates=%d; keeping the previous global model",
                r,
                stats.updates,
                self.cfg.min_updates,
            )
        stats.seconds = time.monotonic() - started
        return stats, client_metrics

    # --- metrics and checkpoints ---------------------------------------------------------------------------

    def evaluate_all(self) -> list[tuple[float, float]]:
        assert self._test is not None
        return [evaluate(self.state, k, self._test) for k in range(len(self.specs))]

    def record(
        self, stats: RoundStats, accuracies: list[tuple[float, float]], clients: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        rows = []
        for k, (acc, loss) in enumerate(accuracies):
            row = {
                "round": stats.round,
                "submodel": k,
                "gamma": self.specs[k].gamma,
                "accuracy": acc,
                "loss": loss,
                "clients": sum(1 for c in clients if c["submodel"] == k),
                **{key: value for key, value in asdict(stats).items() if key != "round"},
            }
            rows.append(row)
        with (self.run_dir / "metrics.jsonl").open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        return rows

    def save_checkpoint(self) -> None:
        from safetensors.numpy import save

        name = f"state-{self.round:05d}.safetensors"
        _atomic_write(self.run_dir / name, save(self.state.flat()))
        meta = {
            "round": self.round,
            "state": name,
            "rng": self.rng.bit_generator.state,
            "registry": {n: asdict(i) for n, i in self.registry.items()},
            "saved_at": time.time(),
        }
        _atomic_write(self.run_dir / CHECKPOINT, json.dumps(meta).encode())
        for old in self.run_dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def _load_checkpoint(self) -> None:
        from safetensors.numpy import load_file

        meta = json.loads((self.run_dir / CHECKPOINT).read_text())
        self.round = int(meta["round"])
        self.state = GlobalState.from_flat(self.config, self.specs, load_file(str(self.run_dir / meta["state"])))
        self.rng.bit_generator.state = meta["rng"]
        self.registry = {n: NodeInfo(**i) for n, i in meta["registry"].items()}
        for info in self.registry.values():
            info.online = False  # until they say hello again
        truncate_metrics(self.run_dir / "metrics.jsonl", self.round)
        log.info("resuming %s after round %d", self.run_dir, self.round)

    # --- the whole run -------------------------------------------------------------------------------------

    def serve(self) -> Path:
        """Run the remaining rounds; return the run directory (with metrics, checkpoint and report)."""
        if self.round == 0 and not read_metrics(self.run_dir / "metrics.jsonl"):
            self.record(RoundStats(0, aggregated=False), self.evaluate_all(), [])
            self.save_checkpoint()
        reason = "finished"
        try:
            while self.round < self.cfg.rounds and not self.stop_event.is_set():
                r = self.round + 1
                stats, clients = self.run_round(r)
                rows = self.record(stats, self.evaluate_all(), clients)
                self.round = r
                self.save_checkpoint()
                if self.on_round is not None:
                    self.on_round(stats, rows)
            if self.stop_event.is_set():
                reason = "interrupted"
        except BaseException:
            reason = "coordinator stopped on an error"
            raise
        finally:
            self.close(reason)
            write_report(self.run_dir)
        return self.run_dir
