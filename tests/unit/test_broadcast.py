"""The broadcast ring's header (shm://?pattern=broadcast): encoding, checked decoding, the pattern mismatch."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import struct

import pytest

import podipc
from podipc.errors import ProtocolError
from podipc.presence import peer_role, subscriber_role
from podipc.transports.shm import broadcast_layout as bl
from podipc.transports.shm import layout
from podipc.transports.shm.options import parse_pattern, parse_slow, parse_subscribers

CAPACITY = 4096


def header(slots: int = 2, slow: int = bl.SLOW_WAIT) -> bytearray:
    return bytearray(bl.encode_header(CAPACITY, 2048, slots, slow))


def segment(slots: int = 2) -> bytearray:
    return header(slots) + bytearray(CAPACITY)


def test_a_new_header_decodes_to_what_was_encoded() -> None:
    decoded = bl.decode_header(segment(3), bl.segment_size(CAPACITY, 3))
    assert decoded == bl.BroadcastHeader(CAPACITY, 2048, 3, bl.SLOW_WAIT, 256 + 3 * 64, 0, False)


def test_a_subscriber_reading_a_pair_ring_is_told_it_is_a_pair_ring() -> None:
    pair = layout.encode_header(CAPACITY, 2048) + bytes(CAPACITY)
    with pytest.raises(ProtocolError, match="pair ring"):
        bl.decode_header(pair, len(pair))


def test_a_pair_side_reading_a_broadcast_ring_is_told_it_is_a_broadcast_ring() -> None:
    with pytest.raises(ProtocolError, match="broadcast ring"):
        layout.decode_header(segment(), bl.segment_size(CAPACITY, 2))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (32, struct.pack("<I", 0), "subscriber slots"),
        (32, struct.pack("<I", 65), "subscriber slots"),
        (36, struct.pack("<I", 7), "slow policy"),
        (12, struct.pack("<I", 999), "header size"),
        (64, struct.pack("<Q", 3), "write index"),
        (256 + 8, struct.pack("<Q", 9), "slot 0 is garbage"),
        (256 + 64, struct.pack("<Q", 8), "slot 1 is garbage"),
    ],
)
def test_a_crafted_header_is_a_protocol_error_naming_what_is_wrong(offset: int, value: bytes, message: str) -> None:
    data = segment()
    data[offset : offset + len(value)] = value
    with pytest.raises(ProtocolError, match=message):
        bl.decode_header(data, len(data))


def test_a_segment_too_small_for_its_ring_is_a_protocol_error() -> None:
    data = segment()
    with pytest.raises(ProtocolError, match="does not fit"):
        bl.decode_header(data, len(data) - 8)


def test_random_garbage_never_raises_anything_but_protocol_error() -> None:
    generator = random.Random(14)
    base = segment()
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(generator.randint(1, 8)):
            position = generator.randrange(0, 400)
            data[position] = generator.randrange(256)
        with contextlib.suppress(ProtocolError):
            bl.decode_header(data, generator.choice((len(data), len(data) - 8, 100)))


def test_a_subscriber_refuses_a_crafted_live_segment_without_a_traceback() -> None:
    name = f"podipc-bcast-unit-{os.getpid()}"
    path = f"/dev/shm/{name}"
    data = segment()
    data[256 + 8 : 256 + 16] = struct.pack("<Q", 77)  # slot 0's state: garbage
    with open(path, "wb") as file:
        file.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live producer holds it
        with pytest.raises(ProtocolError, match="slot 0 is garbage"):
            podipc.consumer(f"shm:///{name}?pattern=broadcast&wait=2")  # joins at open: refused there
    finally:
        os.close(fd)
        os.unlink(path)


def test_the_options_accept_their_values_and_refuse_others() -> None:
    assert (parse_pattern("Broadcast"), parse_slow("drop"), parse_subscribers("4")) == ("broadcast", "drop", 4)
    for parse, value in ((parse_pattern, "fanout"), (parse_slow, "block"), (parse_subscribers, "65")):
        with pytest.raises(ValueError, match="must be"):
            parse(value)


def test_a_subscriber_role_watches_the_producer() -> None:
    assert peer_role(subscriber_role(3)) == "producer"
    assert peer_role("consumer") == "producer"
    with pytest.raises(ValueError, match="role must be"):
        peer_role("subscriber.x")
