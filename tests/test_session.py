"""The protocol above the transport, without a broker: the coordinator's session (``coordinator.session``) and
the device's (``edge_client.session``) over the in-memory link (``core.link.MemoryLink`` on a
``MemoryBroker``), with the real wire frames, signatures and checks.

The device here is a script on :class:`DeviceSession` (no ONNX Runtime): it answers what each test says, so
that the coordinator's rules (answers matched to tasks, replays, declines, evaluation checks) and the
device's (replayed and stale tasks refused) can be driven message by message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.client import topic_matches_sub

from nefl_edge.coordinator.grid import EvalRequest, Instruction
from nefl_edge.coordinator.session import Answers, CoordinatorSession
from nefl_edge.core.link import Link, MemoryBroker, MemoryLink, topic_matches
from nefl_edge.core.mqtt import BrokerAddress, MqttLink
from nefl_edge.core.schemas import (
    BnCount,
    Control,
    DeviceProfile,
    EvalTask,
    FileEntry,
    Hello,
    Manifest,
    ManifestMessage,
    Metrics,
    ParamEntry,
    Status,
    SubmodelEntry,
    SubmodelEval,
    Task,
    TrainConfig,
    Update,
    Weights,
)
from nefl_edge.core.signing import Keyring, Signer, signer_policy
from nefl_edge.core.wire import Topics, encode, pack_tensors, sha256, tensor_parts
from nefl_edge.edge_client.session import Admission, CannotTakePart, DeviceSession, RunEnded

RUN = "sess"
SHAPES = {0: (2, 3), 1: (4, 3)}  # the one tensor "w" of submodel 0 and of submodel 1
PROFILE = DeviceProfile(
    arch="x86_64", system="Linux", python="3", cores=2, memory_mb=512, onnxruntime="1", backend="onnxruntime"
)
METRICS = Metrics(loss_first=2.0, loss_last=1.0, accuracy=0.5, steps=3, seconds=0.1)


def manifest(folder: Path) -> Manifest:
    """Two submodels with one tensor each, and one small artifact file each, written to ``folder``."""
    subs = []
    for k, shape in SHAPES.items():
        data = f"graph {k}".encode()
        (folder / f"g{k}.onnx").write_bytes(data)
        subs.append(
            SubmodelEntry(
                index=k,
                key=sha256(f"arch {k}".encode()),
                width=0.5 * (k + 1),
                blocks=[[0]],
                gamma=0.5 * (k + 1),
                mflops=1.0 + k,
                param_count=int(np.prod(shape)),
                files={"training": FileEntry(name=f"g{k}.onnx", sha256=sha256(data), size=len(data))},
                params=[ParamEntry(name="w", shape=shape, kind="consistent", trainable=True)],
            )
        )
    return Manifest(model={}, input_shape=(1, 28, 28), num_classes=10, train=TrainConfig(), opset=17, submodels=subs)


def extract(state: float, k: int) -> dict[str, np.ndarray]:
    """The test's "global state" is one number; submodel ``k``'s weights are that number in its shape."""
    return {"w": np.full(SHAPES[k], state + k, np.float32)}


class Fleet:
    """A coordinator session and device sessions on one in-memory broker (unsigned, or signed with a key per
    device and one for the coordinator, verified on both sides)."""

    def __init__(self, folder: Path, signed: bool = False, deadline_s: float = 5.0) -> None:
        self.broker = MemoryBroker()
        self.signed = signed
        self.keys = {"coordinator": Ed25519PrivateKey.generate()}
        self.manifest = manifest(folder)
        link = self.link("coordinator", "coordinator")
        self.coordinator = CoordinatorSession(link, RUN, self.manifest, folder, deadline_s, extract)  # type: ignore[arg-type]
        self.coordinator.open()
        self.devices: dict[str, DeviceSession] = {}

    def link(self, me: str, coordinator_key: str) -> MemoryLink:
        if not self.signed:
            return MemoryLink(self.broker, RUN)
        keyring = Keyring({name: key.public_key() for name, key in self.keys.items()})
        return MemoryLink(
            self.broker,
            RUN,
            signer=Signer(self.keys[me], me),
            keyring=keyring,
            sender_of=signer_policy(coordinator_key),
        )

    def join(self, node: str) -> DeviceSession:
        """A device that joins: its session has the manifest and said hello; the coordinator counts it online."""
        self.keys[node] = Ed25519PrivateKey.generate()
        if self.signed:  # the coordinator learns the device's key (enrolment)
            self.coordinator.link.receiver.keyring.add(node, self.keys[node].public_key())  # type: ignore[attr-defined]
        device = DeviceSession(self.link(node, "coordinator"), RUN, node)
        device.subscribe_run()
        device.link.connect()
        assert device.wait_manifest(5.0) is not None, f"{node} got no manifest"
        device.hello = Hello(run=RUN, node=node, profile=PROFILE, num_samples=10)
        device.announce()
        self.devices[node] = device
        self.coordinator.clients(len(self.devices), 5.0)
        return device

    def task(self, node: str, timeout: float = 5.0) -> Any:
        """The next task the device's session takes (refused ones are skipped and recorded)."""
        device = self.devices[node]
        while True:
            item = device.next(timeout)
            assert item is not None, f"{node} got no task within {timeout} s"
            taken = device.handle(*item)
            if taken is not None:
                return taken


def in_thread(work: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``work`` beside the coordinator's collection loop; the returned call joins it and re-raises."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(10.0)
        assert not thread.is_alive(), "the device script did not finish"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join


# --- the link ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["a/b/c", "a/+/c", "a/#", "#", "+/+/+", "+", "a/b/#", "a/b/c/#", "+/b/+", "a/+", "$SYS/#", "+/x/#"],
)
def test_topic_matching_agrees_with_paho(pattern: str) -> None:
    topics = ["a/b/c", "a/b", "a", "a/b/c/d", "x/b/c", "a/x/c", "$SYS/x", "b/x/y", "a//c", "/a"]

    ours = {t: topic_matches(pattern, t) for t in topics}

    assert ours == {t: topic_matches_sub(pattern, t) for t in topics}, f"filter {pattern!r} matches differently"


def test_the_memory_link_keeps_retained_chunks_and_clears_them(tmp_path: Path) -> None:
    # Prepare: a publisher with 1 KiB frames, so a 4 KiB body travels as several retained chunks
    broker = MemoryBroker()
    sender, early = MemoryLink(broker, RUN, chunk_size=1024), MemoryLink(broker, RUN)
    sender.connect()
    early.subscribe("nefl/sess/weights/+")
    early.connect()
    body = bytes(range(256)) * 16
    message = Weights(run=RUN, round=1, submodel=3)

    # Execute: publish retained, a late subscriber joins, then the publisher clears what it retained
    sender.publish("nefl/sess/weights/3", message, body, retain=True)
    late = MemoryLink(broker, RUN)
    late.subscribe("nefl/sess/weights/3")
    late.connect()
    got_early, got_late = early.next(1.0), late.next(1.0)
    sent_chunks = sum(1 for t in broker._retained if t.startswith("nefl/sess/weights/3/chunk/"))
    sender.clear_retained("nefl/sess/weights/3")
    after = MemoryLink(broker, RUN)
    after.subscribe("nefl/sess/weights/3")
    after.connect()

    # Assert
    chunks = [t for t in broker._retained if t.startswith("nefl/sess/weights/3/chunk/")]
    assert got_early is not None and got_early[0] == "nefl/sess/weights/3" and got_early[2] == body
    assert got_late is not None and got_late[2] == body, "a late subscriber did not get the retained message"
    assert sent_chunks >= 5, f"the body was not chunked: {sent_chunks} chunks"
    assert chunks == [], f"chunks left after clear_retained: {chunks}"
    assert after.next(0.1) is None, "a cleared retained message was delivered"


class ExactRetainedBroker(MemoryBroker):
    """A broker that, like RabbitMQ's MQTT plugin (3.10 to 3.13), sends a retained message only to a filter that
    is exactly its topic, never through a wildcard."""

    def retained(self, filters: Sequence[str]) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self._retained.items() if t in filters]


def test_retained_chunks_arrive_through_exact_subscriptions_only(tmp_path: Path) -> None:
    # Prepare: a 4 KiB retained message in 1 KiB frames on a broker that sends retained messages only to
    # exact filters
    broker = ExactRetainedBroker()
    sender = MemoryLink(broker, RUN, chunk_size=1024)
    sender.connect()
    body = bytes(range(256)) * 16
    sender.publish("nefl/sess/weights/3", Weights(run=RUN, round=1, submodel=3), body, retain=True)
    chunks = sum(1 for t in broker._retained if t.startswith("nefl/sess/weights/3/chunk/"))

    # Execute: a wildcard subscriber (the control: it gets nothing) and an exact one join late
    wildcard, exact = MemoryLink(broker, RUN), MemoryLink(broker, RUN)
    wildcard.subscribe("nefl/sess/weights/+")
    exact.subscribe("nefl/sess/weights/3")
    wildcard.connect()
    exact.connect()
    got = exact.next(1.0)

    # Assert: the exact subscriber read the chunk count from chunk 0, subscribed the rest, and dropped them after
    assert chunks >= 5, f"the body was not chunked: {chunks} chunks"
    assert wildcard.next(0.1) is None, "the broker sent a retained message through a wildcard"
    assert got is not None and got[2] == body, f"the retained message did not arrive whole: {got}"
    left = sorted(exact._filters_now)
    assert left == ["nefl/sess/weights/3", "nefl/sess/weights/3/chunk/0"], f"chunk subscriptions left: {left}"


def test_both_links_implement_the_link_interface() -> None:
    assert isinstance(MemoryLink(MemoryBroker(), RUN), Link)
    assert isinstance(MqttLink("x", BrokerAddress("127.0.0.1", 1), RUN), Link)


def test_a_dropped_memory_link_publishes_its_last_will() -> None:
    broker = MemoryBroker()
    status = Topics(RUN).node("pi", "status")
    watcher = MemoryLink(broker, RUN)
    watcher.subscribe(Topics(RUN).all_nodes("status"))
    watcher.connect()
    device = MemoryLink(broker, RUN, will=(status, encode(Status(run=RUN, node="pi", state="lost"))))
    device.connect()

    device.drop()
    item = watcher.next(1.0)

    assert item is not None and isinstance(item[1], Status) and item[1].state == "lost", f"no Last Will: {item}"


# --- the protocol ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_a_task_is_answered_and_the_update_comes_back(tmp_path: Path, signed: bool) -> None:
    # Prepare: one device joined; it will train submodel 1 by adding 1 to the weights it is sent
    fleet = Fleet(tmp_path, signed=signed)
    device = fleet.join("pi-a")

    def answer() -> np.ndarray:
        task = fleet.task("pi-a")
        sub = fleet.manifest.submodels[task.submodel]
        weights = device.weights(sub, task.round, task.weights_sha256, 5.0)
        trained = {"w": weights["w"] + 1}
        device.send_update(task, sub.index, 7, METRICS, tensor_parts(trained))
        return weights["w"]

    # Execute
    join = in_thread(answer)
    outcomes = list(fleet.coordinator.run(4, 2.0, [Instruction("pi-a", 1, TrainConfig())]))  # type: ignore[arg-type]
    received = join()

    # Assert: the device got submodel 1 of state 2.0 (3.0 in shape 4x3); the coordinator got it back + 1
    (outcome,) = outcomes
    assert np.array_equal(received, np.full((4, 3), 3.0, np.float32)), "the device got other weights"
    assert (outcome.node, outcome.submodel, outcome.status, outcome.num_samples) == ("pi-a", 1, "updated", 7)
    assert outcome.tensors is not None and np.array_equal(outcome.tensors["w"], received + 1), "update changed"
    assert fleet.coordinator.rejections() == {}, "a clean round counted rejections"


def test_replayed_and_foreign_answers_are_refused_and_the_real_one_counts(tmp_path: Path) -> None:
    # Prepare: two devices, one task each; pi-a replays an update of an old round, sends an update that
    # names pi-b on its own stream, answers properly and then once more; pi-b declines.
    fleet = Fleet(tmp_path)
    a, b = fleet.join("pi-a"), fleet.join("pi-b")
    topics = Topics(RUN)
    body = pack_tensors({"w": np.zeros(SHAPES[0], np.float32)})

    def script_a() -> None:
        task = fleet.task("pi-a")
        old = Update(
            run=RUN, node="pi-a", task_id="0123456789abcdef", round=task.round - 1, submodel=0, num_samples=99,
            metrics=METRICS,
        )  # fmt: skip
        a.link.publish(topics.node("pi-a", "update"), old, body)
        forged = Update(
            run=RUN, node="pi-b", task_id=task.task_id, round=task.round, submodel=0, num_samples=3, metrics=METRICS
        )
        a.link.publish(topics.node("pi-a", "update"), forged, body)  # refused by the link: wrong_topic
        a.send_update(task, 0, 3, METRICS, body)
        a.send_update(task, 0, 3, METRICS, body)  # a duplicate of a resolved answer

    def script_b() -> None:
        task = fleet.task("pi-b")
        b.decline(task, "too slow for this deadline")

    # Execute
    joins = [in_thread(script_a), in_thread(script_b)]
    instructions = [Instruction("pi-a", 0, TrainConfig()), Instruction("pi-b", 0, TrainConfig())]
    outcomes = {o.node: o for o in fleet.coordinator.run(5, 0.0, instructions)}  # type: ignore[arg-type]
    for join in joins:
        join()
    while (late := fleet.coordinator.next(0.3)) is not None:  # what came after the round was resolved
        fleet.coordinator.answers.update(5, late, {}, 0.0)

    # Assert
    assert outcomes["pi-a"].status == "updated" and outcomes["pi-a"].num_samples == 3, "not the real answer"
    assert outcomes["pi-b"].status == "declined" and "too slow" in outcomes["pi-b"].reason
    rejections = fleet.coordinator.rejections()
    assert rejections.get("stale") == 2, f"the old-round update and the duplicate: {rejections}"
    assert rejections.get("wrong_topic") == 1, f"the update naming pi-b on pi-a's topic: {rejections}"


def test_an_answer_on_another_devices_stream_is_refused() -> None:
    # Prepare: pi-a has a pending task; its answer comes on pi-b's update stream (node says pi-a)
    answers = Answers()
    task = Task(
        run=RUN, node="pi-a", task_id="t1", round=2, submodel=0, weights_sha256="0" * 64, train=TrainConfig(),
        deadline_s=5,
    )  # fmt: skip
    pending = {"pi-a": task}
    update = Update(run=RUN, node="pi-a", task_id="t1", round=2, submodel=0, num_samples=3, metrics=METRICS)
    body = pack_tensors({"w": np.zeros(SHAPES[0], np.float32)})

    # Execute
    foreign = answers.update(2, (Topics(RUN).node("pi-b", "update"), update, body), pending, 0.0)
    own = answers.update(2, (Topics(RUN).node("pi-a", "update"), update, body), pending, 0.0)

    # Assert
    assert foreign is None and answers.rejections == {"unknown_sender": 1}
    assert own is not None and own.status == "updated" and pending == {}, "the real answer was not matched"


def test_an_evaluation_with_unasked_statistics_is_rejected(tmp_path: Path) -> None:
    # Prepare: evaluate tasks that ask for results only; pi-a also sends BatchNorm statistics, pi-b does not
    fleet = Fleet(tmp_path)
    devices = {n: fleet.join(n) for n in ("pi-a", "pi-b")}
    stats = {"0/bn.mean_sum": np.zeros(3, np.float32), "0/bn.var_sum": np.ones(3, np.float32)}

    def script(node: str, extra: bool) -> Callable[[], EvalTask]:
        def run() -> EvalTask:
            task = fleet.task(node)
            result = [SubmodelEval(submodel=0, loss=0.5, correct=3, count=4)]
            counts = [BnCount(submodel=0, batches=1)] if extra else []
            devices[node].send_evaluation(task, result, counts, pack_tensors(stats) if extra else b"")
            return task  # type: ignore[no-any-return]

        return run

    # Execute
    joins = [in_thread(script("pi-a", True)), in_thread(script("pi-b", False))]
    requests = [EvalRequest(n, (0,), True, False, 0.2, 8) for n in ("pi-a", "pi-b")]
    outcomes = {o.node: o for o in fleet.coordinator.evaluate(6, 1.0, requests)}  # type: ignore[arg-type]
    tasks = [join() for join in joins]

    # Assert
    assert all(isinstance(t, EvalTask) and t.evaluate and not t.bn_stats for t in tasks), tasks
    assert outcomes["pi-a"].status == "rejected" and outcomes["pi-a"].reason.startswith("unasked"), outcomes["pi-a"]
    assert outcomes["pi-b"].status == "evaluated" and outcomes["pi-b"].results[0].correct == 3, outcomes["pi-b"]
    assert outcomes["pi-b"].results[0].loss_sum == pytest.approx(0.5 * 4), "loss is a mean on the wire, a sum here"


def test_a_device_that_says_nothing_is_dropped_at_the_deadline(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, deadline_s=0.5)
    fleet.join("pi-a")

    (outcome,) = list(fleet.coordinator.run(1, 0.0, [Instruction("pi-a", 0, TrainConfig())]))  # type: ignore[arg-type]

    assert outcome.status == "dropped" and "deadline" in outcome.reason, outcome


# --- the device's state machine ----------------------------------------------------------------------------


def coordinator_task(fleet: Fleet, node: str, round_: int, task_id: str, sent_at: float) -> Task:
    task = Task(
        run=RUN, node=node, task_id=task_id, round=round_, submodel=0, weights_sha256="0" * 64, train=TrainConfig(),
        deadline_s=5, sent_at=sent_at,
    )  # fmt: skip
    fleet.coordinator.link.publish(Topics(RUN).node(node, "task"), task)
    return task


def test_the_device_refuses_replayed_and_stale_tasks(tmp_path: Path) -> None:
    # Prepare: the device joined with the manifest (its sent_at is the join time); round 3 is taken
    fleet = Fleet(tmp_path)
    device = fleet.join("pi-a")
    joined = device.joined_at
    coordinator_task(fleet, "pi-a", 3, "r3", joined + 30)
    first = fleet.task("pi-a")

    # Execute: a replay of that task, an older round, a task of an earlier run, then a fresh one
    coordinator_task(fleet, "pi-a", 3, "r3", joined + 30)
    coordinator_task(fleet, "pi-a", 2, "r2", joined + 20)
    coordinator_task(fleet, "pi-a", 5, "old", joined - 10)
    coordinator_task(fleet, "pi-a", 4, "r4", joined + 40)
    taken = fleet.task("pi-a")

    # Assert
    assert (first.task_id, taken.task_id) == ("r3", "r4")
    assert device.refused == [
        "this task was done already (a replay)",
        "round 2 is older than round 3, already seen in this run (a replay)",
        "it was sent before this run's manifest (a task of an earlier run, replayed)",
    ]


def test_the_device_ends_on_the_runs_end_but_not_on_a_replayed_one(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    device = fleet.join("pi-a")
    control = Topics(RUN).control

    fleet.coordinator.link.publish(control, Control(run=RUN, action="end", sent_at=device.joined_at - 1))
    replayed = device.next(1.0)
    assert replayed is not None and device.handle(*replayed) is None, "a replayed end was not ignored"
    fleet.coordinator.close("finished")
    ended: Optional[RunEnded] = None
    try:
        while (item := device.next(1.0)) is not None:
            device.handle(*item)
    except RunEnded as exc:
        ended = exc

    assert ended is not None and str(ended) == "finished", "the run's end did not end the device's session"


def test_an_unsigned_task_is_refused_by_a_device_that_verifies(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, signed=True)
    device = fleet.join("pi-a")
    rogue = MemoryLink(fleet.broker, RUN)  # a publisher without the coordinator's key
    rogue.connect()

    rogue.publish(
        Topics(RUN).node("pi-a", "task"),
        Task(
            run=RUN, node="pi-a", task_id="forged", round=9, submodel=0, weights_sha256="0" * 64,
            train=TrainConfig(), deadline_s=5,
        ),
    )  # fmt: skip

    assert device.next(0.3) is None, "an unsigned task reached the device's session"
    assert sum(device.link.rejections.values()) == 1, f"not counted: {device.link.rejections}"


# --- a device that cannot take part --------------------------------------------------------------------------

ENROLLED = "enrolled"  # the device trusts the run's coordinator key
OTHER = "other"  # the device trusts another coordinator's key
NOT_FITTING = "3 x 32 x 32 images do not fit the model's input"


def signed_link(broker: MemoryBroker, key: Optional[Ed25519PrivateKey]) -> MemoryLink:
    """A coordinator's link that signs with ``key`` (unsigned without)."""
    if key is None:
        return MemoryLink(broker, RUN)
    return MemoryLink(
        broker, RUN, signer=Signer(key, "coordinator"), keyring=Keyring(), sender_of=signer_policy("coordinator")
    )


def waiting_device(
    broker: MemoryBroker, trusts: Optional[Ed25519PrivateKey], fits: Callable[[Manifest], str] = lambda m: ""
) -> DeviceSession:
    """A device connected and subscribed before any coordinator: enrolled (it verifies with ``trusts``'s public
    key) or not (``trusts`` None); ``fits`` says why its data does not fit a manifest's model."""
    keyring = None if trusts is None else Keyring({"coordinator": trusts.public_key()})
    sender_of = None if keyring is None else signer_policy("coordinator")
    link = MemoryLink(broker, RUN, keyring=keyring, sender_of=sender_of)
    device = DeviceSession(link, RUN, "pi-a", admission=Admission(RUN, keyring, "coordinator", fits))
    device.subscribe_run()
    link.connect()
    return device


@pytest.mark.parametrize(
    ("signed", "trusted", "fits", "refusal"),
    [
        (True, None, "", "is signed by its coordinator and this device is not enrolled"),
        (
            True,
            OTHER,
            "",
            "is not signed by the coordinator this device is enrolled with (bad signature by key 'coordinator'",
        ),
        (False, ENROLLED, "", "is not signed by the coordinator this device is enrolled with (message is not signed)"),
        (False, None, NOT_FITTING, f"trains a model this device's data does not fit: {NOT_FITTING}"),
        (True, ENROLLED, "", ""),
        (False, None, "", ""),
    ],
    ids=["not-enrolled-signed-run", "another-coordinator", "unsigned-run", "data-does-not-fit", "enrolled", "open"],
)
def test_a_device_waiting_before_the_run_exists_stops_when_its_manifest_shows_it_cannot_take_part(
    tmp_path: Path, signed: bool, trusted: Optional[str], fits: str, refusal: str
) -> None:
    # Prepare: the device waits for its run before any coordinator is there
    broker = MemoryBroker()
    key = Ed25519PrivateKey.generate()
    trusts = {None: None, ENROLLED: key, OTHER: Ed25519PrivateKey.generate()}[trusted]
    device = waiting_device(broker, trusts, lambda m: fits)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            outcome["manifest"] = device.wait_manifest(10.0)
        except CannotTakePart as exc:
            outcome["refused"] = str(exc)
        outcome["at"] = time.monotonic()

    waiting = threading.Thread(target=wait)
    waiting.start()

    # Execute: the coordinator announces the run (its retained manifest)
    announced = time.monotonic()
    CoordinatorSession(
        signed_link(broker, key if signed else None), RUN, manifest(tmp_path), tmp_path, 5.0, extract
    ).open()  # type: ignore[arg-type]
    waiting.join(15.0)

    # Assert: refused with the reason within the session's 1 s poll (and some slack), or joined
    assert "at" in outcome, "wait_manifest did not return within 15 s"
    if refusal:
        assert refusal in outcome.get("refused", ""), f"refusal {outcome.get('refused')!r}, wanted {refusal!r}"
        assert outcome["at"] - announced < 3.0, f"refused {outcome['at'] - announced:.1f} s after the announcement"
    else:
        assert "refused" not in outcome, f"a run this device can take part in was refused: {outcome['refused']}"
        assert outcome["manifest"] is not None and device.manifest is not None, "the device did not join"


def test_after_the_join_a_forged_manifest_is_only_rejected_and_a_newer_one_is_checked(tmp_path: Path) -> None:
    # Prepare: an enrolled device joined its coordinator's run; its data fits only 10 classes
    broker = MemoryBroker()
    key = Ed25519PrivateKey.generate()
    device = waiting_device(broker, key, lambda m: "" if m.num_classes == 10 else f"{m.num_classes} classes, not 10")
    coordinator = CoordinatorSession(signed_link(broker, key), RUN, manifest(tmp_path), tmp_path, 5.0, extract)  # type: ignore[arg-type]
    coordinator.open()
    assert device.wait_manifest(5.0) is not None, "the device did not join its coordinator's run"
    while device.next(0.2) is not None:  # the coordinator's announce
        pass
    rogue = MemoryLink(broker, RUN)
    rogue.connect()
    manifest_topic = Topics(RUN).manifest
    other = manifest(tmp_path).model_copy(update={"num_classes": 7})

    # Execute: an unsigned manifest (a rogue publisher), then the coordinator's newer one of another model
    rogue.publish(manifest_topic, ManifestMessage(run=RUN), other.to_json().encode(), retain=True)
    forged = device.next(0.3)
    coordinator.link.publish(manifest_topic, ManifestMessage(run=RUN), other.to_json().encode(), retain=True)
    newer = device.next(2.0)

    # Assert: the forged one never reached the session; the newer one stops it
    assert forged is None, f"an unsigned manifest reached a joined, enrolled device: {forged}"
    assert device.link.rejections["unsigned"] == 1, f"not counted as unsigned: {device.link.rejections}"
    assert newer is not None, "the coordinator's newer manifest did not arrive"
    with pytest.raises(CannotTakePart, match="data does not fit: 7 classes, not 10"):
        device.handle(*newer)


def test_run_discovery_sees_a_run_open_and_close_over_the_link(tmp_path: Path) -> None:
    # Prepare: the agent's discovery on the in-memory broker, before any run
    from nefl_edge.edge_client.agent import RunDiscovery
    from nefl_edge.edge_client.client import ClientOptions

    broker = MemoryBroker()
    discovery = RunDiscovery(
        ClientOptions(BrokerAddress("127.0.0.1", 1), "pi-a"), "agent", lambda: MemoryLink(broker, RUN)
    )
    discovery.connect(1.0)
    before = discovery.open_runs()

    # Execute: a coordinator opens run "sess" (retained manifest), then ends it (clears what it retained)
    coordinator = CoordinatorSession(MemoryLink(broker, RUN), RUN, manifest(tmp_path), tmp_path, 5.0, extract)  # type: ignore[arg-type]
    coordinator.open()
    during = discovery.open_runs()
    coordinator.close("finished")
    after = discovery.open_runs()

    # Assert
    assert before == [] and after == [], (before, after)
    assert [run for run, _ in during] == [RUN], f"the open run was not discovered: {during}"
    assert discovery.link is not None and sum(discovery.link.rejections.values()) == 0, "payloads reached the receiver"
