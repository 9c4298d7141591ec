"""The MQTT link's publish window (issue 24): at most ``max_inflight`` QoS 1 messages unacknowledged, fewer when an
MQTT 5 broker announces a lower Receive Maximum, the rest queued in order and sent as acknowledgements come;
``flush`` waits for all of them. Checked against a scripted broker that holds its PUBACKs back (the window seen
on the wire) and against a real Mosquitto delivering thousands of per-device messages to several subscribers."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import pytest

from nefl_edge.coordinator.broker_config import MAX_INFLIGHT_MESSAGES, BrokerOptions, config_text
from nefl_edge.core.link import Receiver
from nefl_edge.core.mqtt import MAX_INFLIGHT, BrokerAddress, MqttLink
from nefl_edge.core.schemas import Task, TrainConfig
from nefl_edge.core.wire import Topics
from tests.helpers import Broker


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class HeldBroker:
    """A TCP server that speaks just enough MQTT for one client (CONNECT -> CONNACK, SUBSCRIBE -> SUBACK,
    PINGREQ -> PINGRESP) and acknowledges a PUBLISH only when the test says so (:meth:`ack`), or at once after
    :meth:`ack_all`; ``receive_maximum`` goes into an MQTT 5 CONNACK. ``topics`` lists the PUBLISH packets in the
    order they arrived (packet ids in ``mids``)."""

    def __init__(self, receive_maximum: Optional[int] = None) -> None:
        self.receive_maximum = receive_maximum
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.topics: list[str] = []
        self.mids: list[int] = []
        self.arrived = threading.Condition()
        self.auto = False
        self.level = 4
        self.conn: Optional[socket.socket] = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, n: int) -> bytes:
        assert self.conn is not None
        data = b""
        while len(data) < n:
            part = self.conn.recv(n - len(data))
            if not part:
                raise EOFError
            data += part
        return data

    def _packet(self) -> tuple[int, bytes]:
        first = self._read(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read(1)[0]
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, self._read(length)

    def _send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def _serve(self) -> None:
        self.conn, _ = self.server.accept()
        try:
            while True:
                first, body = self._packet()
                kind = first >> 4
                if kind == 1:  # CONNECT: protocol name (2 + 4 bytes), then the level
                    self.level = body[6]
                    if self.level == 5:
                        props = (
                            b"" if self.receive_maximum is None else b"\x21" + self.receive_maximum.to_bytes(2, "big")
                        )
                        reply = b"\x00\x00" + _varint(len(props)) + props
                        self._send(b"\x20" + _varint(len(reply)) + reply)
                    else:
                        self._send(b"\x20\x02\x00\x00")
                elif kind == 3:
                    size = int.from_bytes(body[:2], "big")
                    topic = body[2 : 2 + size].decode()
                    mid = int.from_bytes(body[2 + size : 4 + size], "big")
                    with self.arrived:
                        self.topics.append(topic)
                        self.mids.append(mid)
                        auto = self.auto
                        self.arrived.notify_all()
                    if auto:
                        self.ack(mid)
                elif kind == 8:  # SUBSCRIBE: granted QoS 1 for each filter
                    mid = body[:2]
                    rest = body[2:]
                    if self.level == 5:
                        rest = rest[1:]  # an empty property list (paho sends none here)
                    count = 0
                    while rest:
                        size = int.from_bytes(rest[:2], "big")
                        rest = rest[3 + size :]
                        count += 1
                    reply = mid + (b"\x00" if self.level == 5 else b"") + b"\x01" * count
                    self._send(b"\x90" + _varint(len(reply)) + reply)
                elif kind == 12:
                    self._send(b"\xd0\x00")
                elif kind == 14:
                    return
        except (EOFError, OSError):
            return

    def ack(self, mid: int) -> None:
        self._send(b"\x40\x02" + mid.to_bytes(2, "big"))

    def ack_all(self) -> None:
        """Acknowledge every PUBLISH that came and from now on each as it comes."""
        with self.arrived:
            self.auto = True
            mids = list(self.mids)
        for mid in mids:
            self.ack(mid)

    def wait_count(self, count: int, timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.topics) >= count, timeout)

    def close(self) -> None:
        self.server.close()
        if self.conn is not None:
            self.conn.close()


def _publish(link: MqttLink, count: int) -> list[str]:
    """``count`` tasks, one per device topic, as the coordinator sends a round's; their topics in order."""
    topics = []
    for i in range(count):
        node = f"d{i:04d}"
        topics.append(Topics("w").node(node, "task"))
        task = Task(run="w", node=node, task_id=f"t{i}", round=1, submodel=0, weights_sha256="a" * 64,
                    train=TrainConfig(), deadline_s=30)  # fmt: skip
        link.publish(topics[-1], task)
    return topics


@pytest.mark.parametrize("protocol, receive_maximum, window", [("3.1.1", None, 8), ("5", 3, 3), ("5", None, 8)])
def test_no_more_than_the_window_is_unacknowledged_and_the_rest_follows_in_order(
    protocol: str, receive_maximum: Optional[int], window: int
) -> None:
    held = HeldBroker(receive_maximum)
    link = MqttLink("coord", BrokerAddress("127.0.0.1", held.port), "w", protocol=protocol, max_inflight=8)  # type: ignore[arg-type]
    try:
        link.connect(10)
        assert link.window == window, f"window {link.window} over {protocol} with Receive Maximum {receive_maximum}"
        topics = _publish(link, 40)
        assert held.wait_count(window, 10), f"only {len(held.topics)} of the first {window} messages arrived"
        assert not held.wait_count(window + 1, 0.5), f"{len(held.topics)} messages sent with {window} unacknowledged"
        assert link.in_flight() == (window, 40 - window), f"in flight / queued: {link.in_flight()}"
        for mid in held.mids[:2]:
            held.ack(mid)
        assert held.wait_count(window + 2, 10), "two acknowledgements did not let two more messages out"
        assert not held.wait_count(window + 3, 0.5), f"{len(held.topics)} sent after 2 of {window} were acknowledged"
        assert not link.flush(0.2), "flush said everything was acknowledged while the broker held its PUBACKs"
        held.ack_all()
        assert link.flush(10), "flush did not see every message acknowledged"
        assert held.topics[:40] == topics, "the messages did not reach the broker in the order they were published"
        assert link.in_flight() == (0, 0), f"after flush: {link.in_flight()}"
        assert link.acked == link.published == 42, f"acknowledged {link.acked} of {link.published} (40 + 2 markers)"
    finally:
        link.close()
        held.close()


def test_generated_broker_config_announces_the_links_window() -> None:
    lines = config_text(BrokerOptions(Path("/tmp/unused"), ("127.0.0.1",))).splitlines()
    assert f"max_inflight_messages {MAX_INFLIGHT}" in lines, "broker-config does not match the link's window"
    assert MAX_INFLIGHT_MESSAGES == MAX_INFLIGHT


@pytest.mark.parametrize("protocol, window", [("3.1.1", MAX_INFLIGHT), ("5", 20)])
def test_thousands_of_per_device_messages_all_reach_their_subscribers_in_order(
    broker: Broker, protocol: str, window: int
) -> None:
    """3,000 per-device task topics over 3 subscriber connections on a real Mosquitto (its default
    ``max_inflight_messages`` 20, announced over MQTT 5 as Receive Maximum 20, which the link honours)."""
    count, subscribers = 3000, 3
    topics = [Topics("w").node(f"d{i:04d}", "task") for i in range(count)]
    received: list[list[str]] = [[] for _ in range(subscribers)]
    done = threading.Event()
    lock = threading.Lock()
    subscribed = threading.Semaphore(0)
    clients = []
    host, port = broker.address.rsplit(":", 1)
    for s in range(subscribers):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{s}", clean_session=True)
        receiver = Receiver("w")

        def on_message(
            c: mqtt.Client, u: object, msg: mqtt.MQTTMessage, s: int = s, receiver: Receiver = receiver
        ) -> None:
            item = receiver.receive(msg.topic, msg.payload)
            with lock:
                received[s].append(msg.topic if item is not None else f"rejected {msg.topic}")
                if sum(len(r) for r in received) == count:
                    done.set()

        client.on_message = on_message
        client.on_subscribe = lambda c, u, mid, codes, props: subscribed.release()
        client.connect(host, int(port))
        client.loop_start()
        mine = topics[s::subscribers]
        for lo in range(0, len(mine), 200):
            client.subscribe([(t, 1) for t in mine[lo : lo + 200]])
        clients.append((client, (len(mine) + 199) // 200))
    for _, batches in clients:
        for _ in range(batches):
            assert subscribed.acquire(timeout=30), "a subscriber's SUBACK did not come"
    link = MqttLink("coord", BrokerAddress.parse(broker.address), "w", protocol=protocol)  # type: ignore[arg-type]
    try:
        link.connect(10)
        assert link.window == window, f"window {link.window} over {protocol} (Mosquitto's default 20 in flight)"
        _publish(link, count)
        assert link.flush(60), f"the broker did not acknowledge {count} messages within 60 s: {link.in_flight()}"
        assert done.wait(60), f"{sum(len(r) for r in received)} of {count} messages reached the subscribers"
        for s in range(subscribers):
            assert received[s] == topics[s::subscribers], f"subscriber {s} got its messages out of order or rejected"
    finally:
        link.close()
        for client, _ in clients:
            client.loop_stop()
            client.disconnect()
