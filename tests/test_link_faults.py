"""The MQTT link against a real Mosquitto under hostile and faulty traffic: payloads that used to kill paho's
network thread, retained messages and Last Wills on the chunked status topic, a flood of incomplete chunked
messages, and signed traffic both ways with forgeries."""

from __future__ import annotations

import gc
import queue
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from nefl_edge.core.mqtt import BrokerAddress, Inbound, Inbox, MqttLink
from nefl_edge.core.schemas import Control, Status, Task, TrainConfig
from nefl_edge.core.signing import Keyring, Signer, save_private_key, signer_policy
from nefl_edge.core.wire import Assembler, Topics, encode, frames
from tests.fakes import KILLERS, Clock, first_frames
from tests.helpers import Broker, stop, wait_for

pytestmark = pytest.mark.integration

RUN = "r"
TOPICS = Topics(RUN)


@pytest.fixture
def raw(broker: Broker) -> Iterator[mqtt.Client]:
    """A plain paho client: what an attacker with broker access has."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-attacker")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def make_link(broker: Broker, name: str, **kwargs: object) -> MqttLink:
    link = MqttLink(name, BrokerAddress("127.0.0.1", broker.port), RUN, clean=True, **kwargs)  # type: ignore[arg-type]
    return link


def next_message(link: MqttLink, timeout: float = 10) -> Inbound:
    return link.inbox.get(timeout=timeout)


def send(client: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def test_known_killers_do_not_silence_a_live_link(broker: Broker, raw: mqtt.Client) -> None:
    status = TOPICS.node("evil", "status")
    send(raw, f"{status}/chunk/0", KILLERS[0][1], retain=True)
    link = make_link(broker, "victim")
    link.subscribe(TOPICS.all_nodes("status"))
    link.connect(10)
    device = make_link(broker, "device")
    device.connect(10)

    for _, payload in KILLERS:
        send(raw, status, payload)
    wait_for(lambda: link.rejected == len(KILLERS) + 1, 10, "every killer to be rejected")
    device.publish(TOPICS.node("d1", "status"), Status(run=RUN, node="d1", state="online"))
    stream, message, _ = next_message(link)

    assert (stream, message.kind) == (TOPICS.node("d1", "status"), "status")
    assert link.client._thread is not None and link.client._thread.is_alive()
    assert set(link.rejections) <= {"frame", "frame_header", "message"}, link.rejections
    assert link.inbox.empty()
    link.close()
    device.close()


def test_a_retained_status_reaches_a_later_subscriber_of_node_plus_status(broker: Broker) -> None:
    device = make_link(broker, "device")
    device.connect(10)
    device.publish(TOPICS.node("d1", "status"), Status(run=RUN, node="d1", state="online"), retain=True)
    device.close()
    coordinator = make_link(broker, "coordinator")
    coordinator.subscribe(TOPICS.all_nodes("status"))

    coordinator.connect(10)
    stream, message, _ = next_message(coordinator)

    assert stream == TOPICS.node("d1", "status")
    assert isinstance(message, Status) and message.state == "online"
    coordinator.close()


DEVICE_WITH_WILL = """
import sys, time
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.schemas import Status
from nefl_edge.core.signing import Signer
from nefl_edge.core.wire import Topics, encode

port, key = int(sys.argv[1]), sys.argv[2]
topic = Topics("r").node("d1", "status")
signer = Signer.load(key, "d1")
link = MqttLink("d1", BrokerAddress("127.0.0.1", port), "r", signer=signer,
                will=(topic, encode(Status(run="r", node="d1", state="offline"))))
link.connect(10)
link.publish(topic, Status(run="r", node="d1", state="online"), retain=True)
print("ready", flush=True)
time.sleep(120)
"""


def test_a_signed_last_will_replaces_the_retained_status(broker: Broker, tmp_path: Path) -> None:
    device_key = Signer.generate("d1")
    save_private_key(tmp_path / "d1.key", device_key.private_key)
    keyring = Keyring({"d1": device_key.public_key})
    coordinator = make_link(broker, "coordinator", keyring=keyring, sender_of=signer_policy("coord"))
    coordinator.subscribe(TOPICS.all_nodes("status"))
    coordinator.connect(10)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DEVICE_WITH_WILL), str(broker.port), str(tmp_path / "d1.key")],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        online = next_message(coordinator)[1]

        proc.kill()
        offline = next_message(coordinator)[1]
    finally:
        stop(proc)
    late = make_link(broker, "late", keyring=keyring, sender_of=signer_policy("coord"))
    late.subscribe(TOPICS.all_nodes("status"))
    late.connect(10)
    retained = next_message(late)[1]

    assert isinstance(online, Status) and online.state == "online"
    assert isinstance(offline, Status) and offline.state == "offline"
    assert isinstance(retained, Status) and retained.state == "offline"
    with pytest.raises(queue.Empty):
        late.inbox.get(timeout=1)
    assert not coordinator.rejections and not late.rejections
    coordinator.close()
    late.close()


def test_a_flood_of_incomplete_messages_stays_within_the_caps(broker: Broker, raw: mqtt.Client) -> None:
    clock = Clock()
    assembler = Assembler(
        timeout_s=60,
        max_partials_per_sender=4,
        max_bytes_per_sender=16 << 10,
        max_partials=10,
        max_bytes=32 << 10,
        clock=clock,
    )
    link = make_link(broker, "victim", assembler=assembler)
    link.subscribe(TOPICS.all_nodes("update"))
    link.connect(10)
    device = make_link(broker, "device")
    device.connect(10)
    flood = first_frames(100, size=8 << 10)

    for i, frame in enumerate(flood):
        send(raw, TOPICS.node("one", "update"), frame)
        send(raw, TOPICS.node(f"many{i % 5}", "update"), frame)
    device.publish(TOPICS.node("one", "update"), Control(run=RUN, action="end"))  # wrong kind: last to arrive
    wait_for(lambda: link.rejections["wrong_topic"] == 1, 20, "the flood to be received")
    peak = (assembler.partials, assembler.held_bytes)
    per_sender = [assembler.held_by(f"{TOPICS.base}/node/{n}") for n in ("one", "many0", "many1", "many2")]
    clock.now = 61
    assembler.expire()

    assert peak == (10, 10 << 10)
    assert all(count <= 4 and held <= 16 << 10 for count, held in per_sender)
    assert sum(assembler.evicted.values()) == 200
    assert (assembler.partials, assembler.held_bytes) == (0, 0)
    link.close()
    device.close()


def test_memory_returns_to_its_baseline_after_a_flood() -> None:
    assembler = Assembler()
    frame = frames(bytes(4 << 20), 1 << 20)[0]  # the first 1 MiB chunk of a 4 MiB message
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(200):  # 200 MiB from 20 senders into an Assembler with the default caps
            assembler.feed(f"nefl/r/node/n{i % 20}/update", frame[:16] + b"%032x" % i + frame[48:])
        held_peak, partials_peak = assembler.held_bytes, assembler.partials
        traced_peak = tracemalloc.get_traced_memory()[1] - baseline
        assembler.clear()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()

    assert (partials_peak, held_peak) == (64, 64 << 20)
    assert assembler.evicted == {"total_count": 200 - 64}
    assert traced_peak < 72 << 20, f"{traced_peak} bytes at the peak"
    assert after < 1 << 20, f"{after} bytes still allocated after the flood"


def test_signed_traffic_both_ways_and_forgeries_are_refused(broker: Broker, raw: mqtt.Client) -> None:
    coord_key, device_key = Signer.generate("coord"), Signer.generate("d1")
    policy = signer_policy("coord")
    coordinator = make_link(
        broker, "coordinator", signer=coord_key, keyring=Keyring({"d1": device_key.public_key}), sender_of=policy
    )
    device = make_link(
        broker, "device", signer=device_key, keyring=Keyring({"coord": coord_key.public_key}), sender_of=policy
    )
    forger = make_link(broker, "forger", signer=Signer.generate("coord"))
    coordinator.subscribe(TOPICS.all_nodes("status"))
    device.subscribe(TOPICS.node("d1", "task"))
    device.subscribe(TOPICS.control)
    for link in (coordinator, device, forger):
        link.connect(10)
    task = Task(
        run=RUN,
        node="d1",
        task_id="t1",
        round=1,
        submodel=0,
        weights_sha256="a" * 64,
        train=TrainConfig(),
        deadline_s=9,
    )

    device.publish(TOPICS.node("d1", "status"), Status(run=RUN, node="d1", state="online"), retain=True)
    status = next_message(coordinator)[1]
    forger.publish(TOPICS.node("d1", "task"), task)
    forger.publish(TOPICS.control, Control(run=RUN, action="end"))
    send(raw, TOPICS.control, frames(encode(Control(run=RUN, action="end")))[0])
    wait_for(lambda: device.rejected == 3, 10, "the forgeries to be rejected")
    coordinator.publish(TOPICS.node("d1", "task"), task)
    got = next_message(device)[1]

    assert isinstance(status, Status) and status.state == "online"
    assert isinstance(got, Task) and got.task_id == "t1"
    assert device.rejections == {"bad_signature": 2, "unsigned": 1}
    assert device.inbox.empty()
    for link in (coordinator, device, forger):
        link.close()


def test_a_consumer_that_falls_behind_loses_new_messages_not_memory() -> None:
    link = MqttLink("inbox-test", BrokerAddress("127.0.0.1", 1), "r", inbox_size=2)
    topic = Topics("r").node("dev", "status")

    for _ in range(5):
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = frames(encode(Status(run="r", node="dev", state="online")))[0]
        link._on_message(link.client, None, message)

    assert link.inbox.qsize() == 2
    assert link.rejections["inbox_full"] == 3


def test_the_inbox_is_bounded_by_the_bytes_waiting_as_well() -> None:
    status = Status(run="r", node="dev", state="online")
    inbox = Inbox(maxsize=100, max_bytes=250)
    item = ("stream", status, b"x" * 100)

    refusals = [inbox.offer(item) for _ in range(5)]
    inbox.get_nowait()
    again = inbox.offer(item)

    assert refusals[:2] == [None, None]
    assert all(r is not None and "bytes are waiting" in r for r in refusals[2:])
    assert again is None
    assert inbox.qsize() == 2 and inbox.bytes == 200
