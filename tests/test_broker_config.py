"""The generated Mosquitto configuration, run by a real Mosquitto: authentication, TLS, the per-device ACL,
the packet size limit, session takeover and revocation. Mosquitto denies silently, so every negative check
comes after a positive control on the same connection has arrived."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional

import paho.mqtt.client as mqtt
import pytest

from nefl_edge.coordinator.broker_config import (
    BrokerOptions,
    config_text,
    hash_password,
    verify_password,
)
from nefl_edge.coordinator.enrolment import remove_device
from tests.fakes import Peer
from tests.helpers import EnrolledBroker, wait_for

pytestmark = pytest.mark.integration

RUN = "r1"


def node(name: str, kind: str) -> str:
    return f"nefl/{RUN}/node/{name}/{kind}"


class Deployment(EnrolledBroker):
    """The generated, enrolled broker (:class:`tests.helpers.EnrolledBroker`, persistent) with two devices."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, ("pi-a", "pi-b"), persistence=True)

    def peer(self, user: Optional[str], password: Optional[str] = None, tls: bool = True, **kw: object) -> Peer:
        if user is not None and password is None:
            password = self.passwords[user]
        port = self.tls_port if tls else self.plain_port
        return Peer(port, user, password, self.settings.ca_cert if tls else None, **kw)  # type: ignore[arg-type]


def _bundle_password(path: Path) -> str:
    import json

    return str(json.loads(path.read_text())["password"])


def stays_false(predicate, seconds: float = 0.3) -> bool:  # type: ignore[no-untyped-def]
    """The bounded wait of a negative check, after the positive control has arrived."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    d.start()
    peers: List[Peer] = []
    real_peer = d.peer

    def tracked(*args: object, **kw: object) -> Peer:
        p = real_peer(*args, **kw)  # type: ignore[arg-type]
        peers.append(p)
        return p

    d.peer = tracked  # type: ignore[method-assign]
    yield d
    for p in peers:
        p.close()
    d.stop()


def connect_packet(client_id: str, user: str, password: str) -> bytes:
    def text(s: str) -> bytes:
        return struct.pack(">H", len(s)) + s.encode()

    body = text("MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30) + text(client_id) + text(user) + text(password)
    return bytes([0x10, len(body)]) + body


def first_bytes(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        try:
            return s.recv(4)
        except (ConnectionResetError, socket.timeout):
            return b""


# --- the configuration text --------------------------------------------------------------------------------


def test_plain_listener_only_on_loopback_and_only_when_asked(tmp_path: Path) -> None:
    with_plain = config_text(BrokerOptions(tmp_path, tls_port=8883, plain_port=1884))
    without = config_text(BrokerOptions(tmp_path, tls_port=8883))

    listeners = re.findall(r"^listener .*$", with_plain, re.M)
    assert listeners == ["listener 8883", "listener 1884 127.0.0.1"]
    assert re.findall(r"^listener .*$", without, re.M) == ["listener 8883"]
    for line in ("allow_anonymous false", "per_listener_settings false", "tls_version tlsv1.2"):
        assert line in without
    assert f"password_file {tmp_path.resolve() / 'passwd'}" in without
    assert re.search(r"^max_packet_size \d+$", without, re.M)
    moved = config_text(BrokerOptions(tmp_path, install_dir=Path("/etc/mosquitto/nefl")))
    assert "acl_file /etc/mosquitto/nefl/acl" in moved and "keyfile /etc/mosquitto/nefl/server.key" in moved
    global_section = without.split("\nlistener ", 1)[0]
    assert "use_username_as_clientid" not in global_section  # there it would open a default listener on 1883


def test_password_hash_is_what_mosquitto_passwd_makes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("u:correct horse\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    entry = passwd.read_text().strip().split(":", 1)[1]
    _, _, iterations, salt, _ = entry.split("$")

    import base64

    ours = hash_password("correct horse", base64.b64decode(salt), int(iterations))

    assert ours == entry
    assert verify_password(entry, "correct horse")
    assert not verify_password(entry, "correct horsE")


# --- a real Mosquitto with the generated configuration -----------------------------------------------------


def test_the_broker_listens_only_where_configured(deployment: Deployment) -> None:
    deployment.peer("pi-a").connect()

    opened = set(re.findall(r"listen socket on port (\d+)", deployment.log.read_text()))

    assert opened == {str(deployment.tls_port), str(deployment.plain_port)}


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "loopback"])
def test_no_or_wrong_credentials_are_refused(deployment: Deployment, tls: bool) -> None:
    anonymous = deployment.peer(None, tls=tls, client_id="anon").start()
    wrong = deployment.peer("pi-a", "not-the-password", tls=tls, client_id="x").start()
    stranger = deployment.peer("nobody", "pw", tls=tls, client_id="y").start()
    swapped = deployment.peer("pi-a", deployment.passwords["pi-b"], tls=tls, client_id="z").start()
    good = deployment.peer("pi-a", tls=tls).connect()

    for refused in (anonymous, wrong, stranger, swapped):
        wait_for(lambda: refused.connack is not None, 10, "CONNACK", 0.02)  # noqa: B023
        assert refused.failed, refused.connack
    assert not good.failed


def test_plaintext_is_refused_on_the_tls_listener(deployment: Deployment) -> None:
    packet = connect_packet("pi-a", "pi-a", deployment.passwords["pi-a"])

    assert first_bytes(deployment.plain_port, packet) == b"\x20\x02\x00\x00"  # control: CONNACK accepted
    assert not first_bytes(deployment.tls_port, packet).startswith(b"\x20")


def test_tls_needs_the_generated_ca(deployment: Deployment) -> None:
    def client(ca: Optional[Path]) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-a")
        c.username_pw_set("pi-a", deployment.passwords["pi-a"])
        c.tls_set(ca_certs=str(ca) if ca else None)  # None: the system's CAs only
        return c

    trusting = client(deployment.settings.ca_cert)
    assert trusting.connect("127.0.0.1", deployment.tls_port) == mqtt.MQTT_ERR_SUCCESS
    trusting.disconnect()
    with pytest.raises(ssl.SSLCertVerificationError):
        client(None).connect("127.0.0.1", deployment.tls_port)


def test_a_device_cannot_publish_as_another_device(deployment: Deployment) -> None:
    coord = deployment.peer("nefl-coord").connect()
    coord.subscribe(*(node("+", f"{kind}/#") for kind in ("hello", "status", "update")))
    a = deployment.peer("pi-a").connect()

    a.publish(node("pi-b", "update"), b"forged update")
    a.publish(node("pi-b", "hello"), b"forged hello")
    a.publish(node("pi-b", "status/chunk/0"), b"forged status", retain=True)
    a.publish(node("pi-a", "update"), b"real update")
    a.publish(node("pi-a", "status/chunk/0"), b"real status", retain=True)

    wait_for(lambda: coord.got(node("pi-a", "status/chunk/0")), 5, "the positive control", 0.02)
    assert coord.got(node("pi-a", "update"), b"real update")
    assert stays_false(lambda: any("/pi-b/" in t for t in coord.topics()))


def test_a_device_reads_only_its_own_task_and_the_broadcasts(deployment: Deployment) -> None:
    a, b = deployment.peer("pi-a").connect(), deployment.peer("pi-b").connect()
    a.subscribe(
        node("pi-b", "task"),
        node("+", "task"),
        node("pi-a", "task"),
        f"nefl/{RUN}/weights/#",
        f"nefl/{RUN}/artifact/#",
        f"nefl/{RUN}/manifest/#",
        f"nefl/{RUN}/control",
    )
    b.subscribe(node("pi-b", "task"))
    coord = deployment.peer("nefl-coord").connect()
    broadcasts = [
        f"nefl/{RUN}/weights/0/chunk/0",
        f"nefl/{RUN}/artifact/{'ab' * 32}/chunk/0",
        f"nefl/{RUN}/manifest/chunk/0",
        f"nefl/{RUN}/control",
    ]

    coord.publish(node("pi-b", "task"), b"task for b")
    for topic in broadcasts:
        coord.publish(topic, b"broadcast", retain=topic.endswith("/0"))
    coord.publish(node("pi-a", "task"), b"task for a")

    wait_for(lambda: a.got(node("pi-a", "task")), 5, "a's own task", 0.02)
    wait_for(lambda: b.got(node("pi-b", "task")), 5, "b's task", 0.02)
    assert all(a.got(topic) for topic in broadcasts)
    assert stays_false(lambda: a.got(node("pi-b", "task")))


def test_a_device_cannot_forge_tasks_or_broadcasts(deployment: Deployment) -> None:
    b = deployment.peer("pi-b").connect()
    b.subscribe(node("pi-b", "task"), f"nefl/{RUN}/control", f"nefl/{RUN}/weights/#", f"nefl/{RUN}/manifest/#")
    a = deployment.peer("pi-a").connect()
    coord = deployment.peer("nefl-coord").connect()

    a.publish(node("pi-b", "task"), b"forged task")
    a.publish(f"nefl/{RUN}/control", b"forged end")
    a.publish(f"nefl/{RUN}/weights/0/chunk/0", b"forged weights", retain=True)
    a.publish(f"nefl/{RUN}/manifest/chunk/0", b"forged manifest", retain=True)
    a.publish(node("pi-a", "update"), b"a is still connected")
    coord.publish(f"nefl/{RUN}/control", b"real control")

    wait_for(lambda: b.got(f"nefl/{RUN}/control", b"real control"), 5, "the coordinator's control", 0.02)
    assert stays_false(lambda: any(p.startswith(b"forged") for _, p in list(b.messages)))
    assert a.disconnects == []


def test_a_device_cannot_take_over_another_devices_session(deployment: Deployment) -> None:
    b = deployment.peer("pi-b", client_id=f"nefl-{RUN}-pi-b").connect()
    b.subscribe(node("pi-b", "task"))
    deployment.peer("pi-a", client_id=f"nefl-{RUN}-pi-b").connect()  # same client id, other account
    coord = deployment.peer("nefl-coord").connect()

    coord.publish(node("pi-b", "task"), b"task")

    wait_for(lambda: b.got(node("pi-b", "task")), 5, "b's task", 0.02)
    assert b.disconnects == []


def test_packets_over_the_size_limit_are_refused(deployment: Deployment) -> None:
    coord = deployment.peer("nefl-coord").connect()
    coord.subscribe(node("+", "update/#"))
    a, b = deployment.peer("pi-a").connect(), deployment.peer("pi-b").connect()

    a.client.publish(node("pi-a", "update"), b"x" * (deployment_limit(deployment) + 1), qos=1)
    wait_for(lambda: a.disconnects, 10, "the broker to drop the oversized publisher", 0.02)
    b.publish(node("pi-b", "update"), b"y" * 1_000_000)

    wait_for(lambda: coord.got(node("pi-b", "update")), 10, "b's update", 0.02)
    assert stays_false(lambda: coord.got(node("pi-a", "update")))


def deployment_limit(d: Deployment) -> int:
    text = (d.settings.folder / "mosquitto.conf").read_text()
    match = re.search(r"^max_packet_size (\d+)$", text, re.M)
    assert match
    return int(match.group(1))


def test_a_removed_device_is_disconnected_when_the_broker_reloads(deployment: Deployment) -> None:
    a, b = deployment.peer("pi-a").connect(), deployment.peer("pi-b").connect()

    assert remove_device(deployment.folder / "enrol", "pi-a", deployment.settings.folder)
    deployment.reload()

    wait_for(lambda: a.disconnects, 10, "the removed device to be disconnected", 0.05)
    again = deployment.peer("pi-a", client_id="again").start()
    wait_for(lambda: again.connack is not None, 10, "CONNACK", 0.02)
    assert again.failed
    assert b.disconnects == []


def test_the_mqtt_link_connects_with_an_enrolled_identity(deployment: Deployment, tmp_path: Path) -> None:
    from nefl_edge.coordinator.enrolment import add_device as enrol
    from nefl_edge.core.identity import install_bundle, open_identity
    from nefl_edge.core.mqtt import BrokerAddress, MqttLink
    from nefl_edge.core.schemas import Status

    state = tmp_path / "device-state"
    with open_identity(state) as ident:
        public = ident.public_key
    bundle = enrol(tmp_path / "enrol", "pi-c", public, deployment.settings.folder).bundle
    deployment.reload()
    probe = deployment.peer("pi-c", _bundle_password(bundle), client_id="probe").start()
    wait_for(lambda: probe.connack is not None and not probe.failed, 10, "the broker to know pi-c", 0.02)
    probe.close()
    coord = deployment.peer("nefl-coord").connect()
    coord.subscribe(node("+", "status/#"))
    ident = install_bundle(state, bundle)
    assert ident.enrolment is not None
    link = MqttLink("ignored", BrokerAddress.parse(ident.enrolment.broker), RUN, ident.security(), clean=True)
    link.connect(10)

    link.publish(node(ident.node, "status"), Status(run=RUN, node=ident.node, state="online"), retain=True)

    wait_for(lambda: coord.got(node("pi-c", "status/chunk/0")), 5, "the device's status", 0.02)
    link.clear_retained(node(ident.node, "status"))
    link.close()
    ident.close()
