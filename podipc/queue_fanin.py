"""Fan-in over the kernel queues (mq://, sysvmq://; `pattern=fanin`): many named producers into one consumer.

A kernel queue already takes many writers; what podipc adds is who sent each message, each
producer's own end of stream and death, and the consumer's account per producer, with the API
of the stream fan-in (podipc.fanin): `recv_from()`, `last_sender`, `senders` / `summary()`,
NameTaken for a name a live producer holds, `producers=N` ending the stream after N clean ends.

Slots: a producer claims a presence slot of its own, `podipc.presence.TOKEN.slotK.producer`
(K from 1 to MAX_PRODUCERS; podipc.presence's atomic claim, as a work queue's consumers claim
theirs, podipc.work_queue), under the channel's lock (`consumers_lock`), which it removes when
its claim is done: it refuses a name a live slot declares (NameTaken), takes the first slot no
live producer holds (a dead one's is taken over) and declares `fanin`, `name NAME` and `claim
ID` (drawn at open). The consumer's presence file declares `fanin`: a pair producer meeting it,
or a fan-in producer meeting a pair consumer, is refused with ChannelUnavailable naming the fix.

Wire (docs/wire/mq.md, docs/wire/sysvmq.md, "Fan-in"): every queue message carries a tag,
`K << 4 | KIND`: the SysV mtype itself; on a POSIX queue a 2-byte big-endian prefix of a
priority-2 message (all of a fan-in's messages share one priority, so the queue stays FIFO
across producers: priorities per producer would let a busy producer starve the others).
KIND: 1 data, 2 end of stream (empty), 4 start (`ID NAME`: the first message of each
producer), 5 died (put by the consumer itself, `ID`). FIFO order keeps each producer's
messages in its order, after its start and before its end.

Death: the process's peer-death monitor probes the slot file of every attached producer
(`SendersTracker`); a producer whose file is gone, unlocked or replaced died. Messages it put
before dying may still be queued, so the consumer puts a died marker for it into its own queue
and records the producer as died when it takes that marker: everything the producer sent is
handed out first, and the others go on. A start on a slot whose producer has not ended means
that producer died too (its slot was taken over).

End of stream: the consumer takes a producer's end marker and acknowledges it by declaring
`acked K ID` in its own presence file; the producer's close() returns once it reads that line
there (it keeps the consumer's file open from its end marker on, so a consumer that ends its
stream and leaves cleanly cannot hide the acknowledgement): close() means "delivered", as on
every channel. A consumer that leaves without acknowledging makes it raise PeerGone. With
`producers=N` the consumer's stream ends once N producers ended theirs, none is attached and
the queue is empty (a producer whose start was queued by then is served too); a dead producer
does not count, so a restarted one can still complete it.

Cost: a data message is one queue message as in a pair (SysV: the tag is the mtype; POSIX: 2
bytes more, prepended by the producer and cut off by the consumer); the consumer's hot path
adds one dict lookup, and folds payloads into their sender's SHA-256 every SETTLE_EVERY
messages. Every producer's acknowledgement line stays in the consumer's presence file until it
leaves (~40 bytes per producer that ended).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import AddressError, ChannelClosed, ChannelUnavailable, EndOfStream, NameTaken, PodIPCError
from podipc.fanin import DIED, ENDED, ProducerRoster, ProducerSummary
from podipc.options import deadline_after
from podipc.ownership import Trust
from podipc.presence import (
    DECLARATION,
    RECORD_LIMIT_BYTES,
    Identity,
    PeerState,
    PeerTracker,
    Presence,
    lock_state,
    open_presence,
    probe_identity,
    read_record,
    remove_if_gone,
    slot_path,
)
from podipc.queue import FANIN_WORD, WORK_QUEUE, QueueConsumer, QueueProducer, declared_queue
from podipc.stream_producer import default_producer_name
from podipc.work_queue import consumers_lock, read_slot

MAX_PRODUCERS = 64
"""Producer slots of a fan-in queue: at most this many producers attached at once."""
KIND_BITS = 4
DATA, END, WAKE, START, DEATH = 1, 2, 3, 4, 5
"""The KIND of a tag (WAKE: sysvmq's wake-up, slot 0 only)."""
NOTHING = 0
"""The tag of a message that carries none (garbage)."""
NAME_WORD = "name"
CLAIM_WORD = "claim"
ACKED_WORD = "acked"
SETTLE_EVERY = 256
"""A sender's payloads are counted and hashed in batches of this many (and whenever its summary is asked)."""
PRODUCER_ROLE = "producer"


def tag(slot: int, kind: int) -> int:
    """The tag of a message of `kind` from producer slot `slot`."""
    return slot << KIND_BITS | kind


def producer_slot_path(token: str, slot: int) -> str:
    """The presence file of producer slot `slot` of a fan-in queue."""
    return slot_path(token, slot, role=PRODUCER_ROLE)


def _ack_line(slot: int, claim: str) -> bytes:
    return f"{DECLARATION} {ACKED_WORD} {slot} {claim}\n".encode()


def claim_producer_slot(
    token: str, mode: int, trust: Trust, location: str, name: str, claim: str
) -> tuple[Presence, int]:
    """Claim the first producer slot no live producer holds (hold `consumers_lock`): its presence and number.

    The slot declares `fanin`, `name NAME` and `claim CLAIM`. Raises NameTaken when a live
    slot declares the name, ChannelUnavailable when all MAX_PRODUCERS slots are live.
    """
    name_line = f"{DECLARATION} {NAME_WORD} {name}"
    free = 0
    for number in range(1, MAX_PRODUCERS + 1):
        try:
            found = read_slot(number, producer_slot_path(token, number), trust)
        except ChannelUnavailable:
            continue  # another user's file at the path: not a slot of ours, nor a free one
        if found.state is PeerState.ALIVE:
            if name_line in found.lines:
                raise NameTaken(
                    f"another live producer is named {name!r} at {location}; give each producer its own name="
                )
        elif not free:
            free = number
    if not free:
        raise ChannelUnavailable(f"{location} has {MAX_PRODUCERS} live fan-in producers, the most a channel takes")
    presence = Presence(token, PRODUCER_ROLE, mode, channel=location, slot=free)
    try:
        for word in (FANIN_WORD, f"{NAME_WORD} {name}", f"{CLAIM_WORD} {claim}"):
            presence.declare(word)
    except BaseException:
        presence.close()
        raise
    return presence, free


def holder_identity(token: str, trust: Trust, slot: int, claim: str) -> tuple[Identity, str, bool] | None:
    """Producer slot `slot`'s file when it declares `claim` (else None): its identity, declared name, and whether its
    holder lives (a dead holder's file stays until the slot is claimed again)."""
    path = producer_slot_path(token, slot)
    try:
        fd = open_presence(path, trust)
    except ChannelUnavailable:
        return None
    if fd is None:
        return None
    try:
        status = os.fstat(fd)
        record = os.pread(fd, RECORD_LIMIT_BYTES, 0)
        lines = record.decode("utf-8", "replace").splitlines()
        if f"{DECLARATION} {CLAIM_WORD} {claim}" not in lines:
            return None
        name_prefix = f"{DECLARATION} {NAME_WORD} "
        name = next((line[len(name_prefix) :] for line in lines if line.startswith(name_prefix)), "")
        alive = lock_state(fd) is PeerState.ALIVE
        return (status.st_dev, status.st_ino, record.partition(b"\n")[0]), name, alive
    finally:
        os.close(fd)


class QueueFanInProducer(QueueProducer):
    """A named producer of a fan-in queue: claims a slot, tags its messages, waits for its end to be acknowledged."""

    slot: int = 0
    """Its producer slot (1..MAX_PRODUCERS)."""
    producer_name: str = ""
    """Its name at the consumer (`name`, which mq:// producers use for the queue's name)."""
    _start_put = False
    _claim = ""
    _consumer_fd = -1
    """The consumer's presence file, open from the end marker on (its acknowledgement is read there)."""
    _acks_from = 0

    def _claim_presence(self, mode: int) -> Presence:
        """Claim the first free producer slot under the channel's lock; NameTaken when a live producer has the name."""
        if self.settings.get("pattern") == WORK_QUEUE or int(self.settings.get("consumers") or 1) > 1:
            raise AddressError(
                "name= makes a fan-in producer (many producers, one consumer); pattern=queue and consumers= are the "
                "work queue's (one producer, many consumers): choose one"
            )
        self.producer_name = str(self.settings.get("name") or "") or default_producer_name()
        self._claim = secrets.token_hex(8)
        token = self.address.token
        trust = Trust.for_mode(mode)
        with consumers_lock(token, mode, trust) as lock:
            try:
                presence = self._claim_slot(token, mode, trust)
            finally:
                lock.remove()  # nobody needs it between claims: leave nothing behind
        self.data_mark = tag(self.slot, DATA)  # type: ignore[misc]
        self.end_mark = tag(self.slot, END)  # type: ignore[misc]
        self._start_message = f"{self._claim} {self.producer_name}".encode()
        return presence

    def _claim_slot(self, token: str, mode: int, trust: Trust) -> Presence:
        presence, self.slot = claim_producer_slot(
            token, mode, trust, self.address.location, self.producer_name, self._claim
        )
        return presence

    def _consumers_now(self) -> tuple[PeerState, int | None]:
        presence = self._presence
        state = presence.peer_state()
        if state is not PeerState.ALIVE:
            return state, None
        record = read_record(presence.peer_path, presence.trust)
        if f"{DECLARATION} {FANIN_WORD}" not in record:
            raise ChannelUnavailable(
                f"the consumer of {self.address.location} takes one producer (pattern=pair): open it with "
                "pattern=fanin (podipc consume --producers N), or drop name= and pattern= here"
            )
        return state, declared_queue(record)

    # --- the start marker before anything else ------------------------------

    def _connect_to(self, queue: Any) -> None:
        super()._connect_to(queue)
        self._fast_limit = -1  # nothing goes straight to the queue before the start marker

    def _try_connect(self) -> bool:
        """One step of the rendezvous, then the start marker; True once it is in the queue."""
        if not super()._try_connect():
            return False
        if not self._start_put:
            if not self._put_now(self._start_message, tag(self.slot, START)):
                return False  # full: the readiness is room
            self._start_put = True
            self._fast_limit = self.max_message_size
        return True

    def _try_send(self, view: memoryview) -> bool:
        if not self._start_put and self._queue is not None and not self._try_connect():
            return False
        return super()._try_send(view)

    def _try_close(self) -> bool:
        if not self._start_put and self._queue is not None and not self._try_connect():
            return False
        return super()._try_close()

    # --- the end: acknowledged in the consumer's presence file -----------------

    def _put_end_markers(self) -> bool:
        if self._consumer_fd < 0:
            fd = open_presence(self._presence.peer_path, self._presence.trust)
            if fd is None:
                raise self._consumer_gone()
            self._consumer_fd = fd
            self._acks_from = os.fstat(fd).st_size
        return super()._put_end_markers()

    def _end_taken(self) -> bool:
        """True once the consumer acknowledged this producer's end; PeerGone when it left without doing so."""
        fd = self._consumer_fd
        if self._acked(fd):
            return True
        if lock_state(fd) is PeerState.ALIVE:
            return False
        if self._acked(fd):  # it acknowledged, then left
            return True
        raise self._consumer_gone()

    def _acked(self, fd: int) -> bool:
        written = os.pread(fd, RECORD_LIMIT_BYTES, self._acks_from)
        return _ack_line(self.slot, self._claim) in written

    def _free(self) -> None:
        fd, self._consumer_fd = self._consumer_fd, -1
        if fd >= 0:
            os.close(fd)
        super()._free()


class SendersTracker(PeerTracker):
    """A fan-in consumer's view of its producers for the peer-death monitor: each attached producer's slot file.

    A producer whose file is gone, unlocked, replaced or not trusted any more died: `lost()` calls
    `on_death(slot, claim)` once for it (on the monitor thread) and returns False, so the watch
    goes on for the others. `on_death` is held weakly, as the monitor holds its callbacks.
    """

    def __init__(
        self, presence: Presence, token: str, on_death: Callable[[int, str], None], retry: Callable[[], None]
    ) -> None:
        self.presence = presence
        self.token = token
        self._retry = weakref.WeakMethod(retry)
        """Put the died markers a full queue refused (every sweep)."""
        self.watched: dict[int, tuple[Identity, str]] = {}
        """slot -> (the identity of its holder's file, its claim): replaced whole by the consumer, never changed."""
        self._on_death = weakref.WeakMethod(on_death)
        self._reported: set[tuple[int, str]] = set()

    def attach(self) -> None:
        """Nothing to take: producers are added as their start markers arrive."""

    def lost(self) -> bool:
        """Probe every attached producer's slot file and report the dead ones; never True (the watch goes on)."""
        retry = self._retry()
        if retry is not None:
            with contextlib.suppress(Exception):
                retry()
        for slot, (identity, claim) in self.watched.items():
            if (slot, claim) in self._reported or self._alive(slot, identity):
                continue
            self._reported.add((slot, claim))
            on_death = self._on_death()
            if on_death is not None:
                with contextlib.suppress(Exception):  # a failing report must not end the watch of the others
                    on_death(slot, claim)
        return False

    def _alive(self, slot: int, identity: Identity) -> bool:
        try:
            state, now = probe_identity(producer_slot_path(self.token, slot), self.presence.trust)
        except Exception:  # not trusted any more, or vanished oddly: not our producer
            return False
        return state is PeerState.ALIVE and now == identity


class SlotSender:
    """A producer attached to a fan-in queue consumer: its slot, claim, name and counts."""

    __slots__ = ("bytes", "claim", "digest", "ended", "error", "messages", "name", "pending", "slot")

    def __init__(self, name: str, slot: int, claim: str) -> None:
        self.name = name
        self.slot = slot
        self.claim = claim
        self.pending: list[bytes] = []
        """Payloads handed out and not counted yet (SETTLE_EVERY at most)."""
        self.messages = 0
        self.bytes = 0
        self.digest = hashlib.sha256()
        self.ended: str | None = None
        self.error = ""

    def settle(self) -> None:
        """Count and hash the pending payloads."""
        pending = self.pending
        if pending:
            self.messages += len(pending)
            self.bytes += sum(map(len, pending))
            self.digest.update(b"".join(pending))
            pending.clear()

    def summary(self) -> ProducerSummary:
        """What it sent so far (pending payloads included)."""
        pending = list(self.pending)
        digest = self.digest.copy()
        digest.update(b"".join(pending))
        return ProducerSummary(
            self.name,
            self.messages + len(pending),
            self.bytes + sum(map(len, pending)),
            digest.hexdigest(),
            self.ended,
            self.error,
        )


class SlotSenderRoster(ProducerRoster):
    """The roster of a fan-in consumer whose producers claim slots (mq, sysvmq, zmq): `_senders` and `_last`."""

    _senders: Sequence[SlotSender]
    """Every producer that attached, in order of arrival (the finished ones too)."""
    _last: SlotSender | None = None
    """The sender of the message the last receive returned."""

    @property
    def last_sender(self) -> str | None:
        """The name of the producer of the message the last receive returned (one receiving thread; else recv_from)."""
        sender = self._last
        return None if sender is None else sender.name

    @property
    def senders(self) -> list[ProducerSummary]:
        """Every producer that attached so far, in order of arrival: name, counts, SHA-256, how it ended."""
        return [sender.summary() for sender in list(self._senders)]


class QueueFanInConsumer(SlotSenderRoster, QueueConsumer):
    """The consumer of a fan-in queue: creates the queue, hands out the messages of many named producers.

    Transports implement `_next_tagged` (wait for the next message: (tag, payload)), `_untag`
    (a taken (mark, body) as (tag, payload)) and `_put_own` (the consumer's died marker).
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        if settings.get("adopt"):
            self._closed = self._freed = True  # nothing to free; no unclosed warning
            raise AddressError("adopt=true and pattern=fanin do not go together: a fan-in queue is podipc's own")
        self._limit = int(settings.get("producers") or 0)
        self._senders: list[SlotSender] = []
        """Every producer that attached, in order of arrival (the finished ones too)."""
        self._by_tag: dict[int, SlotSender] = {}
        """The data tag of every attached producer -> its sender: the hot path's one lookup."""
        self._by_slot: dict[int, SlotSender] = {}
        self._ended_cleanly = 0
        self._last: SlotSender | None = None
        self._deaths: list[tuple[int, str]] = []
        """Died markers to put into the queue (it was full): (slot, claim)."""
        self._deaths_lock = threading.Lock()
        """Held while died markers are put (the monitor thread and the receiving one both put them)."""
        self._tracker: SendersTracker | None = None
        super().__init__(address, settings)

    # --- hooks -------------------------------------------------------------

    @abstractmethod
    def _next_tagged(self) -> tuple[int, bytes]:
        """Wait for the next message and take it: (tag, payload); (-1, b'') when woken (closing, a producer lost)."""

    @abstractmethod
    def _untag(self, mark: int, body: bytes) -> tuple[int, bytes]:
        """A message taken as (mark, body) as (tag, payload); NOTHING as its tag when it carries none."""

    @abstractmethod
    def _put_own(self, message_tag: int, body: bytes) -> bool:
        """Put a message of the consumer's own without waiting; False when the queue is full (or failed)."""

    # --- opening -----------------------------------------------------------

    def _watch_peer(self, presence: Presence) -> None:
        presence.declare(FANIN_WORD)
        self._tracker = SendersTracker(presence, self.address.token, self._died, self._put_deaths)
        presence.watch(self._signal_peer_lost, self._tracker)

    def _signal_peer_lost(self) -> None:
        """Nothing: a fan-in consumer has no one peer to lose (its tracker reports each producer's death, `_died`)."""

    # --- receiving ---------------------------------------------------------

    @holds_call_gate
    def recv_from(self, timeout: float | None = None) -> tuple[str, bytes]:
        """Receive the next message and the name of the producer that sent it; `timeout` as in recv().

        Raises as recv() does (EndOfStream once `producers` producers ended their streams).
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                peeked = self._take_state()
                if peeked is not None:
                    return self.last_sender or "", peeked
            elif timeout is None and self._fast:
                try:
                    message_tag, data = self._next_tagged()
                except self._queue_errors:
                    message_tag, data = -1, b""  # nothing was taken: the checked path translates
                sender = self._by_tag.get(message_tag)
                if sender is not None:
                    pending = sender.pending
                    pending.append(data)
                    if len(pending) >= SETTLE_EVERY:
                        sender.settle()
                    self._last = sender
                    return sender.name, data
                if message_tag >= 0:
                    self._taken = (message_tag, data)
                self._fast = False
            message = self._recv(None if timeout is None else deadline_after(timeout))
            return self.last_sender or "", message
        except EndOfStream:
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message of any producer; `timeout` and what it raises as Consumer.recv."""
        return self.recv_from(timeout)[1]

    def _recv(self, deadline: float | None) -> bytes:
        return Consumer._recv(self, deadline)

    def _try_recv(self) -> bytes | None:
        if self._deaths:
            self._put_deaths()
        taken, self._taken = self._taken, None
        while True:
            if taken is None:
                raw = self._take_now()
                if raw is None:
                    self._nothing_now()
                    return None
                taken = self._untag(*raw)
            message_tag, data = taken
            taken = None
            sender = self._by_tag.get(message_tag)
            if sender is not None:
                sender.pending.append(data)
                if len(sender.pending) >= SETTLE_EVERY:
                    sender.settle()
                self._last = sender
                self._fast = not self._deaths
                return data
            self._handle(message_tag, data)

    def _nothing_now(self) -> None:
        """The queue is empty now: the stream ends once `producers` producers ended and none is attached."""
        if self._limit and self._ended_cleanly >= self._limit and not self._by_slot and not self._deaths:
            self._end_seen = True
            self._free_once()
            raise EndOfStream(f"{self.address.location}: all {self._limit} producers ended their streams")
        self._fast = False
        self._idle()

    def _handle(self, message_tag: int, data: bytes) -> None:
        """A message that is not an attached producer's data: a start, an end, a died marker, a wake-up, garbage."""
        slot, kind = message_tag >> KIND_BITS, message_tag & ((1 << KIND_BITS) - 1)
        sender = self._by_slot.get(slot)
        if kind == START and 1 <= slot <= MAX_PRODUCERS:
            self._start(slot, data)
        elif kind == END and sender is not None and not data:
            self._finish(sender, None)
        elif kind == DEATH and sender is not None and data.decode("utf-8", "replace") == sender.claim:
            self._finish(sender, f"PeerGone: producer {sender.name!r} died (its slot {slot} was lost)")
        elif message_tag == WAKE and not data:
            pass  # a wake-up (sysvmq)
        elif kind != DEATH:  # a died marker of a producer that ended meanwhile is no garbage
            self.skipped += 1

    def _start(self, slot: int, data: bytes) -> None:
        """A producer's start marker: attach it, watch its slot file (or mark it died when it is gone already)."""
        claim, _, name = data.decode("utf-8", "replace").partition(" ")
        previous = self._by_slot.get(slot)
        if previous is not None:
            self._finish(previous, f"PeerGone: producer {previous.name!r} died (a new producer took its slot {slot})")
        sender = SlotSender(name, slot, claim)
        self._senders.append(sender)
        self._by_slot[slot] = sender
        self._by_tag[tag(slot, DATA)] = sender
        self._peer_seen = True
        tracker = self._tracker
        assert tracker is not None
        identity = self._holder_identity(slot, claim)
        if identity is None:
            self._deaths.append((slot, claim))  # it died already: its messages queued before the marker come first
            self._put_deaths()
        else:
            tracker.watched = {**tracker.watched, slot: (identity, claim)}

    def _holder_identity(self, slot: int, claim: str) -> Identity | None:
        """The identity of slot `slot`'s file when its live holder declares `claim`; None when it does not."""
        assert self._presence is not None
        held = holder_identity(self.address.token, self._presence.trust, slot, claim)
        return None if held is None or not held[2] else held[0]

    def _finish(self, sender: SlotSender, error: str | None) -> None:
        """A producer ended its stream (error None: acknowledge it) or died (error: why); the others go on."""
        sender.settle()
        slot = sender.slot
        del self._by_slot[slot]
        del self._by_tag[tag(slot, DATA)]
        tracker = self._tracker
        if tracker is not None and slot in tracker.watched:
            tracker.watched = {key: value for key, value in tracker.watched.items() if key != slot}
        presence = self._presence
        if error is None:
            sender.ended = ENDED
            self._ended_cleanly += 1
            if presence is not None:
                presence.declare(_ack_line(slot, sender.claim).decode()[len(DECLARATION) + 1 :].rstrip("\n"))
        else:
            sender.ended = DIED
            sender.error = error
            if presence is not None:
                remove_if_gone(producer_slot_path(self.address.token, slot), presence.trust)

    def _died(self, slot: int, claim: str) -> None:
        """The monitor found producer `slot` (`claim`) dead: put its died marker, which wakes a waiting receive.

        Runs on the monitor thread; when the queue is full (the receiver is busy, not waiting) the
        marker waits in `_deaths` and the receiver puts it on its checked path.
        """
        self._deaths.append((slot, claim))
        self._fast = False
        self._put_deaths()

    def _put_deaths(self) -> None:
        """Put the pending died markers while the queue has room; the hot path waits until all are in."""
        with self._deaths_lock:
            deaths = self._deaths
            while deaths:
                slot, claim = deaths[0]
                if not self._put_own(tag(slot, DEATH), claim.encode()):
                    self._fast = False
                    return
                deaths.pop(0)

    def _free(self) -> None:
        for sender in self._senders:
            sender.settle()
        super()._free()
