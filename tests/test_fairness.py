"""A fair share of the broker and the coordinator (issue 22): accounts that flood partial messages on their
own update topics as fast as they can cost the honest devices no update, whether the flooders have a task
(their partials pass the coordinator's gate and fill its caps, which then make room from the sender holding
the most) or not (the coordinator does not even subscribe their update topics); the flooders' refused traffic
is counted per device and puts them over the quarantine budget. A real Mosquitto, real MQTT links, scripted
devices on :class:`edge_client.session.DeviceSession` (no ONNX Runtime: the update is the weights + 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.grid import Instruction, Outcome
from nefl_edge.coordinator.session import REJECTED_BUDGET, CoordinatorSession
from nefl_edge.core.link import FairAssembler
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.schemas import (
    FileEntry,
    Manifest,
    Metrics,
    ParamEntry,
    SubmodelEntry,
    Task,
    TrainConfig,
)
from nefl_edge.core.wire import Topics, sha256, tensor_parts
from nefl_edge.edge_client.session import DeviceSession
from tests.helpers import Broker, wait_for

pytestmark = pytest.mark.integration

RUN = "fair"
SHAPE = (256, 128)  # 128 KiB of float32: an update of 8 chunks of 16 KiB, partial for a while on the way
HONEST = ["honest-0", "honest-1", "honest-2"]
FLOODERS = [f"flood-{i}" for i in range(10)]
METRICS = Metrics(loss_first=2.0, loss_last=1.0, accuracy=0.5, steps=1, seconds=0.1)


def manifest(folder: Path) -> Manifest:
    data = b"graph 0"
    (folder / "g0.onnx").write_bytes(data)
    sub = SubmodelEntry(
        index=0, key=sha256(b"arch 0"), width=1.0, blocks=[[0]], gamma=1.0, mflops=1.0,
        param_count=int(np.prod(SHAPE)),
        files={"training": FileEntry(name="g0.onnx", sha256=sha256(data), size=len(data))},
        params=[ParamEntry(name="w", shape=SHAPE, kind="consistent", trainable=True)],
    )  # fmt: skip
    return Manifest(model={}, input_shape=(1, 28, 28), num_classes=10, train=TrainConfig(), opset=17, submodels=[sub])


def extract(state: float, k: int) -> dict[str, np.ndarray]:
    return {"w": np.full(SHAPE, state, np.float32)}


def honest_device(port: int, node: str, stop: threading.Event) -> threading.Thread:
    """A device that joins and answers every task with the weights it was sent + 1 (in 16 KiB chunks)."""
    link = MqttLink(f"dev-{node}", BrokerAddress("127.0.0.1", port), RUN, clean=True, chunk_size=16 << 10)
    device = DeviceSession(link, RUN, node, stop=stop)
    device.subscribe_run()
    link.connect(10)
    assert device.wait_manifest(10.0) is not None, f"{node} got no manifest"

    def serve() -> None:
        try:
            while not stop.is_set():
                item = device.next(0.2)
                task = device.handle(*item) if item is not None else None
                if isinstance(task, Task):
                    assert device.manifest is not None
                    sub = device.manifest.submodels[task.submodel]
                    weights = device.weights(sub, task.round, task.weights_sha256, 20.0)
                    device.send_update(task, sub.index, 10, METRICS, tensor_parts({"w": weights["w"] + 1}))
        finally:
            link.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


FLOOD = """
import json, sys, threading
from pathlib import Path
import paho.mqtt.client as mqtt
from tests.fakes import first_frames

port, run, stop_file, nodes = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
sent, started = dict.fromkeys(nodes, 0), threading.Event()

def flood(node):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="acct-" + node)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topic, pool = f"nefl/{run}/node/{node}/update", first_frames(64)
    while not stop_file.exists():
        info = client.publish(topic, pool[sent[node] % len(pool)], qos=1)
        sent[node] += 1
        if sent[node] % 100 == 0:
            info.wait_for_publish(5)
            if min(sent.values()) >= 100 and not started.is_set():
                started.set()
    client.disconnect()
    client.loop_stop()

threads = [threading.Thread(target=flood, args=(n,)) for n in nodes]
for t in threads:
    t.start()
started.wait(60)
print(json.dumps(sent), flush=True)  # every account floods
for t in threads:
    t.join()
print(json.dumps(sent), flush=True)
"""


def flooders(port: int, folder: Path) -> subprocess.Popen[str]:
    """Ten accounts in a process of their own (as on other machines), each opening new partial messages on
    its own update topic as fast as QoS 1 lets it (a window of 100 unacknowledged messages kept full); they
    stop when ``folder / "stop"`` exists and print how many each sent."""
    return subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(port), RUN, str(folder / "stop"), *FLOODERS],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )


def test_flooding_accounts_cost_the_honest_devices_no_update(broker: Broker, tmp_path: Path) -> None:
    # Prepare: a coordinator whose caps a flood fills (16 partials, 2 MiB held; per sender 4 and 512 KiB),
    # three honest devices, ten accounts flooding their own update topics
    assembler = FairAssembler(
        max_partials=16, max_bytes=2 << 20, max_partials_per_sender=4, max_bytes_per_sender=512 << 10
    )
    link = MqttLink("coordinator", BrokerAddress("127.0.0.1", broker.port), RUN, clean=True, assembler=assembler)
    coordinator = CoordinatorSession(link, RUN, manifest(tmp_path), tmp_path, 4.0, extract)  # type: ignore[arg-type]
    coordinator.open()
    stop = threading.Event()
    threads = [honest_device(broker.port, node, stop) for node in HONEST]
    flood = flooders(broker.port, tmp_path)
    outcomes: dict[int, list[Outcome]] = {}
    try:
        assert flood.stdout is not None
        progress = json.loads(flood.stdout.readline() or "{}")
        assert len(progress) == len(FLOODERS), f"the accounts did not start flooding: {progress}"

        # Execute: round 1 tasks the flooders too (they flood instead of answering); round 2 only the honest
        everyone = [Instruction(n, 0, TrainConfig()) for n in HONEST + FLOODERS]
        outcomes[1] = list(coordinator.run(1, 1.0, everyone))  # type: ignore[arg-type]
        offenders = coordinator.offenders()
        evicted_1 = sum(assembler.evicted_by.values())
        outcomes[2] = list(coordinator.run(2, 2.0, [Instruction(n, 0, TrainConfig()) for n in HONEST]))  # type: ignore[arg-type]
        offenders_2 = coordinator.offenders()
        evicted_2 = sum(assembler.evicted_by.values())
    finally:
        stop.set()
        (tmp_path / "stop").touch()
        out, _ = flood.communicate(timeout=30)
        for thread in threads:
            thread.join(15)
        coordinator.close("test over")
    sent = json.loads(out.splitlines()[-1])

    # Assert: every honest update arrived, intact; each flooder was cut off once over budget (its task dropped)
    # and is an offender for the engine's quarantine; in round 2 the flood was dropped before the assembler
    for r, state in ((1, 1.0), (2, 2.0)):
        honest = {o.node: o for o in outcomes[r] if o.node in HONEST}
        assert {n: o.status for n, o in honest.items()} == dict.fromkeys(HONEST, "updated"), f"round {r}: {honest}"
        for node, outcome in honest.items():
            assert outcome.tensors is not None and np.array_equal(outcome.tensors["w"], np.full(SHAPE, state + 1)), (
                f"round {r}: the update of {node} changed on the way"
            )
    flooded = {o.node: (o.status, o.reason.split(":")[0]) for o in outcomes[1] if o.node in FLOODERS}
    assert flooded == dict.fromkeys(FLOODERS, ("dropped", "cut off")), f"the flooders' tasks: {flooded}"
    total = sum(sent.values())
    print(f"flood: {total} partial messages from {len(FLOODERS)} accounts; {evicted_1} evicted by the caps")
    assert total > 20 * REJECTED_BUDGET, f"the flood was too slow to test anything: {total} messages"
    assert sorted(offenders) == FLOODERS, f"over budget after round 1: {offenders} (budget {REJECTED_BUDGET})"
    assert not set(offenders_2) & set(HONEST), f"an honest device over budget in round 2: {offenders_2}"
    assert evicted_2 - evicted_1 <= assembler.max_partials, (
        f"new flood partials reached the assembler in round 2: {evicted_1} -> {evicted_2} evictions"
    )  # (the honest updates of round 2 may evict what the flood left held in round 1)
    assert link.rejections["unsolicited"] > 0, "nothing was dropped at the gate: the flood was not tested"
    assert not any(assembler.evicted_by[f"{Topics(RUN).base}/node/{n}"] for n in HONEST), (
        f"an honest device's partial was evicted: {dict(assembler.evicted_by)}"
    )


def retained_on(port: int, pattern: str) -> dict[str, bytes]:
    """The retained messages on ``pattern`` now (topic: payload), read by a fresh subscription; complete once
    a marker published after the subscription comes back (the broker sends a subscription's retained
    messages before anything published later)."""
    import uuid

    import paho.mqtt.client as mqtt

    marker, found = f"probe/{uuid.uuid4().hex}", {}
    back, subscribed = threading.Event(), threading.Event()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic == marker:
            back.set()
        elif m.retain and m.payload:
            found[m.topic] = bytes(m.payload)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=marker.replace("/", "-"), clean_session=True)
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe([(pattern, 1), (marker, 1)])
        assert subscribed.wait(5), "no SUBACK"
        client.publish(marker, b"end", qos=1)
        assert back.wait(10), "the marker did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def retain(port: int, topics: list[str], payload: bytes) -> None:
    """Publish ``payload`` retained on each of ``topics`` (a device account: the plain broker has no ACL)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rogue", clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_retained_messages_where_the_protocol_retains_none_are_deleted_and_counted(
    broker: Broker, tmp_path: Path, protocol: str
) -> None:
    # Prepare: a device retained messages before the run, under this run's name and another; a retained
    # status (its Last Will's topic) is the protocol's own
    port, junk, node = broker.port, b"x" * 4096, f"nefl/{RUN}/node/rogue"
    retain(port, ["nefl/other/node/rogue/hello", f"{node}/update"], junk)
    retain(port, [f"{node}/status/chunk/0"], b"its status")
    link = MqttLink("coordinator", BrokerAddress("127.0.0.1", port), RUN, clean=True, protocol=protocol)  # type: ignore[arg-type]
    coordinator = CoordinatorSession(link, RUN, manifest(tmp_path), tmp_path, 4.0, extract)  # type: ignore[arg-type]
    try:
        # Execute: the run starts (its sweep); then the device retains during the run, and a round begins
        coordinator.open()
        swept = retained_on(port, "nefl/+/node/rogue/#")
        before_round = coordinator.offenders(budget=0), coordinator.rejections().get("retained")
        retain(port, [f"{node}/hello", f"{node}/status"], junk)
        if protocol == "5":  # Retain As Published: seen as it is published, before any round
            wait_for(lambda: not set(retained_on(port, f"{node}/#")) - {f"{node}/status/chunk/0"}, 10, "deletion")
        coordinator.listen(frozenset())  # a round: its renewed subscriptions show what is retained now
        wait_for(lambda: not set(retained_on(port, f"{node}/#")) - {f"{node}/status/chunk/0"}, 10, "deletion")
        during_run = coordinator.offenders(budget=0), coordinator.rejections().get("retained")
    finally:
        coordinator.close("test over")

    # Assert: what was retained where the protocol retains nothing is gone, in every run, and its device counted
    # as its refused traffic (the engine quarantines a device over budget); its retained status stays
    assert swept == {f"{node}/status/chunk/0": b"its status"}, f"the sweep at the start left {sorted(swept)}"
    assert before_round == (["rogue"], 2), f"offenders and messages deleted by the sweep: {before_round}"
    assert during_run == (["rogue"], 2), f"offenders and messages deleted during the run: {during_run}"
    assert retained_on(port, f"{node}/#") == {f"{node}/status/chunk/0": b"its status"}
