"""Stand-ins and fakes that several test modules share (kept here so that no test module imports another)."""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import paho.mqtt.client as mqtt
import torch

from nefl_edge.coordinator.models import SubmodelNet
from nefl_edge.core.artifacts import load_manifest
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.schemas import (
    Artifact,
    Control,
    ManifestMessage,
    Message,
    Task,
    TrainConfig,
    Weights,
)
from nefl_edge.core.wire import (
    MAGIC_FRAME,
    MAGIC_MESSAGE,
    Topics,
    encode,
    frames,
    pack_tensors,
    sha256,
)
from tests.helpers import Broker, wait_for


class StandIn:
    """Just enough coordinator to drive one device: publish manifest, artifacts, weights and tasks."""

    def __init__(self, broker: Broker, artifacts: Path, chunk_size: int = 1 << 20, run: str = "default") -> None:
        self.run = run
        self.retained: set[str] = set()
        self.topics = Topics(run)
        self.link = MqttLink(
            f"stand-in-{run}", BrokerAddress.parse(broker.address), run, chunk_size=chunk_size, clean=True
        )
        for kind in ("hello", "update"):
            self.link.subscribe(self.topics.all_nodes(kind))
        self.link.connect()
        self.manifest = load_manifest(artifacts)
        for sub in self.manifest.submodels:
            for f in sub.files.values():
                self.publish_retained(
                    self.topics.artifact(f.sha256), Artifact(run=run, name=f.name), (artifacts / f.name).read_bytes()
                )
        self.publish_retained(self.topics.manifest, ManifestMessage(run=run), self.manifest.to_json().encode())

    def publish_retained(self, topic: str, message: Message, body: bytes) -> None:
        self.retained.add(topic)
        self.link.publish(topic, message, body, retain=True)

    def end(self, reason: str = "test over") -> None:
        """What the coordinator does at the end of a run: say ``end``, clear every retained message, leave."""
        self.link.publish(self.topics.control, Control(run=self.run, action="end", reason=reason))
        for topic in self.retained:
            self.link.clear_retained(topic)
        self.link.close()

    def expect(self, kind: type[Message], timeout: float = 60) -> tuple[Any, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, message, body = self.link.inbox.get(timeout=1)
            except queue.Empty:
                continue
            if isinstance(message, kind):
                return message, body
        raise AssertionError(f"no {kind.__name__} within {timeout} s")

    def task(
        self,
        node: str,
        rnd: int,
        submodel: int,
        tensors: dict[str, np.ndarray],
        train: TrainConfig,
        deadline_s: float = 60,
    ) -> Task:
        body = pack_tensors(tensors)
        self.publish_retained(self.topics.weights(submodel), Weights(run=self.run, round=rnd, submodel=submodel), body)
        task = Task(
            run=self.run,
            node=node,
            task_id=f"t{rnd}",
            round=rnd,
            submodel=submodel,
            weights_sha256=sha256(body),
            train=train,
            deadline_s=deadline_s,
        )
        self.link.publish(self.topics.node(node, "task"), task)
        return task


class Peer:
    """A plain paho client that records what it receives, its CONNACK and its disconnects."""

    def __init__(
        self,
        port: int,
        user: Optional[str],
        password: Optional[str],
        ca: Optional[Path],
        client_id: str = "",
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{user}", clean_session=True
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.reconnect_delay_set(0.1, 0.2)  # refused peers retry; keeps loop_stop() short
        self.port = port
        self.lock = threading.Lock()
        self.messages: List[Tuple[str, bytes]] = []
        self.connack: Optional[str] = None
        self.failed = False
        self.disconnects: List[str] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnects.append(str(reason))
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.failed = bool(getattr(reason, "is_failure", True))
        self.connack = str(reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def start(self) -> Peer:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self

    def connect(self) -> Peer:
        self.start()
        wait_for(lambda: self.connack is not None, 10, "CONNACK", 0.02)
        assert not self.failed, f"connection refused: {self.connack}"
        return self

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def topics(self) -> List[str]:
        with self.lock:
            return [t for t, _ in self.messages]

    def got(self, topic: str, payload: bytes = b"") -> bool:
        with self.lock:
            return any(t == topic and (not payload or p == payload) for t, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


TASK = Task(
    run="r1", node="n1", task_id="t1", round=3, submodel=1, weights_sha256="a" * 64, train=TrainConfig(), deadline_s=30
)

MSG_ID = "0123456789abcdef0123456789abcdef"


def raw_frame(header: bytes, chunk: bytes = b"") -> bytes:
    return MAGIC_FRAME + struct.pack(">I", len(header)) + header + chunk


def raw_message(header: bytes, body: bytes = b"") -> bytes:
    return MAGIC_MESSAGE + struct.pack(">I", len(header)) + header + body


def frame_header(data: bytes = b"", **changes: object) -> bytes:
    header = {
        "msg": MSG_ID,
        "i": 0,
        "n": 1,
        "size": len(data),
        "chunk": 1024,
        "sha256": sha256(data),
        "chunk_sha256": sha256(data),
        **changes,
    }
    return json.dumps(header, separators=(",", ":")).encode()


def task_header_text() -> str:
    raw = encode(TASK.model_copy(update={"run": "r"}))
    return raw[8 : 8 + struct.unpack(">I", raw[4:8])[0]].decode()


KILLERS: list[tuple[str, bytes]] = [
    ("frame header 1e999", raw_frame(frame_header().replace(b'"i":0', b'"i":1e999'))),
    ("frame header NaN", raw_frame(frame_header().replace(b'"n":1', b'"n":NaN'))),
    ("frame header nested", raw_frame(b"[" * 1000)),
    ("frame header not UTF-8", raw_frame(b'{"msg":"\xff\xfe"}')),
    ("message header nested", frames(raw_message(b"[" * 30000 + b"]" * 30000))[0]),
    (
        "message header huge int",
        frames(raw_message(task_header_text().replace('"round":3', '"round":' + "7" * 5000).encode()))[0],
    ),
    (
        "message header Infinity",
        frames(raw_message(task_header_text().replace('"deadline_s":30.0', '"deadline_s":Infinity').encode()))[0],
    ),
    (
        "message header 1e999",
        frames(raw_message(task_header_text().replace('"deadline_s":30.0', '"deadline_s":1e999').encode()))[0],
    ),
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def first_frames(count: int, size: int = 4096) -> list[bytes]:
    """The first 1 KiB chunk of ``count`` distinct messages of ``size`` bytes: partials that never finish."""
    return [frames(bytes([i % 256]) * size, 1024)[0] for i in range(count)]


def torch_step(
    net: SubmodelNet, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, momentum: dict[str, np.ndarray]
) -> float:
    """One torch.optim.SGD step from the given momentum buffers (the reference)."""
    net.train()
    params = dict(net.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for name, buf in momentum.items():
        opt.state[params[name]]["momentum_buffer"] = torch.from_numpy(buf.copy())
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    opt.step()
    return float(loss.detach())
