"""One MQTT connection for either side (paho-mqtt 2.x): TLS and password options, a Last Will, persistent
sessions, automatic reconnects with backoff, chunked publishing, and an inbox of validated messages.

Correct over MQTT 3.1.1; MQTT 5 is optional (``protocol="5"``), used only for a session expiry interval.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import paho.mqtt.client as mqtt
from nefl_edge.edge_client.schemas import Message
from nefl_edge.edge_client.wire import DEFAULT_CHUNK_SIZE, Assembler, ProtocolError, decode, encode, frames
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

CHUNK_MARK = "/chunk/"
Inbound = Tuple[str, Message, bytes]


class BrokerError(ConnectionError):
    """The broker cannot be reached or refused us; the message says what to check."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int = 1883

    @classmethod
    def parse(cls, text: str, default_port: int = 1883) -> BrokerAddress:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, str(default_port)
        if not host:
            raise ValueError(f"broker address {text!r} has no host; use HOST or HOST:PORT")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"broker port in {text!r} must be a number in 1..65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Security:
    """How to authenticate: TLS (a CA file, optional client certificate) and a username with a password
    read from a file (never from the command line, where other users could see it)."""

    tls_ca: Optional[Path] = None
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    tls_insecure: bool = False
    username: Optional[str] = None
    password_file: Optional[Path] = None

    def apply(self, client: mqtt.Client) -> None:
        for path in (self.tls_ca, self.tls_cert, self.tls_key, self.password_file):
            if path is not None and not Path(path).is_file():
                raise BrokerError(f"file {path} does not exist; check the TLS / password options")
        if self.tls_ca is not None or self.tls_cert is not None:
            client.tls_set(
                ca_certs=str(self.tls_ca) if self.tls_ca else None,
                certfile=str(self.tls_cert) if self.tls_cert else None,
                keyfile=str(self.tls_key) if self.tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(self.tls_insecure)
        if self.username is not None:
            password = Path(self.password_file).read_text().strip() if self.password_file else None
            client.username_pw_set(self.username, password)


class MqttLink:
    """A persistent, reconnecting MQTT session that speaks the nefl wire format."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerAddress,
        run: str,
        security: Security = Security(),
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        will: Optional[Tuple[str, bytes]] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        clean: bool = False,
    ) -> None:
        self.broker, self.run, self.chunk_size = broker, run, chunk_size
        self.protocol = protocol
        self._clean = clean
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        kwargs: Dict[str, Any] = {"client_id": client_id, "protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        security.apply(self.client)
        if will is not None:
            self.client.will_set(will[0], frames(will[1], chunk_size)[0], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.assembler = Assembler()
        self.rejected = 0
        self.connected = threading.Event()
        self._refused: Optional[str] = None
        self._subs: List[str] = []
        self._retained_counts: Dict[str, int] = {}
        self.on_connected: Optional[Callable[[], None]] = None
        self._lock = threading.Lock()

    # --- connection ----------------------------------------------------------------------------------------

    def connect(self, timeout_s: float = 15.0) -> None:
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        try:
            if self.protocol == "5":
                self.client.connect_async(
                    self.broker.host, self.broker.port, keepalive=30, clean_start=self._clean, properties=props
                )
            else:
                self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to broker {self.broker}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(timeout_s) or self._refused:
            self.client.loop_stop()
            reason = self._refused or f"no answer within {timeout_s:.0f} s"
            raise BrokerError(
                f"cannot connect to MQTT broker {self.broker}: {reason}. Check that the broker runs and "
                "listens there, and the --tls-* / --username / --password-file options."
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = f"broker refused the connection ({reason})"
            log.error("broker %s refused the connection: %s", self.broker, reason)
            self.connected.set()
            client.disconnect()
            return
        log.info("connected to broker %s", self.broker)
        with self._lock:
            for topic in self._subs:
                client.subscribe(topic, qos=1)
        self.connected.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            log.warning("lost broker %s (%s); reconnecting with backoff", self.broker, reason)

    # --- traffic -------------------------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        with self._lock:
            if topic not in self._subs:
                self._subs.append(topic)
        self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            if topic in self._subs:
                self._subs.remove(topic)
        self.client.unsubscribe(topic)

    def publish(self, topic: str, message: Message, body: bytes = b"", retain: bool = False) -> int:
        """Publish one message (chunked as needed) at QoS 1; return the bytes sent. Retained messages
        keep chunk ``i`` on ``<topic>/chunk/<i>`` and clear chunks left over from a longer predecessor."""
        parts = frames(encode(message, body), self.chunk_size)
        if retain:
            for i, frame in enumerate(parts):
                self.client.publish(f"{topic}{CHUNK_MARK}{i}", frame, qos=1, retain=True)
            for i in range(len(parts), self._retained_counts.get(topic, 0)):
                self.client.publish(f"{topic}{CHUNK_MARK}{i}", b"", qos=1, retain=True)
            self._retained_counts[topic] = len(parts)
        else:
            for frame in parts:
                self.client.publish(topic, frame, qos=1)
        return sum(len(p) for p in parts)

    def clear_retained(self, topic: str) -> None:
        """Delete the retained chunks that this link published on ``topic``."""
        for i in range(self._retained_counts.pop(topic, 0)):
            self.client.publish(f"{topic}{CHUNK_MARK}{i}", b"", qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        stream = msg.topic.split(CHUNK_MARK, 1)[0]
        try:
            data = self.assembler.feed(stream, bytes(msg.payload))
            if data is None:
                return
            message, body = decode(data)
            if message.run != self.run:
                raise ProtocolError(f"message for run {message.run!r}, this is run {self.run!r}")
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("rejected payload on %s: %s", msg.topic, exc)
            return
        self.inbox.put((stream, message, body))
