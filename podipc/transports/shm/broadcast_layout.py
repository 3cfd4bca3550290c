"""The broadcast ring's header (shm://NAME?pattern=broadcast): one writer, N subscriber slots.

Pure functions over bytes, like podipc.transports.shm.layout (whose record encoding the
broadcast ring shares unchanged). Little-endian; docs/wire/shm.md has the same table.

    offset      size  field                            written by
    0           8     magic b"PODIPCSH"                 producer (creation)
    8           4     version (2: broadcast)            producer
    12          4     header size (256 + 64 x slots)    producer
    16          8     capacity (data bytes)             producer
    24          8     max message size (bytes)          producer
    32          4     subscriber slots N (1..64)        producer
    36          4     slow policy (0 wait, 1 drop)      producer
    64          8     write index                       producer
    72          8     producer flags                    producer (1 attached, 2 end written)
    96          8     tail generation                   producer (slow=drop: odd while the tail moves)
    104         8     tail index                        producer (slow=drop: the oldest record still in the ring)
    112         8     tail sequence                     producer (slow=drop: data records before the tail index)
    128         8     producer waiting                  producer sets it before sleeping; a subscriber clears it, wakes
    256 + 64 k        slot k, one cache line each:
      +0        8     read index                        subscriber k
      +8        8     state (0 free, 1 active, 2 left, 3 ended)  subscriber k
      +16       8     subscriber waiting                subscriber k sets it before sleeping; producer clears it, wakes
      +24       8     messages taken                    subscriber k
      +32       8     epoch (joins of this slot)        subscriber k
    header size cap   ring data (records as in layout.py)

A slot's read index is where that subscriber reads next; with slow=wait the writer never
writes past the lowest read index of the live, active slots plus the capacity. With
slow=drop it never waits: it moves the tail past the records it is about to overwrite
(generation odd, tail index and sequence, generation even, then the new data), and a
subscriber whose read index is behind the tail resumes at the tail, counting the data
records in between as lost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from podipc.errors import ProtocolError
from podipc.transports.shm.layout import (
    ALIGNMENT,
    BROADCAST_VERSION,
    HEADER_SIZE,
    IDENTITY,
    MAGIC,
    MAX_INDEX,
    PRODUCER_ENDED,
    VERSION,
    check_geometry,
)

SLOT_BYTES = 64
SLOTS_OFFSET = HEADER_SIZE
SLOTS_FIELDS = struct.Struct("<II")
"""Subscriber slots and slow policy, at offset 32."""
SLOTS_FIELDS_OFFSET = 32
IDENTITY_BYTES = SLOTS_FIELDS_OFFSET + SLOTS_FIELDS.size
"""The first bytes of a header, enough to know its slots and size (read_identity)."""
MAX_SLOTS = 64

SLOW_WAIT = 0
SLOW_DROP = 1
SLOW_NAMES = {SLOW_WAIT: "wait", SLOW_DROP: "drop"}

SLOT_FREE = 0
SLOT_ACTIVE = 1
SLOT_LEFT = 2
SLOT_ENDED = 3
KNOWN_SLOT_STATES = (SLOT_FREE, SLOT_ACTIVE, SLOT_LEFT, SLOT_ENDED)

# word indices (the header as native 8-byte words)
WRITE_INDEX_WORD = 8
PRODUCER_FLAGS_WORD = 9
TAIL_GENERATION_WORD = 12
TAIL_INDEX_WORD = 13
TAIL_SEQUENCE_WORD = 14
PRODUCER_WAITING_WORD = 16
SLOT_READ_INDEX = 0
SLOT_STATE = 1
SLOT_WAITING = 2
SLOT_TAKEN = 3
SLOT_EPOCH = 4
_INDEX = struct.Struct("<Q")


def slot_word(slot: int) -> int:
    """The word index of slot `slot`'s read index (its other fields follow: SLOT_STATE ... SLOT_EPOCH)."""
    return (SLOTS_OFFSET + SLOT_BYTES * slot) >> 3


def header_size(slots: int) -> int:
    """Bytes of the header of a ring with `slots` subscriber slots (the ring data starts there)."""
    return HEADER_SIZE + SLOT_BYTES * slots


def segment_size(capacity: int, slots: int) -> int:
    """Bytes of the whole broadcast segment file."""
    return header_size(slots) + capacity


def encode_header(capacity: int, max_message_size: int, slots: int, slow: int) -> bytes:
    """The header of a new, empty broadcast ring (indices 0, every slot free)."""
    check_geometry(capacity, max_message_size)
    if not 1 <= slots <= MAX_SLOTS or slow not in SLOW_NAMES:
        raise ValueError(f"a broadcast ring has 1 to {MAX_SLOTS} slots and slow 0 or 1, not {slots}, {slow}")
    size = header_size(slots)
    identity = IDENTITY.pack(MAGIC, BROADCAST_VERSION, size, capacity, max_message_size)
    fields = SLOTS_FIELDS.pack(slots, slow)
    return identity + fields + bytes(size - len(identity) - len(fields))


@dataclass(frozen=True)
class BroadcastHeader:
    """A decoded, checked broadcast header."""

    capacity: int
    max_message_size: int
    slots: int
    slow: int
    header_size: int
    write_index: int
    ended: bool
    """The producer wrote its end of stream: a subscriber arriving now waits for the next producer."""


def read_identity(buffer: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(slots, header size) from the first 40 bytes, checked enough to know how much header to read."""
    view = memoryview(buffer).cast("B")
    if view.nbytes < IDENTITY_BYTES:
        raise ProtocolError(f"shm broadcast header truncated: {view.nbytes} bytes")
    magic, version, size, _capacity, _largest = IDENTITY.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"not a podipc shm ring: magic {bytes(magic)!r} != {MAGIC!r}")
    if version == VERSION:
        raise ProtocolError(
            "this shm ring is a pair ring (its consumer opened it with pattern=pair, the default); "
            "a subscriber needs pattern=broadcast on every side"
        )
    if version != BROADCAST_VERSION:
        raise ProtocolError(f"shm ring version {version} is not supported (this podipc speaks {BROADCAST_VERSION})")
    slots, _slow = SLOTS_FIELDS.unpack_from(view, SLOTS_FIELDS_OFFSET)
    if not 1 <= slots <= MAX_SLOTS:
        raise ProtocolError(f"shm broadcast ring claims {slots} subscriber slots (1 to {MAX_SLOTS})")
    if size != header_size(slots):
        raise ProtocolError(f"shm broadcast header size {size} != {header_size(slots)} for {slots} slots")
    return slots, size


def decode_header(buffer: bytes | bytearray | memoryview, segment_bytes: int) -> BroadcastHeader:
    """Decode and check a whole broadcast header (`segment_bytes`: the file's size); ProtocolError on garbage."""
    view = memoryview(buffer).cast("B")
    slots, size = read_identity(view)
    if view.nbytes < size:
        raise ProtocolError(f"shm broadcast header truncated: {view.nbytes} bytes < {size}")
    _magic, _version, _size, capacity, max_message_size = IDENTITY.unpack_from(view, 0)
    _slots, slow = SLOTS_FIELDS.unpack_from(view, SLOTS_FIELDS_OFFSET)
    if slow not in SLOW_NAMES:
        raise ProtocolError(f"shm broadcast ring has unknown slow policy {slow}")
    try:
        check_geometry(capacity, max_message_size)
    except ValueError as exc:
        raise ProtocolError(f"shm broadcast header: {exc}") from None
    if segment_bytes % ALIGNMENT or segment_size(capacity, slots) > segment_bytes:
        raise ProtocolError(
            f"shm broadcast ring of capacity {capacity} and {slots} slots does not fit the {segment_bytes}-byte segment"
        )
    (write_index,) = _INDEX.unpack_from(view, WRITE_INDEX_WORD * 8)
    if write_index % ALIGNMENT or write_index > MAX_INDEX:
        raise ProtocolError(f"shm broadcast write index {write_index} is not a valid index")
    for slot in range(slots):
        base = slot_word(slot) * 8
        (read_index,) = _INDEX.unpack_from(view, base)
        (state,) = _INDEX.unpack_from(view, base + SLOT_STATE * 8)
        if state not in KNOWN_SLOT_STATES or read_index % ALIGNMENT or read_index > write_index:
            raise ProtocolError(f"shm broadcast slot {slot} is garbage (state {state}, read index {read_index})")
    (producer_flags,) = _INDEX.unpack_from(view, PRODUCER_FLAGS_WORD * 8)
    ended = bool(producer_flags & PRODUCER_ENDED)
    return BroadcastHeader(capacity, max_message_size, slots, slow, size, write_index, ended)
