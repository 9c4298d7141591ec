"""The wire format, independent of MQTT: topics, message encoding, chunking, reassembly and tensors.

Every input here comes from the network and is hostile: each decoder either returns a valid value or raises
:class:`ProtocolError` with a short ``reason`` code and a message saying what is wrong; nothing else escapes.

Layers, outermost first (the full description with tables is in ``docs/protocol.md``):

- **Frame** (one MQTT payload): ``b"NFLC" | u32 BE header length | JSON frame header | chunk``. The frame
  header is exactly ``{"msg", "i", "n", "size", "chunk", "sha256", "chunk_sha256"}``: message id (32 lower-case
  hex digits), chunk index ``0 <= i < n``, chunk count ``n == max(1, ceil(size / chunk))``, the whole
  message's size and digest, the nominal chunk size (``chunk >= 1024``) and this chunk's sha256. The message
  digest is the sha256 of the message when ``n == 1`` and the sha256 of the ``n`` concatenated 32-byte chunk
  digests otherwise (see :func:`message_digest`), so every byte is hashed once, chunk by chunk. Every chunk
  but the last is exactly ``chunk`` bytes long; the last one completes ``size`` exactly. Integers are JSON
  integers (no booleans, no floats), the header is at most 1 KiB, flat, with no duplicate keys.
- **Signed envelope** (optional, see :mod:`edge_client.signing`): ``b"NEFS" | u8 key id length | key id |
  logical message | 64-byte Ed25519 signature``.
- **Logical message**: ``b"NEFL" | u32 BE header length | JSON header | body``; the header (at most 64 KiB,
  nesting depth at most 16) is one of the schemas in :mod:`edge_client.schemas` plus ``body_size`` (the
  frame digests and the signature cover the body). Tensors travel in the body as safetensors (never pickle).

Zero copy: senders hand :func:`frames` a list of buffers (:func:`encode_parts`, :func:`tensor_parts`), which
are hashed in place and copied once, into the frame payloads; receivers keep the chunks they got as
:class:`Pieces` and copy a body out of them once (:func:`decode`).

Retained messages put chunk ``i`` on ``<topic>/chunk/<i>`` so that the broker keeps every chunk.

Partial (incomplete) messages held by an :class:`Assembler` are capped in count and bytes per sender and in
total; when a cap is reached the oldest partial of that sender (or of all senders) is evicted with a log line
and a counter, so memory stays bounded under a flood and returns to zero once partials complete or expire.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from pydantic import ValidationError

from nefl_edge.core.errors import NeflError
from nefl_edge.core.schemas import MESSAGE_TYPES, WIRE_SCHEMA, Message

log = logging.getLogger(__name__)

MAGIC_MESSAGE = b"NEFL"
MAGIC_FRAME = b"NFLC"
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1 << 30
MAX_MESSAGE_SIZE = 256 << 20
MAX_HEADER_SIZE = 64 << 10
MAX_FRAME_HEADER_SIZE = 1024
MAX_HEADER_DEPTH = 16
MAX_INT_DIGITS = 40
MAX_TENSOR_HEADER_SIZE = 16 << 20
MAX_TENSOR_RANK = 16

# Caps on partial (incomplete chunked) messages of one Assembler; see Assembler.
MAX_PARTIALS_PER_SENDER = 8
MAX_PARTIAL_BYTES_PER_SENDER = 64 << 20
MAX_PARTIALS = 64
MAX_PARTIAL_BYTES = 512 << 20

FRAME_KEYS = frozenset({"msg", "i", "n", "size", "chunk", "sha256", "chunk_sha256"})
_MSG_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ProtocolError(NeflError, ValueError):
    """A payload from the network that does not follow the wire protocol.

    ``reason`` is a short code for counters and metrics (``frame``, ``frame_header``, ``chunk``,
    ``too_large``, ``message``, ``schema``, ``body``, ``tensors``, ``wrong_run``, ``wrong_topic``, and the
    signature reasons of :class:`edge_client.signing.SignatureError`); ``str(exc)`` says what is wrong."""

    def __init__(self, message: str, reason: str = "protocol") -> None:
        super().__init__(message)
        self.reason = reason


class LogLimiter:
    """Logs at most ``burst`` warnings per key in each ``window_s``, then one line with how many it held back,
    so that a flood of hostile payloads cannot flood the log."""

    def __init__(self, logger: logging.Logger, burst: int = 5, window_s: float = 60.0) -> None:
        self.logger, self.burst, self.window_s = logger, burst, window_s
        self._windows: Dict[str, List[float]] = {}  # key -> [window start, logged, held back]

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] > self.window_s:
            if window is not None and window[2]:
                self.logger.warning("%d more warnings like this (%s) were not logged", window[2], key)
            window = self._windows[key] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            self.logger.warning(msg, *args)
        else:
            window[2] += 1


Buffer = Union[bytes, bytearray, memoryview]


def sha256(data: Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


def _byte_view(buffer: Any) -> memoryview:
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Pieces:
    """One message held as consecutive buffers (the chunks it arrived in, or the parts it was built from),
    read without joining them: :meth:`read` copies only the range asked for."""

    def __init__(
        self, buffers: Iterable[Any], chunk_digests: Optional[List[bytes]] = None, chunk_size: int = 0
    ) -> None:
        self.views = [v for v in (_byte_view(b) for b in buffers) if v.nbytes]
        self.size = sum(v.nbytes for v in self.views)
        # the sha256 of each ``chunk_size`` chunk, where the message arrived in checked frames
        self.chunk_digests, self.chunk_size = chunk_digests, chunk_size

    def __len__(self) -> int:
        return self.size

    def slices(self, start: int = 0, end: Optional[int] = None) -> List[memoryview]:
        """Views (no copy) of bytes ``start:end``."""
        end = self.size if end is None else min(end, self.size)
        out, offset = [], 0
        for view in self.views:
            n = view.nbytes
            if offset + n > start and offset < end:
                out.append(view[max(0, start - offset) : min(n, end - offset)])
            offset += n
            if offset >= end:
                break
        return out

    def read(self, start: int = 0, end: Optional[int] = None) -> bytes:
        """A copy of bytes ``start:end``."""
        parts = self.slices(start, end)
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def tail(self, start: int) -> Pieces:
        return Pieces(self.slices(start))

    def sha256(self) -> bytes:
        h = hashlib.sha256()
        for view in self.views:
            h.update(view)
        return h.digest()


def message_digest(chunk_digests: Sequence[bytes]) -> str:
    """The frame header's ``sha256`` of a message from its chunks' sha256 digests: the chunk's own digest for
    a one-chunk message, else the sha256 of the concatenated digests (a one-level hash list)."""
    if len(chunk_digests) == 1:
        return chunk_digests[0].hex()
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def short(value: object, limit: int = 60) -> str:
    """``repr`` of an untrusted value, cut to ``limit`` characters, for error messages and logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- safe JSON ---------------------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1}}}")


def json_depth(text: str) -> int:
    """Nesting depth of a JSON text, found without parsing it (brackets inside strings do not count; an
    unterminated string counts its brackets, which only overestimates)."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(_DEPTH[c] for c in brackets), default=0)


class _Refused(Exception):
    """A JSON hook's refusal, made a :class:`ProtocolError` (with what was parsed) by :func:`load_json`."""


def _bad_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"holds an integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds a number out of range ({short(text, 30)})")
    return value


def _pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out = dict(items)
    if len(out) != len(items):
        raise _Refused("repeats a key")
    return out


_decoders = threading.local()  # per thread: (without the integer hook, with it), built once


def _decoder(long_ints: bool) -> json.JSONDecoder:
    pair = getattr(_decoders, "pair", None)
    if pair is None:
        hooks: Dict[str, Any] = {"parse_constant": _bad_constant, "parse_float": _parse_float}
        pair = _decoders.pair = (
            json.JSONDecoder(object_pairs_hook=_pairs, **hooks),
            json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_parse_int, **hooks),
        )
    return pair[long_ints]


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dump_json(value: Any) -> bytes:
    """Compact JSON of ``value`` (as ``json.dumps(value, separators=(",", ":"))``, with one encoder)."""
    return _ENCODER.encode(value).encode()


def load_json(raw: bytes, what: str, reason: str, max_depth: int = MAX_HEADER_DEPTH) -> Any:
    """Parse untrusted JSON: strict UTF-8, nesting at most ``max_depth``, no NaN / Infinity, no float that
    overflows, no integer longer than 40 digits, no duplicate keys. Raise :class:`ProtocolError` otherwise.

    Cheap sufficient conditions go first: a text with at most ``max_depth`` opening brackets cannot nest
    deeper (no depth scan), one without a run of 41 digits holds no longer integer (no per-integer hook); the
    decoders are built once per thread, not once per message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8", reason) from None
    if text.count("{") + text.count("[") > max_depth:
        depth = json_depth(text)
        if depth > max_depth:
            raise ProtocolError(f"{what} is nested {depth} deep (at most {max_depth})", reason)
    try:
        return _decoder(_LONG_DIGITS.search(text) is not None).decode(text)
    except _Refused as exc:
        raise ProtocolError(f"{what} {exc}", reason) from None
    except (ValueError, RecursionError, TypeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {short(str(exc), 120)}", reason) from None


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

    @staticmethod
    def kind_of(topic: str) -> str:
        """The kind of topic: ``hello``, ``status``, ``update``, ``task`` (node topics), ``manifest``,
        ``control``, ``weights``, ``artifact`` (broadcasts), or ``""`` for a topic outside this layout."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[2] == "node" and parts[4] in NODE_KINDS:
            return parts[4]
        if len(parts) == 3 and parts[2] in ("manifest", "control"):
            return parts[2]
        if len(parts) == 4 and parts[2] in ("weights", "artifact"):
            return parts[2]
        return ""

    @staticmethod
    def sender_of(topic: str) -> str:
        """The sender a stream belongs to, for per-sender caps: ``<prefix>/<run>/node/<node>`` for node
        topics, the topic itself otherwise."""
        parts = topic.split("/")
        return "/".join(parts[:4]) if len(parts) > 4 and parts[2] == "node" else topic


NODE_KINDS = ("hello", "status", "update", "task")
MESSAGE_KINDS_BY_TOPIC: Dict[str, Tuple[str, ...]] = {
    "hello": ("hello",),
    "status": ("status",),
    "update": ("update", "decline", "evaluation"),
    "task": ("task", "evaluate"),
    "manifest": ("manifest",),
    "control": ("control",),
    "weights": ("weights",),
    "artifact": ("artifact",),
}


# --- logical messages --------------------------------------------------------------------------------------


def encode_parts(message: Message, body: Union[Buffer, Sequence[Buffer]] = b"") -> List[Buffer]:
    """The logical message as buffers (header first, then the body's buffers, not copied). The header is
    pydantic's own JSON of the message (a JSON object) with ``body_size`` added at its end."""
    parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
    if not message.sent_at:
        message = message.model_copy(update={"sent_at": time.time()})
    size = sum(_byte_view(p).nbytes for p in parts)
    raw = message.model_dump_json(by_alias=True).encode()
    raw = raw[:-1] + b',"body_size":%d}' % size
    return [MAGIC_MESSAGE + struct.pack(">I", len(raw)) + raw, *parts]


def encode(message: Message, body: Union[Buffer, Sequence[Buffer]] = b"") -> bytes:
    return b"".join(encode_parts(message, body))


def decode(data: Union[Buffer, Pieces]) -> Tuple[Message, bytes]:
    """Parse and validate a logical message; raise :class:`ProtocolError` saying what is wrong. The body is
    the one copy made of the message's bytes."""
    pieces = data if isinstance(data, Pieces) else Pieces([data])
    start = pieces.read(0, 8)
    if len(start) < 8 or start[:4] != MAGIC_MESSAGE:
        raise ProtocolError("not a nefl message (bad magic)", "message")
    (size,) = struct.unpack(">I", start[4:8])
    if size > MAX_HEADER_SIZE or 8 + size > len(pieces):
        raise ProtocolError(f"header length {size} does not fit the message of {len(pieces)} bytes", "message")
    header = load_json(pieces.read(8, 8 + size), "message header", "message")
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object", "message")
    body_size = header.pop("body_size", None)
    if type(body_size) is not int or body_size != len(pieces) - 8 - size:
        raise ProtocolError("body size does not match the header", "body")
    if header.get("schema") != WIRE_SCHEMA:
        raise ProtocolError(
            f"unsupported schema {short(header.get('schema'))}; this side speaks {WIRE_SCHEMA}", "schema"
        )
    kind = header.get("kind")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {short(kind)}", "schema")
    try:
        message = cls.model_validate(header)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {cls.__name__} header: {short(where)}: {first['msg']}", "schema") from None
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"invalid {cls.__name__} header: {short(str(exc), 120)}", "schema") from None
    return message, pieces.read(8 + size)


# --- tensors -----------------------------------------------------------------------------------------------

_TENSOR_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "U64": "<u8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "U16": "<u2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


_SAFETENSORS_NAMES = {np.dtype(v).str: k for k, v in _TENSOR_DTYPES.items()}


def tensor_parts(tensors: Dict[str, np.ndarray], keep_dtype: bool = False) -> List[Buffer]:
    """A safetensors blob as buffers: the header, then each tensor's memory (not copied where the array is
    already C-contiguous in the wire dtype). Tensors are float32 unless ``keep_dtype``, which keeps any
    dtype safetensors names (float16, int8, ... as :mod:`edge_client.encoding` uses)."""
    arrays = []
    for name, value in sorted(tensors.items()):
        array = np.asarray(value, dtype=None if keep_dtype else np.float32, order="C")
        if array.dtype.str not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot carry")
        arrays.append((name, array))
    header: Dict[str, Any] = {}
    offset = 0
    for name, array in arrays:
        dtype = _SAFETENSORS_NAMES[array.dtype.str]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = dump_json(header)
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw, *(_byte_view(a.reshape(-1).view(np.uint8).data) for _, a in arrays)]


def pack_tensors(tensors: Dict[str, np.ndarray], keep_dtype: bool = False) -> bytes:
    """A safetensors blob of ``tensors`` (float32 unless ``keep_dtype``), one copy of their bytes."""
    return b"".join(tensor_parts(tensors, keep_dtype))


def _is_int(value: object) -> bool:
    return type(value) is int


_TensorEntry = Tuple[int, str, np.dtype, Tuple[int, ...], int]  # (offset in the data, name, dtype, shape, count)
MAX_CACHED_LAYOUTS = 64
MAX_CACHED_HEADER = 32 << 10
_Layout = Tuple[Tuple[_TensorEntry, ...], Optional[np.dtype]]
_layouts: OrderedDict[Tuple[bytes, int], _Layout] = OrderedDict()
_layouts_lock = threading.Lock()


def unpack_tensors(body: Buffer) -> Dict[str, np.ndarray]:
    """Read a safetensors blob (``u64 LE header length | JSON header | data``) without trusting it: every
    entry must have a known dtype, a shape of non-negative integers whose byte size equals its data range,
    and the ranges must tile the data exactly. The arrays are read-only views of ``body``.

    The checks are a function of the header's bytes and the data's length alone, so a layout that passed
    them is remembered by those (up to :data:`MAX_CACHED_LAYOUTS` headers of at most
    :data:`MAX_CACHED_HEADER` bytes, least recently used first out): every device of a fleet sends the same
    header for the same submodel, and the 10,000th is not parsed again. A sender that varies its header only
    pays the full parse."""
    body = _byte_view(body)
    if len(body) < 8:
        raise _bad_tensors(f"{len(body)} bytes is too short")
    (size,) = struct.unpack("<Q", body[:8])
    if size > MAX_TENSOR_HEADER_SIZE or 8 + size > len(body):
        raise _bad_tensors(f"header length {size} does not fit the {len(body)} bytes")
    start = 8 + size
    entries, dtype = _tensor_layout(bytes(body[8:start]), len(body) - start)
    if dtype is not None:  # one dtype (the usual case): one view of all the data, sliced
        flat = np.frombuffer(body, dtype, offset=start)
        size = dtype.itemsize
        return {name: flat[b // size : b // size + n].reshape(shape) for b, name, _, shape, n in entries}
    return {
        name: np.frombuffer(body, dtype, count=count, offset=start + begin).reshape(shape)
        for begin, name, dtype, shape, count in entries
    }


def _bad_tensors(why: str) -> ProtocolError:
    return ProtocolError(f"body is not a valid safetensors blob: {why}", "tensors")


def _tensor_layout(raw: bytes, length: int) -> _Layout:
    """The checked entries of safetensors header ``raw`` over ``length`` data bytes, in data order, and their
    one dtype if they share one (cached: see :func:`unpack_tensors`); raises :class:`ProtocolError`."""
    cache = len(raw) <= MAX_CACHED_HEADER
    if cache:
        with _layouts_lock:
            known = _layouts.get((raw, length))
            if known is not None:
                _layouts.move_to_end((raw, length))
                return known
    entries = _check_tensor_layout(raw, length)
    if cache:
        with _layouts_lock:
            _layouts[(raw, length)] = entries
            while len(_layouts) > MAX_CACHED_LAYOUTS:
                _layouts.popitem(last=False)
    return entries


def _check_tensor_layout(raw: bytes, length: int) -> _Layout:
    bad = _bad_tensors
    header = load_json(raw, "safetensors header", "tensors", max_depth=3)
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entries: List[Tuple[int, int, str, np.dtype, Tuple[int, ...]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ is not a map of strings")
            continue
        if not name or len(name) > 512:
            raise bad(f"tensor name {short(name)} is empty or too long")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {short(name)} lacks dtype, shape or data_offsets, or has other keys")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _TENSOR_DTYPES:
            raise bad(f"tensor {short(name)} has unsupported dtype {short(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {short(name)} has an invalid shape {short(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise bad(f"tensor {short(name)} has invalid data_offsets {short(offsets)}")
        begin, end = offsets
        np_dtype = np.dtype(_TENSOR_DTYPES[dtype])
        if not 0 <= begin <= end <= length or math.prod(shape) * np_dtype.itemsize != end - begin:
            raise bad(f"tensor {short(name)} of shape {short(shape)} does not match its {end - begin} data bytes")
        entries.append((begin, end, name, np_dtype, tuple(shape)))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise bad(f"tensor {short(name)} does not start where the previous one ends")
        position = end
    if position != length:
        raise bad(f"the tensors cover {position} of the {length} data bytes")
    dtypes = {dtype for _, _, _, dtype, _ in entries}
    one = dtypes.pop() if len(dtypes) == 1 else None
    return tuple((begin, name, dtype, shape, math.prod(shape)) for begin, _, name, dtype, shape in entries), one


# --- chunk frames ------------------------------------------------------------------------------------------


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_id_prefix)  # a forked child must not repeat its parent's ids


def next_message_id() -> str:
    """A frame message id (32 hex digits): 64 random bits drawn once per process, then a counter. Ids need to
    be unique per sender, not secret (whoever reads a topic sees them, and a frame that disagrees with a
    partial of the same id is refused without cancelling it); a ``uuid4`` each is a system call per message,
    which under load costs a GIL hand-off per task of a 10,000-device round."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def frames(
    data: Union[Buffer, Sequence[Buffer]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known: Optional[Dict[int, bytes]] = None,
) -> List[bytes]:
    """Split one logical message (bytes, or a list of buffers taken as their concatenation) into
    self-describing frames. Each byte is hashed once and copied once, into its frame; ``known`` gives the
    sha256 of chunks already hashed (by :meth:`edge_client.signing.Signer.seal_parts` for 1 MiB chunks)."""
    return list(iter_frames(data, chunk_size, known))


def iter_frames(
    data: Union[Buffer, Sequence[Buffer]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known: Optional[Dict[int, bytes]] = None,
) -> Iterator[bytes]:
    """:func:`frames` one at a time: every chunk is hashed first (each frame names the message digest), then
    each frame is built when asked for, so a sender can publish one while it builds the next."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    pieces = Pieces([data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
    size = len(pieces)
    count = max(1, -(-size // chunk_size))
    chunks = [pieces.slices(i * chunk_size, (i + 1) * chunk_size) for i in range(count)]
    digests = []
    for i, views in enumerate(chunks):
        if known is not None and i in known:
            digests.append(known[i])
            continue
        h = hashlib.sha256()
        for view in views:
            h.update(view)
        digests.append(h.digest())
    msg_id, total = next_message_id(), message_digest(digests)
    for i, (views, digest) in enumerate(zip(chunks, digests)):
        header = {
            "msg": msg_id,
            "i": i,
            "n": count,
            "size": size,
            "chunk": chunk_size,
            "sha256": total,
            "chunk_sha256": digest.hex(),
        }
        raw = dump_json(header)
        yield b"".join((MAGIC_FRAME, struct.pack(">I", len(raw)), raw, *views))


@dataclass(frozen=True)
class FrameHeader:
    msg: str
    i: int
    n: int
    size: int
    chunk: int
    sha256: str
    chunk_sha256: str

    def expected_length(self) -> int:
        return self.chunk if self.i < self.n - 1 else self.size - self.chunk * (self.n - 1)


def parse_frame(payload: Buffer, max_size: int = MAX_MESSAGE_SIZE) -> Tuple[FrameHeader, memoryview]:
    """Split and validate one frame: the header schema, its bounds, and the chunk's length and sha256. The
    chunk is a view of ``payload`` (not a copy)."""
    payload = _byte_view(payload)
    if len(payload) < 8 or payload[:4] != MAGIC_FRAME:
        raise ProtocolError("not a nefl frame (bad magic)", "frame")
    (size,) = struct.unpack(">I", payload[4:8])
    if size > MAX_FRAME_HEADER_SIZE or 8 + size > len(payload):
        raise ProtocolError(f"frame header length {size} does not fit the frame", "frame")
    h = load_json(bytes(payload[8 : 8 + size]), "frame header", "frame_header", max_depth=1)
    if not isinstance(h, dict) or set(h) != FRAME_KEYS:
        keys = sorted(h)[:8] if isinstance(h, dict) else type(h).__name__
        raise ProtocolError(f"frame header must have exactly {sorted(FRAME_KEYS)}, got {short(keys)}", "frame_header")
    for key in ("i", "n", "size", "chunk"):
        if not _is_int(h[key]):
            raise ProtocolError(f"frame header field {key} is not an integer: {short(h[key])}", "frame_header")
    for key, pattern in (("msg", _MSG_ID), ("sha256", _SHA256), ("chunk_sha256", _SHA256)):
        if not isinstance(h[key], str) or not pattern.fullmatch(h[key]):
            raise ProtocolError(f"frame header field {key} is malformed: {short(h[key])}", "frame_header")
    head = FrameHeader(**h)
    if not 0 <= head.size <= max_size:
        raise ProtocolError(f"message size {head.size} is out of bounds (at most {max_size})", "too_large")
    if not MIN_CHUNK_SIZE <= head.chunk <= MAX_CHUNK_SIZE:
        raise ProtocolError(f"chunk size {head.chunk} is out of bounds", "frame_header")
    if head.n != max(1, -(-head.size // head.chunk)) or not 0 <= head.i < head.n:
        raise ProtocolError(
            f"frame {head.i}/{head.n} does not fit a message of {head.size} bytes in chunks of {head.chunk}",
            "frame_header",
        )
    chunk = payload[8 + size :]
    if len(chunk) != head.expected_length():
        raise ProtocolError(
            f"chunk {head.i}/{head.n} of message {head.msg[:8]} is {len(chunk)} bytes, "
            f"expected {head.expected_length()}",
            "chunk",
        )
    if sha256(chunk) != head.chunk_sha256:
        raise ProtocolError(f"chunk {head.i}/{head.n} of message {head.msg[:8]} is corrupt (sha256 mismatch)", "chunk")
    return head, chunk


@dataclass
class _Partial:
    sender: str
    head: FrameHeader
    started: float
    held: int = 0
    chunks: Dict[int, memoryview] = field(default_factory=dict)
    digests: Dict[int, bytes] = field(default_factory=dict)


class Assembler:
    """Reassembles frames into messages.

    Duplicates are ignored, corrupt frames raise :class:`ProtocolError`, and partial messages are bounded:
    at most ``max_partials_per_sender`` partials and ``max_bytes_per_sender`` chunk bytes per sender (see
    :meth:`Topics.sender_of`), ``max_partials`` and ``max_bytes`` in total. A new partial or chunk that would
    pass a cap evicts the oldest partial of that sender (or, for the total caps, of anyone); a message whose
    declared size is above ``min(max_size, max_bytes_per_sender)`` is refused outright. Partials older than
    ``timeout_s`` are dropped. Every eviction is logged and counted in :attr:`evicted` by cause
    (``sender_count``, ``sender_bytes``, ``total_count``, ``total_bytes``, ``expired``); :attr:`held_bytes`
    is the chunk bytes held now.
    """

    def __init__(
        self,
        timeout_s: float = 300.0,
        max_size: int = MAX_MESSAGE_SIZE,
        max_partials_per_sender: int = MAX_PARTIALS_PER_SENDER,
        max_bytes_per_sender: int = MAX_PARTIAL_BYTES_PER_SENDER,
        max_partials: int = MAX_PARTIALS,
        max_bytes: int = MAX_PARTIAL_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(max_partials_per_sender, max_bytes_per_sender, max_partials, max_bytes) < 1:
            raise ValueError("assembler caps must be positive")
        if max_bytes_per_sender > max_bytes or max_partials_per_sender > max_partials:
            raise ValueError("a per-sender cap cannot be larger than the total cap")
        self.timeout_s = timeout_s
        self.max_size = min(max_size, max_bytes_per_sender)
        self.max_partials_per_sender, self.max_bytes_per_sender = max_partials_per_sender, max_bytes_per_sender
        self.max_partials, self.max_bytes = max_partials, max_bytes
        self.clock = clock
        self._partials: OrderedDict[Tuple[str, str], _Partial] = OrderedDict()
        self._senders: Dict[str, List[int]] = {}  # sender -> [partials, bytes]
        self.held_bytes = 0
        self.evicted: Counter[str] = Counter()
        self._log = LogLimiter(log)

    @property
    def dropped(self) -> int:
        """Partials dropped for any reason (expired or evicted by a cap)."""
        return sum(self.evicted.values())

    @property
    def partials(self) -> int:
        return len(self._partials)

    def held_by(self, sender: str) -> Tuple[int, int]:
        """``(partials, bytes)`` held now for one sender."""
        count, held = self._senders.get(sender, (0, 0))
        return count, held

    def feed(self, stream: str, payload: Buffer, index: Optional[int] = None) -> Optional[bytes]:
        """Add one frame received on ``stream`` (the topic without a chunk suffix; ``index`` is the ``i`` of
        a ``<stream>/chunk/<i>`` topic); return the whole message once its last chunk arrived and checked
        out, else ``None``."""
        pieces = self.feed_pieces(stream, payload, index)
        return None if pieces is None else pieces.read()

    def feed_pieces(self, stream: str, payload: Buffer, index: Optional[int] = None) -> Optional[Pieces]:
        """:meth:`feed` returning the message as the chunks it arrived in (views of the payloads, no copy)."""
        self.expire()
        head, chunk = parse_frame(payload, self.max_size)
        if index is not None and index != head.i:
            raise ProtocolError(f"frame {head.i} arrived on the topic of chunk {index}", "chunk")
        if head.n == 1:
            if head.chunk_sha256 != head.sha256:  # the chunk's sha256 was checked by parse_frame
                raise ProtocolError(f"message {head.msg[:8]} has the wrong sha256", "chunk")
            return Pieces([chunk], [bytes.fromhex(head.chunk_sha256)], head.chunk)
        key = (stream, head.msg)
        part = self._partials.get(key)
        if part is None:
            part = self._start(key, Topics.sender_of(stream), head)
        elif (part.head.n, part.head.size, part.head.chunk, part.head.sha256) != (
            head.n,
            head.size,
            head.chunk,
            head.sha256,
        ):  # the frame is refused, the partial kept: whoever sees a message id must not be able to cancel it
            raise ProtocolError(f"frames of message {head.msg[:8]} disagree on its size, chunking or hash", "chunk")
        if head.i in part.chunks:
            return None
        self._make_room(key, part.sender, len(chunk))
        part.chunks[head.i] = chunk
        part.digests[head.i] = bytes.fromhex(head.chunk_sha256)
        part.held += len(chunk)
        self._senders[part.sender][1] += len(chunk)
        self.held_bytes += len(chunk)
        if len(part.chunks) < head.n:
            return None
        self._drop(key, "")
        if message_digest([part.digests[j] for j in range(head.n)]) != head.sha256:
            raise ProtocolError(f"message {head.msg[:8]} reassembled to the wrong sha256", "chunk")
        digests = [part.digests[j] for j in range(head.n)]
        return Pieces((part.chunks[j] for j in range(head.n)), digests, head.chunk)

    def expire(self) -> None:
        """Drop partials older than ``timeout_s`` (also done on every :meth:`feed`)."""
        now = self.clock()
        while self._partials:
            key, part = next(iter(self._partials.items()))
            if now - part.started <= self.timeout_s:
                break
            self._drop(key, "expired")

    def clear(self) -> None:
        for key in list(self._partials):
            self._drop(key, "")

    def _start(self, key: Tuple[str, str], sender: str, head: FrameHeader) -> _Partial:
        count = self._senders.get(sender, [0, 0])[0]
        if count >= self.max_partials_per_sender:
            self._drop(self._oldest(sender, key), "sender_count")
        if len(self._partials) >= self.max_partials:
            self._drop(self._oldest(None, key), "total_count")
        part = self._partials[key] = _Partial(sender, head, self.clock())
        self._senders.setdefault(sender, [0, 0])[0] += 1
        return part

    def _make_room(self, key: Tuple[str, str], sender: str, size: int) -> None:
        while self._senders[sender][1] + size > self.max_bytes_per_sender:
            self._drop(self._oldest(sender, key), "sender_bytes")
        while self.held_bytes + size > self.max_bytes:
            self._drop(self._oldest(None, key), "total_bytes")

    def _oldest(self, sender: Optional[str], keep: Tuple[str, str]) -> Tuple[str, str]:
        for key, part in self._partials.items():
            if key != keep and (sender is None or part.sender == sender):
                return key
        raise AssertionError("no partial to evict")  # unreachable: the caps hold at least one message

    def _drop(self, key: Tuple[str, str], cause: str) -> None:
        part = self._partials.pop(key)
        counts = self._senders[part.sender]
        counts[0] -= 1
        counts[1] -= part.held
        if counts[0] == 0:
            del self._senders[part.sender]
        self.held_bytes -= part.held
        if cause:
            self.evicted[cause] += 1
            self._log.warning(
                cause,
                "dropped incomplete message %s on %s (%s): %d of %d chunks, %d bytes held",
                key[1][:8],
                short(key[0], 120),
                cause,
                len(part.chunks),
                part.head.n,
                part.held,
            )
