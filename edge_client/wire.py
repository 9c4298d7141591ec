"""The wire format, independent of MQTT: topics, message encoding, chunking and reassembly.

A logical message is ``b"NEFL" | u32 header length | JSON header | body``; the header is one of the
schemas in :mod:`edge_client.schemas` plus ``body_size`` and ``body_sha256``. Tensors travel in the body
as safetensors (never pickle). Every MQTT payload is a frame ``b"NFLC" | u32 length | JSON frame header |
chunk``, where the frame header carries the message id, chunk index and count, the whole message's size
and sha256, and the chunk's sha256. A message larger than the chunk size becomes several frames; retained
messages put chunk ``i`` on ``<topic>/<i>`` so that the broker keeps every chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from nefl_edge.edge_client.schemas import MESSAGE_TYPES, WIRE_SCHEMA, Message
from pydantic import ValidationError

log = logging.getLogger(__name__)

MAGIC_MESSAGE = b"NEFL"
MAGIC_FRAME = b"NFLC"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_MESSAGE_SIZE = 256 << 20
MAX_HEADER_SIZE = 64 << 10


class ProtocolError(ValueError):
    """A payload from the network that does not follow the wire protocol."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- topics ------------------------------------------------------------------------------------------------


class Topics:
    """Topic names of one run. ``node`` topics carry one device's traffic; the rest are broadcasts."""

    def __init__(self, run: str, prefix: str = "nefl") -> None:
        self.base = f"{prefix}/{run}"

    def node(self, node: str, kind: str) -> str:
        return f"{self.base}/node/{node}/{kind}"

    def all_nodes(self, kind: str) -> str:
        return f"{self.base}/node/+/{kind}"

    def weights(self, submodel: int) -> str:
        return f"{self.base}/weights/{submodel}"

    def artifact(self, digest: str) -> str:
        return f"{self.base}/artifact/{digest}"

    @property
    def manifest(self) -> str:
        return f"{self.base}/manifest"

    @property
    def control(self) -> str:
        return f"{self.base}/control"

    @staticmethod
    def node_of(topic: str) -> str:
        parts = topic.split("/")
        return parts[3] if len(parts) > 4 and parts[2] == "node" else ""


# --- logical messages --------------------------------------------------------------------------------------


def encode(message: Message, body: bytes = b"") -> bytes:
    header = message.model_dump(mode="json", by_alias=True)
    if not header.get("sent_at"):
        header["sent_at"] = time.time()
    header["body_size"] = len(body)
    header["body_sha256"] = sha256(body)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC_MESSAGE + struct.pack(">I", len(raw)) + raw + body


def decode(data: bytes) -> Tuple[Message, bytes]:
    """Parse and validate a logical message; raise :class:`ProtocolError` saying what is wrong."""
    if len(data) < 8 or data[:4] != MAGIC_MESSAGE:
        raise ProtocolError("not a nefl message (bad magic)")
    (size,) = struct.unpack(">I", data[4:8])
    if size > MAX_HEADER_SIZE or 8 + size > len(data):
        raise ProtocolError(f"header length {size} does not fit the message of {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    body = data[8 + size :]
    if header.pop("body_size", None) != len(body) or header.pop("body_sha256", None) != sha256(body):
        raise ProtocolError("body size or sha256 does not match the header")
    if header.get("schema") != WIRE_SCHEMA:
        raise ProtocolError(f"unsupported schema {header.get('schema')!r}; this side speaks {WIRE_SCHEMA}")
    cls = MESSAGE_TYPES.get(str(header.get("kind")))
    if cls is None:
        raise ProtocolError(f"unknown message kind {header.get('kind')!r}")
    try:
        return cls.model_validate(header), body
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {cls.__name__} header: {where}: {first['msg']}") from None


# --- tensors -----------------------------------------------------------------------------------------------


def pack_tensors(tensors: Dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())})


def unpack_tensors(body: bytes) -> Dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(body)
    except (SafetensorError, ValueError, OSError) as exc:
        raise ProtocolError(f"body is not a valid safetensors blob: {exc}") from None


# --- chunk frames ------------------------------------------------------------------------------------------


def frames(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> List[bytes]:
    """Split one logical message into self-describing frames."""
    if chunk_size < 1024:
        raise ValueError(f"chunk size must be at least 1024 bytes, got {chunk_size}")
    msg_id = uuid.uuid4().hex
    total = sha256(data)
    count = max(1, -(-len(data) // chunk_size))
    out = []
    for i in range(count):
        chunk = data[i * chunk_size : (i + 1) * chunk_size]
        header = {"msg": msg_id, "i": i, "n": count, "size": len(data), "sha256": total, "chunk_sha256": sha256(chunk)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        out.append(MAGIC_FRAME + struct.pack(">I", len(raw)) + raw + chunk)
    return out


@dataclass
class _Partial:
    count: int
    size: int
    digest: str
    started: float
    chunks: Dict[int, bytes] = field(default_factory=dict)


class Assembler:
    """Reassembles frames into messages. Duplicates are ignored; corrupt frames raise
    :class:`ProtocolError`; partial messages older than ``timeout_s`` are dropped with a log line."""

    def __init__(self, timeout_s: float = 300.0, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.timeout_s = timeout_s
        self.max_size = max_size
        self._partials: Dict[Tuple[str, str], _Partial] = {}
        self.dropped = 0

    def feed(self, stream: str, payload: bytes) -> Optional[bytes]:
        """Add one frame received on ``stream`` (the topic without a chunk suffix); return the whole message
        once its last chunk arrived and checked out, else ``None``."""
        self._expire()
        if len(payload) < 8 or payload[:4] != MAGIC_FRAME:
            raise ProtocolError("not a nefl frame (bad magic)")
        (size,) = struct.unpack(">I", payload[4:8])
        if size > 4096 or 8 + size > len(payload):
            raise ProtocolError("frame header length does not fit the frame")
        try:
            h = json.loads(payload[8 : 8 + size])
            msg_id, i, n, total_size, digest = str(h["msg"]), int(h["i"]), int(h["n"]), int(h["size"]), str(h["sha256"])
            chunk_digest = str(h["chunk_sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"bad frame header: {exc}") from None
        chunk = payload[8 + size :]
        if not 0 <= i < n or n > self.max_size // 1024 + 1 or not 0 <= total_size <= self.max_size:
            raise ProtocolError(f"frame {i}/{n} of {total_size} bytes is out of bounds")
        if sha256(chunk) != chunk_digest:
            raise ProtocolError(f"chunk {i}/{n} of message {msg_id[:8]} is corrupt (sha256 mismatch)")
        key = (stream, msg_id)
        part = self._partials.get(key)
        if part is None:
            part = self._partials[key] = _Partial(n, total_size, digest, time.monotonic())
        if (part.count, part.size, part.digest) != (n, total_size, digest):
            del self._partials[key]
            raise ProtocolError(f"frames of message {msg_id[:8]} disagree on its size or hash")
        part.chunks.setdefault(i, chunk)
        if len(part.chunks) < n:
            return None
        del self._partials[key]
        data = b"".join(part.chunks[j] for j in range(n))
        if len(data) != total_size or sha256(data) != digest:
            raise ProtocolError(f"message {msg_id[:8]} reassembled to the wrong size or sha256")
        return data

    def _expire(self) -> None:
        now = time.monotonic()
        for key, part in list(self._partials.items()):
            if now - part.started > self.timeout_s:
                del self._partials[key]
                self.dropped += 1
                log.warning(
                    "dropped incomplete message %s on %s: %d of %d chunks after %.0f s",
                    key[1][:8],
                    key[0],
                    len(part.chunks),
                    part.count,
                    self.timeout_s,
                )
