"""The spool's on-disk format (docs/wire/file.md): names, segment headers, records, the consumer's position.

Everything here is pure format: encoding and decoding bytes, and reading a segment
through a descriptor with pread. Integers are little-endian; every checksum is
zlib.crc32 (CRC-32/ISO-HDLC, the one of gzip and PNG).
"""

from __future__ import annotations

import os
import secrets
import struct
from typing import NamedTuple
from zlib import crc32

from podipc.presence import PRESENCE_PREFIX

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024**2
MAX_RECORD_PAYLOAD = 2**32 - 1
"""A record's length field is 32 bits: no message is larger."""
DEFAULT_DEPTH = 1024
DEFAULT_MAX_BYTES = 256 * 1024**2
DEFAULT_SEGMENT_SIZE = 1024**2
MIN_SEGMENT_SIZE = 4096
DEFAULT_SYNC = "batch"
SYNC_LEVELS = ("always", "batch", "none")
DEFAULT_SYNC_DELAY_SECONDS = 0.05

SPOOL_PREFIX = "podipc."
SEGMENT_PREFIX = "podipc.seg."
PART_PREFIX = "podipc.part."
"""A segment being started: its header is written under this name, then it is renamed into place."""
POSITION_NAME = "podipc.position"
DIRECTORY_MARKER = "podipc.directory"
PRESENCE_TOKEN = "spool"
LEGACY_PREFIXES = ("podipc.msg.", "podipc.done.", "podipc.end.")
"""Names of the first spool format (one file per message): a spool holding them is refused, never mixed."""
SEQUENCE_DIGITS = 20
MAX_SEQUENCE = 2**64 - 1

# --- segments ------------------------------------------------------------------------------

SEGMENT_MAGIC = b"PODIPCSG"
FORMAT_VERSION = 2
SEGMENT_HEADER = struct.Struct("<8sIIQQQI4x")
"""magic, version, reserved (0), first sequence, stream id, stream offset, CRC-32 of bytes 0..39, padding."""
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 48
_SEGMENT_CHECKED = 40

# --- records -------------------------------------------------------------------------------

RECORD_HEADER = struct.Struct("<IIIQ")
"""CRC-32 of the rest of the record (bytes 4.. of the header, then the payload), length, kind, sequence."""
RECORD_FIELDS = struct.Struct("<IIQ")
"""The header after its checksum: length, kind, sequence."""
CHECKSUM = struct.Struct("<I")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 20
MESSAGE = 1
"""A message: `sequence` is its number in the stream (0-based), the payload is the message."""
END = 2
"""The end of the stream: `sequence` is the number of messages in it; no payload."""
NEXT = 3
"""This segment is full: the stream goes on in segment `sequence` (its first message's number); no payload."""
KINDS = (MESSAGE, END, NEXT)

# --- the consumer's position ------------------------------------------------------------------

POSITION_FIELDS = struct.Struct("<QQQQQQI")
"""A slot of the position file: generation, stream id, next sequence, segment, offset, stream offset, flags;
then the CRC-32 of these 52 bytes."""
POSITION_FIELDS_SIZE = POSITION_FIELDS.size  # 52
POSITION_SLOT_SIZE = POSITION_FIELDS_SIZE + CHECKSUM.size  # 56
SLOT_OFFSETS = (0, 64)
RING_OFFSET = 128
"""A counter the consumer rewrites (pwrite) to wake a producer waiting for room (its inotify watch)."""
RING = struct.Struct("<Q")
POSITION_SIZE = 136
ENDED = 1
"""Position flag: the consumer took the end of stream."""
HOLDS_PRESENCE = 2
"""Position flag: this consumer holds podipc.presence.spool.consumer while it lives (a plain consumer may not),
so a producer may take its presence file's absence for the consumer's leaving."""


def segment_name(first_sequence: int) -> str:
    """File name of the segment whose first record has sequence `first_sequence`."""
    return f"{SEGMENT_PREFIX}{first_sequence:020d}"


def part_name(first_sequence: int) -> str:
    """The name segment `first_sequence` is started under, before it is renamed into place."""
    return f"{PART_PREFIX}{first_sequence:020d}"


def parse_segment_name(name: str) -> int | None:
    """The first sequence of a segment file name, or None when `name` is not exactly a segment's."""
    if not name.startswith(SEGMENT_PREFIX):
        return None
    digits = name[len(SEGMENT_PREFIX) :]
    if len(digits) != SEQUENCE_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    sequence = int(digits)
    return sequence if sequence <= MAX_SEQUENCE else None


def is_legacy_name(name: str) -> bool:
    """True for a file of the first spool format (podipc.msg.*, podipc.done.*, podipc.end.*)."""
    return name.startswith(LEGACY_PREFIXES)


def is_spool_name(name: str) -> bool:
    """True for the names a spool uses (segments, position, marker, presence); every other name is never touched."""
    return (
        parse_segment_name(name) is not None
        or name.startswith(PART_PREFIX)
        or name in (POSITION_NAME, DIRECTORY_MARKER)
        or name.startswith(PRESENCE_PREFIX + PRESENCE_TOKEN + ".")
    )


def new_stream_id() -> int:
    """A random, non-zero 64-bit stream id."""
    return secrets.randbits(64) or 1


class SegmentHeader(NamedTuple):
    """The header of a segment file."""

    first_sequence: int
    stream_id: int
    stream_offset: int
    """Bytes of records in the stream before this segment's first record (for max_bytes accounting)."""


def encode_segment_header(header: SegmentHeader) -> bytes:
    """The 48 bytes that open a segment file."""
    checked = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, *header, 0)[:_SEGMENT_CHECKED]
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, *header, crc32(checked))


def decode_segment_header(data: bytes) -> SegmentHeader | None:
    """The header at the start of `data`, or None when it is incomplete or not a valid segment header."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return None
    magic, version, _, first, stream_id, stream_offset, checksum = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or version != FORMAT_VERSION or crc32(data[:_SEGMENT_CHECKED]) != checksum:
        return None
    if stream_id == 0:
        return None
    return SegmentHeader(first, stream_id, stream_offset)


def encode_record(kind: int, sequence: int, payload: bytes | memoryview = b"") -> bytes:
    """One record: its 20-byte header, then the payload."""
    fields = RECORD_FIELDS.pack(len(payload), kind, sequence)
    return CHECKSUM.pack(crc32(payload, crc32(fields))) + fields + payload


class Record(NamedTuple):
    """A record's header as read, and whether its checksum holds (checked only once it is complete)."""

    kind: int
    sequence: int
    length: int
    offset: int
    """Where it starts in its segment."""

    @property
    def end(self) -> int:
        """Where the next record starts."""
        return self.offset + RECORD_HEADER_SIZE + self.length


class Position(NamedTuple):
    """Where the consumer stands: the next record to take and what it already took."""

    generation: int
    stream_id: int
    next_sequence: int
    segment: int
    """The first sequence of the segment holding the next record (its file name's number)."""
    offset: int
    """Byte offset of the next record in that segment."""
    stream_offset: int
    """Bytes of records of the stream before the next record."""
    flags: int

    @property
    def ended(self) -> bool:
        """True once the consumer took the end of stream."""
        return bool(self.flags & ENDED)


def encode_position(position: Position) -> bytes:
    """One 56-byte slot of the position file."""
    fields = POSITION_FIELDS.pack(*position)
    return fields + CHECKSUM.pack(crc32(fields))


def decode_position(data: bytes) -> Position | None:
    """The newest valid slot of a position file's content, or None when neither slot is valid."""
    best: Position | None = None
    for offset in SLOT_OFFSETS:
        if len(data) < offset + POSITION_SLOT_SIZE:
            continue
        fields = data[offset : offset + POSITION_FIELDS_SIZE]
        if crc32(fields) != CHECKSUM.unpack_from(data, offset + POSITION_FIELDS_SIZE)[0]:
            continue
        slot = Position(*POSITION_FIELDS.unpack(fields))
        if best is None or slot.generation > best.generation:
            best = slot
    return best


# --- reading a segment ------------------------------------------------------------------------

READ_CHUNK = 256 * 1024
"""How much of a segment one pread takes at most when records are small."""
VERIFY_CHUNK = 1024**2
"""Large payloads are checksummed this much at a time (never held whole just to be checked or skipped)."""


def read_header(fd: int, offset: int) -> Record | None:
    """The header of the record at `offset`, or None when it is not all there (yet)."""
    data = os.pread(fd, RECORD_HEADER_SIZE, offset)
    if len(data) < RECORD_HEADER_SIZE:
        return None
    _, length, kind, sequence = RECORD_HEADER.unpack(data)
    return Record(kind, sequence, length, offset)


def record_checksum_holds(fd: int, record: Record) -> bool | None:
    """True when the record at `record.offset` is whole and its checksum holds, False when whole and broken,
    None when not all of it is there (yet). Reads the payload a chunk at a time."""
    header = os.pread(fd, RECORD_HEADER_SIZE, record.offset)
    if len(header) < RECORD_HEADER_SIZE:
        return None
    stored = CHECKSUM.unpack_from(header)[0]
    checksum = crc32(header[4:])
    position, end = record.offset + RECORD_HEADER_SIZE, record.end
    while position < end:
        chunk = os.pread(fd, min(VERIFY_CHUNK, end - position), position)
        if not chunk:
            return None
        checksum = crc32(chunk, checksum)
        position += len(chunk)
    return bool(checksum == stored)


class SegmentEnd(NamedTuple):
    """How far a segment holds a valid stream: what a resuming producer appends after."""

    offset: int
    """Where the valid records end (a torn or broken tail starts here, if any)."""
    next_sequence: int
    """The sequence the next record carries."""
    last_kind: int
    """The kind of the last valid record (0: none)."""
    last_sequence: int
    """Its sequence (for END: the message count; for NEXT: the next segment)."""


def scan_segment(fd: int, header: SegmentHeader, stop_at: int | None = None) -> SegmentEnd:
    """Follow a segment's records from its header to the first one that is missing, torn or invalid
    (or to `stop_at`, a byte offset: the records before it are checked)."""
    offset, expected, last_kind, last_sequence = SEGMENT_HEADER_SIZE, header.first_sequence, 0, 0
    while stop_at is None or offset < stop_at:
        record = read_header(fd, offset)
        if record is None or not _continues(record, expected, last_kind):
            break
        if not record_checksum_holds(fd, record):
            break
        offset, last_kind, last_sequence = record.end, record.kind, record.sequence
        if record.kind == MESSAGE:
            expected = record.sequence + 1
        else:
            break  # END and NEXT are always a segment's last record
    return SegmentEnd(offset, expected, last_kind, last_sequence)


def _continues(record: Record, expected: int, last_kind: int) -> bool:
    """True when `record` is what may follow in a valid segment (the next message, or END/NEXT after the last)."""
    if last_kind in (END, NEXT) or record.kind not in KINDS:
        return False
    if record.kind != MESSAGE and record.length != 0:
        return False
    return record.sequence == expected
