"""The link: what the protocol sessions (``coordinator.session``, ``edge_client.session``) need of a transport,
and the transport-independent half of one.

Fair share (issue 22): a session says which streams it listens to now (``admit``: the rest are dropped before
reassembly) and whose messages the receive caps must keep (``favoured``); :class:`FairAssembler` and
:class:`Inbox` then make room from the sender holding the most, and :meth:`FramedLink.rejected_by` says who
sent what was refused, for quarantine.

:class:`Link` is the interface: subscribe / unsubscribe topic filters, publish a message (retained or not),
take the next validated inbound message (with a timeout), the ``connected`` event with ``on_connected`` and
``on_session`` watchers, and close. Topic names and wildcards are MQTT's (``+`` one level, ``#`` the rest), as
are retained messages, because the protocol is written in them (see ``wire.Topics``).

:class:`FramedLink` is everything of a link that does not depend on the transport: chunking and signing on
the way out (``wire.iter_frames``, ``signing.Signer``), retained messages kept chunk by chunk on
``<topic>/chunk/<i>``, and on the way in the :class:`Receiver` (reassembly, signature, schema, run and topic
checks) and the bounded :class:`Inbox`. ``core.mqtt.MqttLink`` puts it on paho-mqtt; :class:`MemoryLink` on a
:class:`MemoryBroker` in this process, so that the protocol tests run without a broker.

Where :class:`MemoryBroker` departs from an MQTT broker: delivery is synchronous on the publisher's thread
(one payload at a time per receiving link), there is no QoS (every delivery to an attached link succeeds) and
no persistent session (a link that is not connected misses what is published meanwhile, except retained
messages). The wire bytes are the real ones.
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import queue
import re
import struct
import threading
import time
from collections import Counter
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

from nefl_edge.core.schemas import Message
from nefl_edge.core.signing import SIGNATURE_BLOCK, Keyring, SignatureError, Signer, SignerPolicy, strip_pieces
from nefl_edge.core.wire import (
    DEFAULT_CHUNK_SIZE,
    MAGIC_FRAME,
    MAX_FRAME_HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MESSAGE_KINDS_BY_TOPIC,
    MIN_CHUNK_SIZE,
    Assembler,
    Buffer,
    FrameHeader,
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
MAX_CHUNKS = -(-MAX_MESSAGE_SIZE // MIN_CHUNK_SIZE)  # the most chunks a valid message has
Inbound = Tuple[str, Message, bytes]
"""A validated message: (its stream topic without the chunk suffix, the message, its body)."""


@runtime_checkable
class Link(Protocol):
    """A connection that speaks the nefl wire format over topics (implemented by ``core.mqtt.MqttLink`` and
    :class:`MemoryLink`). ``on_connected`` is called after every (re)connect with the subscriptions restored;
    each of ``on_session`` with ``(connected, reason)`` on every connect and disconnect; ``on_payload`` sees
    every raw inbound payload first and returns True for one it took (a reader of topics alone, such as the
    agent's run discovery: nothing it takes is validated). Callbacks run on the transport's thread; a link
    logs and swallows their exceptions."""

    connected: threading.Event
    on_connected: Optional[Callable[[], None]]
    on_session: List[Callable[[bool, Any], None]]
    on_payload: Optional[Callable[[str, Buffer], bool]]
    admit: Optional[Callable[[str], bool]]
    """Which streams are listened to now; the others are dropped unread and counted as ``unsolicited``."""
    on_retained: Optional[Callable[[str, Buffer], bool]]
    """Sees each payload that arrives with the retain flag (see ``core.mqtt``) before ``on_payload``; True: taken."""

    @property
    def favoured(self) -> Optional[Callable[[str], bool]]:
        """Senders whose messages the receive caps never evict while another sender holds any."""
        ...

    @favoured.setter
    def favoured(self, value: Optional[Callable[[str], bool]]) -> None: ...

    @property
    def rejections(self) -> Counter[str]:
        """Inbound payloads rejected so far, by reason code (see ``wire.ProtocolError``)."""
        ...

    def rejected_by(self) -> Counter[str]:
        """Inbound payloads rejected (and partial messages evicted) on each node's topics so far, by node."""
        ...

    def rejected_of(self, node: str) -> int:
        """:meth:`rejected_by` of one node (cheap enough to ask on every payload)."""
        ...

    def connect(self, timeout_s: float = 15.0) -> None:
        """Connect (subscriptions made before are restored); raise ``BrokerError`` if that fails."""
        ...

    def subscribe(self, topic: str) -> None:
        """Receive ``topic`` (a filter, wildcards allowed), its retained messages included."""
        ...

    def unsubscribe(self, topic: str) -> None: ...

    def subscribe_all(self, topics: Sequence[str]) -> None:
        """:meth:`subscribe` each topic, in one request."""
        ...

    def unsubscribe_all(self, topics: Sequence[str]) -> None: ...

    def subscribe_exact(self, filters: Sequence[str]) -> None:
        """Subscribe exactly ``filters`` (no chunk forms; not restored after a reconnect): the broker sends
        their retained messages, again for a filter already subscribed, without interrupting its flow (MQTT
        3.1.1, 3.8.4). Nothing while not connected."""
        ...

    def publish(
        self, topic: str, message: Message, body: Union[Buffer, Sequence[Buffer]] = b"", retain: bool = False
    ) -> int:
        """Publish one message (signed and chunked as the link is set up); return the bytes sent."""
        ...

    def clear_retained(self, topic: str) -> None:
        """Delete what this link retained on ``topic``."""
        ...

    def clear_topics(self, topics: Sequence[str]) -> None:
        """Delete the retained messages on ``topics`` (exact topics, e.g. chunks another publisher left)."""
        ...

    def next(self, timeout: float) -> Optional[Inbound]:
        """The next validated inbound message, or ``None`` after ``timeout`` seconds."""
        ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything published so far was delivered; False if that is not known in time."""
        ...

    def close(self) -> None: ...


class Inbox(queue.Queue):  # type: ignore[type-arg]
    """The validated messages waiting for the consumer, bounded by count and by the bytes of their bodies.
    Only the transport's thread puts (``offer``); consumers ``get`` as from any queue.

    When it is full, room is made from the sender (``Topics.sender_of`` of the stream) holding the most, never
    from a ``favoured`` one (e.g. a device with a pending task): a new message of a favoured sender, or of a
    sender holding less than the heaviest, evicts the heaviest unfavoured sender's oldest messages; otherwise
    the new message is the one dropped.

    Finding the heaviest and its oldest message is O(log n) amortised in the senders waiting (a scan of every
    sender per offered message, as before, cost 10,000 predicate calls per status a full inbox dropped at 10,000
    devices): each sender's waiting messages are a deque of their own, evicted ones are marked and skipped by
    ``get``, and two lazily pruned heaps (by messages, by bytes) order the senders with the unfavoured first.
    Departure from a scan: whether a sender is favoured is read when its message arrives and again when it
    comes to the top of a heap, so a sender whose favour changed since its last message is found only when it
    reaches the top (a favoured one at the top ends the search: the senders below it are taken as favoured
    too). Ties go to the sender waiting the longest, as the scan's first-inserted order did."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.held: Dict[str, List[int]] = {}  # sender -> [messages, bytes] waiting
        self.evicted: Counter[str] = Counter()  # messages evicted to make room, by sender
        self._cells: Dict[str, Deque[List[Any]]] = {}  # sender -> its waiting [item, alive] cells, oldest first
        self._since: Dict[str, int] = {}  # sender -> when it started waiting (a counter): the tie-break
        self._unfavoured: Dict[str, bool] = {}  # sender -> not favoured, as last read
        self._heaps: Tuple[List[Tuple[bool, int, int, int, str]], List[Tuple[bool, int, int, int, str]]] = ([], [])
        self._live = 0
        self._dead = 0  # evicted cells still in ``self.queue``
        self._clock = 0

    def _qsize(self) -> int:
        return self._live

    def _full(self, size: int) -> Tuple[Optional[str], bool]:
        """Why ``size`` more bytes do not fit (None if they do), and whether the bytes are the limit."""
        if self.bytes and self.bytes + size > self.max_bytes:
            return f"{self.bytes} bytes are waiting (limit {self.max_bytes})", True
        if 0 < self.maxsize <= self._qsize():
            return f"{self.maxsize} messages are waiting", False
        return None, False

    def offer(self, item: Inbound, favoured: Optional[Callable[[str], bool]] = None) -> Optional[str]:
        """Queue ``item`` (making room as the class says), or say why not."""
        size, sender = len(item[2]), Topics.sender_of(item[0])
        with self.mutex:
            mine_favoured = favoured is not None and favoured(sender)
            if sender in self.held and self._unfavoured[sender] == mine_favoured:
                self._unfavoured[sender] = not mine_favoured
                self._push(sender)
            full, by_bytes = self._full(size)
            while full is not None:
                victim = self._heaviest(favoured, by_bytes)
                mine = self.held.get(sender, [0, 0])
                if victim is None or victim == sender:
                    return full
                if not mine_favoured:
                    theirs = self.held[victim]
                    if (mine[1], mine[0]) >= (theirs[1], theirs[0]):
                        return full
                self._evict(victim)
                full, by_bytes = self._full(size)
            self._put(item, not mine_favoured)
            self.unfinished_tasks += 1
            self.not_empty.notify()
        return None

    def _heaviest(self, favoured: Optional[Callable[[str], bool]], by_bytes: bool) -> Optional[str]:
        """The unfavoured sender holding the most bytes (``by_bytes``) or messages waiting, if any."""
        heap = self._heaps[by_bytes]
        while heap:
            was_favoured, _, _, _, sender = top = heap[0]
            if sender not in self.held or top != self._entry(sender, by_bytes):
                heapq.heappop(heap)  # an older weight of this sender, or a sender no longer waiting
                continue
            is_favoured = favoured is not None and favoured(sender)
            if is_favoured != was_favoured:  # its favour changed since its last message: file it anew
                self._unfavoured[sender] = not is_favoured
                self._push(sender)
                continue
            return None if is_favoured else sender
        return None

    def _entry(self, sender: str, by_bytes: bool) -> Tuple[bool, int, int, int, str]:
        """``sender``'s heap entry: a min-heap of (favoured, -weight..., since) puts the heaviest unfavoured first."""
        count, held = self.held[sender]
        first, second = (held, count) if by_bytes else (count, held)
        return (not self._unfavoured[sender], -first, -second, self._since[sender], sender)

    def _push(self, sender: str) -> None:
        for by_bytes in (False, True):
            heap = self._heaps[by_bytes]
            if len(heap) > 2 * len(self.held) + 64:  # mostly stale entries: rebuild, O(n) once per n pushes
                heap[:] = [self._entry(s, by_bytes) for s in self.held]
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, self._entry(sender, by_bytes))

    def _evict(self, sender: str) -> None:
        cell = self._cells[sender][0]
        item, cell[0], cell[1] = cell[0], None, False
        self._dead += 1
        self._account(item, -1)
        self.unfinished_tasks -= 1
        self.evicted[sender] += 1
        self.not_full.notify()
        if self._dead > self._live + 1024:  # the consumer is far behind: drop the marked cells from the queue
            self.queue = collections.deque(c for c in self.queue if c[1])
            self._dead = 0

    def _account(self, item: Inbound, sign: int, unfavoured: bool = True) -> None:
        sender, size = Topics.sender_of(item[0]), len(item[2])
        self.bytes += sign * size
        self._live += sign
        held = self.held.get(sender)
        if held is None:
            held = self.held[sender] = [0, 0]
            self._cells[sender] = collections.deque()
            self._unfavoured[sender] = unfavoured
            self._clock += 1
            self._since[sender] = self._clock
        held[0] += sign
        held[1] += sign * size
        if sign < 0:
            self._cells[sender].popleft()
        if held[0] <= 0:
            for table in (self.held, self._cells, self._since, self._unfavoured):
                del table[sender]  # type: ignore[attr-defined]
        else:
            self._push(sender)

    def _put(self, item: Inbound, unfavoured: bool = True) -> None:  # type: ignore[override]
        cell = [item, True]
        self._account(item, 1, unfavoured)
        self._cells[Topics.sender_of(item[0])].append(cell)
        self.queue.append(cell)

    def _get(self) -> Inbound:
        cell = self.queue.popleft()
        while not cell[1]:
            self._dead -= 1
            cell = self.queue.popleft()
        item: Inbound = cell[0]
        self._account(item, -1)
        return item


class FairAssembler(Assembler):
    """:class:`core.wire.Assembler` whose total caps evict from the sender holding the most (partials for the
    cap on partials, bytes for the cap on bytes), never from a ``favoured`` one while another holds anything
    (``favoured(sender)``: e.g. a device with a pending task), instead of the oldest partial of anyone; the
    per-sender caps evict that sender's own oldest partial, as before. :attr:`evicted_by` counts evictions
    by sender.

    Departure from the base class: the base evicts the oldest partial of anyone for the total caps, so that
    senders opening many partials push out a slow honest sender's only partial (issue 22: 0 of 8 honest
    updates under 10 flooding accounts)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.favoured: Optional[Callable[[str], bool]] = None
        self.evicted_by: Counter[str] = Counter()
        self._by_bytes = False  # which total cap is making room now

    def _start(self, key: Tuple[str, str], sender: str, head: FrameHeader) -> Any:
        self._by_bytes = False
        return super()._start(key, sender, head)

    def _make_room(self, key: Tuple[str, str], sender: str, size: int) -> None:
        self._by_bytes = True
        super()._make_room(key, sender, size)

    def _oldest(self, sender: Optional[str], keep: Tuple[str, str]) -> Tuple[str, str]:
        if sender is None:
            sender = self._heaviest(keep)
        return super()._oldest(sender, keep)

    def _heaviest(self, keep: Tuple[str, str]) -> Optional[str]:
        """The sender holding the most partials or bytes (unfavoured ones first) with a partial other than
        ``keep``."""
        favoured, by_bytes = self.favoured, self._by_bytes
        best, most = None, (False, -1, -1)
        for key, part in self._partials.items():
            if key == keep:
                continue
            count, held = self._senders[part.sender]
            unfavoured = not (favoured is not None and favoured(part.sender))
            weight = (unfavoured, held, count) if by_bytes else (unfavoured, count, held)
            if weight > most:
                best, most = part.sender, weight
        return best

    def _drop(self, key: Tuple[str, str], cause: str) -> None:
        if cause and key in self._partials:
            self.evicted_by[self._partials[key].sender] += 1
        super()._drop(key, cause)


def split_chunk_topic(topic: str) -> Tuple[str, Optional[int]]:
    """``("<stream>", i)`` for a retained chunk topic ``<stream>/chunk/<i>``, else ``(topic, None)``."""
    match = CHUNK_TOPIC.fullmatch(topic)
    return (match.group(1), int(match.group(2))) if match else (topic, None)


def topic_filters(topic: str) -> List[str]:
    """The filters a subscription to ``topic`` takes: it and, unless it ends in ``#``, its retained chunks: of
    a wildcard filter ``<topic>/chunk/+``, of an exact topic only ``<topic>/chunk/0`` (the link subscribes the
    other chunks exactly once chunk 0 says how many there are: :meth:`FramedLink._more_chunks`)."""
    if topic.endswith("#"):
        return [topic]
    return [topic, f"{topic}{CHUNK_MARK}{'+' if is_wildcard(topic) else 0}"]


def is_wildcard(topic: str) -> bool:
    return "+" in topic or "#" in topic


def chunk_count(payload: Buffer) -> Optional[int]:
    """The chunk count ``n`` in a frame's header, or ``None`` if the payload is not a frame with a plausible
    one (only the header is read; the receiver checks the frame in full)."""
    try:
        view = memoryview(payload)
        if len(view) < 8 or view[:4] != MAGIC_FRAME:
            return None
        (size,) = struct.unpack(">I", view[4:8])
        if size > MAX_FRAME_HEADER_SIZE or 8 + size > len(view):
            return None
        n = json.loads(bytes(view[8 : 8 + size])).get("n")
    except (ValueError, TypeError, AttributeError, struct.error):
        return None
    return n if type(n) is int and 1 <= n <= MAX_CHUNKS else None


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT 3.1.1 topic filter matching (section 4.7): ``+`` matches one level, a final ``#`` the parent level
    and everything below it; topics starting with ``$`` match no wildcard at the first level."""
    want, have = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and want[0] in ("+", "#"):
        return False
    for i, part in enumerate(want):
        if part == "#":
            return True
        if i >= len(have) or (part != "+" and part != have[i]):
            return False
    return len(want) == len(have)


class Receiver:
    """Turns one payload into a validated inbound message, or into a counted, logged rejection.

    Steps: reassemble frames (:class:`core.wire.Assembler`, with its caps); with a ``keyring``, verify the
    signature (over the stream's topic too) and refuse a stream outside the protocol's topics; decode and
    validate the logical message; with a ``keyring``, check that its signer is the one ``sender_of(message)``
    names (the protocol's rule, e.g. :func:`core.signing.signer_policy`: a function of the message, not of the
    topic); check it is for this ``run``, that its kind belongs on the topic and that a ``node`` field names
    the node of a node topic. Without a keyring signed and unsigned messages are both accepted (signatures are
    not checked).

    Departure from checking the signer before decoding (as the policy by topic name did): a message signed by
    a known key but not allowed to it is now decoded (its header validated, its body copied once) before it
    is refused; only holders of an enrolled key can cause that, and the assembler's caps bound its size.
    """

    def __init__(
        self,
        run: str,
        assembler: Optional[Assembler] = None,
        keyring: Optional[Keyring] = None,
        sender_of: Optional[SignerPolicy] = None,
        log_burst: int = 5,
        log_window_s: float = 60.0,
    ) -> None:
        if keyring is not None and sender_of is None:
            raise ValueError("a keyring needs sender_of (who may sign each message), e.g. signer_policy(...)")
        self.run = run
        self.assembler = assembler if assembler is not None else FairAssembler()
        self.keyring = keyring
        self.sender_of = sender_of
        self.rejections: Counter[str] = Counter()
        self.by_node: Counter[str] = Counter()  # rejections on each node's topics, by node
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
        topic_kind = Topics.kind_of(stream)
        signer = None
        if self.keyring is not None:
            signer, data = self.keyring.verify_pieces(stream, data)
            if not topic_kind:
                raise SignatureError(f"message signed by {signer!r} on a topic outside the protocol", "wrong_signer")
        else:
            data = strip_pieces(data)
        message, body = decode(data)
        if self.keyring is not None:
            assert self.sender_of is not None
            allowed = self.sender_of(message)
            if signer != allowed:
                who = f"only {allowed!r} may" if allowed else "nobody may"
                kind = getattr(message, "kind", "?")
                raise SignatureError(f"a {kind} message signed by {signer!r}, but {who} send it", "wrong_signer")
        if message.run != self.run:
            raise ProtocolError(f"message for run {short(message.run)}, this is run {self.run!r}", "wrong_run")
        kind = getattr(message, "kind", "")
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
        node = Topics.node_of(topic)
        if node:
            self.by_node[node] += 1
        self.last_rejection = (reason, text)
        self._log.warning(reason, "rejected payload on %s (%s): %s", short(topic, 200), reason, text)


class FramedLink:
    """The transport-independent half of a :class:`Link`. A transport subclass provides
    :meth:`_send` (one payload to one topic), :meth:`_add_filters` / :meth:`_drop_filters` (while connected),
    ``connect``, ``close`` and ``flush``; it hands every inbound payload to :meth:`_deliver` and calls
    :meth:`_session_up` / :meth:`_session_down` as the connection comes and goes.

    With a ``signer`` every published message is signed. With a ``keyring`` every received message must be
    signed by the key that ``sender_of(message)`` names (see :func:`core.signing.signer_policy`); without one,
    messages are accepted unverified."""

    def __init__(
        self,
        run: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        signer: Optional[Signer] = None,
        keyring: Optional[Keyring] = None,
        sender_of: Optional[SignerPolicy] = None,
        assembler: Optional[Assembler] = None,
        inbox_size: int = INBOX_SIZE,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        self.run, self.chunk_size, self.signer = run, chunk_size, signer
        self.receiver = Receiver(run, assembler, keyring, sender_of)
        self.inbox = Inbox(inbox_size, inbox_bytes)
        self.connected = threading.Event()
        self.backpressure_s = 0.0
        """How long an awaited answer waits for room in a full inbox (:meth:`_offer_waiting`); 0: dropped."""
        self.on_connected: Optional[Callable[[], None]] = None
        """Called (on the transport's thread, exceptions logged) after every connect, subscriptions restored."""
        self.on_session: List[Callable[[bool, Any], None]] = []
        """Watchers of the session: each called with (connected, reason) on every connect and disconnect."""
        self.on_payload: Optional[Callable[[str, Buffer], bool]] = None
        """A tap on raw inbound payloads, before any check: True means it took the payload (the receiver never
        sees it); an exception it raises is counted as a rejection."""
        self.on_retained: Optional[Callable[[str, Buffer], bool]] = None
        """Called with each payload the transport receives with the retain flag set, before anything else; True
        means it took the payload; an exception it raises is counted as a rejection (``_took_retained``)."""
        self.admit: Optional[Callable[[str], bool]] = None
        """Which streams are listened to now (called with the stream topic): False drops the payload before it
        is reassembled or checked, counted as ``unsolicited`` (e.g. the coordinator's updates from devices
        without a task)."""
        self._favoured: Optional[Callable[[str], bool]] = None
        self._subs: Dict[str, None] = {}  # the topics subscribed, in order (a dict: 10,000 devices' topics)
        self._chunk_subs: Dict[str, int] = {}  # exact stream -> chunks 1..n-1 subscribed for the message arriving
        self._retained_counts: Dict[str, int] = {}
        self._lock = threading.Lock()

    # --- what a transport provides -------------------------------------------------------------------------

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        raise NotImplementedError

    def _add_filters(self, filters: List[str]) -> None:
        raise NotImplementedError

    def _drop_filters(self, filters: List[str]) -> None:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------------------

    @property
    def assembler(self) -> Assembler:
        return self.receiver.assembler

    @property
    def rejections(self) -> Counter[str]:
        """Rejected payloads by reason code (see :class:`core.wire.ProtocolError`)."""
        return self.receiver.rejections

    @property
    def rejected(self) -> int:
        return sum(self.receiver.rejections.values())

    @property
    def favoured(self) -> Optional[Callable[[str], bool]]:
        """Senders (``Topics.sender_of``) whose partial and waiting messages the caps never evict while another
        sender holds any (see :class:`FairAssembler`, :class:`Inbox`)."""
        return self._favoured

    @favoured.setter
    def favoured(self, value: Optional[Callable[[str], bool]]) -> None:
        self._favoured = value
        if isinstance(self.assembler, FairAssembler):
            self.assembler.favoured = value

    def rejected_by(self) -> Counter[str]:
        """Payloads rejected on each node's topics so far, by node, with the partial messages of that node that
        a cap or the timeout evicted (the trace of a flood of messages that never finish)."""
        out = Counter(self.receiver.by_node)
        evicted = getattr(self.assembler, "evicted_by", None)
        for sender, count in (evicted or {}).items():
            node = Topics.node_of(sender + "/x")
            if node:
                out[node] += count
        return out

    def rejected_of(self, node: str) -> int:
        """:meth:`rejected_by` of one node, without counting the others."""
        evicted = getattr(self.assembler, "evicted_by", None)
        sender = Topics.sender_of(Topics(self.run).node(node, "x"))
        return self.receiver.by_node.get(node, 0) + (evicted or {}).get(sender, 0)

    def receive(self, topic: str, payload: Buffer) -> Optional[Inbound]:
        """What the transport does with one payload, minus queueing: never raises (see
        :meth:`Receiver.receive`)."""
        return self.receiver.receive(topic, payload)

    def _deliver(self, topic: str, payload: Buffer) -> None:
        """One inbound payload into the inbox, or into a counted rejection; never raises. It blocks only for
        an awaited answer (:meth:`_awaited`) that finds the inbox full: for at most ``backpressure_s``."""
        try:
            if self.on_payload is not None and self.on_payload(topic, payload):
                return
            stream, index = split_chunk_topic(topic)
            if self.admit is not None and not self.admit(stream):
                self.receiver.reject(topic, "unsolicited", "a stream this link does not listen to now")
                return
            if index == 0:
                self._more_chunks(stream, payload)
            item = self.receive(topic, payload)
            if item is not None and index is not None:
                self._chunks_done(stream)
            full = None if item is None else self.inbox.offer(item, self.favoured)
            if full is not None and item is not None and self.backpressure_s > 0 and self._awaited(stream):
                full = self._offer_waiting(item, full)
            if full is not None:  # the consumer is behind a flood: drop, count
                self.receiver.reject(topic, "inbox_full", full)
        except Exception as exc:  # receive() never raises; this guards the topic decoding and the queue
            self.receiver.reject("?", f"internal:{type(exc).__name__}", short(str(exc), 200))

    def _took_retained(self, topic: str, payload: Buffer) -> bool:
        """Whether ``on_retained`` took a retained payload; never raises."""
        try:
            return self.on_retained is not None and self.on_retained(topic, payload)
        except Exception as exc:
            self.receiver.reject(topic, f"internal:{type(exc).__name__}", short(str(exc), 200))
            return True

    def subscribe_exact(self, filters: Sequence[str]) -> None:
        """See :meth:`Link.subscribe_exact`."""
        if filters and self.connected.is_set():
            self._add_filters(list(filters))

    def _awaited(self, stream: str) -> bool:
        """Whether ``stream`` is the update topic of a ``favoured`` sender (a device with a pending task)."""
        return (
            self.favoured is not None and Topics.kind_of(stream) == "update" and self.favoured(Topics.sender_of(stream))
        )

    def _offer_waiting(self, item: Inbound, refused: str) -> Optional[str]:
        """Backpressure for an awaited answer that found the inbox full: offer it again each time the consumer
        takes a message, for at most ``backpressure_s``; None once queued, else why not. Meanwhile this
        transport thread reads nothing more, so the broker and TCP hold what follows: dropping it instead
        loses a valid update whenever a burst of answers outpaces the consumer (2,000 devices answering
        within 8 s filled the coordinator's 4,096 messages on a loaded 2-core host), and the round then
        waits for its deadline."""
        deadline = time.monotonic() + self.backpressure_s
        full: Optional[str] = refused
        while full is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return full
            with self.inbox.not_full:
                self.inbox.not_full.wait(min(left, 0.05))
                room = self.inbox._full(len(item[2]))[0] is None  # O(1): offer's eviction scan is O(senders)
            if room:
                full = self.inbox.offer(item, self.favoured)
        return None

    def _filters(self) -> List[str]:
        with self._lock:
            return [f for topic in self._subs for f in topic_filters(topic)]

    def _more_chunks(self, stream: str, payload: Buffer) -> None:
        """Chunk 0 of a retained message on an exactly subscribed ``stream`` came: subscribe its chunks 1..n-1
        exactly. Brokers such as RabbitMQ's MQTT plugin (3.10 to 3.13) send retained messages only to a filter
        that is exactly their topic, never through ``<topic>/chunk/+``; Mosquitto sends them either way."""
        n = chunk_count(payload)
        if n is None:
            return
        with self._lock:
            if stream not in self._subs:
                return
            have = self._chunk_subs.get(stream, 1)
            if n <= have:
                return
            self._chunk_subs[stream] = n  # set before subscribing: a link may deliver during _add_filters
        self._add_filters([f"{stream}{CHUNK_MARK}{i}" for i in range(have, n)])

    def _chunks_done(self, stream: str) -> None:
        """A message on ``stream`` is whole: unsubscribe the chunks that :meth:`_more_chunks` added for it."""
        with self._lock:
            have = self._chunk_subs.pop(stream, 1)
        if have > 1:
            self._drop_filters([f"{stream}{CHUNK_MARK}{i}" for i in range(1, have)])

    def _session_up(self, reason: Any) -> None:
        """The transport (re)connected: tell the watchers, restore the subscriptions, call ``on_connected``.
        Chunks subscribed for a message under way are subscribed again when its chunk 0 comes again."""
        self._tell_session(True, reason)
        with self._lock:
            self._chunk_subs.clear()
        filters = self._filters()
        if filters:
            self._add_filters(filters)
        self.connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("the on_connected handler failed")

    def _session_down(self, reason: Any) -> None:
        self.connected.clear()
        self._tell_session(False, reason)

    def _tell_session(self, connected: bool, reason: Any) -> None:
        for watcher in list(self.on_session):
            try:
                watcher(connected, reason)
            except Exception:  # never let a callback end the transport's thread
                log.exception("a session watcher failed")

    def subscribe(self, topic: str) -> None:
        """Subscribe ``topic`` and, unless it ends in ``#``, its retained chunks (see :func:`topic_filters`)."""
        self.subscribe_all([topic])

    def subscribe_all(self, topics: Sequence[str]) -> None:
        """:meth:`subscribe` each of ``topics``, in one request to the broker."""
        with self._lock:
            for topic in topics:
                self._subs[topic] = None
        filters = [f for topic in topics for f in topic_filters(topic)]
        if filters:
            self._add_filters(filters)

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribe_all([topic])

    def unsubscribe_all(self, topics: Sequence[str]) -> None:
        """:meth:`unsubscribe` each of ``topics``, in one request to the broker."""
        filters: List[str] = []
        with self._lock:
            for topic in topics:
                self._subs.pop(topic, None)
                have = self._chunk_subs.pop(topic, 1)
                filters += topic_filters(topic) + [f"{topic}{CHUNK_MARK}{i}" for i in range(1, have)]
        if filters:
            self._drop_filters(filters)

    def next(self, timeout: float) -> Optional[Inbound]:
        """The next validated inbound message, or ``None`` after ``timeout`` seconds (0: do not wait)."""
        try:
            if timeout <= 0:
                return self.inbox.get_nowait()  # type: ignore[no-any-return]
            return self.inbox.get(timeout=timeout)  # type: ignore[no-any-return]
        except queue.Empty:
            return None

    def _seal(self, topic: str, data: bytes) -> bytes:
        return self.signer.seal(topic, data) if self.signer is not None else data

    def _will_frame(self, will: Tuple[str, bytes]) -> Tuple[str, bytes]:
        """The Last Will ``(status topic, encoded message)`` as the one frame the transport publishes for it, on
        the retained chunk topic so that it replaces the retained status the device published."""
        parts = frames(self._seal(will[0], will[1]), self.chunk_size)
        if len(parts) != 1:
            raise ValueError(f"the Last Will must fit one chunk of {self.chunk_size} bytes")
        return f"{will[0]}{CHUNK_MARK}0", parts[0]

    def publish(
        self, topic: str, message: Message, body: Union[Buffer, Sequence[Buffer]] = b"", retain: bool = False
    ) -> int:
        """Publish one message (signed if this link has a signer, chunked as needed); return the bytes sent.
        ``body`` may be a list of buffers (e.g. :func:`core.wire.tensor_parts`), copied once, into the frames.
        Retained messages keep chunk ``i`` on ``<topic>/chunk/<i>`` and clear chunks left over from a longer
        predecessor."""
        logical: List[Any] = encode_parts(message, body)
        known = None
        if self.signer is not None:
            logical, known = self.signer.seal_parts(topic, logical)
        stream = iter_frames(logical, self.chunk_size, known if self.chunk_size == SIGNATURE_BLOCK else None)
        count = sent = 0
        for i, frame in enumerate(stream):  # published as built: the transport sends one while the next is built
            self._send(f"{topic}{CHUNK_MARK}{i}" if retain else topic, frame, retain)
            count, sent = i + 1, sent + len(frame)
        if retain:
            for i in range(count, self._retained_counts.get(topic, 0)):
                self._send(f"{topic}{CHUNK_MARK}{i}", b"", True)
            self._retained_counts[topic] = count
        return sent

    def clear_retained(self, topic: str) -> None:
        """Delete the retained chunks that this link published on ``topic``."""
        for i in range(self._retained_counts.pop(topic, 0)):
            self._send(f"{topic}{CHUNK_MARK}{i}", b"", True)

    def clear_topics(self, topics: Sequence[str]) -> None:
        """Delete the retained messages on ``topics`` (exact topics, e.g. chunks another publisher left)."""
        for topic in topics:
            self._send(topic, b"", True)


class MemoryBroker:
    """A broker in this process for :class:`MemoryLink` s: topic filters with MQTT wildcards, retained
    messages (an empty retained payload deletes one, and is delivered like MQTT delivers it), and Last Wills
    published when a link is dropped (:meth:`MemoryLink.drop`) rather than closed."""

    def __init__(self) -> None:
        self._links: List[MemoryLink] = []
        self._retained: Dict[str, bytes] = {}
        self._lock = threading.RLock()

    def attach(self, link: MemoryLink) -> None:
        with self._lock:
            if link not in self._links:
                self._links.append(link)

    def detach(self, link: MemoryLink) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Deliver ``payload`` to every attached link with a matching filter (on this thread), and keep it
        (or delete what is kept, for an empty payload) when ``retain``."""
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [link for link in self._links if link.wants(topic)]
        for link in targets:
            link._deliver(topic, payload)

    def retained(self, filters: Sequence[str]) -> List[Tuple[str, bytes]]:
        """The retained messages that match any of ``filters``, in the order they were first retained."""
        with self._lock:
            return [(t, p) for t, p in self._retained.items() if any(topic_matches(f, t) for f in filters)]


class MemoryLink(FramedLink):
    """A :class:`Link` on a :class:`MemoryBroker`: the same frames, signatures and checks as
    ``core.mqtt.MqttLink``, without a network. ``will``: ``(status topic, encoded message)`` published
    (retained) by :meth:`drop`. Messages published while not connected are lost (there is no session)."""

    def __init__(self, broker: MemoryBroker, run: str, will: Optional[Tuple[str, bytes]] = None, **kwargs: Any) -> None:
        super().__init__(run, **kwargs)
        self.broker = broker
        self._filters_now: List[str] = []
        self._attached = False
        self._will = self._will_frame(will) if will is not None else None
        # publishers' threads deliver; the receiver takes one payload at a time (re-entered only by the retained
        # chunks that a subscription made while delivering chunk 0 delivers at once)
        self._inbound = threading.RLock()

    def _deliver(self, topic: str, payload: Buffer) -> None:
        with self._inbound:  # as paho's one network thread does for an MqttLink
            super()._deliver(topic, payload)

    def wants(self, topic: str) -> bool:
        with self._lock:
            return any(topic_matches(f, topic) for f in self._filters_now)

    def connect(self, timeout_s: float = 15.0) -> None:
        self._attached = True
        self.broker.attach(self)
        self._session_up("memory")

    def close(self) -> None:
        self._attached = False
        self.broker.detach(self)
        with self._lock:
            self._filters_now = []
        self._session_down("closed")

    def drop(self) -> None:
        """Lose the connection without closing it: the broker publishes this link's Last Will."""
        self.close()
        if self._will is not None:
            self.broker.publish(*self._will, retain=True)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return self._attached  # delivery is synchronous: what was published is delivered

    def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        if self._attached:
            self.broker.publish(topic, payload, retain)

    def _add_filters(self, filters: List[str]) -> None:
        if not self._attached:  # restored by connect(), as an MQTT client restores its subscriptions
            return
        with self._lock:
            new = [f for f in filters if f not in self._filters_now]
            self._filters_now.extend(new)
        for topic, payload in self.broker.retained(new):
            self._deliver(topic, payload)

    def _drop_filters(self, filters: List[str]) -> None:
        with self._lock:
            self._filters_now = [f for f in self._filters_now if f not in filters]
