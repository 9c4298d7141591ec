"""Enrolment of devices: the coordinator's own Ed25519 key pair, the list of enrolled devices with their
public keys, broker accounts, and the bundle each device installs with ``nefl-edge enrol``.

Flow::

    device$ nefl-edge identity                      # prints the node id and "ed25519:<base64>" public key
    coord$  nefl-coord broker-config --out BROKER --hostname broker.lan
    coord$  nefl-coord add-device kitchen-pi --public-key ed25519:... --enrolment-dir ENROL --broker-dir BROKER
            # -> ENROL/bundles/kitchen-pi.json (0600): copy it to the device, then delete it
    coord$  systemctl reload mosquitto              # the broker re-reads its password file (SIGHUP)
    device$ nefl-edge enrol kitchen-pi.json

Enrolment folder (mode 0700)::

    coordinator.key   Ed25519 private key (PKCS#8 PEM, 0600), made on first use
    coordinator.pub   its public key (PEM)
    devices.json      {"schema": "nefl.devices/1", "devices": [{name, public_key, fingerprint, enrolled_at}]}
    bundles/NAME.json the bundle of device NAME (0600; it holds the broker password)

Bundle (``nefl.enrolment-bundle/1``, JSON): ``node``, ``username`` (= node), ``password``, ``broker``
(HOST:PORT of the TLS listener), ``ca_cert`` (PEM or null), ``coordinator_public_key`` (PEM),
``coordinator_key_id``, ``device_fingerprint`` (the key it was made for), ``created``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nefl_edge.coordinator.broker_config import COORDINATOR_USER, BrokerSettings, set_password
from nefl_edge.core.errors import BadInput
from nefl_edge.core.identity import (
    BUNDLE_SCHEMA,
    COORDINATOR_KEY_ID,
    NAME_PATTERN,
    IdentityError,
    make_private_dir,
    now_iso,
    parse_public_key,
    public_key_pem,
    public_key_text,
    write_atomic,
)
from nefl_edge.core.signing import (
    KeyFileError,
    Keyring,
    Signer,
    fingerprint,
    load_private_key,
    save_private_key,
    save_public_key,
)
from nefl_edge.core.wire import Pieces

log = logging.getLogger(__name__)
DEVICES_SCHEMA = "nefl.devices/1"
RESERVED_NAMES = frozenset({COORDINATOR_KEY_ID, COORDINATOR_USER})


class EnrolmentError(BadInput):
    """An enrolment request that cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True)
class Device:
    """One enrolled device; ``public_key`` in the one-line ``ed25519:<base64>`` form."""

    name: str
    public_key: str
    fingerprint: str
    enrolled_at: str


@dataclass(frozen=True)
class Enrolled:
    device: Device
    bundle: Path
    replaced: bool


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / "lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def coordinator_private_key(enrolment_dir: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key (key id ``coordinator``), made on first use."""
    folder = make_private_dir(Path(enrolment_dir))
    path = folder / "coordinator.key"
    if not path.exists():
        with _locked(folder):
            if not path.exists():
                key = Ed25519PrivateKey.generate()
                save_private_key(path, key)
                save_public_key(folder / "coordinator.pub", key.public_key())
    try:
        return load_private_key(path)
    except KeyFileError as exc:
        raise EnrolmentError(str(exc)) from None


def list_devices(enrolment_dir: Path) -> Dict[str, Device]:
    """The enrolled devices by name (none if the folder has no ``devices.json`` yet)."""
    path = Path(enrolment_dir) / "devices.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != DEVICES_SCHEMA:
            raise ValueError(f"not a {DEVICES_SCHEMA} file")
        return {d["name"]: Device(**d) for d in data["devices"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EnrolmentError(f"{path} cannot be read: {exc}") from None


def device_keyring(enrolment_dir: Path) -> Dict[str, Ed25519PublicKey]:
    """``{key_id: public key}`` of every enrolled device; a device's key id is its node id."""
    return {name: parse_public_key(d.public_key) for name, d in list_devices(enrolment_dir).items()}


def coordinator_signer(enrolment_dir: Path) -> Signer:
    """Signs the coordinator's messages (key id ``coordinator``, as the devices' bundles name it)."""
    return Signer(coordinator_private_key(enrolment_dir), COORDINATOR_KEY_ID)


class EnrolledKeyring(Keyring):
    """The enrolled devices' keys, read again from ``devices.json`` when it changes (its mtime and size are
    looked at before each verification: one ``stat``): a device enrolled (or removed) while ``serve`` runs is
    heard (or refused) from its next message on, without a restart. An unreadable file keeps the keys read
    before."""

    def __init__(self, enrolment_dir: Path) -> None:
        self.path = Path(enrolment_dir) / "devices.json"
        self._seen: Optional[Tuple[float, int]] = self._stamp()
        super().__init__(device_keyring(enrolment_dir))

    def _stamp(self) -> Optional[Tuple[float, int]]:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def refresh(self) -> None:
        """Re-read ``devices.json`` if it changed since it was last read."""
        stamp = self._stamp()
        if stamp == self._seen:
            return
        try:
            keys = device_keyring(self.path.parent)
        except (EnrolmentError, IdentityError) as exc:
            log.warning("kept the enrolled keys read before: %s", exc)
            return
        self._seen = stamp
        for key_id in [k for k in self if k not in keys]:
            self.remove(key_id)
            log.info("device %s is no longer enrolled", key_id)
        for key_id, key in keys.items():
            if self.get(key_id) is None or public_key_text(self.get(key_id)) != public_key_text(key):  # type: ignore[arg-type]
                self.add(key_id, key)
                log.info("device %s enrolled: its messages are accepted from now on", key_id)

    def verify_pieces(self, topic: str, data: Pieces) -> Tuple[str, Pieces]:
        self.refresh()
        return super().verify_pieces(topic, data)


def coordinator_keyring(enrolment_dir: Path) -> Keyring:
    """The enrolled devices' keys, for verifying their hello, status and updates (kept up to date with
    ``devices.json``: :class:`EnrolledKeyring`)."""
    return EnrolledKeyring(enrolment_dir)


def read_public_key(text_or_file: str) -> Ed25519PublicKey:
    """A device public key given as a file (PEM or one-line form) or as the text itself."""
    text = text_or_file.strip()
    if not text.startswith("ed25519:") and "BEGIN" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise EnrolmentError(f"--public-key {text!r} is neither a key (ed25519:... or PEM) nor a file")
        text = path.read_text()
    try:
        return parse_public_key(text)
    except IdentityError as exc:
        raise EnrolmentError(str(exc)) from None


def _save_devices(folder: Path, devices: Dict[str, Device]) -> None:
    data = {"schema": DEVICES_SCHEMA, "devices": [asdict(d) for _, d in sorted(devices.items())]}
    write_atomic(folder / "devices.json", json.dumps(data, indent=1) + "\n", 0o600)


def add_device(
    enrolment_dir: Path,
    name: str,
    public_key: Ed25519PublicKey,
    broker_dir: Path,
    broker: Optional[str] = None,
    replace: bool = False,
    bundle_out: Optional[Path] = None,
) -> Enrolled:
    """Enrol device ``name``: a broker account with a new random password in ``broker_dir/passwd``, an
    entry in ``devices.json`` and a bundle for the device. Enrolling a name again with the same key issues
    new credentials; with another key it is refused unless ``replace``. A key enrolled under another name
    is refused (one device, one identity). The broker must re-read its password file (SIGHUP) afterwards."""
    settings = BrokerSettings.load(broker_dir)
    if not re.match(NAME_PATTERN, name):
        raise EnrolmentError(f"device name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if name in RESERVED_NAMES or name == settings.coordinator_user:
        raise EnrolmentError(f"{name!r} is reserved for the coordinator; choose another device name")
    folder = make_private_dir(Path(enrolment_dir))
    coordinator = coordinator_private_key(folder).public_key()
    key_text, key_print = public_key_text(public_key), fingerprint(public_key)
    with _locked(folder):
        devices = list_devices(folder)
        old = devices.get(name)
        if old is not None and old.public_key != key_text and not replace:
            raise EnrolmentError(
                f"device {name!r} is enrolled with another key ({old.fingerprint}); pass --replace to give the "
                f"name to the key {key_print}, or choose another name"
            )
        for other in devices.values():
            if other.public_key == key_text and other.name != name:
                raise EnrolmentError(f"this key ({key_print}) is already enrolled as {other.name!r}")
        password = secrets.token_urlsafe(32)
        bundle = {
            "schema": BUNDLE_SCHEMA,
            "node": name,
            "username": name,
            "password": password,
            "broker": broker or settings.address,
            "ca_cert": settings.ca_cert.read_text() if settings.ca_cert.is_file() else None,
            "coordinator_public_key": public_key_pem(coordinator).decode(),
            "coordinator_key_id": COORDINATOR_KEY_ID,
            "device_fingerprint": key_print,
            "created": now_iso(),
        }
        out = Path(bundle_out) if bundle_out else make_private_dir(folder / "bundles") / f"{name}.json"
        write_atomic(out, json.dumps(bundle, indent=1) + "\n", 0o600)
        set_password(settings.password_file, name, password)
        device = Device(name, key_text, key_print, now_iso())
        devices[name] = device
        _save_devices(folder, devices)
    return Enrolled(device, out, replaced=old is not None and old.public_key != key_text)


def remove_device(enrolment_dir: Path, name: str, broker_dir: Path) -> bool:
    """Withdraw a device: its broker account, its key and its bundle. False if it was not enrolled.
    The broker must re-read its password file (SIGHUP); Mosquitto then disconnects the device."""
    settings = BrokerSettings.load(broker_dir)
    folder = Path(enrolment_dir)
    if not folder.is_dir():
        return False
    with _locked(folder):
        devices = list_devices(folder)
        known = devices.pop(name, None) is not None
        set_password(settings.password_file, name, None)
        if known:
            _save_devices(folder, devices)
        (folder / "bundles" / f"{name}.json").unlink(missing_ok=True)
    return known
