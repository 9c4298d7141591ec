"""The wire against raw tensor bytes and against raw paho through the same Mosquitto.

- **Bytes per round per device**: what one device receives (its task and its submodel's weights) and sends
  (two status messages and its update), all signed and framed as ``MqttLink`` does, over the raw float32
  tensor bytes down plus up, for every default submodel of resnet-small (Fashion-MNIST) and ResNet18
  (CIFAR-10).
- **10 MB through a local Mosquitto**: an update (device -> coordinator) and a retained weights broadcast
  (coordinator -> device) of 10 MB of tensors with the project's signed ``MqttLink`` (1 MiB chunks, the
  default), timed from the publish call until the receiver holds the verified, decoded tensors, against a
  raw paho client publishing the same number of bytes as one QoS 1 message to a raw paho subscriber through
  the same broker; interleaved, medians.
- **Pack and unpack** without a broker: the sender's path (tensors -> signed frames) and the receiver's
  (frames -> verified tensors) in GB/s, and memcpy of the same bytes for scale.
- **Update encodings**: float16 and int8 body sizes over float32 (``edge_client.encoding``).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paho.mqtt.client as mqtt

from bench.common import ROOT, SummaryRow, interleaved, write_json, write_section
from nefl_edge.coordinator.broker import LocalBroker
from nefl_edge.core.encoding import encode_update
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.nested import extract, init_global_state
from nefl_edge.core.schemas import Metrics, Status, Task, TrainConfig, Update, Weights
from nefl_edge.core.signing import Keyring, Signer, signer_policy
from nefl_edge.core.specs import get_model_config, make_specs
from nefl_edge.core.wire import (
    DEFAULT_CHUNK_SIZE,
    Assembler,
    Topics,
    decode,
    encode_parts,
    frames,
    pack_tensors,
    tensor_parts,
    unpack_tensors,
)

RUN = "bench"
MODELS = (("resnet-small", "fmnist"), ("resnet18", "cifar10"))
DEVICE, COORDINATOR = Signer.generate("dev0"), Signer.generate("coordinator")
KEYRING = Keyring({"dev0": DEVICE.public_key, "coordinator": COORDINATOR.public_key})
TOPICS = Topics(RUN)
METRICS = Metrics(loss_first=2.3, loss_last=1.1, accuracy=0.5, steps=100, seconds=10.0)


def update_message() -> Update:
    return Update(run=RUN, node="dev0", task_id="t1", round=1, submodel=0, num_samples=500, metrics=METRICS)


def framed(topic: str, message: Any, body: Any, signer: Signer) -> list[bytes]:
    """The MQTT payloads ``MqttLink.publish`` sends (signed, 1 MiB chunks)."""
    envelope, known = signer.seal_parts(topic, encode_parts(message, body))
    return frames(envelope, DEFAULT_CHUNK_SIZE, known)


def round_bytes() -> list[dict[str, Any]]:
    rows = []
    for model, dataset in MODELS:
        config = get_model_config(model, dataset)
        specs = make_specs(config)
        state = init_global_state(config, specs, {})
        for k, spec in enumerate(specs):
            tensors = extract(state, k)
            raw = sum(v.nbytes for v in tensors.values())
            task = Task(
                run=RUN, node="dev0", task_id="t1", round=1, submodel=k, weights_sha256="0" * 64,
                train=TrainConfig(), deadline_s=60,
            )  # fmt: skip
            down = framed(TOPICS.node("dev0", "task"), task, b"", COORDINATOR)
            down += framed(TOPICS.weights(k), Weights(run=RUN, round=1, submodel=k), tensor_parts(tensors), COORDINATOR)
            up = framed(TOPICS.node("dev0", "update"), update_message(), tensor_parts(tensors), DEVICE)
            for state_name in ("training", "online"):
                up += framed(TOPICS.node("dev0", "status"), Status(run=RUN, node="dev0", state=state_name), b"", DEVICE)
            wire = sum(len(f) for f in down + up)
            rows.append(
                {"model": model, "gamma": spec.gamma, "raw_bytes": 2 * raw, "wire_bytes": wire,
                 "overhead": wire / (2 * raw) - 1}
            )  # fmt: skip
    return rows


def encoding_sizes() -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    for model, dataset in MODELS:
        config = get_model_config(model, dataset)
        state = init_global_state(config, make_specs(config), {})
        sent = extract(state, len(state.specs) - 1)
        trained = {k: v + rng.standard_normal(v.shape, np.float32) * np.float32(0.01) for k, v in sent.items()}
        base = len(pack_tensors(trained))
        row: dict[str, Any] = {"model": model, "float32_bytes": base}
        for encoding in ("float16", "int8"):
            row[encoding] = len(pack_tensors(encode_update(trained, encoding, sent), keep_dtype=True)) / base
        rows.append(row)
    return rows


def ten_mb() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"layer{i}.weight": rng.standard_normal((640, 1024), np.float32) for i in range(4)}  # 10 MiB


BEFORE = "f7d8b12"  # the last commit before issue 15's wire changes


def old_wire() -> Optional[tuple[Any, Any]]:
    """The wire and signing modules as they were at ``BEFORE`` (read with git), or None without git."""
    folder = Path(tempfile.mkdtemp(prefix="nefl-old-wire-"))
    try:
        for name in ("wire", "signing"):
            text = subprocess.run(
                ["git", "show", f"{BEFORE}:edge_client/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            text = text.replace("from nefl_edge.core.wire import", "from nefl_old_wire import")
            (folder / f"nefl_old_{name}.py").write_text(text)
    except (OSError, subprocess.CalledProcessError):
        return None
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("nefl_old_wire"), importlib.import_module("nefl_old_signing")
    finally:
        sys.path.remove(str(folder))


def pack_unpack(tensors: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """GB/s of the sender's and the receiver's path without a broker; with git, also those of ``BEFORE``."""
    topic = TOPICS.node("dev0", "update")
    size = sum(v.nbytes for v in tensors.values())
    sent = framed(topic, update_message(), tensor_parts(tensors), DEVICE)

    def receive() -> None:
        assembler, out = Assembler(), None
        for frame in sent:
            out = assembler.feed_pieces(topic, frame) or out
        assert out is not None
        _, message = KEYRING.verify_pieces(topic, out)
        unpack_tensors(decode(message)[1])

    blob = bytes(size)
    contenders: dict[str, Callable[[], Any]] = {
        "pack": lambda: framed(topic, update_message(), tensor_parts(tensors), DEVICE),
        "unpack": receive,
        "memcpy": lambda: bytearray(blob),
    }
    old = old_wire()
    if old is not None:
        wire, signing = old
        signer, ring = signing.Signer(DEVICE.private_key, "dev0"), signing.Keyring({"dev0": DEVICE.public_key})

        def old_pack() -> list[bytes]:
            return wire.frames(signer.seal(topic, wire.encode(update_message(), wire.pack_tensors(tensors))))  # type: ignore[no-any-return]

        old_sent = old_pack()

        def old_receive() -> None:
            assembler, out = wire.Assembler(), None
            for frame in old_sent:
                out = assembler.feed(topic, frame) or out
            _, message = ring.verify(topic, out)
            wire.unpack_tensors(wire.decode(message)[1])

        contenders.update({"pack_before": old_pack, "unpack_before": old_receive})
    times = interleaved(contenders, repeats)
    return {name: size / seconds / 1e9 for name, seconds in times.items()}


class RawPaho:
    """A raw paho publisher and subscriber of one topic; ``send(payload)`` returns once it arrived."""

    def __init__(self, port: int, topic: str, retain: bool) -> None:
        self.topic, self.retain, self.arrived = topic, retain, threading.Event()
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{topic}")
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{topic}")
        self.sub.on_message = lambda c, u, m: self.arrived.set() if m.payload else None
        for client in (self.pub, self.sub):
            client.connect("127.0.0.1", port)
            client.loop_start()
        subscribed = threading.Event()
        self.sub.on_subscribe = lambda *a: subscribed.set()
        self.sub.subscribe(topic, qos=1)
        subscribed.wait(10)

    def send(self, payload: bytes) -> None:
        self.arrived.clear()
        self.pub.publish(self.topic, payload, qos=1, retain=self.retain)
        if not self.arrived.wait(60):
            raise TimeoutError("raw paho message did not arrive")

    def close(self) -> None:
        if self.retain:
            self.pub.publish(self.topic, b"", qos=1, retain=True)
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def through_broker(tensors: dict[str, np.ndarray], repeats: int) -> dict[str, float]:
    """Median seconds of each transfer (see the module docstring)."""
    size = sum(v.nbytes for v in tensors.values())
    payload = bytes(size)
    with LocalBroker("mosquitto") as broker:
        address = BrokerAddress("127.0.0.1", broker.port)
        senders = signer_policy("coordinator")
        links = {
            name: MqttLink(name, address, RUN, signer=signer, keyring=KEYRING, sender_of=senders, clean=True)
            for name, signer in (("dev0", DEVICE), ("coordinator", COORDINATOR))
        }
        for link in links.values():
            link.connect()
        up_topic, down_topic = TOPICS.node("dev0", "update"), TOPICS.weights(0)
        links["coordinator"].subscribe(up_topic)
        links["dev0"].subscribe(down_topic)
        raw_up, raw_down = RawPaho(broker.port, "raw/up", False), RawPaho(broker.port, "raw/down", True)
        time.sleep(0.5)  # subscriptions settle (their acknowledgements are not exposed by MqttLink)

        def link_send(sender: str, receiver: str, topic: str, message: Any, retain: bool) -> Callable[[], None]:
            def go() -> None:
                links[sender].publish(topic, message, tensor_parts(tensors), retain=retain)
                _, _, body = links[receiver].inbox.get(timeout=60)
                unpack_tensors(body)

            return go

        try:
            return interleaved(
                {
                    "link_upload": link_send("dev0", "coordinator", up_topic, update_message(), False),
                    "raw_upload": lambda: raw_up.send(payload),
                    "link_download": link_send(
                        "coordinator", "dev0", down_topic, Weights(run=RUN, round=1, submodel=0), True
                    ),
                    "raw_download": lambda: raw_down.send(payload),
                },
                repeats,
            )
        finally:
            links["coordinator"].clear_retained(down_topic)
            raw_up.close()
            raw_down.close()
            for link in links.values():
                link.close()


def run(quick: bool) -> list[SummaryRow]:
    repeats = 2 if quick else 7
    per_round = round_bytes()
    sizes = encoding_sizes()
    tensors = ten_mb()
    speeds = pack_unpack(tensors, repeats)
    broker = through_broker(tensors, repeats)
    size = sum(v.nbytes for v in tensors.values())
    up_ratio = broker["raw_upload"] / broker["link_upload"]
    down_ratio = broker["raw_download"] / broker["link_download"]
    worst = max(per_round, key=lambda r: r["overhead"])
    record = {
        "bytes_per_round": per_round,
        "encodings": sizes,
        "pack_unpack_GBps": speeds,
        "broker_seconds": broker,
        "payload_bytes": size,
        "upload_over_raw": up_ratio,
        "download_over_raw": down_ratio,
        "quick": quick,
    }
    write_json("wire-quick" if quick else "wire", record)
    if not quick:
        lines = [
            "## Wire\n",
            "`python -m bench wire`. Bytes per round per device (task and weights down, two status messages and "
            "the update up; signed, 1 MiB frames) over the float32 tensor bytes down and up:\n",
            "| model | gamma | raw tensor bytes | wire bytes | overhead |",
            "|---|---|---|---|---|",
            *(
                f"| {r['model']} | {r['gamma']:.1f} | {r['raw_bytes']:,} | {r['wire_bytes']:,} | "
                f"{100 * r['overhead']:.2f} % |"
                for r in per_round
            ),
            "",
            f"{size / 2**20:.0f} MiB of tensors through a local Mosquitto, signed `MqttLink` (1 MiB chunks, publish "
            "until the receiver holds verified tensors) against raw paho (one QoS 1 message of the same size), "
            f"median of {repeats} interleaved runs:\n",
            "| direction | MqttLink | raw paho | link throughput / raw |",
            "|---|---|---|---|",
            f"| upload (update) | {broker['link_upload'] * 1e3:.1f} ms | {broker['raw_upload'] * 1e3:.1f} ms | "
            f"{up_ratio:.2f} |",
            f"| download (retained weights) | {broker['link_download'] * 1e3:.1f} ms | "
            f"{broker['raw_download'] * 1e3:.1f} ms | {down_ratio:.2f} |",
            "",
            f"Without a broker: the sender's path (tensors to signed frames) runs at {speeds['pack']:.2f} GB/s and "
            f"the receiver's (frames to verified tensors) at {speeds['unpack']:.2f} GB/s"
            + (
                f" (before issue 15, commit `{BEFORE}`, interleaved: {speeds['pack_before']:.2f} and "
                f"{speeds['unpack_before']:.2f} GB/s)"
                if "pack_before" in speeds
                else ""
            )
            + f"; memcpy of the same bytes {speeds['memcpy']:.1f} GB/s. Each byte is hashed once on each side (the "
            "signature signs the frames' hash list; only the last 1 MiB block is hashed twice) and copied once "
            "(into the frames; out of them into the body).\n",
            "Update encodings (`train.update_encoding`), body bytes over float32 for the full submodel:\n",
            "| model | float16 | int8 deltas |",
            "|---|---|---|",
            *(f"| {r['model']} | {r['float16']:.3f} | {r['int8']:.3f} |" for r in sizes),
        ]
        write_section("wire", "\n".join(lines))
    return [
        SummaryRow(
            "wire", "bytes per round / raw tensor bytes - 1", worst["overhead"], "raw tensor bytes", 0.02,
            higher_is_better=False, note=f"worst: {worst['model']} gamma {worst['gamma']:.1f}",
        ),
        SummaryRow("wire", "10 MiB upload, link / raw paho throughput", up_ratio, "raw paho, same broker", 0.5),
        SummaryRow("wire", "10 MiB download, link / raw paho throughput", down_ratio, "raw paho, same broker", 0.5),
    ]  # fmt: skip
