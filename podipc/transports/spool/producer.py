"""The producing side of a spool: appends records to segment files, syncs them as `sync` says, resumes a stream."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any
from zlib import crc32

from podipc.address import Address
from podipc.errors import ChannelClosed, ChannelUnavailable, PeerGone, PodIPCError, ProtocolError, Timeout
from podipc.presence import PeerState
from podipc.producing import Producer
from podipc.transports.spool.notify import PRODUCER_DIRECTORY_EVENTS, PRODUCER_POSITION_EVENTS
from podipc.transports.spool.side import BatchSync, SpoolSide, spool_error
from podipc.transports.spool.wire import (
    CHECKSUM,
    END,
    HOLDS_PRESENCE,
    MAX_SEQUENCE,
    MESSAGE,
    NEXT,
    PART_PREFIX,
    POSITION_NAME,
    POSITION_SIZE,
    RECORD_FIELDS,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SegmentEnd,
    SegmentHeader,
    decode_position,
    decode_segment_header,
    encode_segment_header,
    new_stream_id,
    parse_segment_name,
    part_name,
    scan_segment,
    segment_name,
)

RESUME_ATTEMPTS = 3
COALESCE_SIZE = 16 * 1024
"""A payload up to this size is copied behind its header and written with one pwrite; larger ones use pwritev."""
_pack_fields = RECORD_FIELDS.pack
_pack_checksum = CHECKSUM.pack
_pwrite = os.pwrite


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


class SpoolProducer(SpoolSide, Producer):
    """Appends each message as a checksummed record; resumes the stream it finds in the spool."""

    role = "producer"
    # the hot path's attributes as slots: read without a dict lookup, and the instance dict stays small
    # enough (<= 30 keys) for CPython's shared-key layout
    __slots__ = (
        "_acked",
        "_batch",
        "_consumer_came",
        "_consumer_next",
        "_consumer_offset",
        "_depth",
        "_fd",
        "_max_bytes",
        "_next",
        "_offset",
        "_position_fd",
        "_position_generation",
        "_position_watched",
        "_room_bytes",
        "_room_next",
        "_segment",
        "_segment_limit",
        "_segment_size",
        "_stream_ended",
        "_stream_id",
        "_stream_offset",
        "_sync_any",
        "_sync_delay",
        "_sync_each",
        "_sync_failure",
    )

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = int(self.settings["max_message_size"])
        self._depth = int(self.settings["depth"])
        self._max_bytes = int(self.settings["max_bytes"])
        self._segment_size = int(self.settings["segment_size"])
        level = str(self.settings["sync"])
        self._sync_each = level == "always"
        self._sync_any = level != "none"
        self._sync_delay = float(self.settings["sync_delay"])
        self._batch: BatchSync | None = None
        self._sync_failure: OSError | None = None
        self._fd = -1
        self._segment = 0
        self._offset = 0
        self._segment_limit = 0
        """segment_size while a segment is open, 0 before: the fast path's room in the segment."""
        self._next = 0
        self._stream_id = 0
        self._stream_offset = 0
        self._stream_ended = False
        self._acked = False
        self._consumer_next = 0
        self._consumer_offset = 0
        self._room_next = 0
        """The fast path sends while _next is below this (the consumer's next + depth); 0 forces the slow path."""
        self._room_bytes = 0
        self._position_fd = -1
        self._position_watched = False
        self._position_generation: int | None = None
        """The consumer position's generation when this producer first read it (None: not read yet)."""
        self._consumer_came = False
        """A consumer committed after this producer opened: its presence gone means it left."""
        try:
            self._open_spool()
        except BaseException:
            self._closed = self._freed = True
            raise
        try:
            self._resume_soon()
            self._read_consumer_position()  # where a consumer before us stood: a later commit means one came
            if self._sync_any and not self._sync_each:
                self._batch = BatchSync(self._sync_segment, self._sync_delay, self._batch_failed)
        except OSError as exc:
            self._abandon_open()
            raise spool_error(exc, self.path) from exc
        except BaseException:
            self._abandon_open()
            raise
        self.resumed_at = self._next

    def _directory_events(self) -> int:
        return PRODUCER_DIRECTORY_EVENTS

    def _abandon_open(self) -> None:
        self._closed = self._freed = True
        self._close_files()
        self._close_spool()

    # --- resuming -----------------------------------------------------------------------

    def _resume_soon(self) -> None:
        """Resume; again if the last segment went meanwhile (its consumer took the END and removed the stream)."""
        for _ in range(RESUME_ATTEMPTS - 1):
            try:
                self._resume()
                return
            except FileNotFoundError:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
        self._resume()

    def _resume(self) -> None:
        """Find the stream's end in the spool (repairing a torn tail), or start a new stream."""
        names = os.listdir(self._dir_fd)
        for name in names:
            if name.startswith(PART_PREFIX):
                self._remove_ours(name)  # a segment a producer was killed while starting
        segments = sorted(first for first in map(parse_segment_name, names) if first is not None)
        if not segments:
            self._stream_id = new_stream_id()
            return  # a new stream: its first segment is made on the first write
        highest = segments[-1]
        fd = self._open_existing(segment_name(highest), os.O_RDWR)
        self._fd = fd
        header = decode_segment_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        if header is None or header.first_sequence != highest:
            header = self._rewrite_header(highest, segments[:-1])
        end = scan_segment(fd, header)
        if os.fstat(fd).st_size > end.offset:
            os.ftruncate(fd, end.offset)  # a record torn by a crash, or damaged: never part of the stream
            if self._sync_any:
                os.fdatasync(fd)
        self._continue_segment(header, end)
        oldest = self._oldest_header(segments, header)
        self._consumer_next, self._consumer_offset = oldest.first_sequence, oldest.stream_offset
        if end.last_kind == NEXT:
            self._start_segment(end.last_sequence)

    def _continue_segment(self, header: SegmentHeader, end: SegmentEnd) -> None:
        self._segment = header.first_sequence
        self._stream_id = header.stream_id
        self._offset = end.offset
        self._segment_limit = self._segment_size
        self._stream_offset = header.stream_offset + end.offset - SEGMENT_HEADER_SIZE
        self._next = end.last_sequence if end.last_kind in (END, NEXT) else end.next_sequence
        self._stream_ended = end.last_kind == END

    def _rewrite_header(self, highest: int, earlier: list[int]) -> SegmentHeader:
        """The last segment's header was torn (a crash while starting it): write it again from its predecessor."""
        header = SegmentHeader(highest, new_stream_id(), 0)
        if earlier:
            previous = self._segment_header(earlier[-1])
            if previous is not None:
                fd = self._open_existing(segment_name(earlier[-1]), os.O_RDONLY)
                try:
                    end = scan_segment(fd, previous)
                finally:
                    os.close(fd)
                if end.last_kind == NEXT and end.last_sequence == highest:
                    stream_offset = previous.stream_offset + end.offset - SEGMENT_HEADER_SIZE
                    header = SegmentHeader(highest, previous.stream_id, stream_offset)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, encode_segment_header(header), 0)
        if self._sync_any:
            os.fdatasync(self._fd)
        return header

    def _segment_header(self, first: int) -> SegmentHeader | None:
        try:
            fd = self._open_existing(segment_name(first), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return decode_segment_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        finally:
            os.close(fd)

    def _oldest_header(self, segments: list[int], current: SegmentHeader) -> SegmentHeader:
        """The oldest segment of this stream still in the spool: what is pending when no consumer has a position."""
        for first in segments[:-1]:
            header = self._segment_header(first)
            if header is not None and header.stream_id == current.stream_id:
                return header
        return current

    # --- sending ------------------------------------------------------------------------

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if not self._try_send(view):
            Producer._send(self, view, deadline)

    def _try_send(self, view: memoryview) -> bool:
        length = len(view)
        size = RECORD_HEADER_SIZE + length
        sequence = self._next
        offset = self._offset
        if (
            sequence >= self._room_next
            or self._stream_offset + size > self._room_bytes
            or offset + size > self._segment_limit
            or length > COALESCE_SIZE
        ):
            return self._try_send_slowly(view)
        body = _pack_fields(length, MESSAGE, sequence) + view
        record = _pack_checksum(crc32(body)) + body
        try:
            written = _pwrite(self._fd, record, offset)
            if written != size:
                self._write_rest(offset, written, record)
            if self._sync_each:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise self._write_failed(offset, exc) from exc
        self._offset = offset + size
        self._stream_offset += size
        self._next = sequence + 1
        batch = self._batch
        if batch is not None:
            batch.written += 1
            if batch.parked:
                batch.kick()
        return True

    def _try_send_slowly(self, view: memoryview) -> bool:
        try:
            if not self._room_for(len(view)):
                return False
            self._append_message(view)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc
        return True

    def _room_for(self, length: int) -> bool:
        """True when the message may go into the spool now; raises when it never will."""
        if self._stream_ended:
            raise ChannelClosed(
                f"the stream in {self.path} already ended after {self._next} messages (its end record is in the "
                "spool); close() to wait until the consumer takes it"
            )
        if self._sync_failure is not None:
            raise self._synced_failure()
        if self._next > MAX_SEQUENCE:
            raise ProtocolError(f"the spool {self.path} ran out of sequence numbers ({MAX_SEQUENCE})")
        size = RECORD_HEADER_SIZE + length
        if self._has_room(size):
            return True
        self._read_consumer_position()
        if self._has_room(size):
            return True
        assert self._ready is not None
        self._ready.drain()
        self._read_consumer_position()
        if self._has_room(size):
            return True
        try:
            self._check_consumer()
        except PeerGone:
            self._read_consumer_position()
            if self._has_room(size):  # it made room and left between our two looks
                return True
            raise
        return False

    def _has_room(self, size: int) -> bool:
        """True when a record of `size` bytes fits the depth and max_bytes bounds (always into an empty spool)."""
        if self._next <= self._consumer_next:
            return True
        return self._next < self._room_next and self._stream_offset + size <= self._room_bytes

    def _read_consumer_position(self) -> None:
        """Learn how far the consumer has taken this stream (its position file), and so how much room there is."""
        if self._position_fd < 0:
            with contextlib.suppress(FileNotFoundError):
                self._position_fd = self._open_existing(POSITION_NAME, os.O_RDONLY)
        if self._position_fd >= 0 and not self._position_watched:
            assert self._ready is not None
            path = os.path.join(self.path, POSITION_NAME)
            self._position_watched = self._ready.watch_file(self._position_fd, path, PRODUCER_POSITION_EVENTS)
        position = decode_position(os.pread(self._position_fd, POSITION_SIZE, 0)) if self._position_fd >= 0 else None
        generation = position.generation if position is not None else 0
        if self._position_generation is None:
            self._position_generation = generation
        elif generation > self._position_generation and position is not None and position.flags & HOLDS_PRESENCE:
            self._consumer_came = True
        if (
            position is not None
            and position.stream_id == self._stream_id
            and position.next_sequence > self._consumer_next
        ):
            self._consumer_next = position.next_sequence
            self._consumer_offset = position.stream_offset
            self._made_progress()
        # the fast path sends below these; an ended stream or a failed sync takes the slow path (which raises)
        blocked = self._stream_ended or self._sync_failure is not None
        self._room_next = 0 if blocked else self._consumer_next + self._depth
        self._room_bytes = self._consumer_offset + self._max_bytes

    def _append_message(self, view: memoryview) -> None:
        size = RECORD_HEADER_SIZE + len(view)
        if self._fd < 0:
            self._start_segment(self._next)
        elif self._offset > SEGMENT_HEADER_SIZE and self._offset + size > self._segment_size:
            self._append(NEXT, self._next, b"")
            if self._sync_any:
                os.fdatasync(self._fd)
            self._start_segment(self._next)
        self._append(MESSAGE, self._next, view)
        self._next += 1
        if self._sync_each:
            os.fdatasync(self._fd)
        elif self._batch is not None:
            self._batch.written += 1
            if self._batch.parked:
                self._batch.kick()

    def _append(self, kind: int, sequence: int, payload: bytes | memoryview) -> None:
        """Write one record at the end of the segment (whole, or not at all: a failed write is cut off again)."""
        length = len(payload)
        size = RECORD_HEADER_SIZE + length
        fields = _pack_fields(length, kind, sequence)
        head = _pack_checksum(crc32(payload, crc32(fields))) + fields
        offset = self._offset
        try:
            if length <= COALESCE_SIZE:
                written = os.pwrite(self._fd, head + payload, offset)
            else:
                written = os.pwritev(self._fd, [head, payload], offset)
            if written != size:
                self._write_rest(offset, written, head + payload)
        except OSError as exc:
            raise self._write_failed(offset, exc) from exc
        self._offset = offset + size
        self._stream_offset += size

    def _write_rest(self, offset: int, written: int, record: bytes) -> None:
        """A write that went out partly (a signal, a full volume): write the rest, or raise OSError."""
        rest = memoryview(record)
        while written < len(record):
            count = os.pwrite(self._fd, rest[written:], offset + written)
            if count == 0:
                raise OSError(28, os.strerror(28))
            written += count

    def _write_failed(self, offset: int, error: OSError) -> PodIPCError:
        """Cut a half-written record off again, so the segment holds whole records only; the error to raise."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, offset)
        return spool_error(error, self.path)

    def _start_segment(self, first: int) -> None:
        """Start segment `first`: its header under a temporary name (synced unless sync=none), renamed into place."""
        header = SegmentHeader(first, self._stream_id, self._stream_offset)
        temporary, name = part_name(first), segment_name(first)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=self._dir_fd)  # ours: the spool's files are ours (checked at open)
        fd = self._create(temporary)
        try:
            os.pwrite(fd, encode_segment_header(header), 0)
            if self._sync_any:
                os.fdatasync(fd)
            if _exists(name, self._dir_fd):
                raise ChannelUnavailable(
                    f"{self.path}/{name} exists, but the stream does not lead there: something else writes "
                    "into the spool; remove it, or use another directory"
                )
            os.rename(temporary, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            if self._sync_any:
                os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self._dir_fd)
            raise
        previous = self._fd
        batch = self._batch
        with batch.lock if batch is not None else contextlib.nullcontext():
            self._fd = fd
        if previous >= 0:
            os.close(previous)
        self._segment = first
        self._offset = SEGMENT_HEADER_SIZE
        self._segment_limit = self._segment_size

    def _sync_segment(self) -> None:
        """fdatasync the segment being written (the sync thread's job; it holds the batch lock)."""
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def _batch_failed(self, error: OSError) -> None:
        """The sync thread's fdatasync failed (its thread): the next send raises it."""
        self._sync_failure = error
        self._room_next = 0

    def _synced_failure(self) -> ChannelUnavailable:
        error = self._sync_failure
        assert error is not None
        return ChannelUnavailable(
            f"the spool {self.path} could not be synced to its volume ({error.strerror}): messages sent "
            "since the last sync may be lost in a crash"
        )

    def _timeout(self, closing: bool = False) -> Timeout:
        if closing:
            return Producer._timeout(self, closing)
        return Timeout(
            f"the spool {self.path} stayed full ({self._next - self._consumer_next} messages, "
            f"{self._stream_offset - self._consumer_offset} bytes of records; depth={self._depth}, "
            f"max_bytes={self._max_bytes}) until the send timeout"
        )

    def _try_prepare(self) -> bool:
        """True (and the readiness descriptor readable) when a send would not wait for room."""
        try:
            if self._stream_ended or self._room_for(0):
                assert self._ready is not None
                self._ready.kick()
                return True
        except PodIPCError:
            return True  # the send raises at once: it does not wait
        return False

    # --- the end --------------------------------------------------------------------------

    def _try_close(self) -> bool:
        try:
            if not self._stream_ended:
                self._end_stream()
            return self._ack_received()
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _end_stream(self) -> None:
        if self._sync_failure is not None:
            raise self._synced_failure()
        if self._fd < 0:
            self._start_segment(self._next)
        if self._presence is not None:
            self._presence.declare_ending()
        self._append(END, self._next, b"")
        if self._sync_any:
            os.fdatasync(self._fd)
        self._stream_ended = True
        self._room_next = 0

    def _ack_received(self) -> bool:
        """True once the consumer removed the segment holding the end record (its acknowledgement)."""
        if self._end_removed():
            return True
        assert self._ready is not None
        self._ready.drain()
        if self._end_removed():
            return True
        self._read_consumer_position()
        try:
            self._check_consumer()
        except PeerGone:
            if self._end_removed():  # it took the end and left between our two looks
                return True
            raise
        return False

    def _end_removed(self) -> bool:
        if os.fstat(self._fd).st_nlink == 0:
            self._acked = True
        return self._acked

    def _check_consumer(self) -> None:
        """Raise PeerGone when the consumer this side needs is gone (seen by the monitor, or it came and went
        between two of its probes: it committed since we opened), unless restart_wait lets another take over."""
        if not self._peer_lost:
            if not self._consumer_came:
                return
            assert self._presence is not None
            try:
                alive = self._presence.peer_state() is PeerState.ALIVE
            except ChannelUnavailable:
                alive = False
            if alive:
                return
            self._peer_lost = True
            self._state = 1
        error = self._peer_gone("consumer")
        if error is not None:
            raise error

    # --- freeing --------------------------------------------------------------------------

    def _close_files(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.stop()
        with batch.lock if batch is not None else contextlib.nullcontext():
            if self._fd >= 0:
                if self._sync_any and not self._acked:
                    with contextlib.suppress(OSError):
                        os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1
        if self._position_fd >= 0:
            os.close(self._position_fd)
            self._position_fd = -1
        self._room_next = self._segment_limit = 0

    def _free(self) -> None:
        self._close_files()
        self._leave(clean=self._acked)
        self._close_spool()

    def _drop_inherited(self) -> None:
        self._batch = None  # its thread is the parent's
        for fd in (self._fd, self._position_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._position_fd = -1
        self._drop_spool_copies()
        self._freed = True
