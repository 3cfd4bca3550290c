"""Broadcast over the stream sockets (unix://, tcp://): one producer, N subscribers, each gets every message.

Opened with `pattern=broadcast` on both sides, with the options of shm://'s broadcast ring:
`subscribers=N` (the producer waits for N before its first send; a subscriber that gives it
must find a producer with N slots) and `slow=wait|drop` (the producer's).

Who does what
    The PRODUCER listens at open (it is the server: the socket file of unix:///path is its,
    created and removed as a pair consumer's is) and its acceptor thread (podipc.stream's)
    answers each connection: a subscriber says BROADCAST_HELLO and gets BROADCAST_HELLO, its
    slot and the number of slots (docs/wire/stream.md, "Broadcast"); beyond N live
    subscribers it gets BUSY; a pair or fan-in producer gets BROADCAST_HELLO alone (and says
    so: ProtocolError); anything else
    (garbage, a health probe) is dropped and counted, and the others go on; a subscriber
    opened with another subscribers= is refused (AddressError on its side). A SUBSCRIBER
    connects at open and, when the producer listens, waits for its answer (at most
    HELLO_ANSWER_SECONDS): from then on it gets every message sent. With no producer yet its
    first receive connects, retrying until `wait`. A dead subscriber's slot goes to a
    newcomer, which joins at the next message.
Sending
    Each message is one frame, built once and written to every live subscriber's connection
    (one write per subscriber; SO_SNDBUF asked at SEND_BUFFER_BYTES). Back-to-back small
    messages (COALESCE_SIZE, within BURST_START_SECONDS / BURST_HOLD_SECONDS of each other,
    the `coalesce` option) join a burst of up to OUTBOX_BYTES, written once per subscriber
    by the next other send, flush(), close() or the process's flusher thread
    (podipc.flushing) once the sends pause; a burst counts as sent. What a subscriber's
    socket does not take waits in its outbox, written first.
    slow=wait: a send is accepted only while no subscriber has more than WAIT_OUTBOX_BYTES
    pending, else it waits for room (then: Timeout at its deadline, and nothing of that
    message went to anyone; nothing is ever lost). A SIGSTOPped subscriber stops the
    producer once its socket buffers and that much are full.
    slow=drop: the producer never waits. A subscriber whose outbox holds more than
    DROP_OUTBOX_BYTES does not get the message (or the burst): it is counted lost for that
    subscriber only, and before the next message it does get, a loss notice (LOSS_NOTICE,
    then an 8-byte count) tells it how many it missed, so its `lost` is exact once it took
    the end. Unlike shm://'s ring (which keeps the newest), a stream keeps the oldest: the
    messages missed are the newest of the time it was behind.
End of stream
    close() writes the pending loss notices and the end marker to every subscriber and
    waits (up to `wait`, or its timeout) until each live one answered ACK ("delivered"). A
    subscriber that dies (its connection breaks) is left out and reported "gone"; one that
    closed early says LEFT first and is reported "left". When every subscriber is gone, send
    raises PeerGone. `subscriber_reports()` gives, per slot (its last holder, as shm://'s),
    the state, the messages written to it (all taken once it "ended") and those dropped for it.
Threads, close from anywhere, readiness
    The endpoint contract of podipc.endpoint: the producer waits on one epoll descriptor
    holding the acceptor's eventfd and, while it waits, the connections it waits on; the
    subscriber on its connection (a blocking read without a timeout, woken by close from
    elsewhere with shutdown(SHUT_RD), as podipc.stream's consumer).
Cost: measured in the bench cells broadcast-unix-N (podipc.bench.patterns; README, "Broadcast
over unix:// and tcp://"): the producer's work grows with N (one write of each burst or large
message per subscriber), the subscriber's is a pair consumer's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from podipc.address import Address
from podipc.coalescing import CoalescingProducer
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import (
    AddressError,
    ChannelUnavailable,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
)
from podipc.flushing import BURST_HOLD_SECONDS, UNFLUSHED, flush_pending
from podipc.framing import (
    ACK,
    BROADCAST_HELLO,
    BUSY,
    FANIN_HELLO,
    HEADER,
    HEADER_SIZE,
    HELLO,
    LEFT,
    LOSS_COUNT,
    LOSS_NOTICE,
    MAX_BROADCAST_LENGTH,
    NO_SLOT,
    SLOT_ANSWER,
    SUBSCRIBERS_FIELD,
    WRONG_PATTERN,
    FrameReader,
    end_of_stream_frame,
)
from podipc.options import Option
from podipc.producing import Producer
from podipc.stream import (
    HELLO_REST_BYTES,
    SEND_FLAGS,
    STREAM_OPTIONS,
    _Acceptor,
    _DontWait,
    peer_gone,
    take_message_limit,
)
from podipc.stream_producer import (
    COALESCE_SIZE,
    CONNECT_RETRY_FIRST_SECONDS,
    CONNECT_RETRY_MAX_SECONDS,
    HELLO_ANSWER_SECONDS,
    NOT_LISTENING_ERRNOS,
    OUTBOX_BYTES,
    _skip,
)
from podipc.waking import POLLIN, POLLOUT, wait_for

BURST_START_SECONDS = 20e-6
"""A small send beginning sooner than this after the previous send began starts a burst (a tight loop's pace)."""
SEND_BUFFER_BYTES = 4 * 1024 * 1024
"""SO_SNDBUF asked for each subscriber's connection (the kernel caps it at net.core.wmem_max): the kernel,
not this process, then moves large messages while the producer serves the other subscribers."""
WAIT_OUTBOX_BYTES = 256 * 1024
"""slow=wait: a send waits while a subscriber has more than this many bytes pending in its outbox."""
DROP_OUTBOX_BYTES = 1024 * 1024
"""slow=drop: a subscriber with more than this many bytes waiting in its outbox misses the next messages."""
SMALL_FRAME_BYTES = 2048
"""Frames up to this many payload bytes are built as one bytes object (header and payload); larger ones gathered."""
ANSWER_BYTES = len(BROADCAST_HELLO) + SLOT_ANSWER.size
"""The producer's whole answer to a subscriber's hello."""
SUBSCRIBER_HELLO_BYTES = len(BROADCAST_HELLO) + SUBSCRIBERS_FIELD.size
"""A subscriber's whole hello."""
ACTIVE, ENDED, LEFT_EARLY, GONE = "active", "ended", "left", "gone"
_pack_header = HEADER.pack
_END = end_of_stream_frame()
_DONTWAIT = socket.MSG_DONTWAIT
_monotonic = time.monotonic


def check_broadcast_limit(endpoint: Producer | Consumer) -> None:
    """AddressError when max_message_size is above what a broadcast frame carries (one more length is reserved)."""
    if endpoint.max_message_size > MAX_BROADCAST_LENGTH:
        raise AddressError(
            f"{endpoint.address.location}: a broadcast message has at most {MAX_BROADCAST_LENGTH} bytes "
            "(the loss notice reserves one more length); lower max_message_size="
        )


def loss_notice(count: int) -> bytes:
    """The loss notice telling a subscriber `count` messages were dropped for it (LOSS_NOTICE, then the count)."""
    return _pack_header(LOSS_NOTICE) + _pack_header(LOSS_COUNT.size) + LOSS_COUNT.pack(count)


@dataclass(frozen=True)
class SubscriberReport:
    """One subscriber as the broadcast producer saw it."""

    slot: int
    state: str
    """active, ended (took the end of stream), left (closed early) or gone (died)."""
    delivered: int
    """Messages written to it (all of them taken once it ended)."""
    lost: int = 0
    """slow=drop: messages dropped for it (what its own `lost` says once it took the end)."""
    error: str = ""
    """Why it counts as gone."""


# --- producer ----------------------------------------------------------------


class _Slots:
    """Which subscriber slots are held; one lock, so the acceptor's claim and the producer's release never race."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._held = [False] * count

    def claim(self) -> int | None:
        """The lowest free slot, now held; None when all are."""
        with self._lock:
            for slot, held in enumerate(self._held):
                if not held:
                    self._held[slot] = True
                    return slot
            return None

    def release(self, slot: int) -> None:
        """Free `slot` for a newcomer."""
        with self._lock:
            self._held[slot] = False


class _Arrival:
    """A subscriber the acceptor admitted: its slot, connection and answer, until the producer adopts it.

    Whoever comes first under `lock` writes the answer: the acceptor at once (so a subscriber
    hears it even from an idle producer), or the producer ahead of the first frame. The
    arrival is listed before the answer goes out, so a subscriber that heard it gets every
    message sent afterwards.
    """

    __slots__ = ("adopted", "answer", "answered", "connection", "lock", "slot")

    def __init__(self, slot: int, connection: socket.socket, answer: bytes) -> None:
        self.slot = slot
        self.connection = connection
        self.answer = answer
        self.lock = threading.Lock()
        self.answered = False
        self.adopted = False


class _BroadcastAcceptor(_Acceptor):
    """The stream acceptor with the broadcast hello: gives each subscriber a slot, hands it to the producer."""

    def __init__(self, listener: socket.socket, configure: Any, name: str, slots: _Slots) -> None:
        self.slots = slots
        self.arrivals: list[_Arrival] = []
        self.refused_count = 0
        super().__init__(listener, configure, name)

    def take_arrivals(self) -> list[_Arrival]:
        """The subscribers admitted since the last call (list.pop is atomic: nothing is taken twice)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.attached_fd, 8)
        taken = []
        arrivals = self.arrivals
        while arrivals:
            taken.append(arrivals.pop(0))
        return taken

    def _read_hello(self, poller: select.poll, fd: int) -> None:
        connection, received, _ = self._pending[fd]
        whole = SUBSCRIBER_HELLO_BYTES if received[: len(HELLO)] == BROADCAST_HELLO else len(HELLO)
        try:
            chunk = connection.recv(whole - len(received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        received += chunk
        if chunk and len(received) < SUBSCRIBER_HELLO_BYTES and BROADCAST_HELLO[: len(received)] == received[:8]:
            return  # more of a broadcast hello to come
        poller.unregister(fd)
        del self._pending[fd]
        hello = bytes(received)
        if hello in (HELLO, FANIN_HELLO):
            self.refused_pattern += 1
            self._answer_producer(connection)
        elif len(hello) != SUBSCRIBER_HELLO_BYTES or not hello.startswith(BROADCAST_HELLO):
            self._reject(connection, hello)
        else:
            self._admit(connection, SUBSCRIBERS_FIELD.unpack_from(hello, len(BROADCAST_HELLO))[0])

    def _answer_producer(self, connection: socket.socket) -> None:
        """A pair or fan-in producer: say BROADCAST_HELLO (it then tells its caller a broadcast producer is here)."""
        with contextlib.suppress(OSError):
            connection.recv(HELLO_REST_BYTES)  # the rest of a fan-in hello: closing on unread bytes resets
        self._answer_and_close(connection, BROADCAST_HELLO)

    def _admit(self, connection: socket.socket, expected: int) -> None:
        if expected and expected != self.slots.count:
            self.refused_count += 1
            self._answer_and_close(connection, BROADCAST_HELLO + SLOT_ANSWER.pack(NO_SLOT, self.slots.count))
            return
        slot = self.slots.claim()
        if slot is None:
            self.refused_busy += 1
            self._answer_and_close(connection, BUSY)
            return
        try:
            self.configure(connection)
            with contextlib.suppress(OSError):  # the kernel caps it at net.core.wmem_max
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError as exc:
            self.slots.release(slot)
            self._reject(connection, BROADCAST_HELLO, exc)
            return
        arrival = _Arrival(slot, connection, BROADCAST_HELLO + SLOT_ANSWER.pack(slot, self.slots.count))
        self.arrivals.append(arrival)
        self._signal()
        with arrival.lock:
            if not arrival.adopted:
                with contextlib.suppress(OSError):  # a broken connection: the producer finds it gone
                    connection.send(arrival.answer, SEND_FLAGS)
                arrival.answered = True

    def describe_rejections(self) -> str:
        parts = []
        if self.rejected:
            parts.append(
                f"; rejected {self.rejected} connection(s) that were not podipc subscribers, "
                f"first bytes {self.first_rejected!r}"
            )
        if self.refused_busy:
            parts.append(f"; refused {self.refused_busy} subscriber(s) beyond subscribers={self.slots.count}")
        if self.refused_count:
            parts.append(f"; refused {self.refused_count} subscriber(s) opened with another subscribers=")
        if self.refused_pattern:
            parts.append(f"; refused {self.refused_pattern} producer(s) of another pattern")
        return "".join(parts)


class _Subscriber:
    """A subscriber attached to a broadcast producer: its connection, outbox and counts."""

    __slots__ = ("connection", "delivered", "error", "events", "lost", "outbox", "slot", "state", "unreported")

    def __init__(self, slot: int, connection: socket.socket) -> None:
        self.slot = slot
        self.connection = connection
        self.outbox = bytearray()
        """Bytes accepted for it and not written yet (a frame's tail, frames, notices, the end)."""
        self.delivered = 0
        self.lost = 0
        self.unreported = 0
        """Messages dropped for it that no loss notice has told it of yet."""
        self.state = ACTIVE
        self.error = ""
        self.events = 0
        """What the producer's epoll watches on its connection (0: not registered)."""

    def report(self) -> SubscriberReport:
        """Its slot, state and counts as a SubscriberReport."""
        return SubscriberReport(self.slot, self.state, self.delivered, self.lost, self.error)


class StreamBroadcastProducer(CoalescingProducer):
    """The producer of a broadcast stream channel: listens at open, writes every message to each subscriber.

    Transports subclass it with the listening hooks of podipc.stream.StreamConsumer
    (`_listen`, `_configure_connection`, `_remove_listener_traces`).
    """

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._what = address.location
        self._acceptor: _BroadcastAcceptor | None = None
        self._listener: socket.socket | None = None
        self._epoll: select.epoll | None = None
        self._live: list[_Subscriber] = []
        self._by_slot: dict[int, _Subscriber] = {}
        """The last subscriber that held each slot (the finished ones too)."""
        self._started = False
        self._ending = False
        self._burst = bytearray()
        """Small messages sent back to back, not written yet (they count as sent): one write per subscriber."""
        self._burst_count = 0
        self._last_send = 0.0
        """When the last coalesced send began, or the last other send (monotonic seconds)."""
        self._watched = False
        """True while the flusher thread holds this producer in its list."""
        try:
            take_message_limit(self)
            check_broadcast_limit(self)
            self.subscribers = int(self.settings["subscribers"] or 1)
            """How many subscribers the first send waits for (and the most it takes at once)."""
            self.slow = str(self.settings["slow"])
            """wait or drop."""
            if not self.settings["coalesce"]:
                self._burst_start = 0.0
            self._slots = _Slots(self.subscribers)
            self._epoll = select.epoll()
            self._listener = self._listen()
            self._acceptor = _BroadcastAcceptor(self._listener, self._configure_connection, self._what, self._slots)
            self._epoll.register(self._acceptor.attached_fd, select.EPOLLIN)
        except BaseException:
            self._closed = self._freed = True
            self._free()
            raise

    # hooks for transports (as podipc.stream.StreamConsumer's)
    def _listen(self) -> socket.socket:
        """Create, bind and listen; raise ChannelUnavailable with the fix when that is impossible."""
        raise NotImplementedError

    def _configure_connection(self, connection: socket.socket) -> None:
        """Set options on an admitted subscriber's connection (TCP_NODELAY for tcp)."""

    def _remove_listener_traces(self) -> None:
        """Remove what listening left behind (the socket file of unix:///path)."""

    # --- what the producer knows of its subscribers ---------------------------

    def subscriber_reports(self) -> list[SubscriberReport]:
        """Per slot a subscriber held, as shm://'s: the last holder's state, messages written and dropped."""
        held = dict(self._by_slot)
        return [held[slot].report() for slot in sorted(held)]

    def summary_fields(self) -> dict[str, object]:
        """The CLI summary's per-subscriber slot, state, messages delivered and lost."""
        return {"subscribers": [asdict(report) for report in self.subscriber_reports()]}

    @property
    def rejected(self) -> int:
        """Connections dropped because their first bytes were not a podipc hello."""
        return self._acceptor.rejected if self._acceptor is not None else self._rejected_at_close

    _rejected_at_close = 0
    _burst_start = BURST_START_SECONDS
    """BURST_START_SECONDS, or 0 with coalesce=false (every send writes at once)."""

    # --- sending ----------------------------------------------------------------

    def _try_send(self, view: memoryview) -> bool:
        if not self._started and not self._try_start():
            return False
        if self._acceptor is not None and self._acceptor.arrivals:
            self._adopt()
        live = self._live
        if not live:
            raise PeerGone(f"every subscriber of {self._what} is gone (died or closed)")
        nbytes = len(view)
        now = _monotonic()
        burst = self._burst
        if (
            nbytes <= COALESCE_SIZE
            and now - self._last_send < (BURST_HOLD_SECONDS if burst else self._burst_start)
            and len(burst) < OUTBOX_BYTES
        ):
            self._last_send = now
            burst += _pack_header(nbytes)
            burst += view
            self._burst_count += 1
            if len(burst) >= OUTBOX_BYTES:
                self._emit_burst()  # slow=wait with a subscriber behind: it stays, and the next send waits
            if burst and not self._watched:
                self._watch()
            return True
        if burst and not self._emit_burst():
            return False
        self._last_send = now
        if nbytes <= SMALL_FRAME_BYTES:
            pieces: list[Any] = [_pack_header(nbytes) + view]
        else:
            pieces = [_pack_header(nbytes), view]
        size = nbytes + HEADER_SIZE
        return self._to_everyone(pieces, size, 1)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        """Producer._send, but what the message left pending (a burst, an outbox's tail) is the flusher thread's.

        A send returns once its message is accepted: a subscriber that is behind (slow=wait, up to
        WAIT_OUTBOX_BYTES pending) delays the next send, never this one.
        """
        try_send = self._try_send
        while not try_send(view):
            self._await_readiness(deadline)
        if (self._burst or not self._try_flush()) and not self._watched:
            self._watch()

    def _to_everyone(self, pieces: list[Any], size: int, count: int) -> bool:
        """Write `count` messages (`pieces`, `size` bytes) to every live subscriber as the slow= policy says.

        slow=wait: False, writing nothing, while a subscriber has more than WAIT_OUTBOX_BYTES pending. slow=drop: always
        True; a subscriber with more than DROP_OUTBOX_BYTES pending loses them (counted).
        """
        live = self._live
        if self.slow == "wait":
            behind = False
            for subscriber in list(live):  # every one, so none is left with room and bytes pending
                if subscriber.outbox and not self._flush(subscriber) and len(subscriber.outbox) > WAIT_OUTBOX_BYTES:
                    behind = True
            if behind:
                return False
            for subscriber in list(live):
                self._deliver(subscriber, pieces, size, count)
            return True
        for subscriber in list(live):
            if subscriber.outbox and not self._flush(subscriber) and len(subscriber.outbox) > DROP_OUTBOX_BYTES:
                subscriber.lost += count
                subscriber.unreported += count
            elif subscriber.state == ACTIVE:
                self._deliver(subscriber, pieces, size, count)
        return True

    def _emit_burst(self) -> bool:
        """Write the burst's messages to every subscriber (as _to_everyone); False when slow=wait must wait."""
        burst = self._burst
        if not self._to_everyone([burst], len(burst), self._burst_count):
            return False
        self._burst = bytearray()  # the old one may wait in an outbox's place: not cleared, replaced
        self._burst_count = 0
        return True

    def _try_flush(self) -> bool:
        """Write the burst and every subscriber's outbox without blocking; True when none holds bytes.

        slow=drop never waits for a slow subscriber (True once the burst is out): its outbox goes out
        at the next send, flush or close, or by the flusher thread.
        """
        if self._burst and not self._emit_burst():
            return False
        pending = False
        for subscriber in list(self._live):
            if subscriber.outbox and not self._flush(subscriber):
                pending = True
        return not pending or self.slow == "drop"

    def _try_start(self) -> bool:
        """True once `subscribers` subscribers attached (the first send waits for them)."""
        self._adopt()
        if len(self._live) < self.subscribers:
            return False
        self._started = self._peer_seen = True
        return True

    def _adopt(self) -> None:
        """Take the subscribers the acceptor admitted."""
        acceptor = self._acceptor
        if acceptor is None:
            raise PeerGone(f"{self._what}: the producer has stopped listening")
        if acceptor.failure is not None:
            raise ChannelUnavailable(f"{self._what}: listening failed: {acceptor.failure}") from acceptor.failure
        for arrival in acceptor.take_arrivals():
            subscriber = _Subscriber(arrival.slot, arrival.connection)
            with arrival.lock:
                arrival.adopted = True
                if not arrival.answered:
                    subscriber.outbox += arrival.answer  # ahead of its first frame
            self._live.append(subscriber)
            self._by_slot[subscriber.slot] = subscriber

    def _deliver(self, subscriber: _Subscriber, pieces: list[Any], size: int, count: int) -> None:
        """Write `count` frames to a subscriber (after its loss notice, if any); what its socket does not take waits."""
        subscriber.delivered += count
        if subscriber.unreported:
            pieces = [loss_notice(subscriber.unreported), *pieces]
            size += len(pieces[0])
            subscriber.unreported = 0
        outbox = subscriber.outbox
        if outbox:
            for piece in pieces:
                outbox += piece
            self._flush(subscriber)
            return
        try:
            if len(pieces) == 1:
                sent = subscriber.connection.send(pieces[0], SEND_FLAGS)
            else:
                sent = subscriber.connection.sendmsg(pieces, (), SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lose(subscriber, exc)
            return
        if sent != size:
            for piece in _skip(pieces, sent):
                outbox += piece
            if not self._watched:
                self._watch()

    def _flush(self, subscriber: _Subscriber) -> bool:
        """Write what the subscriber's outbox holds, without blocking; True when nothing is pending for it."""
        outbox = subscriber.outbox
        try:
            sent = subscriber.connection.send(outbox, SEND_FLAGS)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._lose(subscriber, exc)
            return True
        del outbox[:sent]
        return not outbox  # its epoll registration stays until the next wait: a waiter may be polling it

    def _lose(self, subscriber: _Subscriber, error: OSError | None, state: str = GONE) -> None:
        """A subscriber's connection broke (or it answered what it must not): leave it out; the others go on."""
        if error is not None:
            with contextlib.suppress(OSError):
                if subscriber.connection.recv(1, _DONTWAIT) == LEFT:
                    state = LEFT_EARLY  # it closed early and said so before hanging up
            if state == GONE:
                subscriber.error = str(peer_gone(error, f"{self._what} (slot {subscriber.slot})", "subscriber"))
        subscriber.state = state
        self._forget(subscriber)

    def _forget(self, subscriber: _Subscriber) -> None:
        if subscriber.events:
            self._poll_for(subscriber, 0)
        self._live.remove(subscriber)
        subscriber.outbox.clear()
        subscriber.connection.close()
        self._slots.release(subscriber.slot)

    def _poll_for(self, subscriber: _Subscriber, events: int) -> None:
        """Make the epoll watch `events` on a subscriber's connection (0: not at all)."""
        epoll = self._epoll
        if epoll is None or events == subscriber.events:
            return
        fd = subscriber.connection.fileno()
        with contextlib.suppress(OSError):
            if not subscriber.events:
                epoll.register(fd, events)
            elif not events:
                epoll.unregister(fd)
            else:
                epoll.modify(fd, events)
        subscriber.events = events

    # --- the flusher's side ------------------------------------------------------

    def _has_pending(self) -> bool:
        """Whether the burst or a subscriber's outbox holds bytes (read without the gate: a call may be inside)."""
        return bool(self._burst) or any(subscriber.outbox for subscriber in list(self._live))

    def _write_outbox_now(self) -> bool:
        """Under the call gate, never blocking: True once the burst and every outbox are written (or may be dropped)."""
        if self._try_flush() and not any(subscriber.outbox for subscriber in self._live):
            return True
        return self.slow == "drop" and not self._burst and self._flusher_fd() < 0

    def _flusher_fd(self) -> int:
        """A subscriber connection with bytes pending, for the flusher to wait on for room (-1: none)."""
        for subscriber in list(self._live):
            if subscriber.outbox:
                return subscriber.connection.fileno()
        return -1

    # --- ending -------------------------------------------------------------------

    def _try_close(self) -> bool:
        if not self._started and not self._try_start():
            return False
        if self._burst and not self._emit_burst():
            return False
        if not self._ending:
            self._adopt()  # a newcomer takes the end too
            for subscriber in self._live:
                if subscriber.unreported:
                    subscriber.outbox += loss_notice(subscriber.unreported)
                    subscriber.unreported = 0
                subscriber.outbox += _END
            self._ending = True
        for subscriber in list(self._live):
            if subscriber.outbox and not self._flush(subscriber):
                continue
            if subscriber.state == ACTIVE:
                self._read_ack(subscriber)
        return not self._live

    def _read_ack(self, subscriber: _Subscriber) -> None:
        try:
            answer = subscriber.connection.recv(1, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(subscriber, exc)
            return
        if answer == ACK:
            subscriber.state = ENDED
            self._forget(subscriber)
        elif answer == LEFT:
            self._lose(subscriber, None, LEFT_EARLY)
        else:
            subscriber.error = (
                f"closed the connection before taking the end of stream (answered {answer!r})"
                if answer
                else "closed the connection before taking the end of stream"
            )
            self._lose(subscriber, None)

    # --- the endpoint contract ------------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        epoll = self._epoll
        if epoll is None:
            return -1, 0, None
        pending = False
        for subscriber in self._live:
            wanted = select.EPOLLOUT if subscriber.outbox else (select.EPOLLIN if self._ending else 0)
            self._poll_for(subscriber, wanted)
            pending = pending or bool(wanted)
        if self._started and not pending:
            return epoll.fileno(), POLLIN, 0.0  # drained since the attempt (the flusher thread): try again now
        return epoll.fileno(), POLLIN, None

    def _peer_timeout(self) -> PeerTimeout:
        rejections = self._acceptor.describe_rejections() if self._acceptor is not None else ""
        return PeerTimeout(
            f"{len(self._live)} of {self.subscribers} subscribers connected to {self._what} within the wait "
            f"timeout (wait={self.settings['wait']:g}s){rejections}; start the subscribers or raise wait="
        )

    def _free(self) -> None:
        self._unwatch()
        self._burst = bytearray()
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.stop()
            self._rejected_at_close = acceptor.rejected
            for arrival in acceptor.arrivals:
                arrival.connection.close()
            acceptor.arrivals.clear()
        for subscriber in list(self._live):
            subscriber.events = 0  # the epoll closes below
            self._live.remove(subscriber)
            subscriber.connection.close()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_listener_traces()

    def _drop_inherited(self) -> None:
        self._watched = False
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.drop_inherited()
            for arrival in acceptor.arrivals:
                arrival.connection.close()
        for subscriber in self._live:
            subscriber.connection.close()
        self._live = []
        for held in (self._epoll, self._listener):
            if held is not None:
                held.close()
        self._epoll = None
        self._listener = None
        self._freed = True


# --- subscriber -----------------------------------------------------------------


class _LossNotice(Exception):
    """The reader met a loss notice: the next frame is its count."""


class _BroadcastReader(FrameReader):
    """A FrameReader that also recognises the broadcast loss notice."""

    def _check_length(self, length: int) -> None:
        if length == LOSS_NOTICE:
            self._start += HEADER_SIZE
            raise _LossNotice
        super()._check_length(length)


_UNCONNECTED, _CONNECTING, _HELLO, _READY = range(4)


class StreamBroadcastSubscriber(Consumer):
    """A subscriber of a broadcast stream channel: connects to the producer at open, reads every message.

    Transports subclass it with the connecting hooks of podipc.stream_producer.StreamProducer
    (`_connection_socket`, `_verify_peer`, `_configure`, `_unreachable`).
    """

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._what = address.location
        self._socket: socket.socket | None = None
        self._source: _DontWait | None = None
        self._phase = _UNCONNECTED
        self._answer = bytearray()
        self._retry_at = 0.0
        self._retry_pause = CONNECT_RETRY_FIRST_SECONDS
        self._last_error: OSError | None = None
        self._counting = False
        """True between a loss notice and its count."""
        self.slot: int | None = None
        """The slot the producer gave this subscriber, once attached."""
        self.lost = 0
        """slow=drop: messages the producer dropped for this subscriber (exact once the end of stream is taken)."""
        try:
            take_message_limit(self)
            check_broadcast_limit(self)
            self._expected_slots = self.settings["subscribers"]
            self._reader = _BroadcastReader(self.max_message_size, self._what)
            self._ready = self._reader.ready
            self._join_now()
        except BaseException:
            self._closed = self._freed = True
            self._free()
            raise

    # hooks for transports (as podipc.stream_producer.StreamProducer's)
    def _connection_socket(self) -> tuple[socket.socket, Any]:
        """A new socket of the right family, and the address to connect it to."""
        raise NotImplementedError

    def _verify_peer(self, sock: socket.socket) -> None:
        """Check who listens at the other end before saying hello; raise ChannelUnavailable."""

    def _configure(self, sock: socket.socket) -> None:
        """Options for a connected socket."""

    def _unreachable(self, error: OSError) -> ChannelUnavailable:
        """The error for a connection attempt that retrying cannot fix."""
        return ChannelUnavailable(f"cannot connect to {self._what}: {error.strerror or error}")

    def summary_fields(self) -> dict[str, object]:
        """The CLI summary's slot and loss count (slow=drop: messages dropped for this subscriber)."""
        return {"slot": self.slot, "lost": self.lost}

    # --- receiving ---------------------------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; `timeout` as Consumer.recv's, which raises as it says.

        This is its fast version: the next frame already cut from the last read (never a loss
        notice's count: that is taken at once after its notice); every other case is Consumer.recv's.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.recv(self, timeout)
        try:
            if not self._state:
                ready = self._ready
                if ready:
                    return ready.pop()
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.recv(self, timeout)

    def _try_recv(self) -> bytes | None:
        if self._phase != _READY and not self._progress():
            return None
        source = self._source
        assert source is not None
        return self._next(source)

    def _recv(self, deadline: float | None) -> bytes:
        sock = self._socket
        if UNFLUSHED:
            flush_pending()  # what this process's producers sent may be what we are waiting for
        if deadline is None and self._phase == _READY and sock is not None:
            message = self._next(sock)  # a blocking read, woken by _interrupt() when closed from elsewhere
            assert message is not None
            return message
        return Consumer._recv(self, deadline)

    def _next(self, source: Any) -> bytes | None:
        """The next message from `source` (None when a non-blocking source has none now), counting loss notices."""
        reader = self._reader
        while True:
            try:
                frame = reader.read_frame(source)
            except BlockingIOError:
                return None
            except _LossNotice:
                self._counting = True
                continue
            except EndOfStream:
                self._take_end()
                raise
            except PodIPCError:
                raise
            except OSError as exc:
                raise peer_gone(exc, self._what, "producer") from exc
            if self._counting:
                self._counting = False
                if len(frame) != LOSS_COUNT.size:
                    raise ProtocolError(f"{self._what}: a loss notice carries {len(frame)} bytes, not 8")
                self.lost += LOSS_COUNT.unpack(frame)[0]
                continue
            return frame

    def _take_end(self) -> None:
        """The end of stream arrived: acknowledge it and free everything (we are the call inside)."""
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.send(ACK, SEND_FLAGS)
        self._phase = _UNCONNECTED
        self._free_once()

    # --- connecting and the handshake -----------------------------------------------

    def _join_now(self) -> None:
        """At open: connect, and when a producer listens, wait (at most HELLO_ANSWER_SECONDS) for its answer.

        Once answered, every message the producer sends reaches this subscriber. With nobody
        listening yet it returns at once: the first receive connects (until `wait`).
        """
        deadline = time.monotonic() + HELLO_ANSWER_SECONDS
        while not self._progress():
            sock = self._socket
            left = deadline - time.monotonic()
            if sock is None or left <= 0:
                return
            wait_for(sock.fileno(), POLLOUT if self._phase == _CONNECTING else POLLIN, -1, left)

    def _progress(self) -> bool:
        """One non-blocking step of connecting and the hello handshake; True once attached."""
        if self._phase == _UNCONNECTED and not self._start_connect():
            return False
        if self._phase == _CONNECTING and not self._check_connected():
            return False
        if self._phase == _HELLO and not self._read_answer():
            return False
        return self._phase == _READY

    def _start_connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        sock, where = self._connection_socket()
        sock.setblocking(False)
        code = sock.connect_ex(where)
        if code in (0, errno.EINPROGRESS):
            self._socket = sock
            self._phase = _CONNECTING
            self._readiness_changed()
            return code == 0
        sock.close()
        self._refused(OSError(code, os.strerror(code)))
        return False

    def _refused(self, error: OSError) -> None:
        if error.errno not in NOT_LISTENING_ERRNOS:
            raise self._unreachable(error) from error
        self._last_error = error
        self._retry_at = time.monotonic() + self._retry_pause
        self._retry_pause = min(self._retry_pause * 2, CONNECT_RETRY_MAX_SECONDS)

    def _check_connected(self) -> bool:
        sock = self._socket
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            try:
                sock.getpeername()
            except OSError:  # still in progress (a spurious wake)
                return False
            self._verify_peer(sock)
            self._configure(sock)
            try:
                sock.send(BROADCAST_HELLO + SUBSCRIBERS_FIELD.pack(self._expected_slots or 0), SEND_FLAGS)
            except OSError as exc:
                raise peer_gone(exc, self._what, "producer") from exc
            self._phase = _HELLO
            self.wait_deadline = max(self.wait_deadline, time.monotonic() + HELLO_ANSWER_SECONDS)
            self._readiness_changed()
            return True
        self._drop_socket()
        self._phase = _UNCONNECTED
        self._refused(OSError(code, os.strerror(code)))
        return False

    def _drop_socket(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
            self._readiness_changed()

    def _read_answer(self) -> bool:
        sock = self._socket
        assert sock is not None
        answer = self._answer
        while len(answer) < ANSWER_BYTES:
            wanted = (len(BROADCAST_HELLO) if len(answer) < len(BROADCAST_HELLO) else ANSWER_BYTES) - len(answer)
            try:
                chunk = sock.recv(wanted)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise ProtocolError(
                    f"{self._what} broke the connection instead of answering the broadcast hello; "
                    "is a broadcast producer (pattern=broadcast) listening there?"
                ) from exc
            if not chunk:
                raise ProtocolError(
                    f"{self._what} closed the connection without answering the broadcast hello "
                    f"(got {bytes(answer)!r}); is a broadcast producer (pattern=broadcast) listening there?"
                )
            answer += chunk
            if len(answer) == len(BROADCAST_HELLO) and answer != BROADCAST_HELLO:
                self._refused_by_producer(bytes(answer))
        slot, slots = SLOT_ANSWER.unpack_from(answer, len(BROADCAST_HELLO))
        if slot == NO_SLOT:
            raise AddressError(
                f"{self._what}: the producer made {slots} subscriber slots, this subscriber asked for "
                f"subscribers={self._expected_slots}"
            )
        self.slot = slot
        sock.setblocking(True)
        self._source = _DontWait(sock)
        self._phase = _READY
        self._peer_seen = True
        self._readiness_changed()
        return True

    def _refused_by_producer(self, answer: bytes) -> None:
        if answer == BUSY:
            raise ChannelUnavailable(f"all subscriber slots of {self._what} are taken (the producer's subscribers=)")
        if answer == WRONG_PATTERN:
            raise ProtocolError(f"the producer at {self._what} is not a broadcast producer")
        raise ProtocolError(
            f"{self._what} answered {answer!r} instead of the broadcast hello {BROADCAST_HELLO!r}; "
            "it is not a podipc broadcast producer (or speaks another version)"
        )

    # --- the endpoint contract ------------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        sock = self._socket
        if sock is None:
            return -1, 0, max(0.0, self._retry_at - time.monotonic())
        return sock.fileno(), (POLLOUT if self._phase == _CONNECTING else POLLIN), None

    def _peer_timeout(self) -> PeerTimeout:
        if self._phase == _HELLO:
            return PeerTimeout(f"connected to {self._what}, but no broadcast producer answered the hello in time")
        reason = self._last_error.strerror if self._last_error is not None else ""
        return PeerTimeout(
            f"no broadcast producer listening at {self._what} within the wait timeout "
            f"(wait={self.settings['wait']:g}s): {reason}; start the producer or raise wait="
        )

    def _interrupt(self) -> None:
        sock = self._socket
        if sock is not None and self._phase == _READY:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def _free(self) -> None:
        sock = self._socket
        if sock is not None and self._phase == _READY:
            with contextlib.suppress(OSError):
                sock.send(LEFT, SEND_FLAGS | _DONTWAIT)  # closing before the end: tell the producer we left
        self._source = None
        self._drop_socket()

    def _drop_inherited(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._source = None
        self._freed = True
