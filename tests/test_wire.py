"""Unit tests of the wire format: encoding, chunking, reassembly and every rejection."""

from __future__ import annotations

import hashlib
import json
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.core import wire
from nefl_edge.core.mqtt import Receiver
from nefl_edge.core.schemas import Hello, Message, Update
from nefl_edge.core.signing import (
    KeyFileError,
    Keyring,
    Signer,
    fingerprint,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    signer_policy,
)
from nefl_edge.core.wire import (
    Assembler,
    Pieces,
    ProtocolError,
    decode,
    encode,
    encode_parts,
    frames,
    pack_tensors,
    sha256,
    tensor_parts,
    unpack_tensors,
)
from tests.fakes import (
    KILLERS,
    TASK,
    Clock,
    first_frames,
    frame_header,
    raw_frame,
    raw_message,
    task_header_text,
)


def test_message_round_trip_with_body() -> None:
    body = pack_tensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})

    message, got = decode(encode(TASK, body))

    assert message == TASK.model_copy(update={"sent_at": message.sent_at})
    np.testing.assert_array_equal(unpack_tensors(got)["w"], np.arange(6).reshape(2, 3))


def test_chunked_message_reassembles_in_any_order_with_duplicates() -> None:
    data = encode(TASK, bytes(range(256)) * 40)
    parts = frames(data, chunk_size=1024)
    assembler = Assembler()

    results = [assembler.feed("t", p) for p in [parts[3], *parts[::-1], parts[0]]]

    assert len(parts) == -(-len(data) // 1024)
    assert [r for r in results if r is not None] == [data]


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "corrupt"),
        (lambda p: b"XXXX" + p[4:], "bad magic"),
        (lambda p: p[:4] + struct.pack(">I", 99999) + p[8:], "does not fit"),
    ],
)
def test_corrupt_frames_are_rejected(mangle, match: str) -> None:  # type: ignore[no-untyped-def]
    part = frames(encode(TASK), 4096)[0]

    with pytest.raises(ProtocolError, match=match):
        Assembler().feed("t", mangle(part))


def reframe(frame: bytes, **changes: object) -> bytes:
    """The same frame with some header fields replaced."""
    size = struct.unpack(">I", frame[4:8])[0]
    header = {**json.loads(frame[8 : 8 + size]), **changes}
    raw = json.dumps(header).encode()
    return frame[:4] + struct.pack(">I", len(raw)) + raw + frame[8 + size :]


def test_frames_that_disagree_on_the_whole_are_rejected() -> None:
    parts = frames(encode(TASK, b"x" * 3000), 1024)
    assembler = Assembler()
    assembler.feed("t", parts[0])

    with pytest.raises(ProtocolError, match="disagree"):
        assembler.feed("t", reframe(parts[1], sha256="0" * 64))


def test_incomplete_messages_expire() -> None:
    parts = frames(encode(TASK, b"z" * 5000), 1024)
    assembler = Assembler(timeout_s=0.0)
    assembler.feed("t", parts[0])

    assembler.feed("t", frames(encode(TASK), 4096)[0])

    assert assembler.dropped == 1


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: {**h, "schema": "nefl.wire/9"}, "unsupported schema"),
        (lambda h: {**h, "kind": "nope"}, "unknown message kind"),
        (lambda h: {**h, "round": -1}, "round"),
        (lambda h: {**h, "node": "../etc"}, "node"),
        (lambda h: {**h, "extra": 1}, "extra"),
        (lambda h: {**h, "body_sha256": "0" * 64}, "sha256"),
    ],
)
def test_bad_headers_are_rejected_with_the_reason(edit, match: str) -> None:  # type: ignore[no-untyped-def]
    raw = encode(TASK)
    size = struct.unpack(">I", raw[4:8])[0]
    header = edit(json.loads(raw[8 : 8 + size]))
    new = json.dumps(header).encode()

    with pytest.raises(ProtocolError, match=match):
        decode(raw[:4] + struct.pack(">I", len(new)) + new)


def test_not_safetensors_body_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="safetensors"):
        unpack_tensors(b"\x80\x04pickle-ish")


def test_every_kind_has_a_schema() -> None:
    from nefl_edge.core.schemas import MESSAGE_TYPES

    kinds = {"hello", "status", "task", "update", "decline", "weights", "artifact", "manifest", "control"}
    assert kinds | {"evaluate", "evaluation"} == set(MESSAGE_TYPES)
    assert Hello.model_fields["kind"].default == "hello" and Update.model_fields["kind"].default == "update"
    assert sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --- hostile frames and headers ------------------------------------------------------------------------------


# Payloads that killed paho's network thread before (uncaught OverflowError, RecursionError, ValueError),
# each as one MQTT payload: (name, payload).


@pytest.mark.parametrize(("name", "payload"), KILLERS, ids=[k[0] for k in KILLERS])
def test_known_killers_are_protocol_errors_with_a_reason(name: str, payload: bytes) -> None:
    receiver = Receiver("r")

    with pytest.raises(ProtocolError) as caught:
        receiver.parse("nefl/r/node/n1/task", payload)

    assert caught.value.reason in {"frame", "frame_header", "message"}, name
    assert str(caught.value)


def test_the_killer_payloads_still_reach_the_decoder() -> None:
    """Guards the killer list: without the bad field each payload would be a valid message."""
    header = task_header_text()

    message, _ = decode(raw_message(header.encode()))

    assert message.kind == "task" and '"round":3' in header and '"deadline_s":30.0' in header


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"i": True}, "field i is not an integer"),
        ({"size": 0.0}, "field size is not an integer"),
        ({"n": "1"}, "field n is not an integer"),
        ({"msg": "x" * 32}, "field msg is malformed"),
        ({"sha256": None}, "field sha256 is malformed"),
        ({"extra": 1}, "exactly"),
        ({"n": 2}, "does not fit"),
        ({"i": -1}, "does not fit"),
        ({"chunk": 10}, "chunk size 10 is out of bounds"),
        ({"size": 1 << 40}, "out of bounds"),
    ],
)
def test_frame_headers_are_checked_against_a_strict_schema(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Assembler().feed("t", raw_frame(frame_header(**changes)))


def test_frame_header_with_a_repeated_key_is_rejected() -> None:
    header = frame_header()[:-1] + b',"i":0}'

    with pytest.raises(ProtocolError, match="repeats a key"):
        Assembler().feed("t", raw_frame(header))


def test_a_chunk_must_have_the_length_its_header_implies() -> None:
    data = encode(TASK, b"q" * 3000)
    first, *_, last = frames(data, 1024)
    long_first = reframe(first + b"x", chunk_sha256=sha256(first[len(first) - 1024 :] + b"x"))
    short_last = reframe(last[:-1], chunk_sha256=sha256(last[len(last) - (len(data) % 1024) : -1]))

    with pytest.raises(ProtocolError, match="expected 1024"):
        Assembler().feed("t", long_first)
    with pytest.raises(ProtocolError, match=f"expected {len(data) % 1024}"):
        Assembler().feed("t", short_last)


def test_a_frame_on_the_topic_of_another_chunk_is_rejected() -> None:
    parts = frames(encode(TASK, b"q" * 3000), 1024)

    with pytest.raises(ProtocolError, match="topic of chunk 0"):
        Assembler().feed("t", parts[1], index=0)


# --- caps on partial messages ----------------------------------------------------------------------------------


def test_partials_per_sender_are_capped_by_count_evicting_the_oldest() -> None:
    assembler = Assembler(max_partials_per_sender=3, max_partials=10)

    for frame in first_frames(5):
        assembler.feed("nefl/r/node/a/update", frame)
    assembler.feed("nefl/r/node/b/update", first_frames(1)[0])

    assert assembler.held_by("nefl/r/node/a") == (3, 3 * 1024)
    assert assembler.held_by("nefl/r/node/b") == (1, 1024)
    assert assembler.evicted == {"sender_count": 2}


def test_partials_per_sender_are_capped_by_bytes() -> None:
    assembler = Assembler(max_bytes_per_sender=5000, max_bytes=100_000)

    for frame in first_frames(7):
        assembler.feed("nefl/r/node/a/hello", frame)

    assert assembler.held_by("nefl/r/node/a") == (4, 4096)
    assert assembler.evicted == {"sender_bytes": 3}


def test_partials_in_total_are_capped_by_count_and_bytes() -> None:
    by_count = Assembler(max_partials_per_sender=2, max_partials=4)
    by_bytes = Assembler(max_bytes_per_sender=4096, max_bytes=6000)

    for i, frame in enumerate(first_frames(6)):
        by_count.feed(f"nefl/r/node/n{i}/update", frame)
        by_bytes.feed(f"nefl/r/node/n{i}/update", frame)

    assert (by_count.partials, by_count.evicted) == (4, {"total_count": 2})
    assert (by_bytes.partials, by_bytes.held_bytes, by_bytes.evicted) == (5, 5 * 1024, {"total_bytes": 1})


def test_a_message_larger_than_the_per_sender_cap_is_refused_at_once() -> None:
    assembler = Assembler(max_bytes_per_sender=4096, max_bytes=8192)

    with pytest.raises(ProtocolError, match="at most 4096") as caught:
        assembler.feed("t", first_frames(1, size=5000)[0])
    assert caught.value.reason == "too_large" and assembler.partials == 0


def test_a_message_still_completes_under_the_caps_and_accounting_returns_to_zero() -> None:
    clock = Clock()
    assembler = Assembler(timeout_s=10, max_partials_per_sender=2, max_bytes_per_sender=8192, clock=clock)
    data = encode(TASK, b"w" * 5000)
    parts = frames(data, 1024)
    for frame in first_frames(3):
        assembler.feed("t", frame)

    got = [assembler.feed("t", p) for p in parts]
    clock.now = 11
    assembler.expire()

    assert got[-1] == data
    assert (assembler.partials, assembler.held_bytes) == (0, 0)
    assert assembler.evicted == {"sender_count": 2, "expired": 1}


def test_a_frame_that_lies_about_a_message_in_progress_does_not_cancel_it() -> None:
    data = encode(TASK, b"x" * 4000)
    parts = frames(data, 1024)
    assembler = Assembler()
    assembler.feed("t", parts[0])

    with pytest.raises(ProtocolError, match="disagree"):
        assembler.feed("t", reframe(parts[1], size=len(data) + 1))
    got = [assembler.feed("t", p) for p in parts[1:]]

    assert got[-1] == data
    assert (assembler.partials, assembler.held_bytes) == (0, 0)


# --- tensors ---------------------------------------------------------------------------------------------------


def safetensors_blob(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"w": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}, b"\0" * 8, "does not match"),
        ({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "does not start"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "cover 4 of the 8"),
        ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "lacks"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_lying_safetensors_headers_are_rejected(header: dict[str, object], data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack_tensors(safetensors_blob(header, data))


def test_unpack_reads_what_safetensors_writes() -> None:
    from safetensors.numpy import save

    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.zeros((0, 4), np.float16),
        "c": np.ones(3, np.int64),
    }

    got = unpack_tensors(save(tensors, metadata={"k": "v"}))

    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}
    np.testing.assert_array_equal(got["a"], tensors["a"])


# --- the receiver ------------------------------------------------------------------------------------------------


def test_receiver_checks_run_topic_kind_and_node() -> None:
    receiver = Receiver("r1")
    task = frames(encode(TASK))[0]

    assert receiver.receive("nefl/r1/node/n1/task", task) is not None
    assert receiver.receive("nefl/r1/node/n2/task", task) is None
    assert receiver.receive("nefl/r1/node/n1/update", task) is None
    assert Receiver("other").receive("nefl/r1/node/n1/task", task) is None
    assert receiver.rejections == {"wrong_topic": 2}


def test_receiver_counts_and_survives_an_unexpected_exception() -> None:
    class Broken(Assembler):
        def feed_pieces(self, stream: str, payload: object, index: object = None) -> Pieces:
            raise RuntimeError("a bug")

    receiver = Receiver("r1", Broken())

    assert receiver.receive("nefl/r1/control", b"x") is None
    assert receiver.rejections == {"internal:RuntimeError": 1}


def test_receiver_takes_retained_chunks_and_ignores_cleared_ones() -> None:
    receiver = Receiver("r1")
    parts = frames(encode(TASK, b"z" * 3000), 1024)

    got = [receiver.receive(f"nefl/r1/node/n1/task/chunk/{i}", p) for i, p in enumerate(parts)]

    assert receiver.receive("nefl/r1/node/n1/task/chunk/0", b"") is None
    assert got[-1] is not None and got[-1][0] == "nefl/r1/node/n1/task" and got[-1][2] == b"z" * 3000
    assert not receiver.rejections


# --- signatures --------------------------------------------------------------------------------------------------

COORD, DEVICE, OTHER = Signer.generate("coord"), Signer.generate("n1"), Signer.generate("n2")
KEYRING = Keyring({s.key_id: s.public_key for s in (COORD, DEVICE, OTHER)})
HELLO_TOPIC, TASK_TOPIC = "nefl/r1/node/n1/update", "nefl/r1/node/n1/task"
UPDATE = Update(
    run="r1",
    node="n1",
    task_id="t1",
    round=3,
    submodel=1,
    num_samples=10,
    metrics={"loss_first": 1.0, "loss_last": 0.5, "accuracy": 0.5, "steps": 1, "seconds": 1.0},
)


def signed_receiver() -> Receiver:
    return Receiver("r1", keyring=KEYRING, sender_of=signer_policy("coord"))


def sealed(signer: Signer, topic: str, message: Message, body: bytes = b"") -> bytes:
    return signer.seal(topic, encode(message, body))


def test_signed_messages_verify_both_ways() -> None:
    receiver = signed_receiver()

    update = receiver.receive(HELLO_TOPIC, frames(sealed(DEVICE, HELLO_TOPIC, UPDATE, b"body"))[0])
    task = receiver.receive(TASK_TOPIC, frames(sealed(COORD, TASK_TOPIC, TASK))[0])

    assert update is not None and update[1] == UPDATE.model_copy(update={"sent_at": update[1].sent_at})
    assert update[2] == b"body"
    assert task is not None and task[1].kind == "task"
    assert not receiver.rejections


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: flip(sealed(DEVICE, HELLO_TOPIC, UPDATE, b"body"), -1), "bad_signature"),
        (lambda: flip(sealed(DEVICE, HELLO_TOPIC, UPDATE, b"body"), 5 + 2 + 64 + 20), "bad_signature"),
        (lambda: sealed(Signer.generate("n1"), HELLO_TOPIC, UPDATE), "bad_signature"),
        (lambda: sealed(DEVICE, "nefl/r1/node/n1/hello", UPDATE), "bad_signature"),
        (lambda: sealed(Signer.generate("stranger"), HELLO_TOPIC, UPDATE), "unknown_key"),
        (lambda: encode(UPDATE), "unsigned"),
        (lambda: sealed(OTHER, HELLO_TOPIC, UPDATE), "wrong_signer"),
        (lambda: sealed(DEVICE, HELLO_TOPIC, UPDATE)[:60], "envelope"),
    ],
    ids=["body", "header", "wrong-key", "other-topic", "unknown-key", "unsigned", "other-node", "truncated"],
)
def test_badly_signed_messages_are_rejected(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    receiver = signed_receiver()

    assert receiver.receive(HELLO_TOPIC, frames(make())[0]) is None
    assert receiver.rejections == {reason: 1}


def test_a_device_key_cannot_sign_coordinator_topics() -> None:
    receiver = signed_receiver()

    assert receiver.receive(TASK_TOPIC, frames(sealed(DEVICE, TASK_TOPIC, TASK))[0]) is None
    assert receiver.receive("nefl/r1/other", frames(sealed(COORD, "nefl/r1/other", TASK))[0]) is None
    assert receiver.rejections == {"wrong_signer": 2}


def test_without_a_keyring_signed_and_unsigned_messages_are_accepted() -> None:
    receiver = Receiver("r1")

    assert receiver.receive(HELLO_TOPIC, frames(sealed(DEVICE, HELLO_TOPIC, UPDATE))[0]) is not None
    assert receiver.receive(HELLO_TOPIC, frames(encode(UPDATE))[0]) is not None


def test_key_files_round_trip_with_owner_only_private_keys(tmp_path: Path) -> None:
    signer = Signer.generate("n1")
    save_private_key(tmp_path / "pem", signer.private_key)
    save_private_key(tmp_path / "raw", signer.private_key, raw=True)
    save_public_key(tmp_path / "pub", signer.public_key)
    ring = Keyring({"n1": signer.public_key})
    ring.save(tmp_path / "ring.json")

    loaded = [load_private_key(tmp_path / name) for name in ("pem", "raw")]

    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("pem", "raw")} == {0o600}
    assert {fingerprint(k.public_key()) for k in loaded} == {fingerprint(signer.public_key)}
    assert fingerprint(load_public_key(tmp_path / "pub")) == fingerprint(signer.public_key)
    assert Keyring.load(tmp_path / "ring.json").verify("t", signer.seal("t", b"NEFLx"))[0] == "n1"


def test_a_private_key_that_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    save_private_key(path, Signer.generate("n1").private_key)
    path.chmod(0o644)

    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)


def test_a_flood_of_bad_payloads_is_counted_in_full_but_logged_a_few_times(caplog: pytest.LogCaptureFixture) -> None:
    receiver = Receiver("r1")

    with caplog.at_level("WARNING"):
        for _ in range(100):
            receiver.receive("nefl/r1/control", b"garbage")

    assert receiver.rejections == {"frame": 100}
    assert len(caplog.records) == 5 and "bad magic" in caplog.records[0].getMessage()


# --- one hash and one copy per byte (issue 15) ----------------------------------------------------------------


def test_tensor_parts_are_safetensors_in_any_wire_dtype(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {
        "b": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a": np.array([-3, 7], np.int8),
        "s": np.array(2, np.float32),
    }
    (tmp_path / "t.safetensors").write_bytes(pack_tensors(tensors, keep_dtype=True))

    for got in (
        unpack_tensors(b"".join(tensor_parts(tensors, keep_dtype=True))),
        load_file(tmp_path / "t.safetensors"),
    ):
        assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}
        for name, value in tensors.items():
            np.testing.assert_array_equal(got[name], value)


def count_hashed_bytes(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Every byte sha256 hashes from here on (in wire and signing) is appended to the returned list."""
    hashed: list[int] = []
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self.inner = real()
            self.update(data)

        def update(self, data: bytes) -> None:
            hashed.append(memoryview(data).nbytes)
            self.inner.update(data)

        def digest(self) -> bytes:
            return self.inner.digest()

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr(wire.hashlib, "sha256", Counting)
    return hashed


def test_a_signed_message_is_hashed_once_but_for_its_last_block(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    signer, topic = Signer.generate("coordinator"), "nefl/r1/node/n1/task"
    receiver = Receiver(
        "r1", keyring=Keyring({"coordinator": signer.public_key}), sender_of=signer_policy("coordinator")
    )
    body = tensor_parts({"w": np.ones((900, 1000), np.float32)})  # 3.4 MiB
    hashed = count_hashed_bytes(monkeypatch)

    envelope, known = signer.seal_parts(topic, encode_parts(TASK, body))
    sent = frames(envelope, 1 << 20, known)
    got = [receiver.parse(topic, f) for f in sent]

    size = sum(memoryview(p).nbytes for p in envelope)
    assert got[-1] is not None and got[-1][1] == TASK.model_copy(update={"sent_at": got[-1][1].sent_at})
    assert 2 * size <= sum(hashed) <= 2 * size + 2 * (1 << 20) + 1024  # the last block is hashed twice on each side


def test_frames_of_parts_equal_frames_of_the_joined_message_and_hash_each_byte_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tensors = {"w": np.random.default_rng(0).standard_normal((300, 1000)).astype(np.float32)}
    parts = encode_parts(TASK, tensor_parts(tensors))
    size = sum(memoryview(p).nbytes for p in parts)
    hashed = count_hashed_bytes(monkeypatch)

    sent = frames(parts, 64 << 10)
    assembler = Assembler()
    out = [assembler.feed_pieces("t", f) for f in sent]
    _, body = decode(out[-1])  # type: ignore[arg-type]

    assert len(sent) > 1 and all(o is None for o in out[:-1])
    assert sum(hashed) == 2 * (size + 32 * len(sent))  # sender and receiver: each byte once, and the hash list
    np.testing.assert_array_equal(unpack_tensors(body)["w"], tensors["w"])
    assert Pieces([f[-10:] for f in sent]).read(5, 15) == b"".join(f[-10:] for f in sent)[5:15]
