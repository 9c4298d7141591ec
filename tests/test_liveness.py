"""Liveness and recovery (issue 22): a device leaves a run whose coordinator went silent (no heartbeat); a
new coordinator of a run name deletes what a dead one retained before it publishes its own; a coordinator
that reconnects asks its pending tasks again, so answers lost meanwhile do not cost the round its deadline.
Over the in-memory link and over a real Mosquitto."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from nefl_edge.coordinator.grid import Instruction
from nefl_edge.coordinator.session import CoordinatorSession
from nefl_edge.core.link import FramedLink, MemoryBroker, MemoryLink
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.schemas import (
    Control,
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
from tests.helpers import Broker

RUN = "live"
SHAPE = (32, 32)  # 4 KiB of weights: five retained chunks of 1 KiB
Links = Callable[[str], FramedLink]
METRICS = Metrics(loss_first=2.0, loss_last=1.0, accuracy=0.5, steps=1, seconds=0.1)


def manifest(folder: Path, graph: bytes) -> Manifest:
    """One submodel whose one artifact is ``graph`` (written to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "g0.onnx").write_bytes(graph)
    sub = SubmodelEntry(
        index=0, key=sha256(b"arch"), width=1.0, blocks=[[0]], gamma=1.0, mflops=1.0, param_count=int(np.prod(SHAPE)),
        files={"training": FileEntry(name="g0.onnx", sha256=sha256(graph), size=len(graph))},
        params=[ParamEntry(name="w", shape=SHAPE, kind="consistent", trainable=True)],
    )  # fmt: skip
    return Manifest(model={}, input_shape=(1, 28, 28), num_classes=10, train=TrainConfig(), opset=17, submodels=[sub])


def extract(state: float, k: int) -> dict[str, np.ndarray]:
    return {"w": np.full(SHAPE, state, np.float32)}


@pytest.fixture(params=["memory", "mosquitto"])
def links(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Links, Callable[[], list[str]]]]:
    """A factory of links (1 KiB chunks) on one broker, and what that broker retains under the run now."""
    if request.param == "memory":
        memory = MemoryBroker()
        yield (lambda name: MemoryLink(memory, RUN, chunk_size=1024)), lambda: sorted(memory._retained)
        return
    broker = Broker(tmp_path / "broker").start()
    try:

        def make(name: str) -> FramedLink:
            return MqttLink(name, BrokerAddress("127.0.0.1", broker.port), RUN, clean=True, chunk_size=1024)

        yield make, lambda: retained_on(broker.port)
    finally:
        broker.stop()


def retained_on(port: int) -> list[str]:
    """The topics under the run that a new subscriber gets retained messages on (all of them: they come
    before a marker this subscriber publishes after subscribing)."""
    got: list[str] = []
    marker, done = f"nefl/{RUN}/marker", threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain and msg.payload:
            got.append(msg.topic)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retained-probe")
    client.on_message = on_message
    client.on_subscribe = lambda c, *args: c.publish(marker, b"x", qos=0)
    client.on_connect = lambda c, u, f, r, p: c.subscribe(f"nefl/{RUN}/#", 0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "the marker did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    return sorted(got)


def test_a_new_coordinator_deletes_what_a_dead_one_retained(
    links: tuple[Links, Callable[[], list[str]]], tmp_path: Path
) -> None:
    # Prepare: coordinator A publishes its run and a round's weights, then dies (its connection ends, nothing
    # is cleared)
    make, retained = links
    old = CoordinatorSession(make("coord-a"), RUN, manifest(tmp_path / "a", b"old graph"), tmp_path / "a", 5, extract)
    old.heartbeat_s = 3600
    old.open()
    old.publish_weights(1, 1.0, {0})
    assert old.link.flush(5.0), "A's publishes were not acknowledged"
    left = retained()
    old._beating.set()
    old.link.close()

    # Execute: coordinator B opens the same run name with another artifact
    new = CoordinatorSession(make("coord-b"), RUN, manifest(tmp_path / "b", b"new graph"), tmp_path / "b", 5, extract)
    new.heartbeat_s = 3600
    new.open()
    assert new.link.flush(5.0), "B's publishes were not acknowledged"
    after = retained()
    new.close("test over")

    # Assert: before, A's manifest, artifact and weights were retained; after, only B's manifest and artifact
    topics = Topics(RUN)
    kinds = {t.split("/")[2] for t in left}
    assert kinds == {"manifest", "artifact", "weights"}, f"what A left: {left}"
    base = (topics.manifest, topics.artifact(sha256(b"new graph")))
    assert after and all(t.startswith(base) for t in after), f"retained after B opened: {after}"
    assert not any(t.startswith(topics.artifact(sha256(b"old graph"))) for t in after), after


def test_a_device_leaves_a_run_whose_coordinator_went_silent(tmp_path: Path) -> None:
    # Prepare: a coordinator beating every 0.1 s; a device that takes 0.6 s of silence as a dead run
    broker = MemoryBroker()
    coordinator = CoordinatorSession(MemoryLink(broker, RUN), RUN, manifest(tmp_path, b"graph"), tmp_path, 5, extract)  # type: ignore[arg-type]
    coordinator.heartbeat_s = 0.1
    coordinator.open()
    device = DeviceSession(MemoryLink(broker, RUN), RUN, "pi")
    device.silent_s = 0.6
    device.subscribe_run()
    device.link.connect()
    assert device.wait_manifest(5.0) is not None, "no manifest"

    # Execute: listen for 1.5 s while the coordinator lives, then while it is dead (no heartbeat, no close)
    beats, alive_until = 0, time.monotonic() + 1.5
    while time.monotonic() < alive_until:
        item = device.next(0.1)
        if item is not None and isinstance(item[1], Control) and item[1].action == "heartbeat":
            beats += 1
            assert device.handle(*item) is None, "a heartbeat is no task"
        assert device.silent() is None, f"left a live run: {device.silent()} ({beats} heartbeats)"
    coordinator._beating.set()
    died = time.monotonic()
    while device.silent() is None and time.monotonic() < died + 5:
        device.next(0.1)
    waited = time.monotonic() - died

    # Assert
    assert beats >= 5, f"only {beats} heartbeats in 1.5 s at one per 0.1 s"
    assert device.silent() is not None, "the device still takes a dead run as alive after 5 s"
    assert 0.5 <= waited <= 2.0, f"the device left {waited:.1f} s after the last heartbeat (silent_s 0.6)"


def test_the_coordinator_asks_again_for_answers_lost_while_it_was_away(tmp_path: Path) -> None:
    # Prepare: a coordinator and one device on an in-memory broker (no persistent sessions: what is published
    # while a link is away is lost, as on a broker restarted without persistence)
    broker = MemoryBroker()
    coordinator = CoordinatorSession(MemoryLink(broker, RUN), RUN, manifest(tmp_path, b"graph"), tmp_path, 30, extract)  # type: ignore[arg-type]
    coordinator.heartbeat_s = 3600
    coordinator.open()
    device = DeviceSession(MemoryLink(broker, RUN), RUN, "pi")
    device.subscribe_run()
    device.link.connect()
    assert device.wait_manifest(5.0) is not None, "no manifest"
    assert device.manifest is not None
    sub = device.manifest.submodels[0]
    asked: list[Task] = []

    def next_task() -> Task:
        while True:
            item = device.next(5.0)
            assert item is not None, "no task"
            taken = device.handle(*item)
            if isinstance(taken, Task):
                return taken

    def script() -> None:
        # the device answers while the coordinator is away (lost), then answers the task it is asked again
        asked.append(next_task())
        weights = device.weights(sub, asked[0].round, asked[0].weights_sha256, 5.0)
        coordinator.link.close()
        device.send_update(asked[0], 0, 5, METRICS, tensor_parts({"w": weights["w"] + 1}))
        coordinator.link.connect()
        asked.append(next_task())
        weights = device.weights(sub, asked[1].round, asked[1].weights_sha256, 5.0)
        device.send_update(asked[1], 0, 5, METRICS, tensor_parts({"w": weights["w"] + 1}))

    # Execute
    thread = threading.Thread(target=script, daemon=True)
    started = time.monotonic()
    thread.start()
    (outcome,) = list(coordinator.run(1, 1.0, [Instruction("pi", 0, TrainConfig())]))  # type: ignore[arg-type]
    seconds = time.monotonic() - started
    thread.join(10)
    coordinator.close("test over")

    # Assert: the round got the answer to the task asked again, long before its 30 s deadline
    assert len(asked) == 2 and asked[0].task_id != asked[1].task_id and asked[1].round == 1, asked
    assert outcome.status == "updated", f"the round lost the answer: {outcome}"
    assert outcome.tensors is not None and np.array_equal(outcome.tensors["w"], np.full(SHAPE, 2.0)), "wrong update"
    assert seconds < 10, f"the round took {seconds:.1f} s (deadline 30 s)"


@pytest.mark.integration
def test_an_agent_leaves_a_dead_run_for_another_announced_one(
    broker: Broker, small_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: run "alpha" announced by a coordinator that says nothing after the device's hello (no
    # heartbeat: as a dead one whose retained manifest stays); an agent in discovery mode that takes 3 s of
    # silence as a dead run
    from nefl_edge.core.data import load_dataset
    from nefl_edge.core.schemas import Hello
    from nefl_edge.edge_client.agent import Agent, AgentOptions
    from nefl_edge.edge_client.client import ClientOptions
    from tests.fakes import StandIn
    from tests.helpers import make_shards

    dead = StandIn(broker, small_artifacts, run="alpha")
    data = load_dataset(make_shards(tmp_path, [100])[0], "train")
    options = ClientOptions(
        BrokerAddress("127.0.0.1", broker.port), "pi-a", "alpha", tmp_path / "cache", threads=1, silent_s=3.0
    )
    agent = Agent(options, data, AgentOptions(broker_wait_s=10.0), pinned=False)
    thread = threading.Thread(target=agent.run, daemon=True)
    live = None
    try:
        # Execute: the agent joins alpha; then run "beta" is announced by a live coordinator
        thread.start()
        joined, _ = dead.expect(Hello, timeout=60)
        started = time.monotonic()
        live = StandIn(broker, small_artifacts, run="beta")
        hello, _ = live.expect(Hello, timeout=60)
        seconds = time.monotonic() - started
    finally:
        agent.stop()
        thread.join(30)
        dead.link.close()
        if live is not None:
            live.end()

    # Assert: it left the silent run after 3 s and said hello in the live one
    states = [(o.state, o.reason) for o in agent.outcomes]
    assert joined.run == "alpha" and states and states[0][0] == "silent", f"the agent's runs: {states}"
    assert hello.run == "beta" and hello.node == "pi-a", hello
    assert 2.0 <= seconds <= 40, f"hello in the live run {seconds:.0f} s after the dead one's last word"


@pytest.mark.integration
def test_a_round_survives_a_broker_restart_while_the_device_answers(broker: Broker, tmp_path: Path) -> None:
    # Prepare: a coordinator and a device on a real Mosquitto without persistence; the device takes its task,
    # then the broker restarts, and the device answers as soon as it is back, before the coordinator is
    address = BrokerAddress("127.0.0.1", broker.port)
    coordinator = CoordinatorSession(
        MqttLink("coord", address, RUN, clean=True), RUN, manifest(tmp_path, b"graph"), tmp_path, 60, extract
    )  # type: ignore[arg-type]
    coordinator.heartbeat_s = 3600
    coordinator.open()
    device = DeviceSession(MqttLink("dev-pi", address, RUN, clean=True), RUN, "pi")
    device.subscribe_run()
    device.link.connect(10)
    assert device.wait_manifest(10.0) is not None and device.manifest is not None, "no manifest"
    sub, stop, asked = device.manifest.submodels[0], threading.Event(), []

    def script() -> None:
        while not stop.is_set():
            item = device.next(0.2)
            task = device.handle(*item) if item is not None else None
            if not isinstance(task, Task):
                continue
            asked.append(task)
            weights = device.weights(sub, task.round, task.weights_sha256, 20.0)
            if len(asked) == 1:  # the coordinator comes back 5 s after the broker, the device within 1 s
                coordinator.link.client.reconnect_delay_set(min_delay=5, max_delay=5)  # type: ignore[attr-defined]
                broker.stop()
                broker.start()
                assert device.link.connected.wait(40), "the device did not reconnect"
            device.send_update(task, 0, 5, METRICS, tensor_parts({"w": weights["w"] + 1}))

    # Execute
    thread = threading.Thread(target=script, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        (outcome,) = list(coordinator.run(1, 1.0, [Instruction("pi", 0, TrainConfig())]))  # type: ignore[arg-type]
        seconds = time.monotonic() - started
    finally:
        stop.set()
        thread.join(30)
        device.link.close()
        coordinator.close("test over")

    # Assert: the answer into the void was asked again, and the round got it well before its 60 s deadline
    assert len(asked) == 2 and asked[0].task_id != asked[1].task_id, f"tasks the device got: {asked}"
    assert outcome.status == "updated", f"the round lost the answer: {outcome} (tasks: {asked})"
    assert outcome.tensors is not None and np.array_equal(outcome.tensors["w"], np.full(SHAPE, 2.0)), "wrong update"
    assert seconds < 45, f"the round took {seconds:.1f} s (deadline 60 s)"
    print(f"round across a broker restart: {seconds:.1f} s, {len(asked)} task(s) sent to the device")


def test_an_answer_to_the_task_id_before_it_was_asked_again_still_counts() -> None:
    # Prepare: pi's task was asked again under a new id; pi answers the first id (it was training it all along)
    from nefl_edge.coordinator.session import Answers
    from nefl_edge.core.schemas import Update

    answers = Answers()
    task = Task(
        run=RUN, node="pi", task_id="new", round=2, submodel=0, weights_sha256="0" * 64, train=TrainConfig(),
        deadline_s=5,
    )  # fmt: skip
    answers.earlier_ids = {"pi": {"old"}}
    stream = Topics(RUN).node("pi", "update")

    def update(task_id: str, round_: int = 2) -> Update:
        return Update(run=RUN, node="pi", task_id=task_id, round=round_, submodel=0, num_samples=3, metrics=METRICS)

    # Execute
    unknown = answers.claim(2, stream, update("other"), {"pi": task})
    earlier = answers.claim(2, stream, update("old"), {"pi": task})
    again = answers.claim(2, stream, update("new"), {})  # the task is resolved: a second answer is stale

    # Assert
    assert unknown is None and earlier == ("pi", task) and again is None, (unknown, earlier, again)
    assert answers.rejections == {"stale": 2}, answers.rejections
