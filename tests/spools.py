"""Spools made and read by hand from the wire format (docs/wire/file.md), for the file:// tests."""

from __future__ import annotations

import os
from pathlib import Path

from podipc.transports.spool.wire import (
    END,
    MESSAGE,
    NEXT,
    POSITION_NAME,
    POSITION_SIZE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SLOT_OFFSETS,
    Position,
    SegmentHeader,
    decode_segment_header,
    encode_position,
    encode_record,
    encode_segment_header,
    parse_segment_name,
    segment_name,
)

STREAM_ID = 0x5EED


def messages_segment(
    first: int,
    messages: list[bytes],
    ending: int | None = None,
    stream_id: int = STREAM_ID,
    stream_offset: int = 0,
) -> bytes:
    """A segment's bytes: header, a MESSAGE record per message from sequence `first`, then END or NEXT (`ending`)."""
    data = encode_segment_header(SegmentHeader(first, stream_id, stream_offset))
    for sequence, message in enumerate(messages, start=first):
        data += encode_record(MESSAGE, sequence, message)
    if ending is not None:
        data += encode_record(ending, first + len(messages))
    return data


def write_segment(directory: Path, first: int, data: bytes) -> Path:
    """Write a segment file (mode 0600) into `directory`, made if missing."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / segment_name(first)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def write_position(directory: Path, position: Position) -> Path:
    """Write a consumer position file whose both slots hold `position` (the newer generation in slot 1)."""
    older = position._replace(generation=max(0, position.generation - 1))
    data = bytearray(POSITION_SIZE)
    data[SLOT_OFFSETS[0] : SLOT_OFFSETS[0] + 56] = encode_position(older)
    data[SLOT_OFFSETS[1] : SLOT_OFFSETS[1] + 56] = encode_position(position)
    path = directory / POSITION_NAME
    path.write_bytes(bytes(data))
    path.chmod(0o600)
    return path


def offset_after(messages: list[bytes]) -> int:
    """The segment offset after a header and one MESSAGE record per message."""
    return SEGMENT_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(message) for message in messages)


def segments_of(directory: Path) -> list[int]:
    """The first sequences of the segment files in `directory`, in order."""
    names = os.listdir(directory) if directory.exists() else []
    return sorted(first for first in map(parse_segment_name, names) if first is not None)


def records_of(path: Path) -> list[tuple[int, int, bytes]]:
    """(kind, sequence, payload) of every whole record of a segment file (no checksum check)."""
    data = path.read_bytes()
    assert decode_segment_header(data) is not None, f"{path} has no valid header"
    records, offset = [], SEGMENT_HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= len(data):
        _, length, kind, sequence = RECORD_HEADER.unpack_from(data, offset)
        end = offset + RECORD_HEADER_SIZE + length
        if end > len(data):
            break
        records.append((kind, sequence, data[offset + RECORD_HEADER_SIZE : end]))
        offset = end
    return records


def stream_in(directory: Path) -> list[tuple[int, int, bytes]]:
    """Every record of every segment in `directory`, in order."""
    return [record for first in segments_of(directory) for record in records_of(directory / segment_name(first))]


def messages_in(directory: Path) -> list[bytes]:
    """The payloads of the MESSAGE records in the spool."""
    return [payload for kind, _, payload in stream_in(directory) if kind == MESSAGE]


def highest_message(directory: Path) -> int:
    """The highest message sequence written into the spool (-1: none)."""
    try:
        return max((sequence for kind, sequence, _ in stream_in(directory) if kind == MESSAGE), default=-1)
    except (FileNotFoundError, AssertionError):  # a segment removed or being started while we looked
        return -1


__all__ = [
    "END",
    "MESSAGE",
    "NEXT",
    "STREAM_ID",
    "highest_message",
    "messages_in",
    "messages_segment",
    "offset_after",
    "records_of",
    "segments_of",
    "stream_in",
    "write_position",
    "write_segment",
]
