"""A device's identity: a node id that is not the host name, an Ed25519 key pair, and the enrolment
material the coordinator issued (broker account, coordinator public key, CA certificate), all kept in one
state directory. A lock file makes a second process with the same identity fail with a clear error.

State directory (default ``$NEFL_STATE_DIR`` or ``~/.local/state/nefl-edge``, mode 0700)::

    identity.json     {"schema": "nefl.identity/1", "node": "dev-<10 hex>", "created": ISO time}
    device.key        Ed25519 private key, PKCS#8 PEM, mode 0600
    device.pub        its public key, SubjectPublicKeyInfo PEM
    lock              flock()ed by the process that uses the identity; holds its pid
    enrolment.json    after ``nefl-edge enrol``: node, username, broker, coordinator key id, time (no secret)
    broker.password   the broker password, mode 0600
    coordinator.pub   the coordinator's public key (PEM)
    ca.crt            the broker's CA certificate, when the coordinator's bundle had one

Device side: no torch, onnx or coordinator imports; valid on Python 3.9.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Optional, Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nefl_edge.core.errors import BadInput
from nefl_edge.core.files import write_atomic
from nefl_edge.core.signing import (
    KEY_ID_PATTERN,
    KeyFileError,
    Keyring,
    Signer,
    fingerprint,
    load_private_key,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
)

IDENTITY_SCHEMA = "nefl.identity/1"
ENROLMENT_SCHEMA = "nefl.enrolment/1"
BUNDLE_SCHEMA = "nefl.enrolment-bundle/1"
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
COORDINATOR_KEY_ID = "coordinator"
PUBLIC_KEY_PREFIX = "ed25519:"
MAX_BUNDLE_SIZE = 64 << 10


class IdentityError(BadInput):
    """The state directory or an enrolment bundle cannot be used; the message says what to do."""


class IdentityInUse(IdentityError):
    """Another process holds this identity's lock."""


# --- keys and files ----------------------------------------------------------------------------------------


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; tighten an existing one."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The one-line form ``ed25519:<base64 of the 32 raw bytes>`` (what ``nefl-edge identity`` prints)."""
    return PUBLIC_KEY_PREFIX + base64.b64encode(public_key_bytes(key)).decode()


def parse_public_key(text: Union[str, bytes]) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or from the one-line ``ed25519:<base64>`` form."""
    data = text.decode(errors="replace") if isinstance(text, bytes) else text
    data = data.strip()
    try:
        if data.startswith(PUBLIC_KEY_PREFIX):
            return public_key_from_bytes(base64.b64decode(data[len(PUBLIC_KEY_PREFIX) :], validate=True))
        key = serialization.load_pem_public_key(data.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error) as exc:
        raise IdentityError(f"not an Ed25519 public key (PEM or {PUBLIC_KEY_PREFIX}<base64>): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError("the public key is not an Ed25519 key")
    return key


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def default_state_dir() -> Path:
    env = os.environ.get("NEFL_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nefl-edge"


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise IdentityError(f"{path} is not a JSON object")
    return data


# --- the identity ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    """What ``nefl-edge enrol`` installed: the broker account and the coordinator's key."""

    node: str
    username: str
    broker: str
    password_file: Path
    coordinator_public_key: Ed25519PublicKey = field(repr=False)
    coordinator_key_id: str = COORDINATOR_KEY_ID
    ca_cert: Optional[Path] = None
    enrolled_at: str = ""


class Identity:
    """This device's identity in ``state_dir``. Use :func:`open_identity`; ``close()`` (or leaving the
    ``with`` block) releases the lock."""

    def __init__(self, state_dir: Path, generated_node: str, private_key: Ed25519PrivateKey) -> None:
        self.state_dir = Path(state_dir)
        self.generated_node = generated_node
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.enrolment: Optional[Enrolment] = load_enrolment(self.state_dir)
        self._lock: Optional[IO[str]] = None

    @property
    def node(self) -> str:
        """The node id: the enrolled name once enrolled, the generated ``dev-...`` id before."""
        return self.enrolment.node if self.enrolment else self.generated_node

    @property
    def key_id(self) -> str:
        """The id under which the coordinator's keyring holds this device's public key (its node id)."""
        return self.node

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def public_key_text(self) -> str:
        return public_key_text(self.public_key)

    def describe(self) -> Dict[str, Any]:
        """What ``nefl-edge identity`` shows (no secret)."""
        enrolled = self.enrolment
        return {
            "node": self.node,
            "public_key": self.public_key_text,
            "fingerprint": self.fingerprint,
            "state_dir": str(self.state_dir),
            "enrolled": enrolled is not None,
            "username": enrolled.username if enrolled else None,
            "broker": enrolled.broker if enrolled else None,
            "tls_ca": str(enrolled.ca_cert) if enrolled and enrolled.ca_cert else None,
            "coordinator_fingerprint": fingerprint(enrolled.coordinator_public_key) if enrolled else None,
        }

    def signer(self) -> Signer:
        """Signs this device's messages with key id = its node id (as the coordinator's keyring has it)."""
        return Signer(self.private_key, self.key_id)

    def keyring(self) -> Keyring:
        """The coordinator's key under its key id; empty before enrolment."""
        e = self.enrolment
        return Keyring({e.coordinator_key_id: e.coordinator_public_key} if e else {})

    def security(self) -> Any:
        """The :class:`~nefl_edge.core.mqtt.Security` of the enrolled broker account (TLS with the
        enrolment's CA when it had one); an empty one before enrolment."""
        from nefl_edge.core.mqtt import Security

        e = self.enrolment
        if e is None:
            return Security()
        return Security(tls_ca=e.ca_cert, username=e.username, password_file=e.password_file)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Identity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(state_dir: Path) -> IO[str]:
    """Take the identity's lock or raise :class:`IdentityInUse` naming the holder's pid and identity."""
    handle = open(state_dir / "lock", "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            handle.close()
            raise
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise IdentityInUse(
            f"another nefl-edge process (pid {pid}) uses identity {_node_name(state_dir)} in {state_dir}; "
            "stop it first, or give this process its own --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _node_name(state_dir: Path) -> str:
    for name in ("enrolment.json", "identity.json"):
        try:
            node = json.loads((state_dir / name).read_text()).get("node")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(node, str):
            return node
    return "?"


def _load_or_create(state_dir: Path) -> Identity:
    meta, key_path = state_dir / "identity.json", state_dir / "device.key"
    if not meta.exists() and not (state_dir / "enrolment.json").exists():  # first start (or an interrupted one)
        key = Ed25519PrivateKey.generate()
        save_private_key(key_path, key)
        save_public_key(state_dir / "device.pub", key.public_key())
        record = {"schema": IDENTITY_SCHEMA, "node": "dev-" + secrets.token_hex(5), "created": now_iso()}
        write_atomic(meta, json.dumps(record), 0o600)
    data = _read_json(meta)
    node = data.get("node")
    if data.get("schema") != IDENTITY_SCHEMA or not isinstance(node, str) or not re.match(NAME_PATTERN, node):
        raise IdentityError(f"{meta} is not a {IDENTITY_SCHEMA} file with a valid node id")
    if not key_path.exists():
        raise IdentityError(f"{key_path} is missing; restore it, or delete {meta} to make a new identity")
    try:
        return Identity(state_dir, node, load_private_key(key_path))
    except KeyFileError as exc:
        raise IdentityError(str(exc)) from None


def open_identity(state_dir: Optional[Path] = None, lock: bool = True) -> Identity:
    """This device's identity, made on first use. With ``lock`` (what a long-lived client wants) the
    identity stays locked until ``close()``; a second process gets :class:`IdentityInUse`. Without it
    (read-only uses such as ``nefl-edge identity``) the lock is held only while a new identity is made."""
    folder = make_private_dir(Path(state_dir) if state_dir else default_state_dir())
    if lock or not (folder / "identity.json").exists():
        handle = _lock(folder)
        try:
            identity = _load_or_create(folder)
        except BaseException:
            handle.close()
            raise
        if lock:
            identity._lock = handle
        else:
            handle.close()
        return identity
    return _load_or_create(folder)


# --- enrolment ---------------------------------------------------------------------------------------------


def load_enrolment(state_dir: Path) -> Optional[Enrolment]:
    path = Path(state_dir) / "enrolment.json"
    if not path.exists():
        return None
    data = _read_json(path)
    try:
        coordinator = parse_public_key((Path(state_dir) / "coordinator.pub").read_text())
    except OSError as exc:
        raise IdentityError(f"enrolment in {state_dir} is incomplete: {exc}; run `nefl-edge enrol` again") from None
    ca = Path(state_dir) / "ca.crt"
    return Enrolment(
        node=str(data["node"]),
        username=str(data["username"]),
        broker=str(data["broker"]),
        password_file=Path(state_dir) / "broker.password",
        coordinator_public_key=coordinator,
        coordinator_key_id=str(data.get("coordinator_key_id", COORDINATOR_KEY_ID)),
        ca_cert=ca if data.get("tls") else None,
        enrolled_at=str(data.get("enrolled_at", "")),
    )


def _field(bundle: Dict[str, Any], name: str, pattern: Optional[str] = None) -> str:
    value = bundle.get(name)
    if not isinstance(value, str) or not value or (pattern is not None and not re.match(pattern, value)):
        raise IdentityError(f"the enrolment bundle has no valid {name!r}")
    return value


def read_bundle(path: Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BUNDLE_SIZE:
            raise IdentityError(f"{path} is larger than an enrolment bundle can be")
    except OSError as exc:
        raise IdentityError(f"cannot read the enrolment bundle {path}: {exc}") from None
    bundle = _read_json(path)
    if bundle.get("schema") != BUNDLE_SCHEMA:
        raise IdentityError(f"{path} is not an enrolment bundle ({BUNDLE_SCHEMA}) from `nefl-coord add-device`")
    return bundle


def install_bundle(state_dir: Optional[Path], bundle_path: Path) -> Identity:
    """Install an enrolment bundle from ``nefl-coord add-device`` into this device's state directory.
    Refuses a bundle made for another device's key, and refuses while another process uses the identity.
    Returns the (locked) identity; the caller closes it."""
    bundle = read_bundle(bundle_path)
    identity = open_identity(state_dir, lock=True)
    try:
        node = _field(bundle, "node", NAME_PATTERN)
        username = _field(bundle, "username", NAME_PATTERN)
        password = _field(bundle, "password", r"^[\x21-\x7e]{8,256}$")
        broker = _field(bundle, "broker", r"^[A-Za-z0-9.:\[\]-]{1,260}$")
        coordinator = parse_public_key(_field(bundle, "coordinator_public_key"))
        key_id = bundle.get("coordinator_key_id", COORDINATOR_KEY_ID)
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise IdentityError("the enrolment bundle has no valid 'coordinator_key_id'")
        if _field(bundle, "device_fingerprint") != identity.fingerprint:
            raise IdentityError(
                f"this bundle was made for the key {bundle['device_fingerprint']}, but this device's key is "
                f"{identity.fingerprint}; run `nefl-coord add-device` with this device's public key"
            )
        ca = bundle.get("ca_cert")
        if ca is not None:
            try:
                x509.load_pem_x509_certificate(ca.encode())
            except (ValueError, TypeError, AttributeError):
                raise IdentityError("the enrolment bundle's 'ca_cert' is not a PEM certificate") from None
        folder = identity.state_dir
        write_atomic(folder / "broker.password", password + "\n", 0o600)
        write_atomic(folder / "coordinator.pub", public_key_pem(coordinator), 0o644)
        if ca is not None:
            write_atomic(folder / "ca.crt", ca, 0o644)
        record = {
            "schema": ENROLMENT_SCHEMA,
            "node": node,
            "username": username,
            "broker": broker,
            "coordinator_key_id": key_id,
            "tls": ca is not None,
            "enrolled_at": now_iso(),
        }
        write_atomic(folder / "enrolment.json", json.dumps(record, indent=1), 0o600)
        identity.enrolment = load_enrolment(folder)
    except BaseException:
        identity.close()
        raise
    return identity
