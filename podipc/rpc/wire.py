"""The request/reply wire: a hello, then length-prefixed frames both ways, each opening with a call header.

    client -> server   HELLO (8 bytes: b"PODRPC" + version 0x0001)
    server -> client   HELLO back (accepted)
    both ways          frames: 4-byte big-endian length, then that many bytes (podipc.framing),
                       each frame = a 16-byte call header + the body:
                         version  u8   1
                         kind     u8   1 request, 2 reply, 3 error (the body: UTF-8 text)
                         flags    u16  0 (reserved)
                         call id  u64  chosen by the client, unique among its calls in flight
                         deadline u32  request: milliseconds the client still waits (0: no limit);
                                       0 in replies
    client -> server   END_OF_STREAM (the length 0xFFFFFFFF) on a clean close, or just the close

A relative deadline (gRPC's grpc-timeout) needs no shared clock: the server counts it
from the request's arrival. The hello differs from the stream channels' (b"PODIPC"), so
a producer that connects to a server (or a client to a consumer) is refused at once.
docs/wire/rpc.md has the same with a plain-socket client.
"""

from __future__ import annotations

import struct

from podipc.errors import ProtocolError
from podipc.framing import HEADER, MAX_FRAME_LENGTH

VERSION = 1
HELLO = b"PODRPC" + VERSION.to_bytes(2, "big")
"""What a client sends first and a server answers to accept it."""

REQUEST = 1
REPLY = 2
ERROR = 3
KINDS = {REQUEST: "request", REPLY: "reply", ERROR: "error"}

CALL_HEADER = struct.Struct(">BBHQI")
"""version, kind, flags, call id, deadline in milliseconds."""
CALL_HEADER_SIZE = CALL_HEADER.size
FRAME_PREFIX = struct.Struct(">IBBHQI")
"""The frame's length and the call header in one pack."""
MAX_DEADLINE_MS = 0xFFFFFFFF
"""The largest deadline the header carries (49.7 days); longer timeouts are sent as this."""
MAX_CALL_ID = 0xFFFFFFFFFFFFFFFF
MAX_BODY = MAX_FRAME_LENGTH - CALL_HEADER_SIZE
"""The largest body a frame can carry."""

_pack_prefix = FRAME_PREFIX.pack
_pack_header = CALL_HEADER.pack
_unpack_header = CALL_HEADER.unpack_from
assert FRAME_PREFIX.size == HEADER.size + CALL_HEADER_SIZE


def deadline_ms(seconds: float | None) -> int:
    """The deadline field for `seconds` left (None: 0, no limit); at least 1 ms, at most MAX_DEADLINE_MS."""
    if seconds is None:
        return 0
    return max(1, min(MAX_DEADLINE_MS, int(seconds * 1000 + 0.999)))


def frame_prefix(kind: int, call_id: int, body_size: int, deadline: int = 0) -> bytes:
    """The frame length and call header that go before a body of `body_size` bytes."""
    return _pack_prefix(CALL_HEADER_SIZE + body_size, VERSION, kind, 0, call_id, deadline)


def call_header(kind: int, call_id: int, deadline: int = 0) -> bytes:
    """The call header alone: what opens a message on a transport that keeps boundaries (shm://'s rings)."""
    return _pack_header(VERSION, kind, 0, call_id, deadline)


def encode_frame(kind: int, call_id: int, body: bytes | bytearray | memoryview, deadline: int = 0) -> bytes:
    """One whole frame: length, call header, body."""
    return frame_prefix(kind, call_id, memoryview(body).nbytes, deadline) + bytes(body)


def decode(frame: bytes, where: str) -> tuple[int, int, int, bytes]:
    """(kind, call id, deadline ms, body) of a frame's payload; ProtocolError for anything that is not one."""
    if len(frame) < CALL_HEADER_SIZE:
        raise ProtocolError(
            f"{where}: a frame of {len(frame)} bytes is shorter than the {CALL_HEADER_SIZE}-byte call header; "
            "the peer does not speak podipc request/reply"
        )
    version, kind, flags, call_id, deadline = _unpack_header(frame)
    if version != VERSION or kind not in KINDS or flags:
        raise ProtocolError(
            f"{where}: a call header says version {version}, kind {kind}, flags {flags}; "
            f"expected version {VERSION}, kind 1-3, flags 0 (the peer speaks another version, or not podipc)"
        )
    return kind, call_id, deadline, frame[CALL_HEADER_SIZE:]
