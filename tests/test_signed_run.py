"""A signed run end to end: Mosquitto with the generated configuration (TLS, passwords, ACL), a coordinator
with an enrolment folder, and two enrolled devices started as a user would (`nefl-edge join --state-dir`,
broker, account and keys from the enrolment). An attacker with a broker account that may read and write
every nefl topic (a compromised account, or whoever runs the broker; the ACL alone already stops a device
account from publishing tasks and broadcasts, see test_broker_config.py) forges updates, hellos, statuses,
tasks, control and weights, and replays captured signed messages: nothing of it is taken.

Also here: the pure logic of replay refusal on the device, duplicate identities on both sides, and what
`join` does with an identity (conflicting --node-id, a second process, no enrolment)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

from nefl_edge.coordinator import checkpoint
from nefl_edge.coordinator.broker_config import BrokerOptions, write_broker_config
from nefl_edge.coordinator.enrolment import add_device
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.coordinator.registry import Registry
from nefl_edge.core.data import Dataset
from nefl_edge.core.identity import install_bundle, open_identity
from nefl_edge.core.mqtt import BrokerAddress, Inbound, Receiver
from nefl_edge.core.schemas import (
    Control,
    DeviceProfile,
    Hello,
    ManifestMessage,
    Message,
    Metrics,
    Status,
    Task,
    TrainConfig,
    Update,
)
from nefl_edge.core.signing import Signer
from nefl_edge.core.wire import encode, frames, pack_tensors
from nefl_edge.edge_client.client import ClientOptions, EdgeClient, TakeoverWatch
from tests.fakes import Peer
from tests.helpers import Broker, EnrolledBroker, device_env, make_shards, spawn_coordinator, stop, wait_for

RUN = "signed"
MALLORY = "mallory"


def topic(node: str, kind: str) -> str:
    return f"nefl/{RUN}/node/{node}/{kind}"


class SignedDeployment(EnrolledBroker):
    """The generated, enrolled broker (:class:`tests.helpers.EnrolledBroker`) with two devices, and an attacker
    account appended to the generated ACL with read and write on every nefl topic."""

    def __init__(self, folder: Path) -> None:
        import os

        super().__init__(folder, ("pi-a", "pi-b"))
        self.mallory_password = "mallory-" + os.urandom(8).hex()
        self.add_account(MALLORY, self.mallory_password, ["topic readwrite nefl/#"])

    def attacker(self) -> Peer:
        """A raw paho client on the loopback plain listener with the attacker's account."""
        return Peer(self.plain_port, MALLORY, self.mallory_password, None, client_id=MALLORY).connect()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SignedDeployment]:
    d = SignedDeployment(tmp_path)
    d.start()
    yield d
    d.stop()


def spawn_enrolled(folder: Path, state: Path, data: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    """`nefl-edge join --state-dir STATE`: no --broker, --node-id or credentials; all from the enrolment."""
    args = [sys.executable, "-m", "nefl_edge.edge_client", "join", "--state-dir", str(state), "--data", str(data)]
    args += ["--run", RUN, "--cache", str(folder / f"cache-{name}"), "--threads", "1", *extra]
    log = (folder / f"{name}.log").open("ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=device_env(folder), start_new_session=True)


def nefl_edge(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nefl_edge.edge_client", *args]
    return subprocess.run(command, capture_output=True, text=True, env=device_env(folder), timeout=60)


# --- the attacker ------------------------------------------------------------------------------------------


class Eavesdropper:
    """Decodes what the attacker's subscription receives (unverified), keeping each message's raw frames."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.receiver = Receiver(RUN)
        self.seen = 0
        self.raw: Dict[str, List[bytes]] = {}
        self.messages: List[Tuple[Message, List[bytes]]] = []

    def poll(self) -> None:
        with self.peer.lock:
            new = self.peer.messages[self.seen :]
            self.seen = len(self.peer.messages)
        for t, payload in new:
            self.raw.setdefault(t, []).append(payload)
            item: Optional[Inbound] = self.receiver.receive(t, payload)
            if item is not None:
                self.messages.append((item[1], self.raw.pop(t)))

    def find(self, match: Callable[[Message], bool]) -> Optional[Tuple[Message, List[bytes]]]:
        self.poll()
        return next((m for m in self.messages if match(m[0])), None)


def forged(t: str, message: Message, body: bytes = b"", signer: Optional[Signer] = None) -> List[bytes]:
    data = encode(message, body)
    return frames(signer.seal(t, data) if signer else data)


def publish(peer: Peer, t: str, parts: List[bytes]) -> None:
    for part in parts:
        peer.publish(t, part)


def profile() -> DeviceProfile:
    return DeviceProfile(arch="x", system="y", python="3", cores=1, memory_mb=1, onnxruntime="1", backend="portable")


def forge_everything(mallory: Peer, task: Task) -> None:
    """Every message a device account may publish (on A's topics), and coordinator messages on the topics the
    devices hold subscriptions to all run long (task, control, manifest). Weights are read only while a device
    waits for them, and must also match the sha256 that the signed task names."""
    impostor_a, impostor_coord = Signer.generate("pi-a"), Signer.generate("coordinator")
    huge = {"conv1.weight": np.full((16, 1, 3, 3), 1e6, np.float32)}
    update = Update(
        run=RUN,
        node="pi-a",
        task_id=task.task_id,
        round=task.round,
        submodel=task.submodel,
        num_samples=10_000_000,
        metrics=Metrics(loss_first=1, loss_last=0, accuracy=1, steps=1, seconds=1),
    )
    for signer in (None, impostor_a, Signer.generate(MALLORY)):
        publish(mallory, topic("pi-a", "update"), forged(topic("pi-a", "update"), update, pack_tensors(huge), signer))
    hello = Hello(run=RUN, node="pi-a", profile=profile(), num_samples=1, instance="0badc0ffee00")
    publish(mallory, topic("pi-a", "hello"), forged(topic("pi-a", "hello"), hello, signer=impostor_a))
    sybil = Hello(run=RUN, node="sybil", profile=profile(), num_samples=1)
    publish(mallory, topic("sybil", "hello"), forged(topic("sybil", "hello"), sybil))
    offline = Status(run=RUN, node="pi-a", state="offline")
    publish(mallory, topic("pi-a", "status"), forged(topic("pi-a", "status"), offline))
    fake_task = task.model_copy(update={"node": "pi-b", "task_id": "f0rged", "train": TrainConfig(lr=100.0)})
    for signer in (None, impostor_coord):
        publish(mallory, topic("pi-b", "task"), forged(topic("pi-b", "task"), fake_task, signer=signer))
    control = f"nefl/{RUN}/control"
    publish(mallory, control, forged(control, Control(run=RUN, action="end", reason="forged"), signer=impostor_coord))
    manifest = f"nefl/{RUN}/manifest"
    (frame,) = forged(manifest, ManifestMessage(run=RUN), b'{"forged": true}', impostor_coord)
    mallory.publish(f"{manifest}/chunk/0", frame, retain=True)  # replaces the retained manifest: joined devices see it


# --- the signed run ----------------------------------------------------------------------------------------

SIZES = {"pi-a": 128, "pi-b": 768}  # B trains longer: round 2 is still open when the replay comes


class SignedRun:
    """One 2-round run: the coordinator with the enrolment, two enrolled devices (static tiers, so that a run
    is repeatable), logs and the run directory under ``folder``."""

    def __init__(self, d: SignedDeployment, folder: Path, shards: List[Path]) -> None:
        folder.mkdir()
        self.folder = folder
        self.coord = spawn_coordinator(
            d.address,
            folder,
            *("--run", RUN, "--enrolment-dir", str(d.enrol), "--tls-ca", str(d.settings.ca_cert)),
            *("--username", "nefl-coord", "--password-file", str(d.settings.coordinator_password_file)),
            *("--rounds", "2", "--gammas", "0.2,1.0", "--min-clients", "2", "--lr", "0.05", "--policy", "static"),
            *("--eval-samples", "200", "--bn-calibration", "0", "--deadline-s", "60", "--wait-clients-s", "60"),
        )
        self.edges = [
            spawn_enrolled(folder, d.states[n], shard, n, "--tier", str(tier))
            for tier, (n, shard) in enumerate(zip(SIZES, shards))
        ]

    def finish(self) -> Tuple[Path, str, str, str]:
        """Wait for the end; the run directory and the logs of the coordinator, A and B."""
        try:
            code = self.coord.wait(120)
            edge_codes = [edge.wait(30) for edge in self.edges]
        finally:
            self.stop()
        logs = [(self.folder / f"{n}.log").read_text() for n in ("coordinator", "pi-a", "pi-b")]
        assert code == 0, logs[0][-3000:]
        assert edge_codes == [0, 0], (logs[1][-2000:], logs[2][-2000:])
        return next((self.folder / "runs").glob(f"{RUN}-*")), logs[0], logs[1], logs[2]

    def stop(self) -> None:
        for p in [self.coord, *self.edges]:
            stop(p)


@pytest.mark.integration
def test_a_signed_run_takes_nothing_forged_or_replayed(deployment: SignedDeployment, tmp_path: Path) -> None:
    # Prepare: an eavesdropping, forging attacker; the same run without it, for reference
    d = deployment
    shards = make_shards(tmp_path, list(SIZES.values()))
    clean_dir, *_ = SignedRun(d, tmp_path / "clean", shards).finish()
    mallory = d.attacker()
    mallory.subscribe(topic("+", "task/#"), topic("+", "update/#"))
    spy = Eavesdropper(mallory)
    attacked = SignedRun(d, tmp_path / "attacked", shards)
    try:
        # Execute: forge while A's round-1 task is open; replay A's round-1 update and task in round 2
        def task_of_a(r: int) -> Callable[[Message], bool]:
            return lambda m: isinstance(m, Task) and m.node == "pi-a" and m.round == r

        def genuine_update(m: Message) -> bool:
            return isinstance(m, Update) and m.node == "pi-a" and m.num_samples == SIZES["pi-a"]

        first = wait_for(lambda: spy.find(task_of_a(1)), 120, "A's task of round 1", 0.01)
        assert isinstance(first[0], Task)
        forge_everything(mallory, first[0])
        old_update = wait_for(lambda: spy.find(genuine_update), 60, "A's update")
        wait_for(lambda: spy.find(task_of_a(2)), 60, "A's task of round 2", 0.01)
        publish(mallory, topic("pi-a", "update"), old_update[1])
        publish(mallory, topic("pi-a", "task"), first[1])
        run_dir, log, a, b = attacked.finish()
    finally:
        attacked.stop()
        mallory.close()

    # Assert: both genuine updates in each round and nothing else; the model as without the attacker
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert sorted((c["round"], c["node"], c["status"], c["num_samples"]) for c in clients) == [
        (r, n, "updated", SIZES[n]) for r in (1, 2) for n in SIZES
    ]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert all(m["updates"] == 2 and m["aggregated"] for m in metrics if m["round"] > 0)
    rejected = {m["round"]: m["rejected"] for m in metrics if m["submodel"] == 0}
    assert rejected[2] == {"stale": 1}
    assert {"unsigned", "bad_signature", "unknown_key"} <= set(rejected[1])  # counted in the metrics too
    state, reference = checkpoint.load(run_dir).state, checkpoint.load(clean_dir).state
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        np.testing.assert_allclose(state[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)
    for t, reason in (
        ("pi-a/update", "unsigned"),
        ("pi-a/update", "bad_signature"),
        ("pi-a/update", "unknown_key"),
        ("pi-a/hello", "bad_signature"),
        ("sybil/hello", "unsigned"),
        ("pi-a/status", "unsigned"),
    ):
        assert f"rejected payload on 'nefl/{RUN}/node/{t}' ({reason})" in log, (t, reason)
    assert f"rejected update from pi-a for task {first[0].task_id} of round 1" in log
    assert "UNAUTHENTICATED" not in log and "two processes use" not in log
    for t, reason in (
        ("node/pi-b/task", "unsigned"),
        ("node/pi-b/task", "bad_signature"),
        ("control", "bad_signature"),
        ("manifest/chunk/0", "bad_signature"),
    ):
        assert f"rejected payload on 'nefl/{RUN}/{t}' ({reason})" in b, (t, reason)
    assert "enrolled as pi-b" in b and "UNAUTHENTICATED" not in b and "ended: finished" in b
    assert f"refused task {first[0].task_id} of round 1: this task was done already" in a


# --- one identity, two processes ---------------------------------------------------------------------------


@pytest.mark.integration
def test_two_processes_with_one_identity_get_clear_errors(deployment: SignedDeployment, tmp_path: Path) -> None:
    # Prepare: pi-a's device runs; its state dir is also copied to a second machine
    shard = make_shards(tmp_path, [64])[0]
    first = spawn_enrolled(tmp_path, deployment.states["pi-a"], shard, "first")
    clone = tmp_path / "clone-state"
    shutil.copytree(deployment.states["pi-a"], clone)
    try:
        wait_for(lambda: "connected to broker" in (tmp_path / "first.log").read_text(), 30, "the first device")

        # Execute
        state = str(deployment.states["pi-a"])
        second = nefl_edge(tmp_path, "join", "--state-dir", state, "--data", str(shard), "--cache", str(tmp_path))
        copy = spawn_enrolled(tmp_path, clone, shard, "copy")
        try:
            wait_for(
                lambda: any(
                    "most likely another process uses the identity pi-a" in (tmp_path / f"{n}.log").read_text()
                    for n in ("first", "copy")
                ),
                30,
                "the takeover error",
            )
        finally:
            stop(copy)
    finally:
        stop(first)

    # Assert
    assert second.returncode == 2
    assert f"another nefl-edge process (pid {first.pid}) uses identity pi-a" in second.stderr


def test_a_node_id_that_conflicts_with_the_enrolment_is_refused(tmp_path: Path) -> None:
    broker_dir = write_broker_config(BrokerOptions(tmp_path / "broker", ("broker.lan",), 8883)).folder
    state = tmp_path / "state"
    with open_identity(state) as ident:
        public = ident.public_key
    install_bundle(state, add_device(tmp_path / "enrol", "pi-a", public, broker_dir).bundle).close()
    shard = make_shards(tmp_path, [16])[0]

    result = nefl_edge(tmp_path, "join", "--state-dir", str(state), "--node-id", "pi-z", "--data", str(shard))

    assert result.returncode == 2
    assert "this device is enrolled as 'pi-a'" in result.stderr and "--node-id pi-z conflicts" in result.stderr


@pytest.mark.integration
def test_an_unenrolled_device_warns_once_and_uses_its_generated_node_id(broker: Broker, tmp_path: Path) -> None:
    # Prepare
    watcher = Peer(broker.port, None, None, None, client_id="watcher").connect()
    watcher.subscribe("nefl/default/node/+/status/#")
    shard = make_shards(tmp_path, [16])[0]
    state = tmp_path / "state"
    args = ["join", "--state-dir", str(state), "--data", str(shard), "--broker", broker.address]
    args += ["--cache", str(tmp_path / "cache")]

    # Execute
    with (tmp_path / "device.log").open("ab") as out:
        device = subprocess.Popen(
            [sys.executable, "-m", "nefl_edge.edge_client", *args], stdout=out, stderr=subprocess.STDOUT,
            env=device_env(tmp_path), start_new_session=True,
        )  # fmt: skip
    try:
        status = wait_for(watcher.topics, 30, "the device's status")
    finally:
        stop(device)
        watcher.close()

    # Assert
    with open_identity(state, lock=False) as ident:
        node = ident.node
    assert node.startswith("dev-") and status[0] == f"nefl/default/node/{node}/status/chunk/0"
    assert (tmp_path / "device.log").read_text().count("UNAUTHENTICATED DEVICE") == 1


# --- pure logic: replay refusal, takeover watch, duplicate hellos -------------------------------------------


class Recorder(EdgeClient):
    def __init__(self, folder: Path) -> None:
        data = Dataset(np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64), "none")
        super().__init__(ClientOptions(BrokerAddress("127.0.0.1", 1), "pi-a", RUN, cache=folder), data)
        self.trained: List[str] = []

    def _run_task(self, task: Task, received: float) -> None:
        self.trained.append(task.task_id)


def task(task_id: str, round_: int, sent_at: float) -> Task:
    return Task(
        run=RUN,
        node="pi-a",
        task_id=task_id,
        round=round_,
        submodel=0,
        weights_sha256="0" * 64,
        train=TrainConfig(),
        deadline_s=60,
        sent_at=sent_at,
    )


def test_the_device_refuses_replayed_tasks_and_old_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: joined with a manifest sent at t=100; round 3 taken at t=130
    client = Recorder(tmp_path)
    client._joined_at = client._manifest_at = 100.0
    client._handle("s", task("r3", 3, 130.0), b"")

    # Execute
    with caplog.at_level(logging.WARNING):
        client._handle("s", task("r3", 3, 130.0), b"")  # the same task again
        client._handle("s", task("r2", 2, 120.0), b"")  # an older round of this run
        client._handle("s", task("old", 5, 90.0), b"")  # a task of an earlier run of the same name
        client._handle("s", Control(run=RUN, action="end", sent_at=95.0), b"")  # an earlier run's end
        client._handle("s", task("r4", 4, 140.0), b"")
        client._manifest_at = 150.0  # a coordinator started afresh under the same run name
        client._handle("s", task("new1", 1, 160.0), b"")

    # Assert
    assert client.trained == ["r3", "r4", "new1"]
    assert client.refused == [
        "this task was done already (a replay)",
        "round 2 is older than round 3, already seen in this run (a replay)",
        "it was sent before this run's manifest (a task of an earlier run, replayed)",
    ]
    assert "ignored a control end sent before this run's manifest" in caplog.text
    assert caplog.text.count("refused task") == 3


class Reason:
    def __init__(self, value: int) -> None:
        self.value, self.is_failure = value, value >= 128

    def __str__(self) -> str:
        return f"reason {self.value}"


def test_repeated_drops_right_after_connecting_name_the_likely_cause(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    watch = TakeoverWatch("pi-a", clock=lambda: now[0])

    def session(seconds: float, reason: int, down_s: float = 1.0) -> int:
        """Connected for ``seconds``, dropped with ``reason``, back ``down_s`` later: the reports so far."""
        watch.connected()
        now[0] += seconds
        watch.disconnected(Reason(reason))
        now[0] += down_s
        return watch.reports

    with caplog.at_level(logging.ERROR):
        long_lived = session(600, 128)  # a long session ends: no sign of a duplicate
        clean = session(1, 0)  # a clean disconnect
        restart = session(1, 128, down_s=30)  # the broker went down: back only much later
        first = session(1, 128)  # knocked off, and back at once
        second = session(2, 142)  # MQTT 5: session taken over
        third = session(1, 128)  # reported once per window
        watch.connected()

    assert (long_lived, clean, restart, first, second, third, watch.reports) == (0, 0, 0, 0, 1, 1, 1)
    assert "most likely another process uses the identity pi-a" in caplog.text


def test_the_coordinator_names_two_processes_that_share_an_identity(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()

    def hello(instance: Optional[str]) -> None:
        registry.note("pi-a", Hello(run=RUN, node="pi-a", profile=profile(), num_samples=5, instance=instance))

    def status(state: str) -> None:
        registry.note("pi-a", Status(run=RUN, node="pi-a", state=state))  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO):
        hello("aaaaaaaaaaaa")
        status("offline")
        hello("bbbbbbbbbbbb")  # a restart after a clean leave
        restarted = caplog.text
        status("lost")
        hello("cccccccccccc")  # the broker kicked b off for c
        hello("bbbbbbbbbbbb")  # and b is back: two processes
        hello("cccccccccccc")

        for instance in ("dddddddddddd", "eeeeeeeeeeee"):  # pi-b still online when e says hello: a restart
            registry.note("pi-b", Hello(run=RUN, node="pi-b", profile=profile(), num_samples=5, instance=instance))
        restarted_online = caplog.text.split(restarted)[-1]
        registry.note("pi-b", Hello(run=RUN, node="pi-b", profile=profile(), num_samples=5, instance="d" * 12))

    assert "ERROR" not in restarted and "restarted" in restarted
    assert "client pi-b restarted" in restarted_online, "a restart before the Last Will came is no duplicate"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "two processes use the identity pi-a: instances cccccccccccc and bbbbbbbbbbbb; give each device its own "
        "state dir (a copied state dir is a copied identity: `nefl-edge identity` shows the node id)",
        "two processes use the identity pi-b: instances eeeeeeeeeeee and dddddddddddd; give each device its own "
        "state dir (a copied state dir is a copied identity: `nefl-edge identity` shows the node id)",
    ]
