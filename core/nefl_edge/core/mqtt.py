"""One MQTT connection for either side (paho-mqtt 2.x): the :class:`core.link.Link` that deployments use. TLS
and password options, a Last Will, persistent sessions, automatic reconnects with backoff; chunked and
optionally signed publishing and the inbox of validated (and, with a keyring, verified) messages are
:class:`core.link.FramedLink`'s, shared with the in-memory link of the protocol tests.

The receive path cannot be killed by a payload: paho's callback hands every payload to
:meth:`core.link.Receiver.receive`, which catches every exception, counts it by reason in ``rejections`` and logs it
(rate-limited) with the topic; the fuzz suite drives that same method. :meth:`MqttLink.subscribe` also
subscribes the chunked form on which retained messages travel (``<topic>/chunk/0`` exactly, then its other
chunks exactly, which brokers such as RabbitMQ need; ``<topic>/chunk/+`` for a wildcard filter), so retained
and plain messages on a topic both arrive.

QoS 1 messages go out through a window of :data:`MAX_INFLIGHT` unacknowledged ones, kept by the link, not by
paho (see :class:`MqttLink`): issue 24 measured the next round's 10,000 tasks taking 6.4 s to reach the devices
behind paho's default window of 20 while the devices' answers came in on the same connection.

Correct over MQTT 3.1.1; MQTT 5 is optional (``protocol="5"``), used for a session expiry interval and for
subscriptions with Retain As Published (MQTT 5.0, 3.8.3.1): a message a client publishes retained then arrives
with its retain flag, so that ``on_retained`` sees it at once; over 3.1.1 only retained messages sent for a new
subscription carry the flag (MQTT 3.1.1, 3.3.1.3).
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from nefl_edge.core.errors import BadInput, ExitCode, NeflError
from nefl_edge.core.link import (
    CHUNK_MARK,
    INBOX_BYTES,
    INBOX_SIZE,
    FramedLink,
    Inbound,
    Inbox,
    Receiver,
    split_chunk_topic,
)
from nefl_edge.core.signing import Keyring, Signer, SignerPolicy
from nefl_edge.core.wire import DEFAULT_CHUNK_SIZE, Assembler

__all__ = [  # the receive path lives in core.link since the Link interface; these names stay importable here
    "CHUNK_MARK",
    "BrokerAddress",
    "BrokerError",
    "Inbound",
    "Inbox",
    "MqttLink",
    "Receiver",
    "Security",
    "split_chunk_topic",
]

log = logging.getLogger(__name__)
BACKPRESSURE_S = 5.0
"""How long paho's network thread may hold an awaited answer for room in a full inbox
(:meth:`core.link.FramedLink._offer_waiting`): well within the 45 s a broker waits on a 30 s keepalive."""
MAX_INFLIGHT = 1000
"""QoS 1 messages a link keeps unacknowledged at once (paho's default is 20). A window must cover the messages
sent in one round trip to the broker: at 20, the 10,000 tasks of a round went out 20 per PUBACK round trip of a
network thread that also took in the devices' answers (issue 24: 6.4 s at 10,000 devices). Over MQTT 5 the
broker's Receive Maximum lowers it (MQTT 5.0, 3.2.2.3.3 and 4.9); ``nefl-coord broker-config`` writes
Mosquitto's ``max_inflight_messages`` (which it announces as its Receive Maximum) to match."""


class BrokerError(NeflError, ConnectionError):
    """The broker cannot be reached or refused us; the message says what to check."""

    exit_code = ExitCode.BROKER


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
            raise BadInput(f"broker address {text!r} has no host; use HOST or HOST:PORT")
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise BadInput(f"broker port in {text!r} must be a number in 1..65535")
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


class MqttLink(FramedLink):
    """A persistent, reconnecting MQTT session that speaks the nefl wire format: a :class:`core.link.Link` on
    paho-mqtt (the framing, signing and receive checks are :class:`core.link.FramedLink`'s).

    With a ``signer`` every published message (and the Last Will) is signed. With a ``keyring`` every
    received message must be signed by the key that ``sender_of(message)`` names (see
    :func:`core.signing.signer_policy`); without one, messages are accepted unverified. Caps on
    partial messages are those of ``assembler`` (default: :class:`core.wire.Assembler`'s). Everything is
    published at QoS 1, at most ``max_inflight`` messages unacknowledged (over MQTT 5 at most the broker's
    Receive Maximum); the rest wait in the link's queue, in order, and go out as acknowledgements come.

    The window is the link's, not paho's (whose own limit is switched off): paho 2.2 refills its window by
    scanning its queue of unacknowledged messages from the start on every PUBACK (``Client._update_inflight``),
    O(window) per message, and it ignores a broker's Receive Maximum. Here a PUBACK costs O(1) and hands the
    next queued messages to paho from its network thread. :attr:`acked` and :attr:`acked_at` count the
    acknowledgements and time the latest (``time.time()``), for measurements.
    """

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
        signer: Optional[Signer] = None,
        keyring: Optional[Keyring] = None,
        sender_of: Optional[SignerPolicy] = None,
        assembler: Optional[Assembler] = None,
        inbox_size: int = INBOX_SIZE,
        inbox_bytes: int = INBOX_BYTES,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        super().__init__(run, chunk_size, signer, keyring, sender_of, assembler, inbox_size, inbox_bytes)
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        self.max_inflight = max_inflight
        self.window = max_inflight  # this connection's: max_inflight, or less if the broker's Receive Maximum is
        self._out = threading.Condition()  # guards the window's counters and queue; never held while calling paho
        self._waiting: collections.deque[Tuple[str, bytes, bool]] = collections.deque()
        self._in_flight = 0  # handed to paho and not yet acknowledged (paho resends them after a reconnect)
        self._handing = 0  # taken off the queue by the network thread and not yet handed to paho
        self._published = 0  # QoS 1 messages accepted by _send, in order: a message's sequence number
        self.acked = 0
        self.acked_at = 0.0
        self.backpressure_s = BACKPRESSURE_S
        self.broker = broker
        self.protocol = protocol
        self._clean = clean
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        kwargs: Dict[str, Any] = {"client_id": client_id, "protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.client.suppress_exceptions = True  # second line of defence: paho logs instead of dying
        self.client.max_inflight_messages_set(0)  # the link keeps the window (class docstring)
        security.apply(self.client)
        if will is not None:
            will_topic, will_frame = self._will_frame(will)
            self.client.will_set(will_topic, will_frame, qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._refused: Optional[str] = None

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
        receive_maximum = getattr(props, "ReceiveMaximum", None) if self.protocol == "5" else None
        with self._out:
            self.window = min(self.max_inflight, receive_maximum or self.max_inflight)
        if self.window < self.max_inflight:
            log.info("broker %s takes at most %d messages in flight (Receive Maximum)", self.broker, self.window)
        self._session_up(reason)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("lost broker %s (%s); reconnecting with backoff", self.broker, reason)
        self._session_down(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and self.on_retained is not None and self._took_retained(msg.topic, msg.payload):
            return
        self._deliver(msg.topic, msg.payload)

    # --- transport -----------------------------------------------------------------------------------------

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        self._enqueue(topic, payload, retain)

    def _enqueue(self, topic: str, payload: bytes, retain: bool) -> int:
        """Hand one QoS 1 message to paho if the window has room and nothing waits before it, else queue it;
        its sequence number (:meth:`flush`). paho is called outside ``_out``: its network thread holds paho's
        own lock when it calls :meth:`_on_publish`, which takes ``_out``."""
        with self._out:
            self._published += 1
            number = self._published
            now = not self._waiting and not self._handing and self._in_flight < self.window
            if now:
                self._in_flight += 1
            else:
                self._waiting.append((topic, payload, retain))
        if now:
            self._hand(topic, payload, retain)
        return number

    def _hand(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            self.client.publish(topic, payload, qos=1, retain=retain)
        except Exception:
            with self._out:
                self._in_flight -= 1
            raise

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """paho's network thread, on each PUBACK: one slot of the window is free; hand over what now fits. paho
        keeps a message until it is acknowledged (resending it after a reconnect), so every message handed
        over is acknowledged exactly once."""
        try:
            with self._out:
                self.acked += 1
                self.acked_at = time.time()
                self._in_flight -= 1
                batch = []
                while self._waiting and self._in_flight < self.window:
                    batch.append(self._waiting.popleft())
                    self._in_flight += 1
                self._handing += len(batch)
                self._out.notify_all()
            for topic, payload, retain in batch:
                try:
                    self.client.publish(topic, payload, qos=1, retain=retain)
                except Exception:  # not sendable (e.g. a bad topic): never acknowledged, so free its slot
                    log.exception("could not publish a queued message on %s", topic)
                    with self._out:
                        self._in_flight -= 1
                finally:
                    with self._out:
                        self._handing -= 1
        except Exception:  # never kill paho's network thread
            log.exception("the publish window failed")

    @property
    def published(self) -> int:
        """QoS 1 messages published on this link so far: the last one is acknowledged once :attr:`acked`
        reaches this."""
        with self._out:
            return self._published

    def in_flight(self) -> Tuple[int, int]:
        """(messages handed to paho and not yet acknowledged, messages waiting in the link's queue)."""
        with self._out:
            return self._in_flight + self._handing, len(self._waiting)

    def _add_filters(self, filters: List[str]) -> None:
        if self.protocol == "5":
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            self.client.subscribe([(f, options) for f in filters])
        else:
            self.client.subscribe([(f, 1) for f in filters])

    def _drop_filters(self, filters: List[str]) -> None:
        self.client.unsubscribe(filters)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the broker acknowledged everything published so far, at most ``timeout_s``; False if it
        did not. A marker goes out behind everything queued: a broker acknowledges QoS 1 messages of one
        connection in order (MQTT 3.1.1, 4.6), so once as many acknowledgements came as messages up to the
        marker, all of them are in."""
        if not self.connected.is_set():
            return False
        number = self._enqueue(f"nefl/{self.run}/flush", b"", False)
        with self._out:
            return self._out.wait_for(lambda: self.acked >= number, timeout_s)
