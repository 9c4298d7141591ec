"""Who may sign what: ``core.signing.signer_policy`` is a function of the protocol message (its kind's
``origin`` and its ``node``), not of MQTT topic names. Checked against a naive reference, the rule by topic
name it replaced (written here), over every message kind, three signers and every topic of the layout: a
signed receiver accepts exactly what the old rule and the topic checks accepted."""

from __future__ import annotations

import itertools

import pytest

from nefl_edge.core.link import Receiver
from nefl_edge.core.schemas import (
    MESSAGE_TYPES,
    Artifact,
    Control,
    Decline,
    DeviceProfile,
    EvalTask,
    Evaluation,
    Hello,
    ManifestMessage,
    Message,
    Metrics,
    Status,
    Task,
    TrainConfig,
    Update,
    Weights,
)
from nefl_edge.core.signing import Keyring, Signer, signer_policy
from nefl_edge.core.wire import MESSAGE_KINDS_BY_TOPIC, Topics, encode, frames

RUN = "r1"
T = Topics(RUN)
SIGNERS = {name: Signer.generate(name) for name in ("coord", "n1", "n2")}
KEYRING = Keyring({name: s.public_key for name, s in SIGNERS.items()})
PROFILE = DeviceProfile(arch="x", system="y", python="3", cores=1, memory_mb=1, onnxruntime="1", backend="portable")
METRICS = Metrics(loss_first=1.0, loss_last=0.5, accuracy=0.5, steps=1, seconds=1.0)


def messages(node: str) -> list[Message]:
    """One message of every kind (those about a device about ``node``)."""
    task = {"run": RUN, "node": node, "task_id": "t1", "round": 1}
    return [
        Hello(run=RUN, node=node, profile=PROFILE, num_samples=10),
        Status(run=RUN, node=node, state="online"),
        Task(**task, submodel=0, weights_sha256="a" * 64, train=TrainConfig(), deadline_s=10),
        EvalTask(**task, submodels=[0], weights_sha256=["a" * 64], deadline_s=10),
        Update(**task, submodel=0, num_samples=10, metrics=METRICS),
        Decline(**task, reason="slow"),
        Evaluation(**task),
        Weights(run=RUN, round=1, submodel=0),
        Artifact(run=RUN, name="sub/eval_model.onnx"),
        ManifestMessage(run=RUN),
        Control(run=RUN, action="end"),
    ]


TOPICS = [
    *(T.node(node, kind) for node in ("n1", "n2") for kind in ("hello", "status", "update", "task")),
    T.weights(0),
    T.artifact("b" * 64),
    T.manifest,
    T.control,
    f"nefl/{RUN}/other",
]


def old_rule(topic: str) -> str | None:
    """The reference: the signer the policy by topic name allowed (device topics: the node of the topic;
    coordinator topics: the coordinator; any other topic: nobody)."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[2] == "node" and parts[4] in ("hello", "status", "update"):
        return parts[3]
    if (len(parts) == 5 and parts[2] == "node" and parts[4] == "task") or (
        len(parts) in (3, 4) and parts[2] in ("manifest", "control", "weights", "artifact")
    ):
        return "coord"
    return None


def accepted_by_reference(signer: str, topic: str, message: Message) -> bool:
    """The old receiver: the topic's signer, then the message's kind on the topic's kind, then the node."""
    if old_rule(topic) != signer:
        return False
    parts = topic.split("/")
    topic_kind = parts[4] if parts[2] == "node" else parts[2]
    if message.kind not in MESSAGE_KINDS_BY_TOPIC[topic_kind]:
        return False
    node = getattr(message, "node", None)
    return node is None or (parts[2] == "node" and node == parts[3])


def test_every_message_kind_says_which_side_sends_it() -> None:
    device_kinds = {k for topic in ("hello", "status", "update") for k in MESSAGE_KINDS_BY_TOPIC[topic]}
    for kind, cls in MESSAGE_TYPES.items():
        assert cls.origin in ("device", "coordinator"), f"{kind} has no origin"
        assert (cls.origin == "device") == (kind in device_kinds), f"{kind}: origin {cls.origin}, device topics?"


def test_the_policy_reads_the_message_alone() -> None:
    policy = signer_policy("coord")
    for node in ("n1", "n2"):
        for message in messages(node):
            want = node if type(message).origin == "device" else "coord"
            assert policy(message) == want, f"{type(message).__name__} of {node}: {policy(message)!r}, not {want!r}"
    assert policy(Message(run=RUN)) is None, "a message of no known kind must have no allowed signer"
    with pytest.raises(ValueError):
        signer_policy("not a key id")


def test_a_signed_receiver_accepts_what_the_rule_by_topic_accepted() -> None:
    receiver = Receiver(RUN, keyring=KEYRING, sender_of=signer_policy("coord"), log_burst=0)
    accepted = rejected = 0
    for (name, signer), topic, message in itertools.product(
        SIGNERS.items(), TOPICS, [*messages("n1"), *messages("n2")]
    ):
        before = dict(receiver.rejections)
        got = receiver.receive(topic, frames(signer.seal(topic, encode(message)))[0])
        want = accepted_by_reference(name, topic, message)
        what = f"{type(message).__name__}(node={getattr(message, 'node', None)}) signed by {name} on {topic}"
        assert (got is not None) == want, f"{what}: accepted {got is not None}, reference {want}"
        if got is None:
            new = {k for k, v in receiver.rejections.items() if v != before.get(k, 0)}
            assert new <= {"wrong_signer", "wrong_topic"}, f"{what}: rejected as {new}"
            rejected += 1
        else:
            accepted += 1
    # per node: its 5 device messages and its 2 tasks; the 4 broadcasts are in both nodes' lists
    assert accepted == 2 * (5 + 2 + 4), f"{accepted} accepted"
    assert rejected > 10 * accepted
