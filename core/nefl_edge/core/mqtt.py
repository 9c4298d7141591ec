"""One MQTT connection for either side (paho-mqtt 2.x): TLS and password options, a Last Will, persistent
sessions, automatic reconnects with backoff, chunked and optionally signed publishing, and an inbox of
validated (and, with a keyring, verified) messages.

The receive path cannot be killed by a payload: paho's callback hands every payload to
:meth:`Receiver.receive`, which catches every exception, counts it by reason in ``rejections`` and logs it
(rate-limited) with the topic; the fuzz suite drives that same method. :meth:`MqttLink.subscribe` also
subscribes the chunked form ``<topic>/chunk/+`` on which retained messages travel, so retained and plain
messages on a topic both arrive.

Correct over MQTT 3.1.1; MQTT 5 is optional (``protocol="5"``), used only for a session expiry interval.
"""

from __future__ import annotations

import logging
import queue
import re
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nefl_edge.core.errors import BadInput, ExitCode, NeflError
from nefl_edge.core.schemas import Message
from nefl_edge.core.signing import SIGNATURE_BLOCK, Keyring, SignatureError, Signer, strip_pieces
from nefl_edge.core.wire import (
    DEFAULT_CHUNK_SIZE,
    MESSAGE_KINDS_BY_TOPIC,
    Assembler,
    Buffer,
    LogLimiter,
    ProtocolError,
    Topics,
    decode,
    encode_parts,
    frames,
    iter_frames,
    short,
)

log = logging.getLogger(__name__)

CHUNK_MARK = "/chunk/"
INBOX_SIZE = 4096  # validated messages waiting for the consumer; beyond it new ones are dropped and counted
INBOX_BYTES = 1 << 30  # and their bodies' bytes: a flood of large updates cannot grow memory past this
CHUNK_TOPIC = re.compile(r"(.+)/chunk/(\d{1,9})")
Inbound = Tuple[str, Message, bytes]


class Inbox(queue.Queue):  # type: ignore[type-arg]
    """The validated messages waiting for the consumer, bounded by count and by the bytes of their bodies.
    Only paho's network thread puts (``offer``); consumers ``get`` as from any queue."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0

    def offer(self, item: Inbound) -> Optional[str]:
        """Queue ``item``, or say why not (the inbox is full by count or by bytes)."""
        size = len(item[2])
        if self.bytes and self.bytes + size > self.max_bytes:
            return f"{self.bytes} bytes are waiting (limit {self.max_bytes})"
        try:
            self.put_nowait(item)
        except queue.Full:
            return f"{self.maxsize} messages are waiting"
        return None

    def _put(self, item: Inbound) -> None:
        self.bytes += len(item[2])
        super()._put(item)

    def _get(self) -> Inbound:
        item: Inbound = super()._get()
        self.bytes -= len(item[2])
        return item


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


def split_chunk_topic(topic: str) -> Tuple[str, Optional[int]]:
    """``("<stream>", i)`` for a retained chunk topic ``<stream>/chunk/<i>``, else ``(topic, None)``."""
    match = CHUNK_TOPIC.fullmatch(topic)
    return (match.group(1), int(match.group(2))) if match else (topic, None)


class Receiver:
    """Turns one MQTT payload into a validated inbound message, or into a counted, logged rejection.

    Steps: reassemble frames (:class:`edge_client.wire.Assembler`, with its caps); with a ``keyring``,
    verify the signature and that its key id is ``sender_of(stream)``; decode and validate the logical
    message; check it is for this ``run``, that its kind belongs on the topic and that a ``node`` field
    names the node of a node topic. Without a keyring signed and unsigned messages are both accepted
    (signatures are not checked).
    """

    def __init__(
        self,
        run: str,
        assembler: Optional[Assembler] = None,
        keyring: Optional[Keyring] = None,
        sender_of: Optional[Callable[[str], Optional[str]]] = None,
        log_burst: int = 5,
        log_window_s: float = 60.0,
    ) -> None:
        if keyring is not None and sender_of is None:
            raise ValueError("a keyring needs sender_of (who may sign each topic), e.g. signers_by_topic(...)")
        self.run = run
        self.assembler = assembler if assembler is not None else Assembler()
        self.keyring = keyring
        self.sender_of = sender_of
        self.rejections: Counter[str] = Counter()
        self.last_rejection: Optional[Tuple[str, str]] = None  # (reason, text), for tests and debugging
        self._log = LogLimiter(log, log_burst, log_window_s)

    def parse(self, topic: str, payload: Buffer) -> Optional[Inbound]:
        """The message that ``payload`` on ``topic`` completes, or ``None`` (a chunk of a longer message, or
        an empty payload that clears a retained topic). Raise :class:`ProtocolError` for anything invalid."""
        if not payload:
            return None
        stream, index = split_chunk_topic(topic)
        data = self.assembler.feed_pieces(stream, payload, index)
        if data is None:
            return None
        if self.keyring is not None:
            assert self.sender_of is not None
            signer, data = self.keyring.verify_pieces(stream, data)
            allowed = self.sender_of(stream)
            if signer != allowed:
                who = f"only {allowed!r} may" if allowed else "nobody may"
                raise SignatureError(f"message signed by {signer!r}, but {who} publish on this topic", "wrong_signer")
        else:
            data = strip_pieces(data)
        message, body = decode(data)
        if message.run != self.run:
            raise ProtocolError(f"message for run {short(message.run)}, this is run {self.run!r}", "wrong_run")
        kind, topic_kind = getattr(message, "kind", ""), Topics.kind_of(stream)
        if topic_kind and kind not in MESSAGE_KINDS_BY_TOPIC[topic_kind]:
            raise ProtocolError(f"a {kind} message does not belong on a {topic_kind} topic", "wrong_topic")
        node = getattr(message, "node", None)
        if node is not None and topic_kind in MESSAGE_KINDS_BY_TOPIC and node != Topics.node_of(stream):
            raise ProtocolError(
                f"message of node {node!r} on the topic of node {Topics.node_of(stream)!r}", "wrong_topic"
            )
        return stream, message, body

    def receive(self, topic: str, payload: Buffer) -> Optional[Inbound]:
        """:meth:`parse` that never raises: a rejection is counted in :attr:`rejections` by reason (an
        unexpected exception as ``internal:<type>``) and logged with the topic."""
        try:
            return self.parse(topic, payload)
        except ProtocolError as exc:
            self.reject(topic, exc.reason, str(exc))
        except Exception as exc:  # a bug, not a protocol violation: still never kill the network thread
            self.reject(topic, f"internal:{type(exc).__name__}", f"{type(exc).__name__}: {short(str(exc), 200)}")
        return None

    def reject(self, topic: str, reason: str, text: str) -> None:
        self.rejections[reason] += 1
        self.last_rejection = (reason, text)
        self._log.warning(reason, "rejected payload on %s (%s): %s", short(topic, 200), reason, text)


class MqttLink:
    """A persistent, reconnecting MQTT session that speaks the nefl wire format.

    With a ``signer`` every published message (and the Last Will) is signed. With a ``keyring`` every
    received message must be signed by the key that ``sender_of(stream topic)`` names (see
    :func:`edge_client.signing.signers_by_topic`); without one, messages are accepted unverified. Caps on
    partial messages are those of ``assembler`` (default: :class:`edge_client.wire.Assembler`'s).
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
        sender_of: Optional[Callable[[str], Optional[str]]] = None,
        assembler: Optional[Assembler] = None,
        inbox_size: int = INBOX_SIZE,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        self.broker, self.run, self.chunk_size = broker, run, chunk_size
        self.protocol = protocol
        self.signer = signer
        self.receiver = Receiver(run, assembler, keyring, sender_of)
        self._clean = clean
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        kwargs: Dict[str, Any] = {"client_id": client_id, "protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.client.suppress_exceptions = True  # second line of defence: paho logs instead of dying
        security.apply(self.client)
        if will is not None:
            parts = frames(self._seal(will[0], will[1]), chunk_size)
            if len(parts) != 1:
                raise ValueError(f"the Last Will must fit one chunk of {chunk_size} bytes")
            # on the retained chunk topic, so that it replaces the retained status the device published
            self.client.will_set(f"{will[0]}{CHUNK_MARK}0", parts[0], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.inbox = Inbox(inbox_size, inbox_bytes)
        self.connected = threading.Event()
        self._refused: Optional[str] = None
        self._subs: List[str] = []
        self._retained_counts: Dict[str, int] = {}
        self.on_connected: Optional[Callable[[], None]] = None
        """Called (on paho's thread, exceptions logged) after every successful connect, subscriptions restored."""
        self.on_session: List[Callable[[bool, Any], None]] = []
        """Watchers of the session: each called with (connected, reason) on every connect and disconnect."""
        self._lock = threading.Lock()

    @property
    def assembler(self) -> Assembler:
        return self.receiver.assembler

    @property
    def rejections(self) -> Counter[str]:
        """Rejected payloads by reason code (see :class:`edge_client.wire.ProtocolError`)."""
        return self.receiver.rejections

    @property
    def rejected(self) -> int:
        return sum(self.receiver.rejections.values())

    def receive(self, topic: str, payload: Buffer) -> Optional[Inbound]:
        """What the MQTT callback does with one payload, minus queueing: never raises (see
        :meth:`Receiver.receive`)."""
        return self.receiver.receive(topic, payload)

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
        self._tell_session(True, reason)
        log.info("connected to broker %s", self.broker)
        with self._lock:
            filters = [f for topic in self._subs for f in _filters(topic)]
        if filters:
            client.subscribe([(f, 1) for f in filters])
        self.connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("the on_connected handler failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            log.warning("lost broker %s (%s); reconnecting with backoff", self.broker, reason)
        self._tell_session(False, reason)

    def _tell_session(self, connected: bool, reason: Any) -> None:
        for watcher in list(self.on_session):
            try:
                watcher(connected, reason)
            except Exception:  # never let a callback end paho's network thread
                log.exception("a session watcher failed")

    # --- traffic -------------------------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        """Subscribe ``topic`` and, unless it ends in ``#``, its retained chunks ``<topic>/chunk/+``."""
        with self._lock:
            if topic not in self._subs:
                self._subs.append(topic)
        self.client.subscribe([(f, 1) for f in _filters(topic)])

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            if topic in self._subs:
                self._subs.remove(topic)
        self.client.unsubscribe(_filters(topic))

    def _seal(self, topic: str, data: bytes) -> bytes:
        return self.signer.seal(topic, data) if self.signer is not None else data

    def publish(
        self, topic: str, message: Message, body: Union[Buffer, Sequence[Buffer]] = b"", retain: bool = False
    ) -> int:
        """Publish one message (signed if this link has a signer, chunked as needed) at QoS 1; return the
        bytes sent. ``body`` may be a list of buffers (e.g. :func:`edge_client.wire.tensor_parts`), copied
        once, into the frames. Retained messages keep chunk ``i`` on ``<topic>/chunk/<i>`` and clear chunks
        left over from a longer predecessor."""
        logical: List[Any] = encode_parts(message, body)
        known = None
        if self.signer is not None:
            logical, known = self.signer.seal_parts(topic, logical)
        stream = iter_frames(logical, self.chunk_size, known if self.chunk_size == SIGNATURE_BLOCK else None)
        count = sent = 0
        for i, frame in enumerate(stream):  # published as built: paho sends one while the next is built
            self.client.publish(f"{topic}{CHUNK_MARK}{i}" if retain else topic, frame, qos=1, retain=retain)
            count, sent = i + 1, sent + len(frame)
        if retain:
            for i in range(count, self._retained_counts.get(topic, 0)):
                self.client.publish(f"{topic}{CHUNK_MARK}{i}", b"", qos=1, retain=True)
            self._retained_counts[topic] = count
        return sent

    def clear_retained(self, topic: str) -> None:
        """Delete the retained chunks that this link published on ``topic``."""
        for i in range(self._retained_counts.pop(topic, 0)):
            self.client.publish(f"{topic}{CHUNK_MARK}{i}", b"", qos=1, retain=True)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the broker acknowledged everything published so far (QoS 1 is sent in order, so the
        last message's acknowledgement stands for all), at most ``timeout_s``; False if it did not come."""
        info = self.client.publish(f"nefl/{self.run}/flush", b"", qos=1) if self.connected.is_set() else None
        if info is None:
            return False
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            item = self.receive(msg.topic, msg.payload)
            full = None if item is None else self.inbox.offer(item)
            if full is not None:  # the consumer is behind a flood: drop, count, never block paho's thread
                self.receiver.reject(msg.topic, "inbox_full", full)
        except Exception as exc:  # receive() never raises; this guards the topic decoding and the queue
            self.receiver.reject("?", f"internal:{type(exc).__name__}", short(str(exc), 200))


def _filters(topic: str) -> List[str]:
    return [topic] if topic.endswith("#") else [topic, f"{topic}{CHUNK_MARK}+"]
