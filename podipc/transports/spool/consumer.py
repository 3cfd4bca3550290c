"""The consuming side of a spool: reads records in order, commits its position before returning each message."""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Mapping
from typing import Any
from zlib import crc32

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.errors import ChannelUnavailable, EndOfStream, PeerGone, PodIPCError, ProtocolError
from podipc.presence import PeerState
from podipc.transports.spool.notify import CONSUMER_DIRECTORY_EVENTS, CONSUMER_SEGMENT_EVENTS
from podipc.transports.spool.side import BatchSync, SpoolSide, spool_error
from podipc.transports.spool.wire import (
    CHECKSUM,
    ENDED,
    HOLDS_PRESENCE,
    KINDS,
    MESSAGE,
    NEXT,
    POSITION_FIELDS,
    POSITION_NAME,
    POSITION_SIZE,
    POSITION_SLOT_SIZE,
    READ_CHUNK,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RING,
    RING_OFFSET,
    SEGMENT_HEADER_SIZE,
    SLOT_OFFSETS,
    Position,
    Record,
    SegmentHeader,
    decode_position,
    decode_segment_header,
    parse_segment_name,
    record_checksum_holds,
    scan_segment,
    segment_name,
)

LARGE_RECORD = 64 * 1024
"""A payload at least this large is read on its own (one copy), not through the read buffer."""
RING_MESSAGES = 256
RING_BYTES = 1024**2
"""The consumer rings (wakes a producer waiting for room) after taking this many messages or bytes, and
whenever it has taken everything there was."""
DAMAGE_GRACE_SECONDS = 2.0
"""How long a live producer has to repair a damaged record (it truncates a broken tail when it resumes)
before the consumer gives up with ProtocolError."""
_pack_position = POSITION_FIELDS.pack
_unpack_record = RECORD_HEADER.unpack_from
_AGAIN = object()


class SpoolConsumer(SpoolSide, Consumer):
    """Reads the spool's records in order; its position is committed before a message is returned."""

    role = "consumer"
    # the hot path's attributes as slots: read without a dict lookup, and the instance dict stays small
    # enough (<= 30 keys) for CPython's shared-key layout
    __slots__ = (
        "_base",
        "_batch",
        "_buffer",
        "_flags",
        "_generation",
        "_map",
        "_next",
        "_pos",
        "_ring_cost",
        "_ring_threshold",
        "_segment",
        "_stream_id",
        "_stream_offset",
        "_sync_each",
        "_unrung",
        "_view",
    )

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = int(self.settings["max_message_size"])
        level = str(self.settings["sync"])
        self._sync_each = level == "always"
        self._batch: BatchSync | None = None
        ring_messages = max(1, min(RING_MESSAGES, int(self.settings["depth"]) // 2))
        self._ring_threshold = max(1, min(RING_BYTES, int(self.settings["max_bytes"]) // 2))
        self._ring_cost = max(1, self._ring_threshold // ring_messages)
        self._unrung = 0
        self._rings = 0
        self._segment_fd = -1
        self._segment = 0
        self._stream_id = 0
        self._next = 0
        self._stream_offset = 0
        self._flags = HOLDS_PRESENCE
        self._generation = 0
        self._buffer = b""
        self._view = memoryview(b"")
        self._base = 0
        """The segment offset of the buffer's first byte."""
        self._pos = 0
        """The next record's place in the buffer (its segment offset is _base + _pos)."""
        self._position_fd = -1
        self._map: mmap.mmap | None = None
        self._stored: Position | None = None
        self._end_taken = False
        self._damage: tuple[int, int, float] | None = None
        try:
            self._open_spool()
        except BaseException:
            self._closed = self._freed = True
            raise
        try:
            self._open_position()
            self._locate()
            if level == "batch":
                self._batch = BatchSync(self._sync_position, float(self.settings["sync_delay"]), self._batch_failed)
        except OSError as exc:
            self._abandon_open()
            raise spool_error(exc, self.path) from exc
        except BaseException:
            self._abandon_open()
            raise
        self.resumed_at = self._next

    def _directory_events(self) -> int:
        return CONSUMER_DIRECTORY_EVENTS

    def _abandon_open(self) -> None:
        self._closed = self._freed = True
        self._close_files()
        self._close_spool()

    # --- where the stream stands ----------------------------------------------------------

    def _open_position(self) -> None:
        """Read the position a consumer before us left (its file is created on the first commit)."""
        try:
            fd = self._open_existing(POSITION_NAME, os.O_RDWR)
        except FileNotFoundError:
            return
        self._map_position(fd)
        self._stored = decode_position(self._map[:POSITION_SIZE])  # type: ignore[index]
        if self._stored is not None:
            self._generation = self._stored.generation

    def _create_position(self) -> mmap.mmap:
        try:
            fd = self._create(POSITION_NAME)
        except FileExistsError:  # a consumer before us, killed after creating it: ours to reuse
            fd = self._open_existing(POSITION_NAME, os.O_RDWR)
        return self._map_position(fd)

    def _map_position(self, fd: int) -> mmap.mmap:
        self._position_fd = fd
        if os.fstat(fd).st_size < POSITION_SIZE:  # new, or created by a consumer killed at once
            os.ftruncate(fd, POSITION_SIZE)
        self._map = mmap.mmap(fd, POSITION_SIZE)
        return self._map

    def _segments(self) -> list[int]:
        return sorted(first for first in map(parse_segment_name, os.listdir(self._dir_fd)) if first is not None)

    def _locate(self) -> bool:
        """Find where to read on: after the stored position in its stream, else the oldest segment. False: none yet."""
        segments = self._segments()
        stored = self._stored
        if not segments:
            if stored is not None and stored.ended:
                self._end_taken = True  # taken and cleaned up: a consumer killed before removing its position
                self._next = stored.next_sequence
                return True
            return False
        if stored is not None:
            candidates = [first for first in segments if first <= stored.next_sequence]
            if candidates and self._enter_stored(candidates[-1], stored, segments):
                return True
        opened = self._open_segment(segments[0])
        if opened is None:
            return False
        fd, header = opened
        self._flags = HOLDS_PRESENCE
        self._switch_to(fd, header, SEGMENT_HEADER_SIZE, header.stream_offset, header.first_sequence)
        self.resumed_at = self._next
        return True

    def _enter_stored(self, first: int, stored: Position, segments: list[int]) -> bool:
        opened = self._open_segment(first)
        if opened is None:
            return False
        fd, header = opened
        if header.stream_id != stored.stream_id:
            os.close(fd)
            return False  # the position of a stream that is over: this is a new one
        if first == stored.segment and self._record_follows(fd, header, stored):
            offset, stream_offset = stored.offset, stored.stream_offset
        else:  # its segment is gone: read this one from its start, skipping what was taken
            offset, stream_offset = SEGMENT_HEADER_SIZE, header.stream_offset
        self._flags = stored.flags | HOLDS_PRESENCE
        self._switch_to(fd, header, offset, stream_offset, stored.next_sequence)
        self._end_taken = stored.ended
        self.resumed_at = self._next
        for older in segments:
            if older < first:
                self._remove_ours(segment_name(older))  # taken whole before: a consumer killed before removing it
        return True

    @staticmethod
    def _record_follows(fd: int, header: SegmentHeader, stored: Position) -> bool:
        """True when the segment's valid records lead exactly to the stored offset and sequence.

        After a power loss the segment may be shorter than the position says, and a resumed
        producer may have written other records there: then the segment is read from its start.
        """
        end = scan_segment(fd, header, stored.offset)
        return end.offset == stored.offset and end.next_sequence == stored.next_sequence

    def _open_segment(self, first: int) -> tuple[int, SegmentHeader] | None:
        """Open segment `first` and read its header; None when it is not (all) there yet."""
        try:
            fd = self._open_existing(segment_name(first), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
            header = decode_segment_header(data)
            if header is None or header.first_sequence != first:
                if len(data) == SEGMENT_HEADER_SIZE:
                    self._damaged(first, 0, "its header is not a valid podipc segment header")
                os.close(fd)
                return None
        except BaseException:
            os.close(fd)
            raise
        return fd, header

    def _switch_to(self, fd: int, header: SegmentHeader, offset: int, stream_offset: int, next_sequence: int) -> None:
        if self._segment_fd >= 0:
            os.close(self._segment_fd)
        self._segment_fd = fd
        assert self._ready is not None
        self._ready.watch_file(
            fd, os.path.join(self.path, segment_name(header.first_sequence)), CONSUMER_SEGMENT_EVENTS
        )
        self._segment = header.first_sequence
        self._stream_id = header.stream_id
        self._stream_offset = stream_offset
        self._next = next_sequence
        self._buffer = b""
        self._view = memoryview(self._buffer)
        self._base = offset
        self._pos = 0
        self._damage = None

    # --- receiving ------------------------------------------------------------------------

    def _try_recv(self) -> bytes | None:
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos >= RECORD_HEADER_SIZE:
            checksum, length, kind, sequence = _unpack_record(buffer, pos)
            end = pos + RECORD_HEADER_SIZE + length
            if (
                end <= len(buffer)
                and kind == MESSAGE
                and sequence == self._next
                and length <= self.max_message_size
                and crc32(self._view[pos + 4 : end]) == checksum
            ):
                message = buffer[pos + RECORD_HEADER_SIZE : end]
                self._pos = end
                self._next = sequence + 1  # what _took does, inline on the hot path
                self._stream_offset += end - pos
                self._commit()
                self._unrung += end - pos + self._ring_cost
                if self._unrung >= self._ring_threshold:
                    self._ring()
                return message
        try:
            return self._try_recv_slowly()
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _took(self, size: int, next_sequence: int) -> None:
        """Commit: the record just read is taken (a message is handed out only after this)."""
        self._next = next_sequence
        self._stream_offset += size
        self._commit()
        self._unrung += size + self._ring_cost
        if self._unrung >= self._ring_threshold:
            self._ring()

    def _commit(self) -> None:
        generation = self._generation = self._generation + 1
        fields = _pack_position(
            generation,
            self._stream_id,
            self._next,
            self._segment,
            self._base + self._pos,
            self._stream_offset,
            self._flags,
        )
        slot = SLOT_OFFSETS[generation & 1]
        position = self._map
        if position is None:
            position = self._create_position()
        position[slot : slot + POSITION_SLOT_SIZE] = fields + _checksum(crc32(fields))
        if self._sync_each:
            position.flush()
            return
        batch = self._batch
        if batch is not None:
            batch.written += 1
            if batch.parked:
                batch.kick()

    def _sync_position(self) -> None:
        """msync the position (the sync thread's job; it holds the batch lock)."""
        if self._map is not None:
            self._map.flush()

    def _batch_failed(self, error: OSError) -> None:
        """The position could not be synced: only a power loss would tell (it delivers again what was taken)."""

    def _ring(self) -> None:
        """Wake a producer that waits for room: rewrite the ring counter (its inotify watch sees it)."""
        self._unrung = 0
        self._rings += 1
        with contextlib.suppress(OSError):
            os.pwrite(self._position_fd, RING.pack(self._rings), RING_OFFSET)

    def _try_recv_slowly(self) -> bytes | None:
        """Everything but a whole message in the buffer: read on, follow segments, the end, errors, waiting."""
        looked_after_draining = False
        gone: PeerGone | ChannelUnavailable | None = None
        while True:
            result = self._step()
            if result is _AGAIN:
                self._made_progress()
                continue
            if result is not None:
                self._made_progress()
                assert isinstance(result, bytes)
                return result
            if gone is not None:
                raise gone
            if looked_after_draining:
                gone = self._peer_gone("producer") if self._peer_lost else None
                if gone is None:
                    return None
                continue  # one last look: what it wrote just before it went
            self._before_waiting()
            looked_after_draining = True

    def _before_waiting(self) -> None:
        if self._unrung:
            self._ring()
        assert self._ready is not None
        self._ready.drain()

    def _step(self) -> object:
        """One move: a message (bytes), _AGAIN after a record that is not one, or None when nothing is there yet."""
        if self._end_taken:
            self._finish()
        if self._segment_fd < 0 and not self._locate():
            return None
        record = self._record()
        if record is None:
            return None
        kind, sequence, length = record.kind, record.sequence, record.length
        size = RECORD_HEADER_SIZE + length
        if kind == MESSAGE:
            return self._message(record, size)
        if sequence > self._next:
            raise self._gap(sequence)
        if kind == NEXT:
            return self._follow(sequence)
        # END (below the position too: after a power loss the consumer may have taken messages the stream lost)
        self._take_end(size)
        return None  # not reached: _take_end raises EndOfStream

    def _message(self, record: Record, size: int) -> object:
        sequence = record.sequence
        if sequence > self._next:
            raise self._gap(sequence)
        if record.length > self.max_message_size:
            return self._skip_oversized(record, size)
        payload = self._payload(record)
        if payload is None:
            return None
        taken_before = sequence < self._next  # before a power loss, then written again by the resumed producer
        self._advance(size)
        self._took(size, max(self._next, sequence + 1))
        return _AGAIN if taken_before else payload

    def _advance(self, size: int) -> None:
        """Move the read position past a record (the buffer may not hold it: large records are read apart)."""
        self._damage = None
        if self._pos + size <= len(self._buffer):
            self._pos += size
        else:
            self._base += self._pos + size
            self._buffer = b""
            self._view = memoryview(self._buffer)
            self._pos = 0

    def _record(self) -> Record | None:
        """The header of the record at the read position, once whole and plausible; None when not there yet."""
        if len(self._buffer) - self._pos < RECORD_HEADER_SIZE and not self._fill(RECORD_HEADER_SIZE):
            return None
        _, length, kind, sequence = _unpack_record(self._buffer, self._pos)
        record = Record(kind, sequence, length, self._base + self._pos)
        if kind not in KINDS or (kind != MESSAGE and length != 0):
            self._damaged(self._segment, record.offset, "its record header is not valid")
            return None
        return record

    def _payload(self, record: Record) -> bytes | None:
        """The payload of a whole record whose checksum holds; None when it is not all there yet (or damaged)."""
        length = record.length
        if length >= LARGE_RECORD:
            header = self._buffer[self._pos : self._pos + RECORD_HEADER_SIZE]
            payload = os.pread(self._segment_fd, length, record.offset + RECORD_HEADER_SIZE)
            if len(payload) < length:
                return None
            if crc32(payload, crc32(header[4:])) != CHECKSUM.unpack_from(header)[0]:
                self._damaged(self._segment, record.offset, "its checksum does not match")
                return None
            return payload
        end = self._pos + RECORD_HEADER_SIZE + length
        if end > len(self._buffer) and not self._fill(RECORD_HEADER_SIZE + length):
            return None
        pos = self._pos
        end = pos + RECORD_HEADER_SIZE + length
        if crc32(self._view[pos + 4 : end]) != CHECKSUM.unpack_from(self._buffer, pos)[0]:
            self._damaged(self._segment, record.offset, "its checksum does not match")
            return None
        return self._buffer[pos + RECORD_HEADER_SIZE : end]

    def _forget_rest(self) -> None:
        """Drop what the buffer holds from the read position on (the next look reads the segment again)."""
        self._base += self._pos
        self._buffer = b""
        self._view = memoryview(self._buffer)
        self._pos = 0

    def _fill(self, needed: int) -> bool:
        """Read the segment from the read position on; True when at least `needed` bytes are there."""
        start = self._base + self._pos
        data = os.pread(self._segment_fd, max(needed, READ_CHUNK), start)
        self._buffer = data
        self._view = memoryview(data)
        self._base = start
        self._pos = 0
        return len(data) >= needed

    def _skip_oversized(self, record: Record, size: int) -> object:
        holds = record_checksum_holds(self._segment_fd, record)
        if holds is None:
            return None
        if not holds:
            self._damaged(self._segment, record.offset, "its checksum does not match")
            return None
        self._advance(size)
        self._took(size, max(self._next, record.sequence + 1))
        self.skipped += 1
        return _AGAIN

    def _follow(self, first: int) -> object:
        """A NEXT record: go on in segment `first` once it is there, then remove the segment taken whole."""
        opened = self._open_segment(first)
        if opened is None:
            return None
        fd, header = opened
        if header.stream_id != self._stream_id:
            os.close(fd)
            raise ProtocolError(
                f"{self.path}/{segment_name(first)} belongs to another stream than the segment before it: "
                "the spool was changed by hand or by a foreign writer"
            )
        taken = self._segment
        self._switch_to(fd, header, SEGMENT_HEADER_SIZE, header.stream_offset, self._next)
        self._commit()  # the new place; its stream offset (NEXT included) comes from the header
        self._remove_ours(segment_name(taken))
        return _AGAIN

    def _take_end(self, size: int) -> None:
        self._advance(size)
        self._flags |= ENDED
        self._took(size, self._next)
        if self._map is not None and (self._sync_each or self._batch is not None):
            self._map.flush()
        self._finish()

    def _gap(self, sequence: int) -> ProtocolError:
        return ProtocolError(
            f"message {self._next} is missing from {self.path}, yet {segment_name(self._segment)} holds message "
            f"{sequence} next: the stream has a gap (files changed by hand, or a foreign writer)"
        )

    def _damaged(self, segment: int, offset: int, problem: str) -> None:
        """A whole record (or header) that is not valid: wait while a live producer may repair it, then ProtocolError.

        A resuming producer truncates a broken tail (a power loss may leave one); anything
        else that stays broken while the producer lives is damage.
        """
        self._forget_rest()  # read it again next time: a producer may cut it off and write anew
        assert self._presence is not None
        try:
            alive = self._presence.peer_state() is PeerState.ALIVE
        except ChannelUnavailable:
            alive = False
        now = time.monotonic()
        if not alive or self._damage is None or self._damage[:2] != (segment, offset):
            self._damage = (segment, offset, now) if alive else None
            return
        if now - self._damage[2] >= DAMAGE_GRACE_SECONDS:
            raise ProtocolError(
                f"the record at offset {offset} of {self.path}/{segment_name(segment)} is damaged ({problem}) and "
                f"the producer did not repair it within {DAMAGE_GRACE_SECONDS:g} s: the volume lost data, or "
                "something else writes into the spool"
            )

    def _readiness(self) -> tuple[int, int, float | None]:
        fd, events, retry = super()._readiness()
        if self._damage is not None:
            retry = 0.1 if retry is None else min(retry, 0.1)
        return fd, events, retry

    # --- the end ----------------------------------------------------------------------------

    def _finish(self) -> None:
        """The end of stream was taken: remove the stream's files (its last segment is the producer's ack)."""
        for first in self._segments():
            if first < self._segment:
                self._remove_ours(segment_name(first))
        if self._segment_fd >= 0:
            self._remove_ours(segment_name(self._segment))
        self._remove_ours(POSITION_NAME)
        with contextlib.suppress(ChannelUnavailable):
            if self._presence is not None and self._presence.peer_state() is PeerState.GONE:
                self._remove_dead_peer_presence()
        self._free_once()
        raise EndOfStream(f"{self.address.location}: the producer ended the stream")

    # --- freeing --------------------------------------------------------------------------

    def _close_files(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.stop()
        with batch.lock if batch is not None else contextlib.nullcontext():
            if self._map is not None:
                if batch is not None and batch.written != batch.synced:
                    with contextlib.suppress(OSError):
                        self._map.flush()
                self._map.close()
                self._map = None
        for fd in (self._segment_fd, self._position_fd):
            if fd >= 0:
                os.close(fd)
        self._segment_fd = self._position_fd = -1
        self._buffer = b""
        self._view = memoryview(self._buffer)

    def _free(self) -> None:
        if self._unrung and self._position_fd >= 0:
            self._ring()
        self._close_files()
        self._leave(clean=True)
        self._close_spool()

    def _drop_inherited(self) -> None:
        self._batch = None  # its thread is the parent's
        self._close_files()
        self._drop_spool_copies()
        self._freed = True


_checksum = CHECKSUM.pack
