"""podipc.stream_broadcast's pieces: the loss notice on the wire, the options, the pattern check."""

from __future__ import annotations

import socket
import threading

import pytest

import podipc
from podipc.address import parse_address
from podipc.channel import check_pattern
from podipc.framing import LOSS_COUNT, LOSS_NOTICE, encode_frame, end_of_stream_frame
from podipc.stream import MAX_SUBSCRIBERS, parse_slow, parse_subscribers
from podipc.stream_broadcast import _BroadcastReader, _LossNotice, loss_notice


def test_a_loss_notice_is_the_reserved_length_then_an_8_byte_count_frame() -> None:
    assert loss_notice(7) == LOSS_NOTICE.to_bytes(4, "big") + encode_frame(LOSS_COUNT.pack(7))


def write_in_pieces(connection: socket.socket, stream: bytes, piece: int) -> None:
    """Send `stream` `piece` bytes at a time, then hang up the writing side."""
    for start in range(0, len(stream), piece):
        connection.sendall(stream[start : start + piece])
    connection.shutdown(socket.SHUT_WR)


def test_the_reader_hands_out_frames_around_a_loss_notice_in_order_whatever_the_reads_cut() -> None:
    stream = (
        encode_frame(b"a") + encode_frame(b"b" * 40_000) + loss_notice(3) + encode_frame(b"c") + end_of_stream_frame()
    )
    for piece in (1, 3, 7, 1000, len(stream)):  # the notice split anywhere across reads
        left, right = socket.socketpair()
        with left, right:
            reader = _BroadcastReader(1 << 20, "test")
            taken: list[object] = []
            writer = threading.Thread(target=write_in_pieces, args=(right, stream, piece))
            writer.start()
            while True:
                try:
                    taken.append(reader.read_frame(left))
                except _LossNotice:
                    taken.append("notice")
                except podipc.EndOfStream:
                    break
            writer.join(10)
            assert taken == [b"a", b"b" * 40_000, "notice", LOSS_COUNT.pack(3), b"c"]


def test_the_broadcast_options_accept_their_values_and_refuse_others() -> None:
    assert parse_subscribers("4") == 4
    assert parse_slow(" Drop ") == "drop"
    for wrong in ("0", str(MAX_SUBSCRIBERS + 1), "two"):
        with pytest.raises(ValueError):
            parse_subscribers(wrong)
    with pytest.raises(ValueError):
        parse_slow("block")


@pytest.mark.parametrize("url", ["unix://@x?pattern=broadcast", "tcp://127.0.0.1:7000?pattern=broadcast&slow=drop"])
def test_the_stream_sockets_take_pattern_broadcast(url: str) -> None:
    check_pattern(parse_address(url), {})


def test_a_pair_endpoint_refuses_the_broadcast_options() -> None:
    with pytest.raises(podipc.AddressError, match="pattern=broadcast only"):
        podipc.consumer("unix://@podipc-unit-pair?slow=drop")
