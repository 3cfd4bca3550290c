"""Length-prefix frames for byte-stream transports (tcp://, unix://), as small as stdlib's.

On the wire (docs/wire/stream.md has the full story and plain-socket scripts):

    producer -> consumer   HELLO (8 bytes: b"PODIPC" + version 0x0001)
    consumer -> producer   HELLO back (accepted) or BUSY (another producer is attached)
                           (fan-in: FANIN_HELLO + name; answers FANIN_HELLO, BUSY, NAME_TAKEN;
                           WRONG_PATTERN to a hello of the other pattern; podipc.fanin)
                           (broadcast: the SUBSCRIBER connects to the listening producer and says
                           BROADCAST_HELLO + its subscribers=; answered BROADCAST_HELLO + slot +
                           slots, or BUSY;
                           LOSS_NOTICE + an 8-byte frame tells it how many messages were dropped
                           for it; it answers the end of stream with ACK; podipc.stream_broadcast)
    producer -> consumer   frames: 4-byte big-endian length, then that many payload bytes
    producer -> consumer   END_OF_STREAM: the length 0xFFFFFFFF with no payload
    consumer -> producer   ACK (1 byte) once it has taken the end of stream

A length above the consumer's max_message_size is a ProtocolError raised before
anything is allocated, so garbage never costs memory.

FrameReader cuts frames out of a stream: one `recv_into` fills a reusable buffer with
many small frames, and every complete frame in it is cut in one pass (a run of frames of
one length by structs that skip the headers, at C speed); large payloads are read straight into
their own object (`recv(n, MSG_WAITALL)`, no copy in the common case). All state lives
in the reader, so a timeout raised by the source between two reads loses nothing.
"""

from __future__ import annotations

import socket
import struct
from operator import itemgetter
from typing import Protocol

from podipc.errors import EndOfStream, PeerGone, ProtocolError

MAGIC = b"PODIPC"
VERSION = 1
HELLO = MAGIC + VERSION.to_bytes(2, "big")
"""What a producer sends first and what a consumer answers to accept it."""
BUSY = MAGIC + b"\xff\xff"
"""What a consumer answers instead of HELLO when another producer is attached."""
ACK = b"\x06"
"""The consumer's answer to END_OF_STREAM."""

FANIN_VERSION = 2
FANIN_HELLO = MAGIC + FANIN_VERSION.to_bytes(2, "big")
"""A fan-in producer's hello (then NAME_LENGTH and its UTF-8 name), and a fan-in consumer's answer to accept it."""
NAME_LENGTH = struct.Struct(">H")
"""The length of the name after FANIN_HELLO."""
MAX_NAME_BYTES = 255
"""The longest producer name, in UTF-8 bytes."""
NAME_TAKEN = MAGIC + b"\xff\xfd"
"""A fan-in consumer's answer when a live producer already has that name."""
WRONG_PATTERN = MAGIC + b"\xff\xfe"
"""The answer to a hello of the other pattern: a pair producer at a fan-in consumer, or the reverse."""

BROADCAST_VERSION = 3
BROADCAST_HELLO = MAGIC + BROADCAST_VERSION.to_bytes(2, "big")
"""A broadcast subscriber's hello, and the start of a broadcast producer's answer (then SLOT_ANSWER)."""
SUBSCRIBERS_FIELD = struct.Struct(">H")
"""After a subscriber's BROADCAST_HELLO: the subscribers= it was opened with (0: not given, any number)."""
SLOT_ANSWER = struct.Struct(">HH")
"""After the broadcast producer's BROADCAST_HELLO: the subscriber's slot (NO_SLOT: refused, its subscribers=
differs) and the producer's number of slots."""
NO_SLOT = 0xFFFF
LEFT = b"\x15"
"""What a broadcast subscriber closing before the end of stream says to its producer (then it hangs up)."""

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
END_OF_STREAM = 0xFFFFFFFF
"""The reserved length that ends the stream."""
MAX_FRAME_LENGTH = END_OF_STREAM - 1
"""The largest payload a frame can carry (4 GiB - 2 bytes)."""
LOSS_NOTICE = END_OF_STREAM - 1
"""Broadcast only: the reserved length of a loss notice, followed by a frame whose 8-byte payload is the count."""
MAX_BROADCAST_LENGTH = LOSS_NOTICE - 1
"""The largest payload a broadcast frame can carry (4 GiB - 3 bytes)."""
LOSS_COUNT = struct.Struct(">Q")
"""The payload of the frame after LOSS_NOTICE: how many messages were dropped for that subscriber since the last."""
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""The max_message_size option's default: 64 MiB."""

BUFFER_SIZE = 256 * 1024
"""Bytes of the reusable receive buffer; one recv can fill it with many small frames."""
DIRECT_READ_SIZE = 32 * 1024
"""Payloads of at least this many bytes skip the buffer and are received into their own object."""

RUN_STRUCTS = 64
"""How many frame lengths the reader keeps a run-cutting struct for."""
RUN_BLOCK_FRAMES = 128
"""Frames a run-cutting struct takes at once: one unpack returns their payloads (half the cost of iter_unpack's pairs)."""

_END_OF_STREAM_HEADER = HEADER.pack(END_OF_STREAM)
MSG_WAITALL = socket.MSG_WAITALL
_payload_of = itemgetter(1)


def encode_header(length: int) -> bytes:
    """The 4-byte header of a frame carrying `length` bytes."""
    return HEADER.pack(length)


def end_of_stream_frame() -> bytes:
    """The frame that ends a stream."""
    return _END_OF_STREAM_HEADER


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """One whole frame (header and payload) as bytes; for tests and plain scripts, not hot paths."""
    return HEADER.pack(memoryview(payload).nbytes) + bytes(payload)


def fanin_hello(name: str) -> bytes:
    """A fan-in producer's whole hello: FANIN_HELLO, the name's length, the name (UTF-8)."""
    encoded = name.encode()
    return FANIN_HELLO + NAME_LENGTH.pack(len(encoded)) + encoded


def check_producer_name(value: object) -> str:
    """The name option: 1 to MAX_NAME_BYTES bytes of UTF-8 text without control characters ('' : the default)."""
    name = str(value)
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise ValueError("a producer name has no control characters")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"a producer name has at most {MAX_NAME_BYTES} bytes (UTF-8)")
    return name


def check_max_message_size(value: object) -> int:
    """The max_message_size option: a size in bytes from 0 to MAX_FRAME_LENGTH."""
    from podipc.options import parse_size

    size = parse_size(value)
    if size > MAX_FRAME_LENGTH:
        raise ValueError(f"at most {MAX_FRAME_LENGTH} bytes (a frame's length is 32 bits, one value is reserved)")
    return size


class StreamSource(Protocol):
    """What FrameReader reads from: a connected stream socket, or anything receiving like one."""

    def recv_into(self, buffer: memoryview, nbytes: int = ..., /) -> int: ...

    def recv(self, bufsize: int, flags: int = ..., /) -> bytes: ...


class FrameReader:
    """Cut a byte stream into frames; keeps every partial read across timeouts and errors."""

    def __init__(self, max_message_size: int, name: str = "the stream", buffer_size: int = BUFFER_SIZE) -> None:
        if buffer_size < HEADER_SIZE + DIRECT_READ_SIZE:
            raise ValueError(f"buffer_size must be at least {HEADER_SIZE + DIRECT_READ_SIZE} bytes")
        self.max_message_size = max_message_size
        self.name = name
        self.ready: list[bytes] = []
        """Frames cut from the buffer and not yet taken, the next one LAST: `ready.pop()` takes it."""
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._capacity = buffer_size
        self._start = 0
        self._end = 0
        self._payload_length = -1
        self._payload: bytearray | None = None
        self._payload_filled = 0
        self._receive_size = buffer_size
        """How much one receive into the empty buffer asks for: all of it, or only a header after a large frame."""
        self._unpack_from = HEADER.unpack_from
        self._runs: dict[int, struct.Struct] = {}
        self._tails: dict[int, struct.Struct] = {}

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (including a large payload in progress)."""
        cut = sum(HEADER_SIZE + len(frame) for frame in self.ready)
        return cut + self._end - self._start + self._payload_filled

    def holds_header(self) -> bool:
        """True when the buffer holds at least a frame header not cut yet (a frame, or the end marker). Never reads."""
        return self._end - self._start >= HEADER_SIZE

    def buffered_frame(self) -> bytes | None:
        """The next frame if it is already complete in the buffer, else None. Never reads."""
        ready = self.ready
        if ready or (self._end - self._start >= HEADER_SIZE and self._cut()):
            return ready.pop()
        return None

    def buffered_frames(self, max_count: int) -> list[bytes]:
        """Up to `max_count` frames already complete in the buffer, in order ([] when none). Never reads."""
        ready = self.ready
        if max_count < 1:
            return []  # del ready[-0:] below would drop every frame
        if not ready and self._end - self._start >= HEADER_SIZE:
            self._cut()
        if len(ready) <= max_count:
            frames = ready[::-1]
            ready.clear()
            return frames
        frames = ready[: -max_count - 1 : -1]
        del ready[-max_count:]
        return frames

    def read_frame(self, source: StreamSource) -> bytes:
        """The next frame's payload, reading from `source` as needed.

        Raises EndOfStream at the end marker, PeerGone when the stream ends without it,
        ProtocolError for a length above max_message_size; errors of `source` (timeouts)
        pass through and leave the reader ready to go on.
        """
        ready = self.ready
        if ready:
            return ready.pop()
        if not self._end and self._payload_length < 0:
            received = source.recv_into(self._view, self._receive_size)
            if not received:
                self._raise_truncated(0)
            self._end = received
            if received >= HEADER_SIZE:
                length = self._unpack_from(self._buffer, 0)[0]
                if length <= self.max_message_size:
                    if length + HEADER_SIZE == received:
                        self._end = 0  # one whole frame: a request or an answer
                        return self._view[HEADER_SIZE:received].tobytes()
                    if received == HEADER_SIZE and length >= DIRECT_READ_SIZE:
                        return self._read_direct(source, length)  # the header of a large frame, alone
                    if self._cut():
                        return ready.pop()
        return self._read_frame_slowly(source)

    def _read_direct(self, source: StreamSource, length: int) -> bytes:
        """The buffer holds just the header of a large frame: receive its payload into its own object."""
        self._start = self._end = 0
        self._receive_size = HEADER_SIZE
        self._payload_length = length
        data = source.recv(length, MSG_WAITALL)
        if len(data) == length:
            self._payload_length = -1
            return data
        self._keep_partial_payload(data)
        return self._read_payload(source)

    def _cut(self) -> bool:
        """Move every complete frame of the buffer to `ready`, in one pass; True when there was one.

        A run of frames of one length is cut after checking all their headers at once
        (strided slices): RUN_BLOCK_FRAMES payloads per unpack of a struct that skips the
        headers, the rest by `struct.iter_unpack`; anything else one frame at a time. Stops
        at a frame not complete yet, the end marker or a length above max_message_size
        (the slow path deals with those).
        """
        buffer, view, unpack_from = self._buffer, self._view, self._unpack_from
        start, end, limit = self._start, self._end, self.max_message_size
        frames: list[bytes] = []
        while end - start >= HEADER_SIZE:
            length = unpack_from(buffer, start)[0]
            stride = HEADER_SIZE + length
            count = (end - start) // stride
            if length > limit or not count:
                break
            if count > 1:
                count = self._run_length(start, stride, count)
            if count > 1:
                stop = start + count * stride
                blocks = count // RUN_BLOCK_FRAMES
                if blocks:
                    block = self._run_struct(length)
                    unpack_block, block_size = block.unpack_from, block.size
                    for _ in range(blocks):
                        frames += unpack_block(buffer, start)  # the headers were checked: skipped here
                        start += block_size
                if start < stop:
                    frames += map(_payload_of, self._tail_struct(length).iter_unpack(view[start:stop]))
            else:
                stop = start + stride
                frames.append(view[start + HEADER_SIZE : stop].tobytes())
            start = stop
        if not frames:
            return False
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start
        frames.reverse()
        self.ready += frames
        return True

    def _run_length(self, start: int, stride: int, count: int) -> int:
        """How many of the `count` frames that would fit from `start` really have the first one's header.

        Checks windows that double in size, so the work is proportional to the run found, not to
        `count`: frames of varying lengths (runs of 1) would otherwise cost a scan of the whole
        buffer each, quadratic in the frames of one read.
        """
        view = self._view
        header = view[start : start + HEADER_SIZE].tobytes()
        if not self._buffer.startswith(header, start + stride):
            return 1  # the common case of varying lengths, without slicing
        checked = 2
        while checked < count:
            window = min(count, 2 * checked)
            first, stop = start + checked * stride, start + window * stride
            run = window - checked
            for index in range(HEADER_SIZE):
                column = view[first + index : stop : stride].tobytes()  # byte `index` of each header in the window
                run = min(run, len(column) - len(column.lstrip(header[index : index + 1])))
            if run < window - checked:
                return checked + run
            checked = window
        return count

    def _run_struct(self, length: int) -> struct.Struct:
        """A struct that cuts RUN_BLOCK_FRAMES frames of `length` bytes into their payloads (headers skipped)."""
        runs = self._runs
        cutter = runs.get(length)
        if cutter is None:
            if len(runs) >= RUN_STRUCTS:
                runs.clear()
            cutter = runs[length] = struct.Struct(f"4x{length}s" * RUN_BLOCK_FRAMES)
        return cutter

    def _tail_struct(self, length: int) -> struct.Struct:
        """A struct that cuts one frame of `length` bytes into (header, payload): the frames after the last block."""
        tails = self._tails
        cutter = tails.get(length)
        if cutter is None:
            if len(tails) >= RUN_STRUCTS:
                tails.clear()
            cutter = tails[length] = struct.Struct(f">I{length}s")
        return cutter

    def _read_frame_slowly(self, source: StreamSource) -> bytes:
        buffer, unpack_from = self._buffer, self._unpack_from
        while True:
            if self._payload_length >= 0:
                return self._read_payload(source)
            start = self._start
            end = self._end
            if end - start >= HEADER_SIZE:
                if self._cut():
                    return self.ready.pop()
                length = unpack_from(buffer, start)[0]
                if start + HEADER_SIZE == end and DIRECT_READ_SIZE <= length <= self.max_message_size:
                    return self._read_direct(source, length)
                self._check_length(length)
                if length < DIRECT_READ_SIZE:
                    self._receive_size = self._capacity
                    self._fill(source, HEADER_SIZE + length)
                else:
                    self._start_payload(length)
            else:
                self._fill(source, HEADER_SIZE)

    def _check_length(self, length: int) -> None:
        if length == END_OF_STREAM:
            self._start += HEADER_SIZE
            raise EndOfStream(f"{self.name}: the producer ended the stream")
        if length > self.max_message_size:
            raise ProtocolError(
                f"{self.name}: a frame announces {length} bytes, more than max_message_size "
                f"{self.max_message_size}; the peer is not a podipc producer, or the two sides "
                "disagree on max_message_size (give both the same URL)"
            )

    def _fill(self, source: StreamSource, needed: int) -> None:
        """Receive once into the buffer, so that `needed` bytes may become available from _start."""
        if self._start and self._start + needed > self._capacity:
            available = self._end - self._start
            self._buffer[:available] = self._buffer[self._start : self._end]
            self._start, self._end = 0, available
        # after a large frame, take no payload bytes into the buffer: the next large payload goes direct
        headers_only = self._receive_size == HEADER_SIZE
        wanted = self._start + needed - self._end if headers_only else self._capacity - self._end
        received = source.recv_into(self._view[self._end :], wanted)
        if not received:
            self._raise_truncated(self._end - self._start)
        self._end += received

    def _start_payload(self, length: int) -> None:
        """Take the header of a large frame; move what the buffer holds of its payload aside."""
        start = self._start + HEADER_SIZE
        held = self._end - start
        self._payload_length = length
        self._receive_size = HEADER_SIZE
        if held:
            payload = bytearray(length)
            payload[:held] = self._view[start : self._end]
            self._payload, self._payload_filled = payload, held
        self._start = self._end = 0

    def _read_payload(self, source: StreamSource) -> bytes:
        length = self._payload_length
        if self._payload is None:
            data = source.recv(length, MSG_WAITALL)
            if len(data) == length:
                self._payload_length = -1
                return data
            self._keep_partial_payload(data)
        assert self._payload is not None
        payload_view = memoryview(self._payload)
        while self._payload_filled < length:
            received = source.recv_into(payload_view[self._payload_filled :], length - self._payload_filled)
            if not received:
                self._raise_truncated(HEADER_SIZE + self._payload_filled)
            self._payload_filled += received
        payload_view.release()
        frame = bytes(self._payload)
        self._payload, self._payload_filled, self._payload_length = None, 0, -1
        return frame

    def _keep_partial_payload(self, data: bytes) -> None:
        """A large payload came in part: keep it in its own buffer for the next reads."""
        if not data:
            self._raise_truncated(HEADER_SIZE)
        self._payload = bytearray(self._payload_length)
        self._payload[: len(data)] = data
        self._payload_filled = len(data)

    def _raise_truncated(self, pending: int) -> None:
        detail = f" in the middle of a frame ({pending} bytes of it received)" if pending else ""
        raise PeerGone(f"{self.name}: the producer closed the connection{detail} without ending the stream")
