"""The two ends of a mapped ring: RingWriter (the producer's) and RingReader (the consumer's).

They own the index arithmetic of the layout (podipc.transports.shm.layout) and the
memory-ordering fences (podipc.transports.shm.fence). Waiting is the endpoint's: each
end is given a `WaitFor` (the endpoint's policy: deadlines, the peer's liveness, close)
and a Waiter (the mechanics: spin, sleep, arm a descriptor, wake the peer). Each keeps
its own index in a Python int. The writer also keeps how far it may write before it must
load the read index again, so a send that finds room loads no shared word; the reader
loads the write index once per message (caching it too was measured: it saves a load
when messages queue up, and costs more than that in a request/reply exchange). Neither
makes a system call unless the peer waits.

The hot paths check the common case inline with the word indices as literals (a constant
load is cheaper than a global one) and hand everything else to the general code: wrap
records, the end of stream, waiting, and garbage, which layout.decode_record reports as
ProtocolError. The writer's fast case (room before the end of the ring and within
`_write_limit`: write the record, store the write index, wake a waiting consumer) is
inline in ShmProducer.send, which reads and updates `_capacity`, `_write_index`,
`_write_limit`, `_words`, `_map` and `_waiter` (a call more there would cost as much as
the call gate); everything else comes here through write_until. RingReader.take is the
consumer's one blocking receive path.

The non-blocking attempts (RingWriter.try_write/try_end, RingReader.try_take) never
wait: when they find no room (no message) they arm the waiter, so the peer writes the
side's FIFO once it moves, and return False (None); the endpoint polls the FIFO.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

from podipc.errors import EndOfStream, ProtocolError
from podipc.options import deadline_after
from podipc.transports.shm.fence import WEAK_MEMORY_ORDER, full_fence
from podipc.transports.shm.layout import (
    CONSUMER_CLOSED,
    CONSUMER_FLAGS_WORD,
    CONSUMER_WAITING_WORD,
    FEATURE_PACKS,
    HEADER_SIZE,
    KIND_END,
    KIND_PACK,
    KIND_WRAP,
    PACK_HEADER,
    PACK_HEADER_SIZE,
    PRODUCER_ATTACHED,
    PRODUCER_ENDED,
    PRODUCER_FLAGS_WORD,
    PRODUCER_WAITING_WORD,
    READ_INDEX_WORD,
    RECORD_HEADER_SIZE,
    WRITE_INDEX_WORD,
    Record,
    RingHeader,
    decode_record,
    record_size,
)
from podipc.transports.shm.segment import Segment
from podipc.transports.shm.waiter import Waiter

INLINE_POLLS = range(64)
"""Polls of the write index inside take() before it asks the waiter: a reply often comes within a microsecond."""

WaitFor = Callable[[int, int, "float | None"], int]
"""The endpoint's wait: (low, high, monotonic deadline or None) -> the peer's index once outside [low, high).
Raises Timeout/PeerTimeout at the deadlines, ChannelClosed when closed, PeerGone when the peer is lost."""

PACK_MOST_BYTES = 256 * 1024
"""The largest pack record a writer makes (and never more than a quarter of the ring): a reader frees it whole."""

if sys.byteorder != "little":  # pragma: no cover - the ring is little-endian and the hot paths use native words
    raise ImportError("shm:// needs a little-endian CPU")


class RingWriter:
    """Writes records into a ring and publishes them; waits for room through the endpoint's WaitFor."""

    def __init__(self, segment: Segment, header: RingHeader, waiter: Waiter, wait_for: WaitFor) -> None:
        """Take over the ring `segment` whose checked header is `header`, and mark the producer attached."""
        mapping = segment.mapping
        self._words = mapping.words
        self._map = mapping.map
        self._buffer = mapping.buffer
        self._capacity = header.capacity
        self._write_index = header.write_index
        self._read_index = header.read_index
        """The consumer's read index as last loaded."""
        self._write_limit = header.read_index + header.capacity
        """How far the write index may go without loading the read index again; -1 while a loan is out."""
        self._loan: memoryview | None = None
        self._loan_size = 0
        self._waiter = waiter
        self._wait_for = wait_for
        self._needed_read_index = 0
        """The read index the last attempt that found no room needed (what arm() waits for)."""
        self.ended = False
        """True once the end record is published."""
        self.packs = bool(header.features & FEATURE_PACKS)
        """True when the consumer's reader takes pack records (see try_write_many)."""
        self._pack_bytes = min(header.capacity // 4, PACK_MOST_BYTES)
        self._words[PRODUCER_FLAGS_WORD] = header.producer_flags | PRODUCER_ATTACHED

    def write_until(self, data: bytes | bytearray | memoryview, length: int, deadline: float | None) -> None:
        """Write one message of `length` bytes, waiting for room until the monotonic `deadline` (None: no limit)."""
        self._refuse_during_loan()
        size = record_size(length)
        offset = self._reserve(size, deadline)
        self._put(offset, data, length)

    def try_write(self, data: bytes | bytearray | memoryview, length: int) -> bool:
        """Write one message now if there is room for it; else arm the waiter and return False (nothing written)."""
        self._refuse_during_loan()
        size = record_size(length)
        if not self._room_for(size):
            return False
        self._put(self._reserve(size, None), data, length)
        return True

    def try_write_many(
        self, views: Sequence[memoryview], start: int, uniform: int = -1, joined: memoryview | None = None
    ) -> int:
        """Write `views[start:]` (sizes checked) while there is room, publishing the write index once per run.

        Returns the index after the last message written; `start` when none fitted (then the
        waiter is armed, as try_write does). Records go back to back; a wrap, or a full ring,
        publishes what was written and takes the general path for that one message.
        `uniform` >= 0 says every message is that many bytes and `joined` holds them back to
        back: then, if the reader takes packs, they go as pack records of many messages each
        (one header and one copy per pack).
        """
        self._refuse_during_loan()
        if joined is not None and self.packs:
            return self._try_write_packed(views, start, uniform, joined)
        capacity = self._capacity
        words = self._words
        ring = self._map
        index = start
        total = len(views)
        while index < total:
            write_index = self._write_index
            limit = self._write_limit
            first = index
            while index < total:
                view = views[index]
                length = len(view)  # flat byte views (or a UniformBatch's bytes): len() is the size in bytes
                size = 8 + ((length + 7) & -8)
                position = write_index % capacity
                if position + size > capacity:
                    break  # a wrap record first: the general path
                if write_index + size > limit:
                    limit = words[READ_INDEX_WORD] + capacity
                    if write_index + size > limit:
                        break  # no room: the general path arms the waiter
                offset = HEADER_SIZE + position
                words[offset >> 3] = length
                ring[offset + RECORD_HEADER_SIZE : offset + RECORD_HEADER_SIZE + length] = view
                write_index += size
                index += 1
            self._write_limit = limit
            self._read_index = limit - capacity
            if index > first:
                self._publish(write_index - self._write_index)
            if index < total:
                view = views[index]
                if not self.try_write(view, len(view)):
                    break
                index += 1
        return index

    def _try_write_packed(self, views: Sequence[memoryview], start: int, size: int, joined: memoryview) -> int:
        """try_write_many for messages of `size` bytes each: packs while two or more fit, else one record."""
        index = start
        total = len(views)
        while index < total:
            if total - index >= 2:
                index = self._write_packs(joined, index, total, size)
                if index >= total:
                    break
            view = views[index]
            if not self.try_write(view, len(view)):
                break
            index += 1
        return index

    def _write_packs(self, joined: memoryview, index: int, total: int, size: int) -> int:
        """Write pack records of messages `index`..`total` of `joined` while two fit before the ring's end; the next index."""
        capacity = self._capacity
        words = self._words
        ring = self._map
        most = max(2, self._pack_bytes // size) if size else self._pack_bytes
        while total - index >= 2:
            write_index = self._write_index
            position = write_index % capacity
            read_index = words[READ_INDEX_WORD]
            self._read_index = read_index
            self._write_limit = read_index + capacity
            # both bounds are multiples of 8, so a payload that fits them fits padded too
            room = min(read_index + capacity - write_index, capacity - position) - RECORD_HEADER_SIZE - PACK_HEADER_SIZE
            if room < 0:
                break
            count = min(total - index, most, room // size if size else most)
            if count < 2:
                break
            length = PACK_HEADER_SIZE + count * size
            offset = HEADER_SIZE + position
            words[offset >> 3] = KIND_PACK << 32 | length
            words[(offset >> 3) + 1] = count | size << 32  # PACK_HEADER: u32 count, u32 size
            start = offset + RECORD_HEADER_SIZE + PACK_HEADER_SIZE
            ring[start : start + count * size] = joined[index * size : (index + count) * size]
            self._publish(record_size(length))
            index += count
        return index

    def _put(self, offset: int, data: bytes | bytearray | memoryview, length: int) -> None:
        self._words[offset >> 3] = length
        self._map[offset + RECORD_HEADER_SIZE : offset + RECORD_HEADER_SIZE + length] = data
        self._publish(record_size(length))

    def _refuse_during_loan(self) -> None:
        if self._loan is not None:
            raise RuntimeError("commit() the loaned buffer before sending")

    def loan(self, size: int, timeout: float | None) -> memoryview:
        """A writable view of `size` bytes in the ring (the caller checked the size), for commit() to send."""
        if self._loan is not None:
            raise RuntimeError("commit() the previous loan first")
        capacity = self._capacity
        write_index = self._write_index
        position = write_index % capacity
        needed = record_size(size)
        if position + needed > capacity or write_index + needed > self._write_limit:
            offset = self._reserve(needed, None if timeout is None else deadline_after(timeout))
        else:
            offset = HEADER_SIZE + position
        start = offset + RECORD_HEADER_SIZE
        loan = self._loan = self._buffer[start : start + size]
        self._loan_size = size
        self._write_limit = -1  # every write takes the slow path, which refuses it until commit()
        return loan

    def commit(self, length: int | None) -> None:
        """Send the loaned view as one message of `length` bytes (None: all of it)."""
        loan = self._loan
        if loan is None:
            raise RuntimeError("nothing is loaned; call loan(size) first")
        length = self._loan_size if length is None else length
        if not 0 <= length <= self._loan_size:
            raise ValueError(f"commit length {length} outside 0..{self._loan_size}")
        self._loan = None
        self._write_limit = self._read_index + self._capacity
        with contextlib.suppress(BufferError):  # the caller made views of it; they stay usable but may change
            loan.release()
        position = self._write_index % self._capacity
        self._words[(HEADER_SIZE + position) >> 3] = length
        self._publish(record_size(length))

    def drop_loan(self) -> None:
        """Forget a loan that will not be committed (its view stops working)."""
        loan, self._loan = self._loan, None
        if loan is not None:
            with contextlib.suppress(BufferError):
                loan.release()
            self._write_limit = self._read_index + self._capacity

    def try_end(self) -> bool:
        """Write and publish the end of stream if there is room now (a loan is dropped); else arm, False."""
        self.drop_loan()
        if not self._room_for(RECORD_HEADER_SIZE):
            return False
        offset = self._reserve(RECORD_HEADER_SIZE, None)
        self._words[offset >> 3] = KIND_END << 32
        self._words[PRODUCER_FLAGS_WORD] |= PRODUCER_ENDED
        self._publish(RECORD_HEADER_SIZE)
        self.ended = True
        return True

    def drained(self) -> bool:
        """True when the consumer has taken everything published; else arm the waiter for that and False."""
        self._needed_read_index = self._write_index
        read_index: int = self._words[READ_INDEX_WORD]
        return read_index >= self._write_index or self.arm() is not None

    def consumer_closed(self) -> bool:
        """True when the consumer left before the end of stream (its closed flag)."""
        return bool(self._words[CONSUMER_FLAGS_WORD] & CONSUMER_CLOSED)

    def arm(self) -> int | None:
        """Ask the consumer to write our FIFO once the read index reaches what the last attempt needed.

        The read index when it is there already (then the next attempt may succeed), else None.
        """
        return self._waiter.arm(0, self._needed_read_index)

    def _room_for(self, size: int) -> bool:
        """True when a record of `size` bytes (and the wrap before it) fits now; else arm and False."""
        capacity = self._capacity
        position = self._write_index % capacity
        wrap = capacity - position if position + size > capacity else 0
        needed = self._write_index + wrap + size - capacity
        read_index: int = self._words[READ_INDEX_WORD]
        if read_index < needed:
            self._needed_read_index = needed
            armed = self.arm()
            if armed is None:
                return False
            read_index = armed
        self._read_index = read_index
        self._write_limit = read_index + capacity
        return True

    def _reserve(self, size: int, deadline: float | None) -> int:
        """Wait for `size` contiguous bytes (writing a wrap record when needed); their segment offset."""
        capacity = self._capacity
        position = self._write_index % capacity
        if position + size > capacity:
            self._wait_for_room(capacity - position, deadline)
            self._words[(HEADER_SIZE + position) >> 3] = KIND_WRAP << 32
            self._publish(capacity - position)
            position = 0
        self._wait_for_room(size, deadline)
        return HEADER_SIZE + position

    def _wait_for_room(self, size: int, deadline: float | None) -> None:
        """Wait until the consumer's read index leaves `size` bytes free after the write index."""
        enough = self._write_index + size - self._capacity
        read_index: int = self._words[READ_INDEX_WORD]
        if read_index < enough:
            read_index = self._wait_for(0, enough, deadline)
        self._read_index = read_index
        self._write_limit = read_index + self._capacity  # never waits with a loan out

    def _publish(self, size: int) -> None:
        """Publish the `size` bytes written after the write index, and wake a waiting consumer."""
        write_index = self._write_index + size
        self._write_index = write_index
        words = self._words
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[WRITE_INDEX_WORD] = write_index
        if words[CONSUMER_WAITING_WORD]:
            self._waiter.wake_peer()


class RingReader:
    """Takes records from a ring, hands their payloads out (copied or in place) and frees them for the writer."""

    def __init__(
        self,
        segment: Segment,
        capacity: int,
        max_message_size: int,
        waiter: Waiter,
        wait_for: WaitFor,
        location: str,
        on_end: Callable[[], None],
    ) -> None:
        """Read the new, empty ring `segment`; `on_end` runs when the end of stream is taken, before EndOfStream."""
        mapping = segment.mapping
        self._words = mapping.words
        self._map = mapping.map
        self._view = mapping.readonly
        self._capacity = capacity
        self._max_message_size = max_message_size
        self._read_index = 0
        """The index after the last record taken: published, or ahead of the published one while a view is held."""
        self._held: memoryview | None = None
        self._pack_taken = 0
        """Messages already taken from the pack record at the read index (0: none, or not at a pack)."""
        self._on_end = on_end
        self._end_message = f"{location}: the producer ended the stream"
        self._waiter = waiter
        self._wait_for = wait_for

    @overload
    def take(self, timeout: float | None, in_place: Literal[False]) -> bytes: ...

    @overload
    def take(self, timeout: float | None, in_place: Literal[True]) -> memoryview: ...

    @overload
    def take(self, timeout: float | None, in_place: bool) -> bytes | memoryview: ...

    def take(self, timeout: float | None, in_place: bool) -> bytes | memoryview:
        """The next message, waiting at most `timeout` seconds (None: no limit); the one blocking receive path.

        in_place=False: a copy, and its bytes go back to the writer at once. in_place=True:
        a read-only view into the ring, held until the next take() or release(). Either way
        a view still held from before is released first. Raises EndOfStream after the
        last message (once `on_end` has run), what WaitFor raises, ProtocolError.
        """
        words = self._words
        read_index = self._read_index
        held = self._held
        if held is not None:
            self._held = None
            try:  # noqa: SIM105 - a with-statement costs more on this path
                held.release()
            except BufferError:  # the caller made views of it; they stay usable but may change
                pass
            if WEAK_MEMORY_ORDER:
                full_fence()
            words[16] = read_index  # READ_INDEX_WORD: freed before waiting, or the writer might wait for it
            if words[18]:  # PRODUCER_WAITING_WORD
                self._waiter.wake_peer()
        write_index = words[8]  # WRITE_INDEX_WORD
        if write_index == read_index:
            for _ in INLINE_POLLS:
                write_index = words[8]
                if write_index != read_index:
                    break
            else:
                write_index = self._wait_for(
                    read_index, read_index + 1, None if timeout is None else deadline_after(timeout)
                )
        if WEAK_MEMORY_ORDER:
            full_fence()
        capacity = self._capacity
        position = read_index % capacity
        offset = HEADER_SIZE + position
        length = words[offset >> 3]  # a data record's header word is its length (kind 0 in the high half)
        if length <= self._max_message_size:
            size = 8 + ((length + 7) & -8)
            if position + size <= capacity and size <= write_index - read_index <= capacity:
                start = offset + 8
                read_index += size
                self._read_index = read_index
                if in_place:
                    view = self._view[start : start + length]
                    self._held = view
                    return view
                data = self._map[start : start + length]
                if WEAK_MEMORY_ORDER:
                    full_fence()
                words[16] = read_index  # READ_INDEX_WORD
                if words[18]:  # PRODUCER_WAITING_WORD
                    self._waiter.wake_peer()
                return data
        return self._pass_marker(read_index, write_index, timeout, in_place)

    def try_take(self) -> bytes | None:
        """The next message (a copy) if one is there now; else arm the waiter and return None. Never waits.

        Raises EndOfStream after the last message (once `on_end` has run), ProtocolError.
        """
        if self._held is not None:
            self.release_held()
        words = self._words
        read_index = self._read_index
        write_index: int = words[8]  # WRITE_INDEX_WORD
        if write_index == read_index:
            armed = self._waiter.arm(read_index, read_index + 1)
            if armed is None:
                return None
            write_index = armed
        if WEAK_MEMORY_ORDER:
            full_fence()
        # take()'s common case, inline: a data record before the end of the ring
        capacity = self._capacity
        position = read_index % capacity
        offset = HEADER_SIZE + position
        length = words[offset >> 3]
        if length <= self._max_message_size:
            size = 8 + ((length + 7) & -8)
            if position + size <= capacity and size <= write_index - read_index <= capacity:
                data: bytes = self._map[offset + 8 : offset + 8 + length]
                read_index += size
                self._read_index = read_index
                if WEAK_MEMORY_ORDER:
                    full_fence()
                words[16] = read_index  # READ_INDEX_WORD
                if words[18]:  # PRODUCER_WAITING_WORD
                    self._waiter.wake_peer()
                return data
        record = decode_record(self._view, self._capacity, self._max_message_size, read_index, write_index)
        if record.kind == KIND_PACK:
            return self._take_from_pack(record)
        if record.kind == KIND_END or record.kind == KIND_WRAP:
            self._advance(record.next_read_index)
            if record.kind == KIND_END:
                self._on_end()
                raise EndOfStream(self._end_message)
            return self.try_take()
        data = self._map[record.payload_offset : record.payload_offset + record.length]
        self._advance(record.next_read_index)
        return data

    def try_take_many(self, max_count: int) -> list[bytes]:
        """Up to `max_count` messages (copies) that are there now, publishing the read index once; [] when none.

        Never waits and never arms the waiter (it is called after a message was taken). An
        end of stream or garbage after some messages is left for the next call; with none,
        EndOfStream (after `on_end`) or ProtocolError is raised.
        """
        self.release_held()
        words = self._words
        ring = self._map
        capacity = self._capacity
        largest = self._max_message_size
        read_index = self._read_index
        write_index: int = words[WRITE_INDEX_WORD]
        if WEAK_MEMORY_ORDER:
            full_fence()
        messages: list[bytes] = []
        append = messages.append
        count = 0
        while count < max_count and read_index != write_index:
            position = read_index % capacity
            offset = HEADER_SIZE + position
            length = words[offset >> 3]  # a data record's header word is its length (kind 0 in the high half)
            if length <= largest:
                size = 8 + ((length + 7) & -8)
                if position + size <= capacity and size <= write_index - read_index <= capacity:
                    start = offset + RECORD_HEADER_SIZE
                    append(ring[start : start + length])
                    read_index += size
                    count += 1
                    continue
            if messages:  # a marker or garbage: the messages first, what follows on the next call
                try:
                    record = decode_record(self._view, capacity, largest, read_index, write_index)
                except ProtocolError:
                    break
                if record.kind == KIND_PACK:
                    count += self._take_pack_into(messages, record, max_count - count)
                    if self._pack_taken:
                        break  # max_count reached inside the pack: the rest on the next call
                    read_index = record.next_read_index
                    continue
                if record.kind != KIND_WRAP:
                    break
                read_index = record.next_read_index
                continue
            record = decode_record(self._view, capacity, largest, read_index, write_index)
            if record.kind == KIND_PACK:
                count += self._take_pack_into(messages, record, max_count - count)
                if self._pack_taken:
                    break
                read_index = record.next_read_index
                continue
            self._advance(record.next_read_index)
            read_index = record.next_read_index
            if record.kind == KIND_END:
                self._on_end()
                raise EndOfStream(self._end_message)
        if read_index != self._read_index:
            self._advance(read_index)
        return messages

    def _take_from_pack(self, record: Record) -> bytes:
        """The next message of the pack record at the read index; the pack is freed once its last is taken."""
        count, size = self._pack_shape(record)
        taken = self._pack_taken
        start = record.payload_offset + PACK_HEADER_SIZE + taken * size
        data: bytes = self._map[start : start + size]
        taken += 1
        if taken == count:
            self._pack_taken = 0
            self._advance(record.next_read_index)
        else:
            self._pack_taken = taken
        return data

    def _pack_shape(self, record: Record) -> tuple[int, int]:
        """(count, size) of the pack record decode_record checked, read again and checked against its length:
        a writer that changed them since (a co-tenant with write access) is a ProtocolError, never a wild read."""
        count, size = PACK_HEADER.unpack_from(self._map, record.payload_offset)
        if count < 1 or size > self._max_message_size or PACK_HEADER_SIZE + count * size != record.length:
            raise ProtocolError(f"shm pack record changed under the reader ({count} messages of {size} bytes)")
        if self._pack_taken >= count:
            raise ProtocolError(f"shm pack record shrank under the reader to {count} messages")
        return count, size

    def _take_pack_into(self, messages: list[bytes], record: Record, room: int) -> int:
        """Append up to `room` messages of a pack record (from where the last take left it); how many.

        The caller publishes the read index after the pack once `_pack_taken` is back to 0. A
        pack met after other records of a batch starts at its first message: a batch that
        stops inside a pack stops there, so only the record at the read index is ever part taken.
        """
        count, size = self._pack_shape(record)
        first = self._pack_taken
        taken = min(count - first, room)
        begin = record.payload_offset + PACK_HEADER_SIZE + first * size
        if size:
            split_into(messages, self._map, begin, size, taken)
        else:
            messages += [b""] * taken
        first += taken
        self._pack_taken = 0 if first == count else first
        return int(taken)

    def has_message(self) -> bool:
        """True when the write index is ahead of this reader (a message, or the end, may be taken now)."""
        return self._words[WRITE_INDEX_WORD] != self._read_index

    def arm(self) -> int | None:
        """Ask the producer to write our FIFO once the write index moves; the write index if it moved already."""
        read_index = self._read_index
        return self._waiter.arm(read_index, read_index + 1)

    def release_held(self) -> None:
        """Release a held view and hand its bytes back to the writer."""
        if self._held is not None:
            self.release()
            self._advance(self._read_index)

    def release(self) -> None:
        """Release a held view without handing its bytes back (the reader is leaving)."""
        if self._held is not None:
            # BufferError: the caller made views of it; they stay usable but may change
            with contextlib.suppress(BufferError):
                self._held.release()
            self._held = None

    def leave_early(self) -> None:
        """Tell the writer this reader is gone before the end of stream: set the closed flag and wake it."""
        self._words[CONSUMER_FLAGS_WORD] |= CONSUMER_CLOSED
        full_fence()
        if self._words[PRODUCER_WAITING_WORD]:
            self._waiter.wake_peer()

    def producer_attached(self) -> bool:
        """True once a producer has marked the ring attached."""
        return bool(self._words[PRODUCER_FLAGS_WORD] & PRODUCER_ATTACHED)

    def _pass_marker(
        self, read_index: int, write_index: int, timeout: float | None, in_place: bool
    ) -> bytes | memoryview:
        """Step over a wrap record (then take the next message) or take the end of stream; garbage: ProtocolError."""
        record = decode_record(self._view, self._capacity, self._max_message_size, read_index, write_index)
        if record.kind == KIND_PACK:
            data = self._take_from_pack(record)
            return memoryview(data) if in_place else data
        # decode_record accepts a data record exactly where take() took it already: this one is a marker
        self._advance(record.next_read_index)
        if record.kind == KIND_END:
            self._on_end()
            raise EndOfStream(self._end_message)
        assert record.kind == KIND_WRAP
        return self.take(timeout, in_place)

    def _advance(self, read_index: int) -> None:
        """Publish `read_index` (the bytes before it are free) and wake a writer waiting for room."""
        words = self._words
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[READ_INDEX_WORD] = read_index
        self._read_index = read_index
        if words[PRODUCER_WAITING_WORD]:
            self._waiter.wake_peer()


SPLIT_BLOCK = 256
"""Messages cut from a pack per struct call (its format string grows with them)."""
SPLITTERS_MOST = 64
_splitters: dict[tuple[int, int], Callable[[Any, int], tuple[Any, ...]]] = {}


def split_into(messages: list[bytes], buffer: Any, begin: int, size: int, count: int) -> None:
    """Append `count` messages of `size` bytes each, back to back in `buffer` from `begin`, as bytes.

    One struct unpack per SPLIT_BLOCK messages: a fifth of the cost of slicing them one by one.
    """
    while count:
        taken = min(count, SPLIT_BLOCK)
        split = _splitters.get((size, taken))
        if split is None:
            if len(_splitters) >= SPLITTERS_MOST:
                _splitters.clear()
            split = _splitters[size, taken] = struct.Struct("=" + f"{size}s" * taken).unpack_from
        messages += split(buffer, begin)
        begin += size * taken
        count -= taken
