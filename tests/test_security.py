"""Password and TLS listeners of a real Mosquitto: the MQTT link (used by both sides) authenticates."""

from __future__ import annotations

from pathlib import Path

import pytest

from nefl_edge.core.mqtt import BrokerAddress, BrokerError, MqttLink, Security
from nefl_edge.core.schemas import Status
from tests.helpers import Broker

pytestmark = pytest.mark.integration


@pytest.fixture
def secure_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    b = Broker(tmp_path).start(with_auth=True)
    yield b
    b.stop()


def link(port: int, security: Security) -> MqttLink:
    return MqttLink("sec-test", BrokerAddress("127.0.0.1", port), "r", security, clean=True)


def test_password_listener_accepts_the_right_password_only(secure_broker: Broker, tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret-pw\n")
    bad.write_text("wrong\n")
    assert secure_broker.password_port is not None

    ok = link(secure_broker.password_port, Security(username="device", password_file=good))
    ok.connect(10)
    ok.publish("nefl/r/node/x/status", Status(run="r", node="x", state="online"))
    ok.close()

    with pytest.raises(BrokerError, match="refused") as refused:
        link(secure_broker.password_port, Security(username="device", password_file=bad)).connect(10)
    assert "wrong" not in str(refused.value)


def test_tls_listener_needs_the_ca(secure_broker: Broker) -> None:
    assert secure_broker.tls_port is not None

    ok = link(secure_broker.tls_port, Security(tls_ca=secure_broker.folder / "ca.crt"))
    ok.connect(10)
    ok.close()

    with pytest.raises(BrokerError):
        link(secure_broker.tls_port, Security()).connect(3)


def test_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="does not exist"):
        link(1883, Security(username="u", password_file=tmp_path / "none"))
