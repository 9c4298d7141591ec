"""Fuzzing every decoder of network input through the entry points the device and the coordinator use.

MQTT payloads go through ``Receiver.receive`` (what ``MqttLink``'s paho callback calls via
``MqttLink.receive``): frames, frame headers, chunk reassembly, signed envelopes and message headers of every
kind. Message bodies go through ``unpack_tensors`` (weights, updates, statistics), ``decode_update`` (an update's
encoding) and ``parse_manifest`` (the manifest).
Every input must end as a value or as a clear rejection (``ProtocolError`` / ``ArtifactError`` with a
non-empty reason); nothing else may escape and no rejection may be an ``internal:`` one.

The default suite runs a few hundred hypothesis examples; ``-m slow`` adds hypothesis runs with more
examples and a seeded mutation loop over more than 100,000 inputs.
"""

from __future__ import annotations

import json
import random
import struct
import time
from typing import Any, Callable, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nefl_edge.core.artifacts import ArtifactError, parse_manifest
from nefl_edge.core.encoding import ENCODINGS, EncodingError, decode_update
from nefl_edge.core.mqtt import Receiver
from nefl_edge.core.schemas import (
    Artifact,
    BnCount,
    Control,
    Decline,
    DeviceProfile,
    EvalTask,
    Evaluation,
    Hello,
    Manifest,
    ManifestMessage,
    Message,
    Metrics,
    Status,
    SubmodelEval,
    Task,
    TrainConfig,
    Update,
    Weights,
)
from nefl_edge.core.signing import Keyring, Signer, signer_policy
from nefl_edge.core.wire import (
    MAGIC_FRAME,
    MAGIC_MESSAGE,
    Assembler,
    ProtocolError,
    Topics,
    encode,
    frames,
    pack_tensors,
    sha256,
    unpack_tensors,
)

RUN = "r1"
T = Topics(RUN)
COORD, DEVICE = Signer.generate("coord"), Signer.generate("n1")
KEYRING = Keyring({"coord": COORD.public_key, "n1": DEVICE.public_key})

_MESSAGES: dict[str, tuple[str, Message]] = {
    "hello": (
        T.node("n1", "hello"),
        Hello(
            run=RUN,
            node="n1",
            profile=DeviceProfile(
                arch="x86_64", system="Linux", python="3.11", cores=4, memory_mb=1024, onnxruntime="1.19", backend="ort"
            ),
            num_samples=100,
            tier=1,
        ),
    ),
    "status": (T.node("n1", "status"), Status(run=RUN, node="n1", state="online")),
    "task": (
        T.node("n1", "task"),
        Task(
            run=RUN,
            node="n1",
            task_id="t1",
            round=2,
            submodel=1,
            weights_sha256="a" * 64,
            train=TrainConfig(max_steps=3),
            deadline_s=30,
        ),
    ),
    "update": (
        T.node("n1", "update"),
        Update(
            run=RUN,
            node="n1",
            task_id="t1",
            round=2,
            submodel=1,
            num_samples=50,
            metrics=Metrics(loss_first=2.0, loss_last=1.0, accuracy=0.5, steps=3, seconds=1.5),
        ),
    ),
    "decline": (T.node("n1", "update"), Decline(run=RUN, node="n1", task_id="t1", round=2, reason="slow")),
    "evaluate": (
        T.node("n1", "task"),
        EvalTask(
            run=RUN,
            node="n1",
            task_id="t2",
            round=2,
            submodels=[0, 1],
            weights_sha256=["a" * 64, "b" * 64],
            bn_stats=True,
            eval_fraction=0.1,
            bn_max_batches=16,
            deadline_s=30,
        ),
    ),
    "evaluation": (
        T.node("n1", "update"),
        Evaluation(
            run=RUN,
            node="n1",
            task_id="t2",
            round=2,
            results=[SubmodelEval(submodel=0, loss=0.5, correct=40, count=50)],
            bn=[BnCount(submodel=1, batches=4)],
        ),
    ),
    "weights": (T.weights(1), Weights(run=RUN, round=2, submodel=1)),
    "artifact": (T.artifact("b" * 64), Artifact(run=RUN, name="sub-1/training.onnx")),
    "manifest": (T.manifest, ManifestMessage(run=RUN)),
    "control": (T.control, Control(run=RUN, action="end", reason="done")),
}
DEVICE_KINDS = ("hello", "status", "update", "decline", "evaluation")
# a fixed send time, so that hypothesis sees the same inputs when it replays an example
MESSAGES = {k: (topic, m.model_copy(update={"sent_at": 1.0})) for k, (topic, m) in _MESSAGES.items()}
TOPICS = sorted({topic for topic, _ in MESSAGES.values()} | {f"{T.node('n1', 'status')}/chunk/0", "other/topic"})
TENSORS = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "bn.bias": np.ones(3, np.float32)}
BODY = pack_tensors(TENSORS)

MANIFEST = Manifest(
    model={"name": "resnet-small", "widths": [8, 16]},
    input_shape=(1, 28, 28),
    num_classes=10,
    train=TrainConfig(),
    opset=17,
    submodels=[
        {
            "index": 0,
            "key": "c" * 64,
            "width": 0.5,
            "blocks": [[0, 1], [0]],
            "gamma": 1.0,
            "mflops": 1.5,
            "param_count": 1000,
            "files": {"training": {"name": "sub-c/training.onnx", "sha256": "d" * 64, "size": 10}},
            "params": [{"name": "conv.weight", "shape": [4, 1, 3, 3], "kind": "consistent", "trainable": True}],
        }
    ],
)
MANIFEST_JSON = MANIFEST.to_json()

NASTY_LITERALS = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 5000,
    "-" + "9" * 50,
    "1" + "0" * 400 + ".5",
    "true",
    "null",
    "[" * 3000,
    "{" * 3000,
    '"\\ud800"',
    '"' + "x" * 70000 + '"',
    "[]",
    "{}",
    '""',
    "0.1",
    "-0",
    "18446744073709551616",
]

FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SLOW = settings(FAST, max_examples=10_000)


# --- oracles -------------------------------------------------------------------------------------------------


def signed_receiver(assembler: Optional[Assembler] = None) -> Receiver:
    return Receiver(RUN, assembler, KEYRING, signer_policy("coord"))


def drive(receiver: Receiver, topic: str, payload: bytes) -> Optional[Message]:
    """Feed one payload exactly as the MQTT callback does; check the outcome is a message or a clear
    rejection. Returns the message, if any."""
    before = sum(receiver.rejections.values())
    got = receiver.receive(topic, payload)
    rejected = sum(receiver.rejections.values()) - before
    if rejected:
        assert got is None and receiver.last_rejection is not None
        reason, text = receiver.last_rejection
        assert not reason.startswith("internal:"), f"{reason}: {text} (payload {payload[:200]!r})"
        assert reason and text.strip()
    if got is None:
        return None
    stream, message, body = got
    assert message.run == RUN and isinstance(body, bytes) and stream
    return message


def check_tensors(body: bytes) -> None:
    try:
        tensors = unpack_tensors(body)
    except ProtocolError as exc:
        assert str(exc).strip() and exc.reason == "tensors"
        return
    for name, value in tensors.items():
        assert isinstance(name, str) and isinstance(value, np.ndarray)


def check_manifest(text: str) -> None:
    try:
        manifest = parse_manifest(text, "the manifest from the broker")
    except ArtifactError as exc:
        assert str(exc).strip()
        return
    assert isinstance(manifest, Manifest)


def framed(header: bytes, chunk: bytes = b"") -> bytes:
    return MAGIC_FRAME + struct.pack(">I", len(header)) + header + chunk


def raw_message(header: bytes, body: bytes = b"") -> bytes:
    return MAGIC_MESSAGE + struct.pack(">I", len(header)) + header + body


def header_of(message: Message, body: bytes = b"") -> dict[str, Any]:
    raw = encode(message, body)
    return json.loads(raw[8 : 8 + struct.unpack(">I", raw[4:8])[0]])  # type: ignore[no-any-return]


# --- strategies ----------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)


def dump(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def mutated_json(draw: st.DrawFn, base: dict[str, Any], keys: list[str]) -> bytes:
    """``base`` with fields dropped, replaced by any JSON value or by a nasty literal, or extra fields."""
    header = dict(base)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*keys, "extra", ""]))
        action = draw(st.sampled_from(["drop", "value", "nasty"]))
        if action == "drop":
            header.pop(key, None)
        elif action == "value":
            header[key] = draw(json_values)
        else:
            header[key] = f"@@{draw(st.sampled_from(NASTY_LITERALS))}@@"
    text = dump(header)
    for literal in NASTY_LITERALS:
        text = text.replace(dump(f"@@{literal}@@"), literal)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", ",", "]", '"', "\\", "\x00", "\u2028"])) + text[cut:]
    return text.encode("utf-8", "surrogatepass")


def valid_frame_header(data: bytes, chunk: int = 1024) -> dict[str, Any]:
    raw = frames(data, chunk)[0]
    return json.loads(raw[8 : 8 + struct.unpack(">I", raw[4:8])[0]])  # type: ignore[no-any-return]


# --- default-suite fuzz tests (a few hundred examples in all) -----------------------------------------------


@FAST
@given(topic=st.sampled_from(TOPICS), payload=st.binary(max_size=2048))
def test_random_bytes(topic: str, payload: bytes) -> None:
    drive(Receiver(RUN), topic, payload)
    drive(signed_receiver(), topic, MAGIC_FRAME + payload)


@FAST
@given(st.data())
def test_frame_headers(data: st.DataObject) -> None:
    topic, message = MESSAGES[data.draw(st.sampled_from(sorted(MESSAGES)))]
    inner = encode(message)
    header = data.draw(mutated_json(valid_frame_header(inner), ["msg", "i", "n", "size", "chunk", "sha256"]))

    drive(Receiver(RUN), topic, framed(header, inner))


@FAST
@given(st.data())
def test_message_headers_of_every_kind(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(MESSAGES)))
    topic, message = MESSAGES[kind]
    base = header_of(message)
    header = data.draw(mutated_json(base, sorted(base)))
    signed = data.draw(st.booleans())
    payload = raw_message(header)
    if signed:
        payload = (DEVICE if kind in DEVICE_KINDS else COORD).seal(topic, payload)

    got = drive(signed_receiver() if signed else Receiver(RUN), topic, frames(payload)[0])

    assert got is None or got.kind in (kind, "decline", "update")


@st.composite
def reassembly_plan(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], bool]:
    """Frames of two real messages and lies about them, in any order, with duplicates and gaps."""
    first = encode(MESSAGES["update"][1], draw(st.binary(min_size=0, max_size=4000)))
    second = encode(MESSAGES["decline"][1])
    parts = frames(first, 1024) + frames(second, 1024)
    liars = []
    for _ in range(draw(st.integers(0, 3))):
        frame = draw(st.sampled_from(parts))
        size = struct.unpack(">I", frame[4:8])[0]
        head = json.loads(frame[8 : 8 + size])
        key = draw(st.sampled_from(["size", "n", "i", "chunk", "sha256", "msg"]))
        head[key] = draw(
            st.sampled_from([0, 1, -1, 1024, 1025, 4096, 10**6, head.get(key), "0" * 64, "f" * 32])
            | st.integers(-5, 10)
        )
        chunk = frame[8 + size :]
        if draw(st.booleans()):
            chunk = chunk[: draw(st.integers(0, len(chunk)))] + draw(st.binary(max_size=8))
            head["chunk_sha256"] = sha256(chunk)
        raw = json.dumps(head).encode()
        liars.append(framed(raw, chunk))
    order = draw(st.lists(st.sampled_from(parts + liars), max_size=20)) + draw(st.permutations(parts))
    return order, [first, second], draw(st.booleans())


@FAST
@given(reassembly_plan())
def test_chunk_reassembly(plan: tuple[list[bytes], list[bytes], bool]) -> None:
    order, originals, small_caps = plan
    assembler = (
        Assembler(max_partials_per_sender=1, max_bytes_per_sender=8192, max_partials=2, max_bytes=8192)
        if small_caps
        else Assembler()
    )
    receiver = Receiver(RUN, assembler)
    want = {originals[0][-20:], originals[1][-20:]}
    for frame in order:
        stream = T.node("n1", "update")
        got = receiver.receive(stream, frame)
        if got is not None:
            body_tail = encode(got[1], got[2])[-20:]
            assert body_tail in want or got[2] == b""
        assert receiver.last_rejection is None or not receiver.last_rejection[0].startswith("internal:")
        assert assembler.partials <= assembler.max_partials and assembler.held_bytes <= assembler.max_bytes
        assert assembler.held_bytes == assembler.held_by(f"{T.base}/node/n1")[1]
    assembler.clear()
    assert (assembler.partials, assembler.held_bytes) == (0, 0)


@FAST
@given(st.data())
def test_signed_envelopes(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(MESSAGES)))
    topic, message = MESSAGES[kind]
    signer = DEVICE if kind in DEVICE_KINDS else COORD
    sealed = bytearray(signer.seal(topic, encode(message, b"body")))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(sealed) - 1))
        sealed[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(sealed)))

    drive(signed_receiver(), topic, frames(bytes(sealed[:cut]) if data.draw(st.booleans()) else bytes(sealed))[0])


@st.composite
def safetensors_blobs(draw: st.DrawFn) -> bytes:
    choice = draw(st.sampled_from(["header", "truncate", "flip", "random"]))
    if choice == "random":
        return draw(st.binary(max_size=512))
    if choice == "truncate":
        return BODY[: draw(st.integers(0, len(BODY)))]
    if choice == "flip":
        blob = bytearray(BODY)
        for _ in range(draw(st.integers(1, 5))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        return bytes(blob)
    entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "BF16", "F8_E4M3", "x"]) | json_values,
            "shape": st.lists(st.integers(-2, 10) | st.integers(10**9, 10**30) | json_scalars, max_size=5)
            | json_values,
            "data_offsets": st.lists(st.integers(-1, 200) | st.integers(2**63, 2**65) | json_scalars, max_size=3),
        }
    )
    header = draw(st.dictionaries(st.text(max_size=5), entry | json_values, max_size=4))
    raw = dump(header).encode("utf-8", "surrogatepass")
    size = draw(st.sampled_from([len(raw), len(raw) + 1, 2**64 - 1, 0]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", size) + raw + draw(st.binary(max_size=256))


@FAST
@given(safetensors_blobs())
def test_tensor_payloads(blob: bytes) -> None:
    check_tensors(blob)


@FAST
@given(safetensors_blobs(), st.sampled_from(ENCODINGS))
def test_encoded_updates(blob: bytes, encoding: str) -> None:
    """An update body as the coordinator decodes it: tensors, then the task's encoding (int8 deltas against
    the weights sent); it ends as float32 tensors or as an ``EncodingError`` with a reason."""
    try:
        tensors = unpack_tensors(blob)
    except ProtocolError:
        return
    try:
        decoded = decode_update(tensors, encoding, lambda: TENSORS)
    except EncodingError as exc:
        assert str(exc).strip()
        return
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in decoded.values())


@st.composite
def manifest_texts(draw: st.DrawFn) -> str:
    choice = draw(st.sampled_from(["mutate", "json", "text", "nasty"]))
    if choice == "text":
        return draw(st.text(max_size=300))
    if choice == "json":
        return dump(draw(json_values))
    doc = json.loads(MANIFEST_JSON)
    if choice == "nasty":
        key = draw(st.sampled_from(sorted(doc)))
        return MANIFEST_JSON.replace(f'"{key}": {dump(doc[key])}', f'"{key}": {draw(st.sampled_from(NASTY_LITERALS))}')
    sub = doc["submodels"][0]
    target = draw(st.sampled_from([doc, sub, sub["files"]["training"], sub["params"][0]]))
    key = draw(st.sampled_from(sorted(target)))
    target[key] = draw(json_values)
    return dump(doc)


@FAST
@given(manifest_texts())
def test_manifests(text: str) -> None:
    check_manifest(text)


def test_the_sample_inputs_are_valid() -> None:
    """Guards the fuzz corpus: unmutated, every sample decodes, so mutations start from real traffic."""
    signed = signed_receiver()
    for kind, (topic, message) in MESSAGES.items():
        signer = DEVICE if kind in DEVICE_KINDS else COORD
        assert drive(Receiver(RUN), topic, frames(encode(message))[0]) == message.model_copy(
            update={"sent_at": drive(Receiver(RUN), topic, frames(encode(message))[0]).sent_at}  # type: ignore[union-attr]
        )
        assert drive(signed, topic, frames(signer.seal(topic, encode(message)))[0]) is not None
    assert set(unpack_tensors(BODY)) == set(TENSORS)
    assert parse_manifest(MANIFEST_JSON, "sample") == MANIFEST


# --- slow suite ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@SLOW
@given(st.data())
def test_slow_hypothesis_every_decoder(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["frame", "message", "reassembly", "signed", "tensors", "manifest"]))
    if which == "frame":
        test_frame_headers.hypothesis.inner_test(data)  # type: ignore[attr-defined]
    elif which == "message":
        test_message_headers_of_every_kind.hypothesis.inner_test(data)  # type: ignore[attr-defined]
    elif which == "reassembly":
        test_chunk_reassembly.hypothesis.inner_test(data.draw(reassembly_plan()))  # type: ignore[attr-defined]
    elif which == "signed":
        test_signed_envelopes.hypothesis.inner_test(data)  # type: ignore[attr-defined]
    elif which == "tensors":
        check_tensors(data.draw(safetensors_blobs()))
    else:
        check_manifest(data.draw(manifest_texts()))


SNIPPETS = [s.encode() for s in NASTY_LITERALS[:13]] + [b'"i":', b'"n":2', b"NFLC", b"NEFL", b"NEFS", b"\xff", b"\x00"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits: bit flips, byte changes, inserts, deletes, truncation, splices of nasty
    JSON literals or magic numbers, or replacement of a number in a JSON header."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(out))
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del out[at : at + rng.randint(1, 16)]
        elif op == 4:
            del out[at:]
        elif op == 5:
            out[at:at] = rng.choice(SNIPPETS)
        else:
            digits = [m for m in range(len(out)) if 48 <= out[m] <= 57][:64]
            if digits:
                i = rng.choice(digits)
                out[i : i + 1] = rng.choice(SNIPPETS)
    return bytes(out)


Check = Callable[[bytes], None]


def feeding(receiver: Receiver, topic: str, wrap: Callable[[bytes], list[bytes]]) -> Check:
    def check(data: bytes) -> None:
        for payload in wrap(data):
            drive(receiver, topic, payload)

    return check


def corpus() -> tuple[list[tuple[str, Check, bytes]], list[Receiver]]:
    """(layer, check, seed input) for every decoder. A mutation is applied to one layer and the layers around
    it are rebuilt correctly (hashes, lengths, signature), so that it reaches that layer's decoder instead of
    dying at the outer chunk hash. MQTT payloads go through long-lived receivers, so reassembly state and the
    caps are exercised across inputs."""
    caps = {"max_partials_per_sender": 4, "max_partials": 16, "max_bytes_per_sender": 1 << 20}
    plain, signed = Receiver(RUN, Assembler(**caps)), signed_receiver(Assembler(**caps))
    items: list[tuple[str, Check, bytes]] = []
    for kind, (topic, message) in MESSAGES.items():
        signer = DEVICE if kind in DEVICE_KINDS else COORD
        body = BODY if kind in ("update", "weights") else b""
        logical = encode(message, body)
        for i, frame in enumerate(frames(logical, 1024)):
            size = struct.unpack(">I", frame[4:8])[0]
            header, chunk = frame[8 : 8 + size], frame[8 + size :]
            items.append(("frame", feeding(plain, f"{topic}/chunk/{i}", lambda p: [p]), frame))
            items.append(("frame_header", feeding(plain, topic, lambda h, c=chunk: [framed(h, c)]), header))
        items.append(("message", feeding(plain, topic, lambda m: frames(m, 1024)), logical))
        sealed = signer.seal(topic, logical)
        items.append(("envelope", feeding(signed, topic, lambda m: frames(m, 1024)), sealed))
        seal_again = lambda m, t=topic, s=signer: frames(s.seal(t, m), 1024)  # noqa: E731
        items.append(("signed_message", feeding(signed, topic, seal_again), logical))
    size = struct.unpack("<Q", BODY[:8])[0]
    items.append(("tensors", check_tensors, BODY))
    rebuild = lambda h: struct.pack("<Q", len(h)) + h + BODY[8 + size :]  # noqa: E731
    items.append(("tensor_header", lambda h: check_tensors(rebuild(h)), BODY[8 : 8 + size]))
    items.append(("manifest", lambda p: check_manifest(p.decode("utf-8", "replace")), MANIFEST_JSON.encode()))
    return items, [plain, signed]


@pytest.mark.slow
def test_slow_mutation_loop_over_100k_inputs() -> None:
    rng = random.Random(20240513)
    items, receivers = corpus()
    count, started = 0, time.perf_counter()
    per_kind: dict[str, int] = {}
    while count < 120_000:
        name, check, seed = items[count % len(items)]
        check(mutate(rng, seed))
        per_kind[name] = per_kind.get(name, 0) + 1
        count += 1
    elapsed = time.perf_counter() - started
    print(f"\nmutation loop: {count} inputs in {elapsed:.1f} s ({count / elapsed:.0f}/s); by decoder {per_kind}")
    print("rejections (plain, signed):", *(dict(r.rejections.most_common()) for r in receivers))
    assert count >= 100_000
