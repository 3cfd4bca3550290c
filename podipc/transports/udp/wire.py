"""The udp:// datagram format (docs/wire/udp.md): the header, the kinds, and BATCH datagrams' entries.

Every datagram opens with an 11-byte header: the magic b"pu", a kind byte and a 64-bit
big-endian sequence number (the number of its first message). DATA carries one message,
BATCH several as entries of a 32-bit length and the message; HELLO, HELLO-ACK, BATCH-OK,
EOS and EOS-ACK carry nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

UDP_DATAGRAM_LIMIT = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)
MAGIC = b"pu"
MAGIC_FIRST, MAGIC_SECOND = MAGIC
HEADER = struct.Struct("!2sBQ")
HEADER_SIZE = HEADER.size
SEQUENCE = struct.Struct("!Q")
SEQUENCE_OFFSET = 3
MAX_MESSAGE_SIZE = UDP_DATAGRAM_LIMIT - HEADER_SIZE

KIND_DATA = 0x44  # 'D'
KIND_HELLO = 0x48  # 'H'
KIND_HELLO_ACK = 0x68  # 'h'
KIND_EOS = 0x45  # 'E'
KIND_EOS_ACK = 0x65  # 'e'
KIND_BATCH = 0x4D  # 'M'
KIND_BATCH_OK = 0x6D  # 'm'
KINDS = frozenset({KIND_DATA, KIND_HELLO, KIND_HELLO_ACK, KIND_EOS, KIND_EOS_ACK, KIND_BATCH, KIND_BATCH_OK})
PAYLOAD_KINDS = frozenset({KIND_DATA, KIND_BATCH})
LENGTH = struct.Struct("!I")
LENGTH_SIZE = LENGTH.size
BATCH_DATAGRAM_BYTES = 16 * 1024
"""The largest BATCH datagram a producer sends (header included).

A lost datagram loses every message it carries: at 16 KiB that is about 240 messages of
64 B, where one datagram's send and receive already cost less than a message's own
Python work on either side (larger datagrams would gain almost nothing and lose more at
once, and need larger contiguous kernel buffers).
"""
BATCH_ENTRIES_BYTES = BATCH_DATAGRAM_BYTES - HEADER_SIZE
"""Bytes of entries (length and payload) one BATCH datagram holds at most."""
_pack_length = LENGTH.pack


def encode(kind: int, sequence: int, payload: bytes = b"") -> bytes:
    """One datagram: header (magic, kind, sequence) and payload."""
    return HEADER.pack(MAGIC, kind, sequence) + payload


def decode(datagram: bytes | bytearray | memoryview) -> tuple[int, int, bytes] | None:
    """Split a datagram into (kind, sequence, payload); None when it is not a valid podipc datagram."""
    if len(datagram) < HEADER_SIZE:
        return None
    magic, kind, sequence = HEADER.unpack_from(datagram)
    if magic != MAGIC or kind not in KINDS:
        return None
    if kind not in PAYLOAD_KINDS and len(datagram) != HEADER_SIZE:
        return None
    payload = bytes(datagram[HEADER_SIZE:])
    if kind == KIND_BATCH and split_batch(payload) is None:
        return None
    return kind, sequence, payload


def encode_batch(sequence: int, messages: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """One BATCH datagram: the header with the first message's sequence number, then each message's entry."""
    entries = b"".join(_pack_length(len(message)) + bytes(message) for message in messages)
    return HEADER.pack(MAGIC, KIND_BATCH, sequence) + entries


def split_batch(entries: bytes) -> list[bytes] | None:
    """The messages of a BATCH datagram's entries (what follows the header), in order; None when malformed.

    Malformed: no entry at all, fewer than 4 bytes left for a length, or a length past the end.
    """
    end = len(entries)
    if not end:
        return None
    unpack = LENGTH.unpack_from
    messages: list[bytes] = []
    append = messages.append
    offset = 0
    try:
        while offset < end:
            start = offset + LENGTH_SIZE
            offset = start + unpack(entries, offset)[0]
            append(entries[start:offset])  # a slice past the end is cut short: the check below sees it
    except struct.error:
        return None
    return messages if offset == end else None
