"""A hand-written single-producer single-consumer busy-poll ring in a /dev/shm file: the raw baseline of shm://.

No podipc layer, no wake-ups: both sides spin on two 64-bit counters (yielding the CPU
between polls after a short pure spin, never sleeping). It shows the
floor a shared-memory channel can reach from Python, and what it costs (an idle
consumer burns a whole core).

File layout (little endian): a 128-byte header, then `capacity` bytes of records.

    offset 0    u64 tail      bytes ever written (producer)
    offset 8    u64 capacity  size of the record area
    offset 16   u64 magic     RING_MAGIC once the consumer has set the file up
    offset 64   u64 head      bytes ever consumed (consumer)

A record is a u32 length, 4 bytes of padding, then the payload, padded to 8 bytes.
A length of WRAP sends the reader to the start of the area; END ends the stream.
Ordering relies on x86-64 total store order: payload, then length, then tail.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time

from podipc.errors import EndOfStream, PeerTimeout, Timeout

HEADER_SIZE = 128
RECORD_HEADER_SIZE = 8
RING_MAGIC = 0x676E6972636970  # "picring"
WRAP = 0xFFFFFFFF
END = 0xFFFFFFFE
LENGTH = struct.Struct("<I")
TAIL_WORD, CAPACITY_WORD, MAGIC_WORD, HEAD_WORD = 0, 1, 2, 8
CLOSE_WAIT_SECONDS = 5.0
SPIN_BEFORE_YIELD = 10
"""Spin this many turns, then yield the CPU at each turn (still polling, never sleeping): on a loaded
machine a pure spin can hold the core its peer needs for a whole time slice."""


def ring_capacity_for(message_size: int) -> int:
    """Room for at least 4 messages of `message_size` bytes, and never less than 1 MiB."""
    record = RECORD_HEADER_SIZE + _padded(message_size)
    return max(1 << 20, 4 * record)


def _padded(size: int) -> int:
    return (size + 7) & ~7


def ring_path(name: str) -> str:
    """The ring file of a name."""
    return f"/dev/shm/{name}"


class RingReceiver:
    """The consuming side: creates the ring file, hands out views into it, unlinks it on close."""

    def __init__(self, name: str, capacity: int) -> None:
        self.path = ring_path(name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE + capacity)
            self.map = mmap.mmap(fd, HEADER_SIZE + capacity)
        finally:
            os.close(fd)
        self.view = memoryview(self.map)
        self.words = self.view[:HEADER_SIZE].cast("Q")
        self.data = self.view[HEADER_SIZE:]
        self.capacity = capacity
        self.words[CAPACITY_WORD] = capacity
        self.words[MAGIC_WORD] = RING_MAGIC
        self.head = 0
        self.next_head = 0
        self.last: memoryview | None = None

    def recv(self) -> memoryview:
        """The next message as a view into the ring, valid until the next recv (spins while empty)."""
        words, data, capacity, unpack, sched_yield = (
            self.words,
            self.data,
            self.capacity,
            LENGTH.unpack_from,
            os.sched_yield,
        )
        head = self.next_head
        words[HEAD_WORD] = head
        while True:
            spins = 0
            while words[TAIL_WORD] == head:
                spins += 1
                if spins > SPIN_BEFORE_YIELD:
                    sched_yield()
            offset = head % capacity
            if capacity - offset < RECORD_HEADER_SIZE:
                head += capacity - offset
                continue
            (length,) = unpack(data, offset)
            if length == WRAP:
                head += capacity - offset
                continue
            if length == END:
                self.next_head = head + RECORD_HEADER_SIZE
                words[HEAD_WORD] = self.next_head
                raise EndOfStream("ring: the producer ended the stream")
            self.head = head
            self.next_head = head + RECORD_HEADER_SIZE + ((length + 7) & ~7)
            start = offset + RECORD_HEADER_SIZE
            last = self.last
            if last is not None:
                last.release()
            self.last = view = data[start : start + length]
            return view

    def idle(self, seconds: float) -> None:
        """Spin for `seconds` waiting for a message, as recv would."""
        words, head = self.words, self.next_head
        deadline = time.monotonic() + seconds
        while words[TAIL_WORD] == head:
            if time.monotonic() >= deadline:
                return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Unmap and unlink the ring."""
        if self.map.closed:
            return
        if self.last is not None:
            self.last.release()
        for view in (self.words, self.data, self.view):
            view.release()
        self.map.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class RingSender:
    """The producing side: maps the consumer's ring on the first send (waiting for it), copies records in."""

    def __init__(self, name: str, wait_seconds: float) -> None:
        self.path = ring_path(name)
        self.wait_deadline = time.monotonic() + wait_seconds
        self.map: mmap.mmap | None = None
        self.tail = 0

    def _attach(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    size = os.fstat(fd).st_size
                    if size > HEADER_SIZE:
                        self.map = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            if self.map is not None:
                words = memoryview(self.map)[:HEADER_SIZE].cast("Q")
                if words[MAGIC_WORD] == RING_MAGIC:
                    break
                words.release()
                self.map.close()
                self.map = None
            if time.monotonic() >= self.wait_deadline:
                raise PeerTimeout(f"ring {self.path}: no consumer appeared")
            time.sleep(0.005)
        self.view = memoryview(self.map)
        self.words = self.view[:HEADER_SIZE].cast("Q")
        self.data = self.view[HEADER_SIZE:]
        self.capacity = self.words[CAPACITY_WORD]

    def send(self, payload: bytes | bytearray | memoryview) -> None:
        """Copy one message into the ring (spins while it is full)."""
        if self.map is None:
            self._attach()
        length = len(payload) if type(payload) is not memoryview else payload.nbytes
        self._put(length, length, payload)

    def _put(self, marker: int, length: int, payload: bytes | bytearray | memoryview | None) -> None:
        words, data, capacity = self.words, self.data, self.capacity
        need = RECORD_HEADER_SIZE + ((length + 7) & ~7)
        if need > capacity:
            raise ValueError(f"{length} bytes do not fit a ring of {capacity} bytes")
        position = self.tail
        offset = position % capacity
        wrapped_from = -1
        if offset + need > capacity:
            wrapped_from = offset
            position += capacity - offset
            offset = 0
        limit = position + need - capacity
        spins = 0
        while words[HEAD_WORD] < limit:
            spins += 1
            if spins > SPIN_BEFORE_YIELD:
                os.sched_yield()
        if wrapped_from >= 0 and capacity - wrapped_from >= RECORD_HEADER_SIZE:
            LENGTH.pack_into(data, wrapped_from, WRAP)
        if payload is not None:
            start = offset + RECORD_HEADER_SIZE
            data[start : start + length] = payload
        LENGTH.pack_into(data, offset, marker)
        self.tail = position + need
        words[TAIL_WORD] = self.tail

    def close(self) -> None:
        """Put the end record, wait (bounded) until the consumer took it, unmap."""
        if self.map is None:
            self._attach()
        self._put(END, 0, None)
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while self.words[HEAD_WORD] < self.tail:
            if time.monotonic() >= deadline:
                self.abort()
                raise Timeout(f"ring {self.path}: the consumer did not take the end of stream")
            time.sleep(0.0005)
        self.abort()

    def abort(self) -> None:
        """Unmap without ending the stream."""
        if self.map is None or self.map.closed:
            return
        for view in (self.words, self.data, self.view):
            view.release()
        self.map.close()
