"""Unit tests of the wire format: encoding, chunking, reassembly and every rejection."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from nefl_edge.edge_client.schemas import Hello, Task, TrainConfig, Update
from nefl_edge.edge_client.wire import (
    Assembler,
    ProtocolError,
    decode,
    encode,
    frames,
    pack_tensors,
    sha256,
    unpack_tensors,
)

TASK = Task(
    run="r1", node="n1", task_id="t1", round=3, submodel=1, weights_sha256="a" * 64, train=TrainConfig(), deadline_s=30
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
    from nefl_edge.edge_client.schemas import MESSAGE_TYPES

    assert {"hello", "status", "task", "update", "decline", "weights", "artifact", "manifest", "control"} == set(
        MESSAGE_TYPES
    )
    assert Hello.model_fields["kind"].default == "hello" and Update.model_fields["kind"].default == "update"
    assert sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
