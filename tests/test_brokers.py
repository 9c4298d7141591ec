"""Brokers people run: the same short `serve` run (real coordinator and device processes, same seeds) through
one Mosquitto with the default chunk size, through a Mosquitto that caps packets at 128 KiB with a small
``--chunk-size``, through two Mosquittos bridged (devices on a site broker), and through RabbitMQ's MQTT
plugin; each must end in the same global state as the reference run within float tolerance."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from nefl_edge.coordinator.bridge import (
    ChunkTooLarge,
    SiteOptions,
    check_chunk_size,
    chunk_size_for,
    packet_size,
    write_site_config,
)
from nefl_edge.coordinator.broker import LocalBroker, free_port, port_open
from nefl_edge.coordinator.broker_config import (
    BrokerConfigError,
    BrokerOptions,
    read_password_file,
    set_password,
    write_broker_config,
)
from nefl_edge.core.mqtt import Security
from nefl_edge.core.wire import Assembler, frames, parse_frame
from tests.helpers import make_shards, spawn_coordinator, spawn_edge, stop, wait_for

pytestmark = pytest.mark.integration

SIZES = [96, 128, 160]
RUN_ARGS = (
    "--method", "nefl-wd", "--gammas", "0.2,0.6,1.0", "--rounds", "2", "--seed", "7", "--policy", "static",
    "--min-clients", "3", "--eval-samples", "200", "--lr", "0.05", "--batch-size", "32", "--deadline-s", "120",
    "--wait-clients-s", "90",
)  # fmt: skip
LIMIT = 131072  # a broker's 128 KiB cap on one MQTT packet (AWS IoT Core: 128 KB per message)
SMALL_CHUNK = 120 << 10  # below LIMIT by the frame header (<= 1 KiB + 8), the topic and the MQTT header
TOLERANCE = 1e-5

State = Dict[str, np.ndarray]


def serve_run(
    folder: Path,
    coordinator_broker: str,
    device_broker: str = "",
    coordinator_args: Sequence[str] = (),
    device_args: Sequence[str] = (),
    timeout_s: float = 300,
    before_devices: Optional[Callable[[], bool]] = None,
) -> State:
    """One short run: ``serve`` on ``coordinator_broker``, three `nefl-edge join` processes on
    ``device_broker`` (default: the same; ``{node}`` in ``device_args`` is the device's name), started once
    ``before_devices`` (if given) returned True; the final global state from the run's checkpoint."""
    from safetensors.numpy import load_file

    folder.mkdir(parents=True, exist_ok=True)
    shards = make_shards(folder, SIZES)
    coord = spawn_coordinator(coordinator_broker, folder, *RUN_ARGS, *coordinator_args)
    edges: List[subprocess.Popen[bytes]] = []
    try:
        if before_devices is not None:
            assert before_devices(), "the condition for starting the devices did not come true"
        for i, shard in enumerate(shards):
            extra = [a.replace("{node}", f"dev{i}") for a in device_args]
            edges.append(spawn_edge(device_broker or coordinator_broker, shard, f"dev{i}", folder, *extra, tier=i))
        code = coord.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        for p in [coord, *edges]:
            stop(p)
    log = (folder / "coordinator.log").read_text()
    assert code == 0, f"serve ended with {code} (None: still running after {timeout_s:.0f} s):\n{log[-3000:]}"
    run_dir = next((folder / "runs").glob("default-*"))
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    assert meta["round"] == 2, f"the checkpoint is of round {meta['round']}, expected 2"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = {r["round"]: r["updates"] for r in records if r["round"] > 0}
    assert updates == {1: 3, 2: 3}, f"every round should aggregate the three devices' updates: {updates}"
    return dict(load_file(str(run_dir / meta["state"])))


def differences(a: State, b: State) -> float:
    """The largest absolute difference between two global states (printed: ``pytest -s`` shows it)."""
    assert a.keys() == b.keys(), f"the states differ in tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    print(f"largest difference from the reference state: {worst:.3g}")
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> State:
    """The run through one Mosquitto with the default chunk size (1 MiB)."""
    folder = tmp_path_factory.mktemp("reference")
    with LocalBroker("mosquitto", folder / "broker") as broker:
        return serve_run(folder, broker.address)


@pytest.fixture
def limited_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A Mosquitto that refuses MQTT packets over 128 KiB (it disconnects the sender)."""
    with LocalBroker("mosquitto", tmp_path / "broker", extra_config=(f"max_packet_size {LIMIT}",)) as broker:
        yield broker


def test_a_small_chunk_size_runs_through_a_broker_with_a_128_kib_limit(
    reference: State, limited_broker: LocalBroker, tmp_path: Path
) -> None:
    state = serve_run(
        tmp_path,
        limited_broker.address,
        coordinator_args=("--chunk-size", str(SMALL_CHUNK)),
        device_args=("--max-message-size", str(SMALL_CHUNK)),
    )
    assert differences(state, reference) < TOLERANCE


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_chunk_check_says_what_fits_a_broker_with_a_128_kib_limit(
    limited_broker: LocalBroker, protocol: str
) -> None:
    # Over 3.1.1 the broker closes the connection on the oversized probe; over MQTT 5 its CONNACK says the limit.
    with pytest.raises(ChunkTooLarge) as refused:
        check_chunk_size(limited_broker.address, Security(), 1 << 20, "default", protocol)
    fits = chunk_size_for(LIMIT)
    assert f"--chunk-size {fits}" in str(refused.value), str(refused.value)
    assert packet_size(fits) <= LIMIT < packet_size(fits + 1024), "the advice is not the largest chunk that fits"
    check_chunk_size(limited_broker.address, Security(), fits, "default", protocol)  # fits: no error
    check_chunk_size(limited_broker.address, Security(), SMALL_CHUNK, "default", protocol)


def test_the_chunk_check_lets_a_run_go_on_when_no_size_passes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A broker that drops every probe (here: packets over 4 KiB, below the smallest probe) is not refused on a
    # guess: the refusal may be about the publish itself (cloud brokers drop a client for a denied publish).
    with LocalBroker("mosquitto", tmp_path / "broker", extra_config=("max_packet_size 4096",)) as tiny:
        check_chunk_size(tiny.address, Security(), 1 << 20, "default")
    assert "of every size tried" in caplog.text, caplog.text


def test_serve_refuses_a_chunk_size_the_broker_does_not_take_instead_of_stalling(
    limited_broker: LocalBroker, tmp_path: Path
) -> None:
    coord = spawn_coordinator(limited_broker.address, tmp_path, *RUN_ARGS)
    try:
        code = coord.wait(120)
    finally:
        stop(coord)
    log = (tmp_path / "coordinator.log").read_text()
    assert code == 2, f"serve should exit 2 on a chunk the broker refuses, got {code}:\n{log[-2000:]}"
    assert f"--chunk-size {chunk_size_for(LIMIT)}" in log and "Traceback" not in log, log[-2000:]


class Mosquitto:
    """Mosquitto on a generated folder (``broker-config`` / ``site-broker-config``), stopped by ``stop``."""

    def __init__(self, folder: Path, *ports: int) -> None:
        self.folder, self.ports = folder, ports
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> Mosquitto:
        with (self.folder.parent / f"{self.folder.name}.log").open("ab") as log:
            conf = str(self.folder / "mosquitto.conf")
            self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: all(port_open(p) for p in self.ports), 10, f"mosquitto on {self.folder.name} to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def retained_once(port: int, user: str, password: str, topic: str) -> bool:
    """Whether a new subscriber to ``topic`` on the broker at ``port`` gets a retained message within 1 s."""
    got = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)
    client.on_message = lambda c, u, m: got.set() if m.retain and m.payload else None
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, 1)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        return got.wait(1.0)
    finally:
        client.disconnect()
        client.loop_stop()


def retained_on(port: int, user: str, password: str, topic: str, timeout_s: float = 90) -> bool:
    """Whether the broker at ``port`` comes to hold a retained message on ``topic``: a new subscriber, again
    and again, until one gets a message with the retain flag (a live message would arrive without it)."""
    return bool(wait_for(lambda: retained_once(port, user, password, topic), timeout_s, f"retained {topic}", 0.5))


@dataclass
class BridgedPair:
    """The coordinator's broker (``broker-config``, folder ``up``) and a site broker (``site-broker-config``,
    folder ``site``) bridged to its TLS listener with an account made there; device accounts at the site."""

    folder: Path
    up_tls: int
    up_plain: int
    site_tls: int
    site_plain: int
    coordinator_password_file: Path
    passwords: Dict[str, str]

    def upstream(self) -> Mosquitto:
        return Mosquitto(self.folder / "up", self.up_tls, self.up_plain)

    def site(self) -> Mosquitto:
        return Mosquitto(self.folder / "site", self.site_tls, self.site_plain)


def bridged_pair(folder: Path, accounts: Sequence[str]) -> BridgedPair:
    root_user = "root" if os.geteuid() == 0 else None  # as root Mosquitto drops to a user who can't read tmp
    up_tls, up_plain, site_tls, site_plain = distinct_ports(4)
    upstream = write_broker_config(
        BrokerOptions(folder / "up", ("127.0.0.1",), up_tls, up_plain, "127.0.0.1", user=root_user)
    )
    made = subprocess.run(
        [
            sys.executable, "-m", "nefl_edge.coordinator", "site-broker-config", "--out", str(folder / "site"),
            "--site", "lab", "--upstream", f"127.0.0.1:{up_tls}", "--upstream-dir", str(folder / "up"),
            "--hostname", "127.0.0.1", "--tls-port", str(site_tls), "--plain-port", str(site_plain),
            "--bind", "127.0.0.1", *(["--broker-user", root_user] if root_user else []),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    bridge_conf = (folder / "site" / "bridge.d" / "bridge.conf").read_text()
    assert "remote_username nefl-site-lab" in bridge_conf and "bridge_cafile" in bridge_conf, bridge_conf
    passwords = {name: secrets.token_urlsafe(12) for name in accounts}
    for name, password in passwords.items():
        set_password(folder / "site" / "passwd", name, password)
        (folder / f"{name}.password").write_text(password)
    return BridgedPair(folder, up_tls, up_plain, site_tls, site_plain, upstream.coordinator_password_file, passwords)


@pytest.mark.slow  # 36 s on this 2-core machine
def test_devices_on_a_site_broker_bridged_to_the_coordinators_broker(reference: State, tmp_path: Path) -> None:
    # Prepare: the coordinator's broker from broker-config; a site broker from site-broker-config bridged to
    # its TLS listener with an account made there; device accounts on the site broker.
    pair = bridged_pair(tmp_path, ("dev0", "dev1", "dev2", "watcher"))
    up_plain, site_plain, passwords = pair.up_plain, pair.site_plain, pair.passwords
    coordinator_account = ("--username", "nefl-coord", "--password-file", str(pair.coordinator_password_file))

    with pair.upstream(), pair.site():
        # Execute: serve on the coordinator's broker; the devices join at the site only once the site broker
        # holds the retained manifest that came over the bridge, so they get manifest and artifacts from it.
        state = serve_run(
            tmp_path / "run",
            f"127.0.0.1:{up_plain}",
            f"127.0.0.1:{site_plain}",
            coordinator_args=coordinator_account,
            device_args=("--username", "{node}", "--password-file", str(tmp_path / "{node}.password")),
            before_devices=lambda: retained_on(
                site_plain, "watcher", passwords["watcher"], "nefl/default/manifest/chunk/+"
            ),
        )

        # The coordinator clears its retained messages when the run ends: the clearing crosses the bridge too.
        watch = (site_plain, "watcher", passwords["watcher"], "nefl/default/manifest/chunk/+")
        wait_for(lambda: not retained_once(*watch), 30, "the retained manifest to be cleared at the site")

    # Assert: the same final state as through one Mosquitto.
    assert differences(state, reference) < TOLERANCE


def test_a_task_sent_while_the_site_broker_is_down_reaches_the_device_after_it_is_back(tmp_path: Path) -> None:
    # The bridge's session upstream is persistent (cleansession false) and so is the device's at the site
    # (persistence on): a QoS 1 task published while the site broker is down waits upstream, then crosses.
    pair = bridged_pair(tmp_path, ("dev0",))
    task = "nefl/r1/node/dev0/task"

    def device() -> Tuple[mqtt.Client, List[bytes]]:
        got: List[bytes] = []
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev0", clean_session=False)
        client.username_pw_set("dev0", pair.passwords["dev0"])
        client.on_message = lambda c, u, m: got.append(bytes(m.payload))
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_connect = lambda c, u, f, r, p: c.subscribe(task, 1)
        client.connect("127.0.0.1", pair.site_plain, 30)
        client.loop_start()
        assert subscribed.wait(10), "the device's subscription was not acknowledged"
        return client, got

    coordinator = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nefl-coord")
    coordinator.username_pw_set("nefl-coord", pair.coordinator_password_file.read_text().strip())
    with pair.upstream():
        coordinator.connect("127.0.0.1", pair.up_plain, 30)
        coordinator.loop_start()
        with pair.site():
            client, got = device()
            coordinator.publish(task, b"before", qos=1).wait_for_publish(10)
            wait_for(lambda: got == [b"before"], 20, "the task through the bridge (positive control)")
            client.disconnect()
            client.loop_stop()
        coordinator.publish(task, b"while down", qos=1).wait_for_publish(10)
        with pair.site():
            client, got = device()
            try:
                wait_for(lambda: b"while down" in got, 30, "the task sent while the site broker was down")
            finally:
                client.disconnect()
                client.loop_stop()
        coordinator.disconnect()
        coordinator.loop_stop()
    assert got == [b"while down"], f"the device got {got}"


def test_a_bridge_off_loopback_needs_tls_and_an_account_and_survives_a_new_broker_config(tmp_path: Path) -> None:
    site = BrokerOptions(tmp_path / "site", ("127.0.0.1",), free_port())
    with pytest.raises(BrokerConfigError, match="--insecure"):
        write_site_config(SiteOptions("lab", "broker.example.org:8883", site))
    plain = write_site_config(SiteOptions("lab", "broker.example.org:1883", site, insecure=True))
    conf = (plain.folder / "bridge.d" / "bridge.conf").read_text()
    assert "remote_password" not in conf and "bridge_cafile" not in conf, conf

    upstream = BrokerOptions(tmp_path / "up", ("127.0.0.1",), free_port())
    write_broker_config(upstream)
    write_site_config(SiteOptions("lab", "broker.example.org:8883", site, upstream_dir=upstream.out))
    conf = (tmp_path / "site" / "bridge.d" / "bridge.conf").read_text()
    assert "remote_username nefl-site-lab" in conf and "bridge_insecure false" in conf, conf
    write_broker_config(upstream)  # the operator regenerates the coordinator's broker: the bridge's rights stay
    acl = (upstream.out / "acl").read_text()
    assert "user nefl-site-lab\ntopic write nefl/+/node/+/hello/#" in acl, acl
    assert "nefl-site-lab" in read_password_file(upstream.out / "passwd")


# --- RabbitMQ's MQTT plugin ----------------------------------------------------------------------------------

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's; /usr/sbin's wrapper su's to rabbitmq


def distinct_ports(count: int) -> List[int]:
    """``count`` free loopback ports, all different (``free_port`` twice may give the same one)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class RabbitMQ:
    """A RabbitMQ node of our own (Debian's rabbitmq-server) with the MQTT plugin on free loopback ports: its
    own node name, config, data and log folders, distribution port and epmd port, so nothing on the machine
    is shared; ``stop`` ends the node and that epmd."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, amqp, dist, self.epmd = distinct_ports(4)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\nmqtt.default_user = guest\nmqtt.default_pass = guest\n"
            "log.console = true\nlog.file = false\n"
        )
        (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.env = dict(
            os.environ,
            HOME=str(folder),  # the Erlang cookie
            RABBITMQ_NODENAME=f"nefl-test-{self.port}@localhost",
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(folder / "plugins-expand"),
            RABBITMQ_PID_FILE=str(folder / "rabbitmq.pid"),
            RABBITMQ_NODE_PORT=str(amqp),
            RABBITMQ_DIST_PORT=str(dist),
            ERL_EPMD_PORT=str(self.epmd),
        )
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def version(self) -> str:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True)
        return out.stdout.decode() or "?"

    def __enter__(self) -> RabbitMQ:
        with (self.folder / "rabbitmq.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_SERVER)], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        try:
            wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 120, "RabbitMQ's MQTT listener")
            assert port_open(self.port), (self.folder / "rabbitmq.log").read_text()[-3000:]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=60)
        subprocess.run(["epmd", "-kill"], env=self.env, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    if not RABBITMQ_SERVER.exists():
        pytest.skip("RabbitMQ is not installed: `apt-get install -y rabbitmq-server` (Debian) to run these tests")
    with RabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


def first_messages(
    port: int, filters: Sequence[str], publish: Sequence[Tuple[str, bool]] = ()
) -> List[Tuple[str, bool]]:
    """(topic, retain flag) of what a new clean subscriber to ``filters`` gets within a second, after it has
    published ``publish`` ((topic, retain) pairs, payload b"x") itself."""
    got: List[Tuple[str, bool]] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(4)}")
    client.on_message = lambda c, u, m: got.append((m.topic, bool(m.retain)))
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_connect = lambda c, u, f, r, p: c.subscribe([(t, 1) for t in filters]) if filters else subscribed.set()
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK"
        for topic, retain in publish:
            client.publish(topic, b"x", qos=1, retain=retain).wait_for_publish(10)
        time.sleep(1.0)  # the bounded wait of a negative check; the positive control is in the same list
        return list(got)
    finally:
        client.disconnect()
        client.loop_stop()


def test_what_rabbitmq_does_differently_from_mosquitto(rabbitmq: RabbitMQ) -> None:
    # Retained messages: RabbitMQ's MQTT plugin (3.10; documented up to 3.13, rabbitmq-server#8824) sends a
    # retained message only to a subscription whose filter is exactly its topic, never through a wildcard.
    # Our retained messages travel on <topic>/chunk/<i> and are fetched with <topic>/# or <topic>/chunk/+.
    first_messages(rabbitmq.port, [], [("nefl/probe/weights/0/chunk/0", True)])
    exact = first_messages(rabbitmq.port, ["nefl/probe/weights/0/chunk/0"])
    wildcard = first_messages(
        rabbitmq.port, ["nefl/probe/weights/0/#", "nefl/probe/weights/0/chunk/+", "nefl/probe/live"],
        [("nefl/probe/live", False)],
    )  # fmt: skip
    assert exact == [("nefl/probe/weights/0/chunk/0", True)], f"an exact subscription got {exact}"
    assert wildcard == [("nefl/probe/live", False)], f"wildcard subscriptions got {wildcard}"
    # Packets: no limit near ours (the default chunk passes the check); QoS 1 and persistent sessions hold.
    check_chunk_size(rabbitmq.address, Security(), 1 << 20, "default")
    print(f"RabbitMQ {rabbitmq.version()}: retained only on exact filters")


def test_exact_chunk_subscriptions_would_fetch_retained_messages_from_rabbitmq(rabbitmq: RabbitMQ) -> None:
    # The link's way (core.link.FramedLink._more_chunks), done here by hand with paho: subscribe
    # <topic>/chunk/0 exactly, read the chunk count n from its frame header, subscribe <topic>/chunk/1 ..
    # <n-1> exactly: every retained chunk arrives from RabbitMQ and the message reassembles.
    data = np.random.default_rng(3).bytes(5000)
    stream = "nefl/fix/weights/0"
    parts = frames(data, 1024)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fix-publisher")
    publisher.connect("127.0.0.1", rabbitmq.port, 30)
    publisher.loop_start()
    for i, part in enumerate(parts):
        publisher.publish(f"{stream}/chunk/{i}", part, qos=1, retain=True).wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()

    assembler, done = Assembler(), threading.Event()
    result: List[bytes] = []

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        index = int(msg.topic.rsplit("/", 1)[1])
        if index == 0:
            head, _ = parse_frame(msg.payload)
            if head.n > 1:
                client.subscribe([(f"{stream}/chunk/{i}", 1) for i in range(1, head.n)])
        whole = assembler.feed(stream, msg.payload, index)
        if whole is not None:
            result.append(whole)
            done.set()

    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fix-reader")
    reader.on_message = on_message
    reader.on_connect = lambda c, u, f, r, p: c.subscribe(f"{stream}/chunk/0", 1)
    reader.connect("127.0.0.1", rabbitmq.port, 30)
    reader.loop_start()
    try:
        assert done.wait(10), f"the {len(parts)} retained chunks did not all arrive through exact subscriptions"
    finally:
        reader.disconnect()
        reader.loop_stop()
    assert len(parts) == 5 and result == [data]


@pytest.mark.slow
def test_a_run_through_rabbitmqs_mqtt_plugin(reference: State, rabbitmq: RabbitMQ, tmp_path: Path) -> None:
    # The links subscribe <topic>/chunk/0 exactly and the other chunks once chunk 0 says how many
    # (core.link.FramedLink._more_chunks), so the retained artifacts and weights arrive from RabbitMQ too.
    state = serve_run(tmp_path, rabbitmq.address, timeout_s=200)
    assert differences(state, reference) < TOLERANCE
