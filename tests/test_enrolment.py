"""Device identity (state directory, key pair, lock) and enrolment (`nefl-coord add-device`,
`nefl-edge enrol`), through the real CLIs where a user would use them."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from nefl_edge.coordinator.broker_config import BrokerOptions, read_password_file, verify_password, write_broker_config
from nefl_edge.coordinator.cli import app as coord_app
from nefl_edge.coordinator.enrolment import (
    EnrolmentError,
    add_device,
    coordinator_keyring,
    coordinator_private_key,
    coordinator_signer,
    device_keyring,
    list_devices,
    read_public_key,
    remove_device,
)
from nefl_edge.core.errors import NeflError
from nefl_edge.core.identity import (
    IdentityError,
    IdentityInUse,
    default_state_dir,
    install_bundle,
    open_identity,
    public_key_pem,
    public_key_text,
)
from nefl_edge.core.signing import SignatureError, Signer
from nefl_edge.edge_client.cli import app as edge_app
from tests.helpers import device_env

runner = CliRunner()


def cli(app: typer.Typer, *args: str) -> Tuple[int, str]:
    """Exit code and output of a command as ``run_app`` ends it (a NeflError: its code and message)."""
    result = runner.invoke(app, list(args))
    if isinstance(result.exception, NeflError):
        return int(result.exception.exit_code), result.output + f"error: {result.exception}\n"
    return result.exit_code, result.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def broker_dir(tmp_path: Path) -> Path:
    return write_broker_config(BrokerOptions(tmp_path / "broker", ("broker.lan",), 8883)).folder


def bundle_of(path: Path) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(path.read_text()))


# --- identity ----------------------------------------------------------------------------------------------


def test_identity_is_made_on_first_start_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"

    with open_identity(state) as first:
        node, key = first.node, first.public_key_text
    with open_identity(state) as again:
        assert (again.node, again.public_key_text) == (node, key)

    assert node.startswith("dev-") and len(node) == 14 and node != socket.gethostname()
    assert mode(state) == 0o700
    assert mode(state / "device.key") == 0o600
    assert mode(state / "identity.json") == 0o600


def test_state_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEFL_STATE_DIR", str(tmp_path / "env-state"))

    assert default_state_dir() == tmp_path / "env-state"


def test_a_second_process_with_the_same_identity_gets_a_clear_error(tmp_path: Path, broker_dir: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from nefl_edge.core.identity import open_identity\n"
            f"i = open_identity({str(state)!r}); print(i.node, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        node = holder.stdout.readline().decode().strip()

        with pytest.raises(IdentityInUse) as in_use:
            open_identity(state)
        bundle = add_device(tmp_path / "e", "pi", Ed25519PrivateKey.generate().public_key(), broker_dir).bundle
        code, output = cli(edge_app, "enrol", str(bundle), "--state-dir", str(state))
    finally:
        holder.communicate(b"", timeout=10)

    assert node.startswith("dev-")
    assert str(in_use.value) == (
        f"another nefl-edge process (pid {holder.pid}) uses identity {node} in {state}; "
        "stop it first, or give this process its own --state-dir"
    )
    assert code == 2 and "another nefl-edge process" in output
    open_identity(state).close()  # the lock goes with the process


def test_the_identity_command_runs_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nefl_edge.edge_client", "identity", "--json", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        env=device_env(tmp_path),
        check=True,
    )

    info = json.loads(out.stdout)
    assert info["public_key"].startswith("ed25519:") and info["enrolled"] is False


# --- enrolment ---------------------------------------------------------------------------------------------


def test_add_device_then_enrol_installs_the_bundle(tmp_path: Path, broker_dir: Path) -> None:
    state, enrol_dir = tmp_path / "device", tmp_path / "enrol"
    key = json.loads(cli(edge_app, "identity", "--json", "--state-dir", str(state))[1])["public_key"]
    dirs = ("--enrolment-dir", str(enrol_dir), "--broker-dir", str(broker_dir))

    added = cli(coord_app, "add-device", "kitchen-pi", "--public-key", key, *dirs)
    bundle = enrol_dir / "bundles" / "kitchen-pi.json"
    enrolled = cli(edge_app, "enrol", str(bundle), "--state-dir", str(state))

    assert added[0] == 0, added[1]
    assert enrolled[0] == 0, enrolled[1]
    password = bundle_of(bundle)["password"]
    assert len(password) >= 40
    assert password not in added[1] + enrolled[1]
    assert mode(bundle) == 0o600
    assert verify_password(read_password_file(broker_dir / "passwd")["kitchen-pi"], password)
    assert list_devices(enrol_dir)["kitchen-pi"].public_key == key
    assert (state / "broker.password").read_text().strip() == password
    assert mode(state / "broker.password") == 0o600
    with open_identity(state) as ident:  # a restart: the enrolled identity is kept
        assert ident.node == "kitchen-pi" and ident.public_key_text == key
        assert ident.enrolment is not None and ident.enrolment.broker == "broker.lan:8883"
        security = ident.security()
    assert security.username == "kitchen-pi" and security.password_file == state / "broker.password"
    assert security.tls_ca == state / "ca.crt"
    assert (state / "ca.crt").read_text() == (broker_dir / "ca.crt").read_text()
    coordinator = coordinator_private_key(enrol_dir).public_key()
    assert (state / "coordinator.pub").read_bytes() == public_key_pem(coordinator)


def test_a_bundle_made_for_another_key_is_refused(tmp_path: Path, broker_dir: Path) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    bundle = add_device(tmp_path / "enrol", "pi-x", other, broker_dir).bundle

    with pytest.raises(IdentityError, match="made for the key"):
        install_bundle(tmp_path / "device", bundle)

    with open_identity(tmp_path / "device") as ident:
        assert ident.enrolment is None and ident.node.startswith("dev-")


def test_a_name_taken_by_another_key_needs_replace(tmp_path: Path, broker_dir: Path) -> None:
    enrol_dir = tmp_path / "enrol"
    first, second = (Ed25519PrivateKey.generate().public_key() for _ in range(2))
    old = bundle_of(add_device(enrol_dir, "pi-1", first, broker_dir).bundle)["password"]

    with pytest.raises(EnrolmentError, match="--replace"):
        add_device(enrol_dir, "pi-1", second, broker_dir)
    replaced = add_device(enrol_dir, "pi-1", second, broker_dir, replace=True)

    assert replaced.replaced
    assert device_keyring(enrol_dir)["pi-1"] == second
    new = bundle_of(replaced.bundle)["password"]
    entry = read_password_file(broker_dir / "passwd")["pi-1"]
    assert verify_password(entry, new) and not verify_password(entry, old)


def test_one_key_one_name_and_coordinator_names_are_reserved(tmp_path: Path, broker_dir: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    add_device(tmp_path / "enrol", "pi-1", key, broker_dir)

    with pytest.raises(EnrolmentError, match="already enrolled as 'pi-1'"):
        add_device(tmp_path / "enrol", "pi-2", key, broker_dir)
    for name in ("nefl-coord", "coordinator", "bad/name", "+"):
        with pytest.raises(EnrolmentError):
            add_device(tmp_path / "enrol", name, Ed25519PrivateKey.generate().public_key(), broker_dir)


def test_remove_device_withdraws_account_key_and_bundle(tmp_path: Path, broker_dir: Path) -> None:
    enrol_dir = tmp_path / "enrol"
    keep, gone = (Ed25519PrivateKey.generate().public_key() for _ in range(2))
    add_device(enrol_dir, "keep", keep, broker_dir)
    bundle = add_device(enrol_dir, "gone", gone, broker_dir).bundle

    dirs = ("--enrolment-dir", str(enrol_dir), "--broker-dir", str(broker_dir))

    result = cli(coord_app, "remove-device", "gone", *dirs)
    again = cli(coord_app, "remove-device", "gone", *dirs)

    assert result[0] == 0, result[1]
    assert again[0] == 2 and "not enrolled" in again[1]
    assert set(device_keyring(enrol_dir)) == {"keep"}
    assert set(read_password_file(broker_dir / "passwd")) == {"keep", "nefl-coord"}
    assert not bundle.exists()
    assert not remove_device(enrol_dir, "never", broker_dir)


def test_the_coordinator_key_is_made_once_and_private(tmp_path: Path) -> None:
    first = coordinator_private_key(tmp_path / "enrol")
    second = coordinator_private_key(tmp_path / "enrol")

    assert public_key_text(first.public_key()) == public_key_text(second.public_key())
    assert mode(tmp_path / "enrol" / "coordinator.key") == 0o600
    assert mode(tmp_path / "enrol") == 0o700


def test_public_keys_are_read_from_text_pem_or_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    pem_file = tmp_path / "device.pub"
    pem_file.write_bytes(public_key_pem(key))

    for given in (public_key_text(key), public_key_pem(key).decode(), str(pem_file)):
        assert read_public_key(given) == key
    for bad in ("ed25519:not-base64!", str(tmp_path / "missing.pub"), "ed25519:" + "A" * 40):
        with pytest.raises(EnrolmentError):
            read_public_key(bad)


def test_add_device_without_a_broker_folder_says_what_to_pass(tmp_path: Path) -> None:
    key = public_key_text(Ed25519PrivateKey.generate().public_key())

    dirs = ("--enrolment-dir", str(tmp_path / "e"), "--broker-dir", str(tmp_path))

    code, output = cli(coord_app, "add-device", "pi", "--public-key", key, *dirs)

    assert code == 2
    assert "broker-config --out" in output
    assert not (tmp_path / "e" / "devices.json").exists()


def test_files_are_private_whatever_the_umask(tmp_path: Path, broker_dir: Path) -> None:
    old = os.umask(0)
    try:
        with open_identity(tmp_path / "device") as ident:
            key = ident.public_key
        bundle = add_device(tmp_path / "enrol", "pi", key, broker_dir).bundle
        install_bundle(tmp_path / "device", bundle).close()
    finally:
        os.umask(old)

    for path in ("device.key", "broker.password", "enrolment.json", "identity.json"):
        assert mode(tmp_path / "device" / path) == 0o600, path
    assert mode(bundle) == 0o600
    assert mode(broker_dir / "passwd") == 0o600


def test_enrolled_keys_sign_and_verify_both_ways(tmp_path: Path, broker_dir: Path) -> None:
    with open_identity(tmp_path / "device") as ident:
        key = ident.public_key
    bundle = add_device(tmp_path / "enrol", "pi", key, broker_dir).bundle
    topic_up, topic_down = "nefl/r/node/pi/update", "nefl/r/node/pi/task"

    with install_bundle(tmp_path / "device", bundle) as device:
        up = device.signer().seal(topic_up, b"NEFL update")
        down = coordinator_signer(tmp_path / "enrol").seal(topic_down, b"NEFL task")

        assert coordinator_keyring(tmp_path / "enrol").verify(topic_up, up) == ("pi", b"NEFL update")
        assert device.keyring().verify(topic_down, down) == ("coordinator", b"NEFL task")
        with pytest.raises(SignatureError):
            device.keyring().verify(topic_down, Signer.generate("coordinator").seal(topic_down, b"NEFL forged"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node", "../etc"),
        ("password", "has space"),
        ("broker", "host:1883\nevil"),
        ("coordinator_public_key", "ed25519:AAAA"),
        ("coordinator_key_id", "a/b"),
        ("ca_cert", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        ("schema", "other/1"),
    ],
)
def test_a_malformed_bundle_is_refused_and_changes_nothing(
    tmp_path: Path, broker_dir: Path, field: str, value: str
) -> None:
    with open_identity(tmp_path / "device") as ident:
        key = ident.public_key
    bundle = add_device(tmp_path / "enrol", "pi", key, broker_dir).bundle
    data = bundle_of(bundle)
    data[field] = value
    bundle.write_text(json.dumps(data))

    with pytest.raises(IdentityError):
        install_bundle(tmp_path / "device", bundle)

    assert not (tmp_path / "device" / "enrolment.json").exists()
    assert not (tmp_path / "device" / "broker.password").exists()
