"""shm://NAME?pattern=broadcast: one producer writes each message once, N subscribers read it in place.

The ring is podipc.transports.shm's (records, wraps and the end record unchanged); the
header (podipc.transports.shm.broadcast_layout, docs/wire/shm.md) has a slot per
subscriber: its read index, state, waiting word and messages taken.

Who does what
    The producer creates the segment /dev/shm/NAME (locked, like a pair consumer's), its
    wake-up FIFO /dev/shm/podipc.wake.TOKEN.space and one FIFO per slot,
    podipc.wake.TOKEN.data.K, and unlinks them when it closes. A subscriber waits (up to
    `wait`) for a live producer's segment, claims a slot by claiming the presence
    `subscriber.K` (podipc.presence: created, locked, then hard-linked into place, so two
    subscribers never share a slot; a dead subscriber's slot is taken over), then joins:
    it bumps the slot's epoch and starts at the write index (slow=wait) or at the tail
    (slow=drop). The producer's first send waits (up to `wait`, PeerTimeout) until
    `subscribers` slots have been joined, so no subscriber misses the start.
Slow subscribers
    slow=wait: the writer never overwrites what the slowest live subscriber has not read
    (with recv_view, not released); a SIGSTOPped subscriber blocks it (send raises Timeout
    at its deadline, nothing is lost). A subscriber whose presence is gone (killed) or
    which closed is left out of that minimum within ~0.25 s: it never blocks the writer.
    slow=drop: the writer never waits for room. Before it overwrites records it moves the
    ring's tail past them; a subscriber behind the tail resumes at the tail and adds the
    data records it missed to its `lost` count (exact). With slow=drop recv_view() returns
    a checked copy (a record may be overwritten while a view of it is held), so the zero-copy
    view is slow=wait's.
End of stream
    close() writes the end record and waits (up to `wait`, or its timeout) until every live
    subscriber took it; a subscriber that died or left is "that slot gone". When every
    subscriber is gone, send raises PeerGone. `subscriber_reports()` gives, per slot,
    its state and the messages it took.
Threads, close from anywhere, timeout=0, fork, aio
    As the pair ring's (see the package docstring): a subscriber's blocking receive spins
    then polls its FIFO with the endpoint's waker (podipc.transports.shm.waiter.Waiter);
    the producer waits on its FIFO through the base's readiness loop; both expose their
    FIFO as the readiness descriptor (fileno(), podipc.aio).

Why one module of ~1000 lines: the producer and the subscriber are two halves of one
protocol (slots and epochs, the tail's seqlock, who wakes whom, who removes what), as
endpoints.py is for the pair ring; the header itself lives in broadcast_layout.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Mapping as MappingType
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PodIPCError,
    ProtocolError,
)
from podipc.options import deadline_after
from podipc.ownership import Trust, check_path, open_checked
from podipc.presence import PeerState, Presence, presence_path, probe, remove_if_gone, subscriber_role
from podipc.producing import Producer
from podipc.transport import DEV_SHM_FIX
from podipc.transports.shm import broadcast_layout as bl
from podipc.transports.shm.endpoints import ATTACH_RETRY_SECONDS, _RingSide, _RingTracker
from podipc.transports.shm.fence import WEAK_MEMORY_ORDER, full_fence
from podipc.transports.shm.layout import (
    BROADCAST_VERSION,
    HEADER_SIZE,
    KIND_DATA,
    KIND_END,
    KIND_WRAP,
    PRODUCER_ATTACHED,
    PRODUCER_ENDED,
    RECORD_HEADER_SIZE,
    WAITING_FIFO,
    decode_record,
)
from podipc.transports.shm.options import MAX_SUBSCRIBERS
from podipc.transports.shm.segment import (
    FIFO_KIND,
    Mapping,
    Segment,
    _allocate,
    _open_live,
    _remove_found,
    _same_inode,
    availability_for,
    broadcast_fifo_paths,
    fifo_paths,
)
from podipc.transports.shm.waiter import FIRST_SLEEP_SECONDS, LONGEST_SLEEP_SECONDS, Doorbell, Waiter, WakeFifo
from podipc.waking import POLLIN

BROADCAST_DECLARATION = "broadcast"
"""What a broadcast producer declares in its presence file."""
SLOT_PROBE_SECONDS = 0.05
"""How often a waiting producer probes the presence of the subscribers it waits for."""
TAIL_SPINS_BEFORE_YIELD = 64
"""Tries at the tail's seqlock before a subscriber yields the CPU (its writer may have been preempted in it)."""


def space_fifo_path(token: str) -> str:
    """The producer's wake-up FIFO of a broadcast channel (the same name as a pair producer's)."""
    return fifo_paths(token)[1]


def slot_fifo_path(token: str, slot: int) -> str:
    """Subscriber slot `slot`'s wake-up FIFO."""
    return broadcast_fifo_paths(token)[slot]


class _NoDoorbell(Doorbell):
    """A broadcast ring has no named semaphores: every side waits on a FIFO."""

    def __init__(self) -> None:
        pass

    def ring(self) -> None:
        """Nothing to ring."""

    def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True)
class SubscriberReport:
    """One slot as the producer sees it: who came, what became of it, how many messages it took."""

    slot: int
    state: str
    """active, ended (took the end of stream), left (closed early) or gone (died)."""
    delivered: int
    """Messages the subscriber took (read past), as it last published."""


_STATE_NAMES = {bl.SLOT_ACTIVE: "active", bl.SLOT_LEFT: "left", bl.SLOT_ENDED: "ended"}


def _refuse_pair_options(settings: MappingType[str, Any], url: str) -> None:
    """AddressError for broadcast options on a pair ring (they would be silently ignored)."""
    if settings.get("subscribers") is not None or settings.get("slow", "wait") != "wait":
        raise AddressError(f"{url}: subscribers= and slow= apply to pattern=broadcast only")


class BroadcastProducer(_RingSide, Producer):
    """Creates a broadcast ring and writes every message once for all its subscribers."""

    def __init__(self, address: Address, settings: MappingType[str, Any]) -> None:
        super().__init__(address, settings)
        self._presence: Presence | None = None
        self._space_fifo: WakeFifo | None = None
        self._slot_fifos: list[WakeFifo] = []
        self._reports: list[SubscriberReport] = []
        self._stream_taken = False
        """True once every live subscriber took the end of stream (then our presence is removed cleanly)."""
        self._subscribers_left_behind = False
        """Set when freed: whether a live subscriber had not taken the end (then our presence is left GONE for it)."""
        try:
            capacity = self._take_options(address, self.settings)
        except BaseException:
            self._closed = self._freed = True
            raise
        self.subscribers = int(self.settings["subscribers"] or 1)
        """Subscriber slots; the first send waits until this many joined."""
        self.slow = self.settings["slow"]
        """wait or drop."""
        self.mode = int(self.settings["mode"])
        self._trust = Trust.for_mode(self.mode)
        problem = availability_for(capacity + bl.SLOT_BYTES * self.subscribers)
        if problem:
            self._closed = self._freed = True
            raise ChannelUnavailable(f"{address.location}: {problem}")
        try:
            self._create(capacity)
        except BaseException:
            self._free()
            self._closed = self._freed = True
            raise
        self._opened()

    # --- creating ------------------------------------------------------------------

    def _create(self, capacity: int) -> None:
        address = self.address
        presence = self._presence = Presence(address.token, "producer", self.mode, channel=address.location)
        presence.declare(BROADCAST_DECLARATION)
        presence.record("posix_shm", "/" + address.name)
        fifo_paths = [space_fifo_path(address.token)] + [
            slot_fifo_path(address.token, slot) for slot in range(self.subscribers)
        ]
        for path in fifo_paths:
            presence.record(FIFO_KIND, path)
        Segment.remove_stale(address, self._trust, BROADCAST_VERSION)
        for path in (space_fifo_path(address.token), *broadcast_fifo_paths(address.token)):
            what = f"the wake-up FIFO {path}"
            if check_path(path, self._trust, what, (stat.S_IFIFO,)) is not None:
                _remove_found(path, what)
        try:
            self._space_fifo = WakeFifo.create(fifo_paths[0], self.mode)
            for path in fifo_paths[1:]:
                self._slot_fifos.append(WakeFifo.create(path, self.mode))
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot create the wake-up FIFOs of {address.location}: {exc.strerror}; {DEV_SHM_FIX}"
            ) from exc
        slow = bl.SLOW_DROP if self.slow == "drop" else bl.SLOW_WAIT
        mapping = _create_broadcast_file(self.path, capacity, self.max_message_size, self.subscribers, slow, self.mode)
        self._segment = Segment(self.path, mapping, _NoDoorbell(), _NoDoorbell(), None, self._space_fifo)
        self._words = mapping.words
        self._map = mapping.map
        self._capacity = capacity
        self._header_size = bl.header_size(self.subscribers)
        self._records = mapping.readonly[self._header_size - HEADER_SIZE :]
        """The segment seen as layout.decode_record expects it: ring data at HEADER_SIZE."""
        self._write_index = 0
        self._floor = 0
        """The lowest read index (slow=wait) or the tail (slow=drop) as last computed: room up to it + capacity."""
        self._tail_sequence = 0
        self._started = False
        self._ended = False
        self._gone: dict[int, int] = {}
        """Slot -> epoch of a subscriber seen dead (its slot no longer holds the writer back)."""
        self._last_probe = 0.0
        self._retry = FIRST_SLEEP_SECONDS
        self._armed = False
        self._spinning = False
        """True while _send spins: re-arming skips the FIFO's drain then."""
        self._waking = [(bl.slot_word(slot) + bl.SLOT_WAITING, fifo) for slot, fifo in enumerate(self._slot_fifos)]
        self._words[bl.PRODUCER_FLAGS_WORD] = PRODUCER_ATTACHED

    # --- sending ------------------------------------------------------------------

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message to every subscriber; wait at most `timeout` seconds for room (None: no limit, 0: once).

        Raises:
            MessageTooLarge: above the ring's max message size, before anything is sent.
            Timeout: no room within `timeout` (slow=wait: the slowest live subscriber is behind).
            PeerTimeout: fewer than `subscribers` subscribers joined within the `wait` option (from open).
            PeerGone: every subscriber is gone (died or closed).
            ChannelClosed: the producer was closed (also while this call waited), or inherited across fork().
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            kind = type(data)
            if kind is bytes or kind is bytearray:
                length = len(data)
            elif kind is memoryview and data.c_contiguous:  # type: ignore[union-attr]
                length = data.nbytes  # type: ignore[union-attr]
            else:
                length = -1
            if self._state or not self._started or length < 0:
                self._send_slowly(data, timeout)
                return
            if length > self.max_message_size:
                raise MessageTooLarge(length, self.max_message_size, self.max_message_source, self.max_message_fix)
            # the common case inline: room known (below the floor) and no wrap before the record
            capacity = self._capacity
            write_index = self._write_index
            position = write_index % capacity
            size = 8 + ((length + 7) & -8)
            if position + size > capacity or write_index + size - capacity > self._floor:
                self._send_slowly(data, timeout)
                return
            words = self._words
            offset = self._header_size + position
            words[offset >> 3] = length
            self._map[offset + 8 : offset + 8 + length] = data
            write_index += size
            self._write_index = write_index
            if WEAK_MEMORY_ORDER:
                full_fence()
            words[8] = write_index  # WRITE_INDEX_WORD
            for waiting_word, fifo in self._waking:
                if words[waiting_word]:
                    how = words[waiting_word]
                    words[waiting_word] = 0
                    if how == WAITING_FIFO:
                        fifo.ring()
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _send_slowly(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        """send() with the gate held, off the common case: state to check, before the start, an odd buffer."""
        if self._state:
            self._check_usable()
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes > self.max_message_size:
            raise MessageTooLarge(view.nbytes, self.max_message_size, self.max_message_source, self.max_message_fix)
        self._send(view, deadline_after(timeout))

    def _try_send(self, view: memoryview) -> bool:
        if self._state:
            self._check_usable()
        if not self._started and not self._try_start():
            return False
        length = view.nbytes
        if length > self.max_message_size:
            raise MessageTooLarge(length, self.max_message_size, self.max_message_source, self.max_message_fix)
        size = 8 + ((length + 7) & -8)
        if not self._room_for(size):
            return False
        offset = self._header_size + self._write_index % self._capacity
        self._words[offset >> 3] = length
        self._map[offset + RECORD_HEADER_SIZE : offset + RECORD_HEADER_SIZE + length] = view
        self._publish(size)
        return True

    def _try_start(self) -> bool:
        """True once `subscribers` slots were joined; else arm the FIFO (a joining subscriber writes it)."""
        if self._joined() >= self.subscribers:
            self._started = self._peer_seen = True
            return True
        self._arm()
        if self._joined() >= self.subscribers:
            self._disarm()
            self._started = self._peer_seen = True
            return True
        return False

    def _joined(self) -> int:
        words = self._words
        return sum(1 for slot in range(self.subscribers) if words[bl.slot_word(slot) + bl.SLOT_EPOCH])

    def _room_for(self, size: int) -> bool:
        """True when a record of `size` bytes fits now (writing the wrap record before it if needed)."""
        capacity = self._capacity
        position = self._write_index % capacity
        if position + size > capacity:
            wrap = capacity - position
            if not self._make_room(self._write_index + wrap - capacity):
                return False
            self._words[(self._header_size + position) >> 3] = KIND_WRAP << 32
            self._publish(wrap)
        return self._make_room(self._write_index + size - capacity)

    def _make_room(self, needed: int) -> bool:
        """True when every byte before `needed` may be overwritten; slow=drop makes it so, slow=wait may arm."""
        if needed <= self._floor:
            return True
        if self.slow == "drop":
            self._advance_tail(needed)
            return True
        floor = self._lowest_read_index()
        if floor < needed:
            self._arm()
            floor = self._lowest_read_index()
            if floor < needed and self._probe_slots():
                floor = self._lowest_read_index()
            if floor < needed:
                return False
            self._disarm()
        self._floor = floor
        self._retry = FIRST_SLEEP_SECONDS  # room came: a later wait starts short again
        return True

    def _lowest_read_index(self) -> int:
        """The lowest read index of the live, active subscribers; PeerGone when none is left."""
        words = self._words
        full_fence()  # our write index stored before their slots are read (a subscriber joining stores the other way)
        lowest = self._write_index
        live = False
        for slot in range(self.subscribers):
            base = bl.slot_word(slot)
            if words[base + bl.SLOT_STATE] != bl.SLOT_ACTIVE or self._gone.get(slot) == words[base + bl.SLOT_EPOCH]:
                continue
            live = True
            read_index = words[base + bl.SLOT_READ_INDEX]
            if read_index < lowest:
                lowest = read_index
        if not live:
            raise PeerGone(f"every subscriber of {self.address.location} is gone (died or closed)")
        return int(lowest)

    def _probe_slots(self) -> bool:
        """Probe the presence of each active subscriber (at most every SLOT_PROBE_SECONDS); True if one died."""
        now = time.monotonic()
        if now - self._last_probe < SLOT_PROBE_SECONDS:
            return False
        self._last_probe = now
        words = self._words
        changed = False
        for slot in range(self.subscribers):
            base = bl.slot_word(slot)
            epoch = words[base + bl.SLOT_EPOCH]
            if words[base + bl.SLOT_STATE] != bl.SLOT_ACTIVE or self._gone.get(slot) == epoch:
                continue
            path = presence_path(self.address.token, subscriber_role(slot))
            try:
                state = probe(path, self._trust)
            except ChannelUnavailable:
                state = PeerState.GONE  # another user's file in its place: not our subscriber any more
            if state is not PeerState.ALIVE and words[base + bl.SLOT_STATE] == bl.SLOT_ACTIVE:
                self._gone[slot] = epoch
                changed = True
        return changed

    def _advance_tail(self, needed: int) -> None:
        """slow=drop: move the tail past every record before `needed`, publishing it before they are overwritten."""
        words = self._words
        tail = self._floor
        sequence = self._tail_sequence
        while tail < needed:
            record = decode_record(self._records, self._capacity, self.max_message_size, tail, self._write_index)
            if record.kind == KIND_DATA:
                sequence += 1
            tail = record.next_read_index
        generation = words[bl.TAIL_GENERATION_WORD]
        words[bl.TAIL_GENERATION_WORD] = generation + 1
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[bl.TAIL_INDEX_WORD] = tail
        words[bl.TAIL_SEQUENCE_WORD] = sequence
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[bl.TAIL_GENERATION_WORD] = generation + 2
        if WEAK_MEMORY_ORDER:
            full_fence()
        self._floor = tail
        self._tail_sequence = sequence

    def _publish(self, size: int) -> None:
        """Publish `size` bytes written after the write index and wake every subscriber that waits."""
        write_index = self._write_index + size
        self._write_index = write_index
        words = self._words
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[bl.WRITE_INDEX_WORD] = write_index
        for waiting_word, fifo in self._waking:
            if words[waiting_word]:
                how = words[waiting_word]
                words[waiting_word] = 0
                if how == WAITING_FIFO:
                    fifo.ring()

    def _arm(self) -> None:
        """Ask the subscribers to write our FIFO when they move (drained first, so a poll waits for that).

        While spinning, still armed and not woken since (the word still says so): no system call.
        Otherwise always drained: a subscriber may have cleared the word and written its byte
        around our last arming, and a byte left there would make every poll return at once.
        """
        words = self._words
        if self._spinning and self._armed and words[bl.PRODUCER_WAITING_WORD] == WAITING_FIFO:
            full_fence()
            return
        if self._armed and words[bl.PRODUCER_WAITING_WORD] != WAITING_FIFO:
            self._retry = FIRST_SLEEP_SECONDS  # a subscriber woke us: activity, so the next wait is short again
        fifo = self._space_fifo
        if fifo is not None:
            fifo.drain()
        words[bl.PRODUCER_WAITING_WORD] = WAITING_FIFO
        full_fence()
        self._armed = True

    def _disarm(self) -> None:
        self._armed = False
        self._words[bl.PRODUCER_WAITING_WORD] = 0
        self._retry = FIRST_SLEEP_SECONDS

    def _send(self, view: memoryview, deadline: float | None) -> None:
        """Try; spin for `spin` seconds (yielding the CPU) while there is no room; then the base's wait on the FIFO."""
        try_send = self._try_send
        if try_send(view):
            return
        clock = time.monotonic
        spin_until = clock() + self.spin_seconds
        if deadline is not None:
            spin_until = min(spin_until, deadline)
        self._spinning = True
        try:
            while clock() < spin_until:
                os.sched_yield()
                if try_send(view):
                    return
        finally:
            self._spinning = False
        Producer._send(self, view, deadline)

    # --- the endpoint contract ----------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        fifo = self._space_fifo
        if fifo is None or fifo.fd < 0:
            return -1, 0, ATTACH_RETRY_SECONDS
        seconds = self._retry
        self._retry = min(seconds * 2, LONGEST_SLEEP_SECONDS)
        return fifo.fd, POLLIN, seconds

    def _try_close(self) -> bool:
        if self._segment is None:
            return True
        if not self._started and not self._try_start():
            return False
        if not self._ended:
            if not self._room_for(RECORD_HEADER_SIZE):
                return False
            assert self._presence is not None
            self._presence.declare_ending()
            offset = self._header_size + self._write_index % self._capacity
            self._words[offset >> 3] = KIND_END << 32
            self._words[bl.PRODUCER_FLAGS_WORD] |= PRODUCER_ENDED
            self._publish(RECORD_HEADER_SIZE)
            self._ended = True
        if self._drained():
            self._stream_taken = True
            return True
        return False

    def _drained(self) -> bool:
        """True when every live subscriber took the end of stream; else arm and False."""
        if self._pending() == 0:
            return True
        self._arm()
        if self._pending() == 0 or (self._probe_slots() and self._pending() == 0):
            self._disarm()
            return True
        return False

    def _live_subscribers(self) -> int:
        """How many slots hold an active subscriber whose presence lives (as last probed)."""
        words = self._words
        return sum(
            1
            for slot in range(self.subscribers)
            if words[bl.slot_word(slot) + bl.SLOT_STATE] == bl.SLOT_ACTIVE
            and self._gone.get(slot) != words[bl.slot_word(slot) + bl.SLOT_EPOCH]
        )

    def _pending(self) -> int:
        """How many live, active subscribers have not read up to the write index."""
        words = self._words
        full_fence()
        pending = 0
        for slot in range(self.subscribers):
            base = bl.slot_word(slot)
            if (
                words[base + bl.SLOT_STATE] == bl.SLOT_ACTIVE
                and self._gone.get(slot) != words[base + bl.SLOT_EPOCH]
                and words[base + bl.SLOT_READ_INDEX] < self._write_index
            ):
                pending += 1
        return pending

    def subscriber_reports(self) -> list[SubscriberReport]:
        """Per slot that a subscriber joined: its state and the messages it took (final once closed)."""
        if self._segment is None:
            return list(self._reports)
        words = self._words
        reports = []
        for slot in range(self.subscribers):
            base = bl.slot_word(slot)
            epoch = words[base + bl.SLOT_EPOCH]
            if not epoch:
                continue
            state = words[base + bl.SLOT_STATE]
            name = "gone" if self._gone.get(slot) == epoch else _STATE_NAMES.get(state, "free")
            reports.append(SubscriberReport(slot, name, int(words[base + bl.SLOT_TAKEN])))
        return reports

    def summary_fields(self) -> dict[str, object]:
        """The CLI summary's per-subscriber counts: slot, state and messages delivered."""
        return {"subscribers": [asdict(report) for report in self.subscriber_reports()]}

    def _free(self) -> None:
        segment = self._segment
        if segment is not None:
            self._probe_slots_now()
            self._reports = self.subscriber_reports()
            self._subscribers_left_behind = self._live_subscribers() > 0
            if segment.same_file():
                _unlink_quietly(segment.path)
        self._unlink_fifos()
        self._segment = None
        self._words = self._map = self._records = None  # type: ignore[assignment]
        if segment is not None:
            segment.close()  # closes the space FIFO too
        elif self._space_fifo is not None:
            self._space_fifo.close()
        for fifo in self._slot_fifos:
            fifo.close()
        self._space_fifo = None
        self._slot_fifos = []
        self._leave_presence()

    def _unlink_fifos(self) -> None:
        """Unlink the FIFOs we created, where their paths still name them."""
        token = self.address.token
        made = [(self._space_fifo, space_fifo_path(token))] if self._space_fifo is not None else []
        made += [(fifo, slot_fifo_path(token, slot)) for slot, fifo in enumerate(self._slot_fifos)]
        for fifo, path in made:
            if fifo is not None and fifo.fd >= 0 and _same_inode(path, fifo.fd):
                _unlink_quietly(path)

    def _leave_presence(self) -> None:
        """Remove dead subscribers' presence files, then leave: cleanly once the stream ended, else as a crash."""
        presence, self._presence = self._presence, None
        if presence is None:
            return
        for slot in range(getattr(self, "subscribers", MAX_SUBSCRIBERS)):
            remove_if_gone(presence_path(self.address.token, subscriber_role(slot)), presence.trust)
        if self._stream_taken or not self._subscribers_left_behind:
            presence.close()
        else:
            presence.abandon()  # the subscribers see GONE: the stream did not end

    def _probe_slots_now(self) -> None:
        self._last_probe = 0.0
        with contextlib.suppress(PodIPCError, OSError):
            self._probe_slots()

    def _drop_inherited(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        for fifo in self._slot_fifos:
            fifo.close()
        self._freed = True


class BroadcastSubscriber(_RingSide, Consumer):
    """Joins a producer's broadcast ring in a free slot and reads every message (in place with recv_view)."""

    def __init__(self, address: Address, settings: MappingType[str, Any]) -> None:
        super().__init__(address, settings)
        self._presence: Presence | None = None
        self._words: Any = None
        """The segment's words once joined; None before and once freed."""
        try:
            self._take_options(address, self.settings)
        except BaseException:
            self._closed = self._freed = True
            raise
        self.mode = int(self.settings["mode"])
        self._trust = Trust.for_mode(self.mode)
        self._expected_slots = self.settings["subscribers"]
        self.slot: int | None = None
        """The slot this subscriber holds, once joined."""
        self.lost = 0
        """slow=drop: messages the producer overwrote before this subscriber read them."""
        self.drops = False
        self._in_place = False
        """True once joined to a slow=wait ring: recv_view's inline path hands out the ring itself."""
        self._held: memoryview | None = None
        self._read_index = 0
        self._sequence = 0
        self._taken = 0
        self._opened()
        try:
            self._try_join()  # a ring already there: join now, so no message sent after open is missed
        except BaseException:
            self._free()
            self._closed = self._freed = True
            raise

    # --- joining --------------------------------------------------------------------

    def summary_fields(self) -> dict[str, object]:
        """The CLI summary's slot and loss count (slow=drop: messages overwritten before this subscriber read them)."""
        return {"slot": self.slot, "lost": self.lost}

    def _try_join(self) -> bool:
        """Map a live producer's ring, claim a slot and join it; False while there is no ring yet."""
        fd = _open_live(self.path, self._trust)
        if fd is None:
            return False
        try:
            size = os.fstat(fd).st_size
            slots, header_bytes = bl.read_identity(os.pread(fd, bl.IDENTITY_BYTES, 0))
            header = bl.decode_header(os.pread(fd, header_bytes, 0), size)
            if header.ended:  # that stream is over: wait for the next producer
                os.close(fd)
                return False
            if self._expected_slots is not None and self._expected_slots != header.slots:
                raise AddressError(
                    f"{self.address.location}: the producer made {header.slots} subscriber slots, "
                    f"this subscriber asked for subscribers={self._expected_slots}"
                )
            mapping = Mapping(fd, bl.segment_size(header.capacity, slots))
        except BaseException:
            os.close(fd)
            raise
        try:
            self._claim_slot(header.slots)
            self._join(mapping, header)
        except BaseException:
            if self._segment is None:
                mapping.close()
            raise
        return True

    def _claim_slot(self, slots: int) -> None:
        """Claim the presence of a free slot (or a dead subscriber's); ChannelUnavailable when all are held."""
        token = self.address.token
        refusal: ChannelUnavailable | None = None
        for slot in range(slots):
            if probe(presence_path(token, subscriber_role(slot)), self._trust) is PeerState.ALIVE:
                continue
            try:
                self._presence = Presence(token, subscriber_role(slot), self.mode, channel=self.address.location)
            except ChannelUnavailable as exc:
                refusal = exc
                continue
            self.slot = slot
            return
        raise ChannelUnavailable(
            f"all {slots} subscriber slots of {self.address.location} are taken; "
            "open the producer with a larger subscribers="
        ) from refusal

    def _join(self, mapping: Mapping, header: bl.BroadcastHeader) -> None:
        slot = self.slot
        assert slot is not None and self._presence is not None
        token = self.address.token
        data_fifo = WakeFifo(
            open_checked(slot_fifo_path(token, slot), os.O_RDWR, self._trust, "a wake-up FIFO", (stat.S_IFIFO,))
        )
        try:
            space_fifo = WakeFifo(
                open_checked(space_fifo_path(token), os.O_RDWR, self._trust, "a wake-up FIFO", (stat.S_IFIFO,))
            )
        except BaseException:
            data_fifo.close()
            raise
        segment = self._segment = Segment(self.path, mapping, _NoDoorbell(), _NoDoorbell(), data_fifo, space_fifo)
        self.max_message_size = header.max_message_size
        self.drops = header.slow == bl.SLOW_DROP
        self._in_place = not self.drops
        self._capacity = header.capacity
        self._header_size = header.header_size
        self._map = mapping.map
        self._view = mapping.readonly
        self._records = mapping.readonly[header.header_size - HEADER_SIZE :]
        words = mapping.words
        base = self._slot_word = bl.slot_word(slot)
        self._read_word = base + bl.SLOT_READ_INDEX
        self._taken_word = base + bl.SLOT_TAKEN
        self._waiter = Waiter(
            words,
            bl.WRITE_INDEX_WORD,
            base + bl.SLOT_WAITING,
            data_fifo,
            bl.PRODUCER_WAITING_WORD,
            _NoDoorbell(),
            space_fifo,
            self.spin_seconds,
            self._ring_check,
            segment.check_size,
            self._waker_fd,
        )
        words[base + bl.SLOT_TAKEN] = 0
        words[base + bl.SLOT_WAITING] = 0
        if self.drops:
            start, self._sequence = self._tail(words)
        else:
            start = words[bl.WRITE_INDEX_WORD]
        words[base + bl.SLOT_READ_INDEX] = start
        words[base + bl.SLOT_EPOCH] += 1
        words[base + bl.SLOT_STATE] = bl.SLOT_ACTIVE
        full_fence()  # active before we look at the write index again: the writer sees us or we see its progress
        if not self.drops:
            start = words[bl.WRITE_INDEX_WORD]
            words[base + bl.SLOT_READ_INDEX] = start
        self._read_index = start
        self._words = words
        self._peer_seen = True
        self._presence.watch(self._signal_peer_lost, _RingTracker(self._presence, segment))
        if words[bl.PRODUCER_WAITING_WORD]:
            self._waiter.wake_peer()  # a producer waiting for its subscribers to join

    def _tail(self, words: Any) -> tuple[int, int]:
        """slow=drop: the tail index and sequence, read consistently (the writer's seqlock).

        The writer holds it for three stores, but may be preempted in between: after a burst of
        tries this yields the CPU, and it gives up only when closed or when the producer is lost.
        """
        attempts = 0
        while True:
            generation = words[bl.TAIL_GENERATION_WORD]
            if not generation & 1:
                if WEAK_MEMORY_ORDER:
                    full_fence()
                tail, sequence = words[bl.TAIL_INDEX_WORD], words[bl.TAIL_SEQUENCE_WORD]
                if WEAK_MEMORY_ORDER:
                    full_fence()
                if words[bl.TAIL_GENERATION_WORD] == generation:
                    return int(tail), int(sequence)
            attempts += 1
            if attempts % TAIL_SPINS_BEFORE_YIELD == 0:
                if self._closing or self._forked:
                    raise self._closed_error()
                if self._peer_lost:
                    raise self._producer_gone()  # it died mid-update: the tail stays torn
                os.sched_yield()

    # --- receiving ----------------------------------------------------------------

    @holds_call_gate
    def recv_view(self, timeout: float | None = None) -> memoryview:
        """The next message as a read-only view into the ring, valid until the next recv/recv_view/close.

        slow=wait: the ring itself (zero copy; the writer does not overwrite it while held).
        slow=drop: a view of a checked copy. Raises what recv() raises.
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
                    return memoryview(peeked)
            elif self._in_place:
                # slow=wait's common case inline: hand the last view back, then a data record already there
                words = self._words
                read_index = self._read_index
                held = self._held
                if held is not None:
                    self._held = None
                    try:  # noqa: SIM105 - a with-statement costs more on this path
                        held.release()
                    except BufferError:  # the caller made views of it; they stay usable but may change
                        pass
                    self._advance(read_index)
                write_index = words[8]  # WRITE_INDEX_WORD
                if write_index != read_index:
                    if WEAK_MEMORY_ORDER:
                        full_fence()
                    view = self._take_data(read_index, write_index, True)
                    if view is not None:
                        return view  # type: ignore[return-value]
            result = self._take(None if timeout is None else deadline_after(timeout), True)
            return result if isinstance(result, memoryview) else memoryview(result)
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

    def _recv(self, deadline: float | None) -> bytes:
        result = self._take(deadline, False)
        assert isinstance(result, bytes)
        return result

    def _take(self, deadline: float | None, in_place: bool) -> bytes | memoryview:
        """The next message, waiting until the monotonic `deadline` (None: no limit)."""
        while self._words is None:
            self._check_joinable()
            if self._try_join():
                break
            self._await_readiness(deadline)
        while True:
            if self._peer_lost:
                self._segment.check_size()  # type: ignore[union-attr]
            message = self._step(in_place)
            if message is not None:
                return message
            read_index = self._read_index
            self._wait_for_index(read_index, read_index + 1, deadline)

    def _try_recv(self) -> bytes | None:
        if self._words is None:
            self._check_joinable()
            if not self._try_join():
                return None
        waiter = self._waiter
        if waiter is not None and waiter.armed:
            self._check_segment()
            waiter.disarm()
        message = self._step(False)
        if message is None:
            if self._waiter.arm(self._read_index, self._read_index + 1) is not None:  # type: ignore[union-attr]
                return self._try_recv()
            if self._peer_lost:
                raise self._producer_gone()
        return message  # type: ignore[return-value]

    def _check_joinable(self) -> None:
        if self._ended_flag or (self._segment is None and self._freed):
            self._refuse()

    def _step(self, in_place: bool) -> bytes | memoryview | None:
        """Take the record at the read index if the writer published one; None when there is none now."""
        words = self._words
        if self._held is not None:
            self._release_held()
        while True:
            read_index = self._read_index
            write_index = words[8]  # WRITE_INDEX_WORD
            if self.drops and read_index < words[bl.TAIL_INDEX_WORD]:  # overrun: the seqlock only then
                self._overrun(*self._tail(words))
                continue
            if write_index == read_index:
                return None
            if WEAK_MEMORY_ORDER:
                full_fence()
            if not self.drops:
                message = self._take_data(read_index, write_index, in_place)
                if message is not None:
                    return message
            try:
                record = decode_record(self._records, self._capacity, self.max_message_size, read_index, write_index)
            except ProtocolError:
                if self.drops and read_index < words[bl.TAIL_INDEX_WORD]:
                    continue  # overwritten while we looked: the next round counts it lost
                raise
            if self.drops:
                if WEAK_MEMORY_ORDER:
                    full_fence()
                if read_index < words[bl.TAIL_INDEX_WORD]:
                    continue  # its header may have been overwritten as we read it: never act on it
            start = record.payload_offset + self._header_size - HEADER_SIZE
            if record.kind == KIND_DATA:
                if in_place and not self.drops:
                    view = self._view[start : start + record.length]
                    self._held = view
                    self._read_index = record.next_read_index
                    self._taken += 1
                    return view
                data = self._map[start : start + record.length]
                if self.drops:
                    if WEAK_MEMORY_ORDER:
                        full_fence()
                    if read_index < words[bl.TAIL_INDEX_WORD]:
                        continue  # overwritten while we copied it
                    self._sequence += 1
                self._taken += 1
                self._advance(record.next_read_index)
                return data
            if record.kind == KIND_END:
                words[self._slot_word + bl.SLOT_STATE] = bl.SLOT_ENDED  # before the index: drained means ended
            self._advance(record.next_read_index)
            if record.kind == KIND_END:
                self._took_end()
            # KIND_WRAP: go on at the start of the ring

    def _take_data(self, read_index: int, write_index: int, in_place: bool) -> bytes | memoryview | None:
        """slow=wait's common case: a data record before the end of the ring (else None: _step decodes it)."""
        capacity = self._capacity
        position = read_index % capacity
        offset = self._header_size + position
        length = self._words[offset >> 3]  # a data record's header word is its length (kind 0 in the high half)
        if length > self.max_message_size:
            return None
        size = 8 + ((length + 7) & -8)
        if position + size > capacity or not size <= write_index - read_index <= capacity:
            return None
        start = offset + RECORD_HEADER_SIZE
        self._taken += 1
        if in_place:
            view = self._view[start : start + length]
            self._held = view
            self._read_index = read_index + size
            return view
        data: bytes = self._map[start : start + length]
        self._advance(read_index + size)
        return data

    def _overrun(self, tail: int, sequence: int) -> None:
        """slow=drop: the writer overwrote what we had not read; resume at the tail and count what was lost."""
        self.lost += sequence - self._sequence
        self._sequence = sequence
        self._advance(tail)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(BufferError):  # the caller made views of it; they stay usable but may change
                held.release()
            self._advance(self._read_index)

    def _advance(self, read_index: int) -> None:
        """Publish `read_index` and the count taken, and wake the producer if it waits for us."""
        words = self._words
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[self._read_word] = read_index
        words[self._taken_word] = self._taken
        self._read_index = read_index
        if words[16]:  # PRODUCER_WAITING_WORD
            self._waiter.wake_peer()  # type: ignore[union-attr]

    def _took_end(self) -> NoReturn:
        self._ended = True
        self._leave_channel()
        raise EndOfStream(f"{self.address.location}: the producer ended the stream")

    def _refuse(self) -> NoReturn:
        self._check_open()
        raise EndOfStream(f"{self.address.location}: the producer ended the stream")

    def _wait_for_index(self, low: int, high: int, deadline: float | None) -> int:
        """The write index once outside [low, high) (the blocking wait: spin, then the FIFO and the waker)."""
        wait = self._waiter.wait  # type: ignore[union-attr]
        while True:
            seconds = self._seconds_to_wait(deadline)
            value = wait(low, high, None if seconds is None else time.monotonic() + seconds)
            if value is not None:
                return value

    def _ring_check(self) -> PodIPCError | None:
        """For the waiter: ChannelClosed at once when closing; PeerGone once the ring is drained and the producer lost."""
        if self._closing or self._forked:
            raise self._closed_error()
        if self._peer_lost:
            self._check_segment()
            return self._producer_gone()
        return None

    def _producer_gone(self) -> PeerGone | ChannelUnavailable:
        gone = PeerGone(
            f"the producer of {self.address.location} is gone (it died or aborted without ending the stream)"
        )
        return gone if self._presence is None else self._presence.lost_error(gone)

    # --- the endpoint contract ----------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        waiter = self._waiter
        if self._words is None or waiter is None or waiter.fifo is None:
            return -1, 0, ATTACH_RETRY_SECONDS
        if self._ended_flag:
            return -1, 0, None
        if self._peer_lost:
            return -1, 0, 0.0
        if waiter.arm(self._read_index, self._read_index + 1) is not None:
            waiter.wake_self()
        return waiter.fifo.fd, POLLIN, waiter.retry_after()

    def _signal_peer_lost(self) -> None:
        Consumer._signal_peer_lost(self)
        self._interrupt()

    def _leave_channel(self) -> None:
        presence, self._presence = self._presence, None
        if presence is None:
            return
        presence.unwatch()
        presence.close()  # a dead producer's file stays: it records the ring for the next producer and podipc clean

    def _free(self) -> None:
        presence = self._presence
        if presence is not None:
            presence.unwatch()
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(BufferError):
                held.release()
        segment = self._segment
        self._in_place = False
        words, self._words = self._words, None
        if words is not None and segment is not None and not self._ended_flag and not segment.truncated():
            words[self._slot_word + bl.SLOT_STATE] = bl.SLOT_LEFT
            full_fence()
            if words[bl.PRODUCER_WAITING_WORD]:
                self._waiter.wake_peer()  # type: ignore[union-attr]
        self._leave_channel()
        self._segment = None
        self._records = self._view = self._map = None  # type: ignore[assignment]
        if segment is not None:
            segment.close()

    def _drop_inherited(self) -> None:
        self._in_place = False
        self._words = None
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        self._freed = True


def _create_broadcast_file(
    path: str, capacity: int, max_message_size: int, slots: int, slow: int, mode: int
) -> Mapping:
    """Create the segment under a temporary name: lock, allocate, map, write the header, rename into place."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise ChannelUnavailable(f"cannot create {temporary}: {exc.strerror}; {DEV_SHM_FIX}") from exc
    mapping: Mapping | None = None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = bl.segment_size(capacity, slots)
        _allocate(fd, size)
        mapping = Mapping(fd, size)
        header = bl.encode_header(capacity, max_message_size, slots, slow)
        mapping.map[: len(header)] = header
        os.rename(temporary, path)
    except BaseException:
        if mapping is None:
            os.close(fd)
        else:
            mapping.close()
        _unlink_quietly(temporary)
        raise
    return mapping


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
