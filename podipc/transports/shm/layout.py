"""The shm:// ring layout: header and record encoding and their checked decoding.

Pure functions over bytes, kept apart from the mapping and the endpoints so the
decoder can be fuzzed on its own, and so the layout (docs/wire/shm.md) has one
definition. Everything is little-endian.

    offset  size  field                     written by
    0       8     magic b"PODIPCSH"          consumer (creation)
    8       4     version (1)                consumer
    12      4     header size (256)          consumer
    16      8     capacity (data bytes)      consumer
    24      8     max message size (bytes)   consumer
    32      8     features                   consumer (1: its reader takes pack records)
    64      8     write index                producer
    72      8     producer flags             producer (1 attached, 2 end written)
    80      8     consumer waiting           consumer sets it before sleeping (how to wake it); producer clears it, wakes
    128     8     read index                 consumer
    136     8     consumer flags             consumer (1 closed)
    144     8     producer waiting           producer sets it before sleeping (how to wake it); consumer clears it, wakes
    256     cap   ring data

A waiting word says how its side wants to be woken: 1 (WAITING_SEMAPHORE) post its
named semaphore, 2 (WAITING_FIFO) write a byte to its FIFO; any other non-zero value is
taken as 1. The semaphore is what a side sleeping in a blocking call waits on; the FIFO is
what a side waiting on a file descriptor (podipc.aio, podipc.wait, fileno()) polls.

The indices count bytes since the ring was created and never wrap (2**64 bytes is
centuries); a position in the ring is `index % capacity`. The producer owns the
cache line at 64, the consumer the one at 128, so neither writes the other's line
on the fast path. A record starts at an 8-byte aligned position:

    u32 length, u32 kind (0 data, 1 wrap, 2 end, 3 pack), then `length` payload bytes, padded to 8

A record never straddles the end of the ring: when it does not fit, the producer
writes a wrap record (length 0) and continues at position 0.

A pack record carries `count` messages of `size` bytes each, back to back: its payload
is u32 count (>= 1), u32 size (<= max message size), then count * size bytes, so its
length is 8 + count * size. A producer writes packs only for a batch of equal-sized
messages (send_many) and only into a ring whose features word says the reader takes
them; a reader that sets no feature never sees one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from podipc.errors import ProtocolError

MAGIC = b"PODIPCSH"
VERSION = 1
BROADCAST_VERSION = 2
"""The version of a broadcast ring (podipc.transports.shm.broadcast): same magic, another header."""
HEADER_SIZE = 256
ALIGNMENT = 8
RECORD_HEADER_SIZE = 8

KIND_DATA = 0
KIND_WRAP = 1
KIND_END = 2
KIND_PACK = 3
KIND_NAMES = {KIND_DATA: "data", KIND_WRAP: "wrap", KIND_END: "end", KIND_PACK: "pack"}

FEATURE_PACKS = 1
"""A features bit: the consumer's reader takes pack records (podipc's does; a plain reader sets no bit)."""
PACK_HEADER = struct.Struct("<II")
"""A pack record's payload starts with its message count and the size of each message."""
PACK_HEADER_SIZE = PACK_HEADER.size

WAITING_SEMAPHORE = 1
"""A waiting word's value: the side sleeps on its semaphore; post it."""
WAITING_FIFO = 2
"""A waiting word's value: the side polls its FIFO; write one byte to it."""

PRODUCER_ATTACHED = 1
PRODUCER_ENDED = 2
CONSUMER_CLOSED = 1
KNOWN_PRODUCER_FLAGS = PRODUCER_ATTACHED | PRODUCER_ENDED
KNOWN_CONSUMER_FLAGS = CONSUMER_CLOSED

# Offsets of the 8-byte header words, and their index in a memoryview cast to "Q".
FEATURES_OFFSET = 32
WRITE_INDEX_OFFSET = 64
PRODUCER_FLAGS_OFFSET = 72
CONSUMER_WAITING_OFFSET = 80
READ_INDEX_OFFSET = 128
CONSUMER_FLAGS_OFFSET = 136
PRODUCER_WAITING_OFFSET = 144
WRITE_INDEX_WORD = WRITE_INDEX_OFFSET // 8
PRODUCER_FLAGS_WORD = PRODUCER_FLAGS_OFFSET // 8
CONSUMER_WAITING_WORD = CONSUMER_WAITING_OFFSET // 8
READ_INDEX_WORD = READ_INDEX_OFFSET // 8
CONSUMER_FLAGS_WORD = CONSUMER_FLAGS_OFFSET // 8
PRODUCER_WAITING_WORD = PRODUCER_WAITING_OFFSET // 8

IDENTITY = struct.Struct("<8sIIQQ")
"""magic, version, header size, capacity, max message size: the first 32 bytes."""
INDEX = struct.Struct("<Q")
RECORD_HEADER = struct.Struct("<II")

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40
MAX_RECORD_LENGTH = (1 << 32) - 1
"""A record's length is a u32: no message may be longer, whatever the capacity."""
MAX_INDEX = 1 << 63
"""Indices start at 0 and grow by the bytes written (2**63 bytes is centuries); a header claiming more is forged."""


def padded(length: int) -> int:
    """`length` rounded up to the 8-byte record alignment."""
    return (length + ALIGNMENT - 1) & -ALIGNMENT


def record_size(length: int) -> int:
    """Bytes a record with a payload of `length` bytes takes in the ring."""
    return RECORD_HEADER_SIZE + padded(length)


def largest_message(capacity: int) -> int:
    """The largest payload a ring of `capacity` bytes can carry: it must fit the ring and a record's u32 length."""
    return min(capacity - RECORD_HEADER_SIZE, MAX_RECORD_LENGTH)


def segment_size(capacity: int) -> int:
    """Bytes of the whole segment file: header plus ring."""
    return HEADER_SIZE + capacity


def check_geometry(capacity: int, max_message_size: int) -> None:
    """Raise ValueError unless capacity and max message size make a usable ring."""
    if capacity % ALIGNMENT or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(
            f"capacity must be a multiple of 8 from {MIN_CAPACITY} to {MAX_CAPACITY} bytes, not {capacity}"
        )
    if not 0 <= max_message_size <= largest_message(capacity):
        bound = (
            "capacity - 8"
            if capacity - RECORD_HEADER_SIZE <= MAX_RECORD_LENGTH
            else "4 GiB - 1 (a record's u32 length)"
        )
        raise ValueError(
            f"max_message_size must be at most {bound} = {largest_message(capacity)} bytes, not {max_message_size}"
        )


def encode_header(capacity: int, max_message_size: int, features: int = 0) -> bytes:
    """The header of a new, empty ring (indices 0, no flags) whose reader has `features` (FEATURE_PACKS)."""
    check_geometry(capacity, max_message_size)
    identity = IDENTITY.pack(MAGIC, VERSION, HEADER_SIZE, capacity, max_message_size) + INDEX.pack(features)
    return identity + bytes(HEADER_SIZE - len(identity))


@dataclass(frozen=True)
class RingHeader:
    """A decoded, checked ring header."""

    capacity: int
    max_message_size: int
    write_index: int
    read_index: int
    producer_flags: int
    consumer_flags: int
    features: int = 0
    """What the consumer's reader takes beyond data, wrap and end records (unknown bits are ignored)."""


def decode_header(buffer: bytes | bytearray | memoryview, segment_bytes: int | None = None) -> RingHeader:
    """Decode and check a ring header; ProtocolError naming the first thing wrong.

    `segment_bytes` is the size of the segment file (default: len(buffer)); it must be a
    multiple of 8 and hold the ring.
    """
    view = memoryview(buffer).cast("B")
    available = view.nbytes if segment_bytes is None else segment_bytes
    if view.nbytes < HEADER_SIZE:
        raise ProtocolError(f"shm ring header truncated: {view.nbytes} bytes < {HEADER_SIZE}")
    magic, version, header_size, capacity, max_message_size = IDENTITY.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"not a podipc shm ring: magic {bytes(magic)!r} != {MAGIC!r}")
    if version == BROADCAST_VERSION:
        raise ProtocolError(
            "this shm ring is a broadcast ring (its producer opened it with pattern=broadcast); "
            "open this side with pattern=broadcast too"
        )
    if version != VERSION:
        raise ProtocolError(f"shm ring version {version} is not supported (this podipc speaks {VERSION})")
    if header_size != HEADER_SIZE:
        raise ProtocolError(f"shm ring header size {header_size} != {HEADER_SIZE}")
    try:
        check_geometry(capacity, max_message_size)
    except ValueError as exc:
        raise ProtocolError(f"shm ring header: {exc}") from None
    if available % ALIGNMENT:
        raise ProtocolError(f"shm segment of {available} bytes is not a multiple of 8: not a podipc ring")
    if segment_size(capacity) > available:
        raise ProtocolError(f"shm ring capacity {capacity} does not fit the {available}-byte segment")
    (write_index,) = INDEX.unpack_from(view, WRITE_INDEX_OFFSET)
    (read_index,) = INDEX.unpack_from(view, READ_INDEX_OFFSET)
    check_indices(read_index, write_index, capacity)
    if write_index > MAX_INDEX:
        raise ProtocolError(f"shm ring write index {write_index} is beyond 2**63: a forged header")
    (producer_flags,) = INDEX.unpack_from(view, PRODUCER_FLAGS_OFFSET)
    (consumer_flags,) = INDEX.unpack_from(view, CONSUMER_FLAGS_OFFSET)
    if producer_flags & ~KNOWN_PRODUCER_FLAGS or consumer_flags & ~KNOWN_CONSUMER_FLAGS:
        raise ProtocolError(
            f"shm ring header has unknown flags (producer {producer_flags:#x}, consumer {consumer_flags:#x})"
        )
    (features,) = INDEX.unpack_from(view, FEATURES_OFFSET)
    return RingHeader(capacity, max_message_size, write_index, read_index, producer_flags, consumer_flags, features)


def check_indices(read_index: int, write_index: int, capacity: int) -> None:
    """ProtocolError unless read <= write <= read + capacity, both 8-byte aligned."""
    if read_index % ALIGNMENT or write_index % ALIGNMENT:
        raise ProtocolError(f"shm ring indices not 8-byte aligned (read {read_index}, write {write_index})")
    if not read_index <= write_index <= read_index + capacity:
        raise ProtocolError(
            f"shm ring indices out of range: read {read_index}, write {write_index}, capacity {capacity}"
        )


@dataclass(frozen=True)
class Record:
    """Where a record is: its kind, payload length and offset in the segment, and the read index after it."""

    kind: int
    length: int
    payload_offset: int
    next_read_index: int


def decode_record(
    buffer: bytes | bytearray | memoryview, capacity: int, max_message_size: int, read_index: int, write_index: int
) -> Record:
    """Decode the record at `read_index` of a ring whose producer published `write_index`.

    Checks everything the producer could get wrong; never reads outside the ring;
    ProtocolError with a clear message on garbage. The ring must not be empty.
    """
    check_indices(read_index, write_index, capacity)
    available = write_index - read_index
    if available < RECORD_HEADER_SIZE:
        raise ProtocolError(f"shm ring holds {available} bytes, less than a record header")
    view = memoryview(buffer).cast("B")
    if view.nbytes < segment_size(capacity):
        raise ProtocolError(f"shm segment of {view.nbytes} bytes is smaller than its ring ({segment_size(capacity)})")
    position = read_index % capacity
    length, kind = RECORD_HEADER.unpack_from(view, HEADER_SIZE + position)
    if kind == KIND_DATA:
        if length > max_message_size:
            raise ProtocolError(
                f"shm record at {read_index} claims {length} bytes > max message size {max_message_size}"
            )
        size = record_size(length)
        if position + size > capacity:
            raise ProtocolError(f"shm record at {read_index} of {length} bytes runs past the end of the ring")
        if size > available:
            raise ProtocolError(
                f"shm record at {read_index} of {length} bytes extends beyond the write index {write_index}"
            )
        return Record(KIND_DATA, length, HEADER_SIZE + position + RECORD_HEADER_SIZE, read_index + size)
    if kind == KIND_PACK:
        return _decode_pack(view, length, position, capacity, max_message_size, read_index, write_index)
    if length != 0 or kind not in KIND_NAMES:
        raise ProtocolError(f"shm record at {read_index} has unknown kind {kind} (length {length})")
    if kind == KIND_WRAP:
        skip = capacity - position
        if position == 0 or skip > available:
            raise ProtocolError(f"shm wrap record at {read_index} skips beyond the write index {write_index}")
        return Record(KIND_WRAP, 0, HEADER_SIZE, read_index + skip)
    return Record(KIND_END, 0, HEADER_SIZE + position + RECORD_HEADER_SIZE, read_index + RECORD_HEADER_SIZE)


def _decode_pack(
    view: memoryview,
    length: int,
    position: int,
    capacity: int,
    max_message_size: int,
    read_index: int,
    write_index: int,
) -> Record:
    """The pack record at `read_index` (its header says kind pack), checked; its payload offset is its count's."""
    size = record_size(length)
    if length < PACK_HEADER_SIZE or position + size > capacity or size > write_index - read_index:
        raise ProtocolError(
            f"shm pack record at {read_index} of {length} bytes is shorter than its header or runs past the ring "
            f"or the write index {write_index}"
        )
    payload = HEADER_SIZE + position + RECORD_HEADER_SIZE
    count, message_size = PACK_HEADER.unpack_from(view, payload)
    if count < 1 or message_size > max_message_size or PACK_HEADER_SIZE + count * message_size != length:
        raise ProtocolError(
            f"shm pack record at {read_index}: {count} messages of {message_size} bytes do not make its "
            f"{length} bytes (or exceed max message size {max_message_size})"
        )
    return Record(KIND_PACK, length, payload, read_index + size)
