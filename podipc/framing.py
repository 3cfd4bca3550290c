"""Length-prefix frames for byte-stream transports (tcp://, unix://), as small as stdlib's.

On the wire (docs/wire/stream.md has the full story and plain-socket scripts):

    producer -> consumer   HELLO (8 bytes: b"PODIPC" + version 0x0001)
    consumer -> producer   HELLO back (accepted) or BUSY (another producer is attached)
    producer -> consumer   frames: 4-byte big-endian length, then that many payload bytes
    producer -> consumer   END_OF_STREAM: the length 0xFFFFFFFF with no payload
    consumer -> producer   ACK (1 byte) once it has taken the end of stream

A length above the consumer's max_message_size is a ProtocolError raised before
anything is allocated, so garbage never costs memory.

FrameReader cuts frames out of a stream: small frames are parsed, several at a time,
from one reusable buffer filled by `recv_into`; large payloads are read straight into
their own object (`recv(n, MSG_WAITALL)`, no copy in the common case). All state lives
in the reader, so a timeout raised by the source between two reads loses nothing.
"""

from __future__ import annotations

import socket
import struct
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

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
END_OF_STREAM = 0xFFFFFFFF
"""The reserved length that ends the stream."""
MAX_FRAME_LENGTH = END_OF_STREAM - 1
"""The largest payload a frame can carry (4 GiB - 2 bytes)."""
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""The max_message_size option's default: 64 MiB."""

BUFFER_SIZE = 256 * 1024
"""Bytes of the reusable receive buffer; one recv can fill it with many small frames."""
DIRECT_READ_SIZE = 32 * 1024
"""Payloads of at least this many bytes skip the buffer and are received into their own object."""

_END_OF_STREAM_HEADER = HEADER.pack(END_OF_STREAM)
MSG_WAITALL = socket.MSG_WAITALL


def encode_header(length: int) -> bytes:
    """The 4-byte header of a frame carrying `length` bytes."""
    return HEADER.pack(length)


def end_of_stream_frame() -> bytes:
    """The frame that ends a stream."""
    return _END_OF_STREAM_HEADER


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """One whole frame (header and payload) as bytes; for tests and plain scripts, not hot paths."""
    return HEADER.pack(memoryview(payload).nbytes) + bytes(payload)


def check_max_message_size(value: object) -> int:
    """The max_message_size option: a size in bytes from 0 to MAX_FRAME_LENGTH."""
    from podipc.channel import parse_size

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

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (including a large payload in progress)."""
        return self._end - self._start + self._payload_filled

    def buffered_frame(self) -> bytes | None:
        """The next frame if it is already complete in the buffer, else None. Never reads."""
        start = self._start
        end = self._end
        if end - start >= HEADER_SIZE:
            length = self._unpack_from(self._buffer, start)[0]
            stop = start + HEADER_SIZE + length
            if stop <= end and length <= self.max_message_size:
                if stop == end:
                    self._start = self._end = 0
                else:
                    self._start = stop
                return self._view[start + HEADER_SIZE : stop].tobytes()
        return None

    def read_frame(self, source: StreamSource) -> bytes:
        """The next frame's payload, reading from `source` as needed.

        Raises EndOfStream at the end marker, PeerGone when the stream ends without it,
        ProtocolError for a length above max_message_size; errors of `source` (timeouts)
        pass through and leave the reader ready to go on.
        """
        end = self._end
        if end:
            # frames already buffered (a large payload in progress keeps the buffer empty)
            start = self._start
            if end - start >= HEADER_SIZE:
                length = self._unpack_from(self._buffer, start)[0]
                stop = start + HEADER_SIZE + length
                if stop <= end and length <= self.max_message_size:
                    if stop == end:
                        self._start = self._end = 0
                    else:
                        self._start = stop
                    return self._view[start + HEADER_SIZE : stop].tobytes()
        elif self._payload_length < 0:
            received = source.recv_into(self._view, self._receive_size)
            if not received:
                self._raise_truncated(0)
            self._end = received
            if received >= HEADER_SIZE:
                length = self._unpack_from(self._buffer, 0)[0]
                stop = HEADER_SIZE + length
                if stop <= received and length <= self.max_message_size:
                    if stop == received:
                        self._end = 0
                    else:
                        self._start = stop
                    return self._view[HEADER_SIZE:stop].tobytes()
        return self._read_frame_slowly(source)

    def _read_frame_slowly(self, source: StreamSource) -> bytes:
        buffer, view, unpack_from = self._buffer, self._view, self._unpack_from
        while True:
            if self._payload_length >= 0:
                return self._read_payload(source)
            start = self._start
            end = self._end
            if end - start >= HEADER_SIZE:
                length = unpack_from(buffer, start)[0]
                stop = start + HEADER_SIZE + length
                if stop <= end and length <= self.max_message_size:
                    if stop == end:
                        self._start = self._end = 0
                    else:
                        self._start = stop
                    return view[start + HEADER_SIZE : stop].tobytes()
                if start + HEADER_SIZE == end and DIRECT_READ_SIZE <= length <= self.max_message_size:
                    self._start = self._end = 0
                    self._receive_size = HEADER_SIZE
                    self._payload_length = length
                    data = source.recv(length, MSG_WAITALL)
                    if len(data) == length:
                        self._payload_length = -1
                        return data
                    self._keep_partial_payload(data)
                    continue
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
