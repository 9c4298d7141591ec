"""Ed25519 signatures of logical wire messages, trusted keys, and key files.

A signed message is an envelope around an encoded logical message (``b"NEFL" | header | body``)::

    b"NEFS" | u8 key id length k | key id (k ASCII bytes) | logical message | 64-byte Ed25519 signature

The signature covers ``b"nefl.sig/2" | u16 BE topic length | topic | u8 k | key id | u64 BE L | D``, where
``D`` is the digest of the ``L`` bytes before the signature (``b"NEFS" | k | key id | logical message``),
computed like a frame's message digest (:func:`edge_client.wire.message_digest`) over 1 MiB blocks: the
sha256 of the content if it fits one block, else the sha256 of its blocks' concatenated sha256 digests. So the whole
logical message (magic, header, body), the signer's key id and the MQTT topic it was published on (without a
``/chunk/<i>`` suffix) are bound: a signed message cannot be moved to another topic or credited to another
key (the topic is the stream name of the ``core.link.Link`` it travels on; another transport names its streams
the same way). Because the signature comes last, the envelope's 1 MiB frames (the default chunk size) are exactly
those blocks, except the last one or two: sender and receiver reuse the frames' chunk digests, so signing
hashes no byte a second time beyond the last block (:meth:`Signer.seal_parts`, :meth:`Keyring.verify_pieces`).
The envelope is chunked into frames like any message (:func:`edge_client.wire.frames`).

A receiver with a :class:`Keyring` accepts a message only if it is signed, the key id is in the keyring,
the signature verifies, and the key id is the one allowed to send that message. Who may send what is a
function of the protocol message, not of a transport's topic names (:func:`signer_policy`): a device signs
what it sends (``Message.origin == "device"``: hello, status, update, decline, evaluation) with key id
``<node>``, the node the message names; the coordinator signs what it sends (task, evaluate, weights,
artifact, manifest, control). The receiver (``core.link.Receiver``) also checks that the message's kind and
node are those of the topic it came on, so a device can neither speak for another node nor use another
node's topics. Anything else raises :class:`SignatureError` with a reason code: ``unsigned``, ``envelope``,
``unknown_key``, ``bad_signature``, ``wrong_signer``.

Key files: private keys are PKCS#8 PEM (or 32 raw bytes) written with mode 0600, and refused on load if the
group or others can read them; public keys are SubjectPublicKeyInfo PEM (or 32 raw bytes). A keyring file
is JSON ``{"schema": "nefl.keyring/1", "keys": {key_id: base64 of the 32-byte public key}}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nefl_edge.core.files import write_atomic
from nefl_edge.core.schemas import Message
from nefl_edge.core.wire import DEFAULT_CHUNK_SIZE, Buffer, Pieces, ProtocolError, message_digest, short

MAGIC_SIGNED = b"NEFS"
SIGNATURE_DOMAIN = b"nefl.sig/2"
SIGNATURE_SIZE = 64
SIGNATURE_BLOCK = DEFAULT_CHUNK_SIZE  # block size of the signed digest (equal to the default frame chunk)
KEYRING_SCHEMA = "nefl.keyring/1"
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SignerPolicy = Callable[[Message], Optional[str]]
"""The key id that must have signed a (validated) message, or ``None`` if nobody may send it."""

PathLike = Union[str, "os.PathLike[str]"]


class SignatureError(ProtocolError):
    """A message without a valid signature by a key allowed for its topic."""


class KeyFileError(ValueError):
    """A key or keyring file that is missing, malformed or readable by others."""


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(f"key id {short(key_id)} must be 1-64 of [A-Za-z0-9_.-]")
    return key_id


def _signed_bytes(topic: str, key_id: str, length: int, digest: bytes) -> bytes:
    raw_topic, raw_id = topic.encode(), key_id.encode()
    if len(raw_topic) > 0xFFFF:
        raise ValueError("topic is longer than MQTT allows")
    return b"".join(
        (
            SIGNATURE_DOMAIN,
            struct.pack(">H", len(raw_topic)),
            raw_topic,
            bytes([len(raw_id)]),
            raw_id,
            struct.pack(">Q", length),
            digest,
        )
    )


def _block_digests(content: Pieces, end: int) -> Dict[int, bytes]:
    """sha256 of each ``SIGNATURE_BLOCK`` block of ``content[:end]``, reusing the chunk digests that
    ``content`` arrived with where its frames were cut at the same size (:attr:`Pieces.chunk_digests`)."""
    known = content.chunk_digests if content.chunk_size == SIGNATURE_BLOCK else None
    out: Dict[int, bytes] = {}
    for i in range(max(1, -(-end // SIGNATURE_BLOCK))):
        start, stop = i * SIGNATURE_BLOCK, min((i + 1) * SIGNATURE_BLOCK, end)
        if known is not None and stop == (i + 1) * SIGNATURE_BLOCK and i < len(known):
            out[i] = known[i]
        else:
            h = hashlib.sha256()
            for view in content.slices(start, stop):
                h.update(view)
            out[i] = h.digest()
    return out


def _digest(blocks: Dict[int, bytes]) -> bytes:
    return bytes.fromhex(message_digest([blocks[i] for i in range(len(blocks))]))


class Signer:
    """Signs outgoing logical messages with one Ed25519 private key, known to others by ``key_id``."""

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str) -> None:
        self.private_key = private_key
        self.key_id = check_key_id(key_id)

    @classmethod
    def generate(cls, key_id: str) -> Signer:
        return cls(Ed25519PrivateKey.generate(), key_id)

    @classmethod
    def load(cls, path: PathLike, key_id: str) -> Signer:
        return cls(load_private_key(path), key_id)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def seal(self, topic: str, message: Buffer) -> bytes:
        """The signed envelope of an encoded logical ``message`` to be published on ``topic``."""
        return b"".join(self.seal_parts(topic, [message])[0])

    def seal_parts(self, topic: str, parts: Sequence[Any]) -> Tuple[List[Any], Dict[int, bytes]]:
        """The envelope of a logical message given as buffers (see :func:`edge_client.wire.encode_parts`), as
        buffers (the parts are not copied), and the sha256 of each of its 1 MiB blocks that lies wholly
        before the signature: the chunk digests of those frames when it is cut into 1 MiB frames (pass them
        to :func:`edge_client.wire.frames` as ``known``)."""
        raw_id = self.key_id.encode()
        head = MAGIC_SIGNED + bytes([len(raw_id)]) + raw_id
        content = Pieces([head, *parts])
        blocks = _block_digests(content, len(content))
        signature = self.private_key.sign(_signed_bytes(topic, self.key_id, len(content), _digest(blocks)))
        whole = {i: d for i, d in blocks.items() if (i + 1) * SIGNATURE_BLOCK <= len(content)}
        return [head, *parts, signature], whole

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r}, public={fingerprint(self.public_key)})"


def open_envelope(data: Buffer) -> Tuple[str, bytes, bytes]:
    """Split a signed envelope into ``(key_id, signature, logical message)`` without verifying it."""
    key_id, signature, message = open_pieces(Pieces([data]))
    return key_id, signature, message.read()


def open_pieces(data: Pieces) -> Tuple[str, bytes, Pieces]:
    """:func:`open_envelope` of a message held as pieces; the logical message stays uncopied."""
    head = data.read(0, 5 + 255)
    if len(head) < 5 or head[:4] != MAGIC_SIGNED:
        raise SignatureError("message is not signed", "unsigned")
    k = head[4]
    start, end = 5 + k, len(data) - SIGNATURE_SIZE
    if end < start:
        raise SignatureError("signed envelope is truncated", "envelope")
    try:
        key_id = head[5:start].decode("ascii")
    except UnicodeDecodeError:
        raise SignatureError("signed envelope has a non-ASCII key id", "envelope") from None
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise SignatureError(f"signed envelope has a malformed key id {short(key_id)}", "envelope")
    return key_id, data.read(end), Pieces(data.slices(start, end))


def strip_envelope(data: Buffer) -> bytes:
    """The logical message inside ``data`` (unchanged when it is not signed), without verifying anything."""
    return open_envelope(data)[2] if bytes(data[:4]) == MAGIC_SIGNED else bytes(data)


def strip_pieces(data: Pieces) -> Pieces:
    """:func:`strip_envelope` of a message held as pieces."""
    return open_pieces(data)[2] if data.read(0, 4) == MAGIC_SIGNED else data


class Keyring:
    """Trusted Ed25519 public keys by key id. Safe to change while another thread verifies."""

    def __init__(self, keys: Optional[Mapping[str, Ed25519PublicKey]] = None) -> None:
        self._keys: Dict[str, Ed25519PublicKey] = {}
        self._lock = threading.Lock()
        for key_id, key in (keys or {}).items():
            self.add(key_id, key)

    def add(self, key_id: str, key: Ed25519PublicKey) -> None:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"key of {key_id!r} is not an Ed25519 public key")
        with self._lock:
            self._keys = {**self._keys, check_key_id(key_id): key}

    def remove(self, key_id: str) -> None:
        with self._lock:
            self._keys = {k: v for k, v in self._keys.items() if k != key_id}

    def get(self, key_id: str) -> Optional[Ed25519PublicKey]:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def verify(self, topic: str, data: Buffer) -> Tuple[str, bytes]:
        """Check the signed envelope ``data`` received on ``topic``; return ``(key_id, logical message)``.
        Raise :class:`SignatureError` if it is unsigned, malformed, by an unknown key, or does not verify."""
        key_id, message = self.verify_pieces(topic, Pieces([data]))
        return key_id, message.read()

    def verify_pieces(self, topic: str, data: Pieces) -> Tuple[str, Pieces]:
        """:meth:`verify` of a message held as pieces; the logical message stays uncopied."""
        key_id, signature, message = open_pieces(data)
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureError(f"message signed by unknown key {key_id!r}", "unknown_key")
        length = len(data) - SIGNATURE_SIZE
        digest = _digest(_block_digests(data, length))
        try:
            key.verify(signature, _signed_bytes(topic, key_id, length, digest))
        except InvalidSignature:
            raise SignatureError(
                f"bad signature by key {key_id!r} (tampered, or another key)", "bad_signature"
            ) from None
        return key_id, message

    # --- files ---------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        keys = {k: base64.b64encode(public_key_bytes(v)).decode() for k, v in sorted(self._keys.items())}
        return json.dumps({"schema": KEYRING_SCHEMA, "keys": keys}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "keyring") -> Keyring:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("schema") != KEYRING_SCHEMA or not isinstance(doc["keys"], dict):
                raise ValueError(f"not a {KEYRING_SCHEMA} document")
            return cls({k: public_key_from_bytes(base64.b64decode(v, validate=True)) for k, v in doc["keys"].items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{where} is not a valid keyring: {exc}") from None

    def save(self, path: PathLike) -> None:
        write_atomic(Path(path), self.to_json().encode(), 0o644)

    @classmethod
    def load(cls, path: PathLike) -> Keyring:
        return cls.from_json(_read(Path(path)).decode("utf-8", "replace"), str(path))


def signer_policy(coordinator_key_id: str) -> SignerPolicy:
    """Who must have signed a message, from the message alone: what a device sends (``origin`` ``device``)
    the device whose key id is the message's ``node``; what the coordinator sends (``origin``
    ``coordinator``) the coordinator, known by ``coordinator_key_id``; anything else nobody (``None``).

    Each side's link applies it to every message it receives (``core.link.Receiver``), whatever the transport:
    it reads no topic name. It departs from the policy it replaces (by MQTT topic: ``node/<node>/update`` ->
    ``<node>``) only in where the node comes from; the receiver's check that a message's node is the node of
    its topic makes the two equal on MQTT."""
    check_key_id(coordinator_key_id)

    def expected(message: Message) -> Optional[str]:
        origin = getattr(type(message), "origin", None)
        if origin == "device":
            node = getattr(message, "node", None)
            return node if isinstance(node, str) else None
        if origin == "coordinator":
            return coordinator_key_id
        return None

    return expected


# --- key files ---------------------------------------------------------------------------------------------


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key for logs and for people comparing keys (sha256, 16 hex digits)."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def save_private_key(path: PathLike, key: Ed25519PrivateKey, raw: bool = False) -> None:
    """Write a private key (PKCS#8 PEM, or 32 raw bytes) readable by its owner only (mode 0600)."""
    if raw:
        data = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    else:
        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    write_atomic(Path(path), data, 0o600)


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """Read a private key written by :func:`save_private_key`; refuse one that others can read."""
    path = Path(path)
    data = _read(path)
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise KeyFileError(f"private key {path} is readable by others; run `chmod 600 {path}`")
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        elif len(data) == 32:
            key = Ed25519PrivateKey.from_private_bytes(data)
        else:
            raise ValueError("neither PEM nor 32 raw bytes")
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def save_public_key(path: PathLike, key: Ed25519PublicKey, raw: bool = False) -> None:
    """Write a public key (SubjectPublicKeyInfo PEM, or 32 raw bytes), mode 0644."""
    if raw:
        data = public_key_bytes(key)
    else:
        data = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(Path(path), data, 0o644)


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    path = Path(path)
    data = _read(path)
    try:
        pem = data.startswith(b"-----BEGIN")
        key = serialization.load_pem_public_key(data) if pem else public_key_from_bytes(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
