"""Length-prefix frames: encoding, the FrameReader over arbitrary chunking, and a fuzz of the decoder."""

from __future__ import annotations

import random
import socket
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podipc.errors import EndOfStream, PeerGone, ProtocolError
from podipc.framing import (
    BUFFER_SIZE,
    DIRECT_READ_SIZE,
    END_OF_STREAM,
    HELLO,
    MAX_FRAME_LENGTH,
    RUN_BLOCK_FRAMES,
    FrameReader,
    check_max_message_size,
    encode_frame,
    encode_header,
    end_of_stream_frame,
)

pytestmark = pytest.mark.timeout(60)


class ChunkedSource:
    """A stream that hands out `data` in chunks of the given sizes (cycled), like a socket would."""

    def __init__(self, data: bytes, chunk_sizes: list[int] | None = None, timeouts_at: set[int] | None = None) -> None:
        self.data = data
        self.position = 0
        self.chunk_sizes = [size for size in (chunk_sizes or [len(data) or 1]) if size > 0] or [1]
        self.calls = 0
        self.timeouts_at = timeouts_at or set()

    def _take(self, wanted: int) -> bytes:
        self.calls += 1
        if self.calls in self.timeouts_at:
            raise TimeoutError("simulated timeout")
        size = min(wanted, self.chunk_sizes[self.calls % len(self.chunk_sizes)])
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        chunk = self._take(nbytes or len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        self.last_received = self._take(bufsize)
        return self.last_received


def read_all(reader: FrameReader, source: ChunkedSource) -> list[bytes]:
    """Frames until the end marker."""
    frames = []
    while True:
        try:
            frames.append(reader.read_frame(source))
        except EndOfStream:
            return frames


def stream_of(messages: list[bytes]) -> bytes:
    return b"".join(encode_frame(message) for message in messages) + end_of_stream_frame()


def test_header_is_four_bytes_big_endian_and_the_end_marker_is_reserved() -> None:
    assert encode_header(0x01020304) == b"\x01\x02\x03\x04"
    assert end_of_stream_frame() == b"\xff\xff\xff\xff"
    assert END_OF_STREAM == MAX_FRAME_LENGTH + 1
    assert HELLO == b"PODIPC\x00\x01"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_max_message_size_option_is_checked_against_the_frame_limit() -> None:
    assert check_max_message_size("64MiB") == 64 * 1024 * 1024
    assert check_max_message_size(MAX_FRAME_LENGTH) == MAX_FRAME_LENGTH
    with pytest.raises(ValueError, match="at most"):
        check_max_message_size(END_OF_STREAM)


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096, BUFFER_SIZE])
def test_messages_of_every_size_class_come_out_whole_whatever_the_chunking(chunk: int) -> None:
    sizes = [0, 1, 0, 5, 100, DIRECT_READ_SIZE - 1, DIRECT_READ_SIZE, DIRECT_READ_SIZE + 1, 0, 300_000, 3, 0]
    generator = random.Random(chunk)
    messages = [generator.randbytes(size) for size in sizes]
    reader = FrameReader(1 << 20)
    assert read_all(reader, ChunkedSource(stream_of(messages), [chunk])) == messages


def test_many_small_frames_are_parsed_from_one_receive() -> None:
    messages = [bytes([index % 256]) * (index % 50) for index in range(1000)]
    source = ChunkedSource(stream_of(messages))
    reader = FrameReader(1 << 20)
    assert read_all(reader, source) == messages
    assert source.calls < 5


def test_buffered_frame_never_reads_and_returns_complete_frames_only() -> None:
    reader = FrameReader(1 << 20)
    assert reader.buffered_frame() is None
    source = ChunkedSource(encode_frame(b"one") + encode_frame(b"two") + encode_header(10) + b"par")
    assert reader.read_frame(source) == b"one"
    calls = source.calls
    assert reader.buffered_frame() == b"two"
    assert reader.buffered_frame() is None
    assert source.calls == calls
    assert reader.buffered == 7


def test_a_timeout_in_the_middle_of_a_frame_keeps_the_stream_position() -> None:
    small, large = b"s" * 1000, bytes(range(256)) * 1000
    data = stream_of([small, large, b"after"])
    source = ChunkedSource(data, [300], timeouts_at={2, 4, 9, 10, 30})
    reader = FrameReader(1 << 20)
    received: list[bytes] = []
    timeouts = 0
    while True:
        try:
            received.append(reader.read_frame(source))
        except TimeoutError:
            timeouts += 1
        except EndOfStream:
            break
    assert received == [small, large, b"after"]
    assert timeouts >= 3


def test_a_length_above_the_limit_is_a_protocol_error_before_allocating() -> None:
    reader = FrameReader(64 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="announces 4294967294 bytes"):
            reader.read_frame(ChunkedSource(encode_header(MAX_FRAME_LENGTH) + b"xxxx"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_small_frame_above_the_limit_is_refused_even_when_fully_buffered() -> None:
    reader = FrameReader(10)
    with pytest.raises(ProtocolError):
        reader.read_frame(ChunkedSource(encode_frame(b"x" * 11)))


@pytest.mark.parametrize("cut", [0, 2, 4, 10, 4 + DIRECT_READ_SIZE // 2])
def test_the_stream_ending_without_the_marker_is_peer_gone(cut: int) -> None:
    data = encode_frame(b"a" * 6) + encode_frame(b"b" * DIRECT_READ_SIZE)
    reader = FrameReader(1 << 20)
    source = ChunkedSource(data[: 10 + cut])
    assert reader.read_frame(source) == b"a" * 6
    with pytest.raises(PeerGone, match="without ending the stream"):
        reader.read_frame(source)


def test_large_payloads_once_in_large_mode_are_returned_without_copying() -> None:
    frames = [bytes([index]) * (DIRECT_READ_SIZE * 4) for index in range(3)]
    source = ChunkedSource(b"".join(encode_frame(frame) for frame in frames), [BUFFER_SIZE])
    reader = FrameReader(1 << 20)
    assert reader.read_frame(source) == frames[0]
    assert reader.read_frame(source) == frames[1]
    frame = reader.read_frame(source)
    assert frame == frames[2]
    assert frame is source.last_received


def test_reader_over_a_real_socketpair() -> None:
    left, right = socket.socketpair()
    try:
        messages = [b"", b"x" * 70_000, b"hello", b""]
        left.sendall(stream_of(messages))
        reader = FrameReader(1 << 20)
        assert read_all(reader, right) == messages  # type: ignore[arg-type]
    finally:
        left.close()
        right.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.binary(max_size=2000) | st.sampled_from([b"", b"\xff" * 4]), max_size=30),
    chunks=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=10),
    big=st.integers(min_value=0, max_value=3),
)
def test_fuzz_any_messages_any_chunking_round_trip(messages: list[bytes], chunks: list[int], big: int) -> None:
    messages = messages + [bytes([big]) * (DIRECT_READ_SIZE + big * 1000)] * (big > 1)
    reader = FrameReader(1 << 20)
    assert read_all(reader, ChunkedSource(stream_of(messages), chunks)) == messages


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    garbage=st.binary(max_size=3000),
    chunks=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=5),
)
def test_fuzz_garbage_never_crashes_and_never_allocates_by_its_length(garbage: bytes, chunks: list[int]) -> None:
    limit = 4096
    reader = FrameReader(limit, buffer_size=4 + DIRECT_READ_SIZE)
    source = ChunkedSource(garbage, chunks)
    tracemalloc.start()
    try:
        for _ in range(len(garbage) + 2):
            try:
                frame = reader.read_frame(source)
            except (EndOfStream, PeerGone, ProtocolError):
                break
            assert len(frame) <= limit
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_fuzz_decoder_agrees_with_a_naive_decoder() -> None:
    generator = random.Random(7)
    for _ in range(200):
        data = bytearray()
        for _ in range(generator.randint(0, 8)):
            size = generator.choice([0, 1, 4, 17, 300])
            data += struct.pack(">I", size) + generator.randbytes(size)
        cut = generator.randint(0, len(data))
        expected, position = [], 0
        while position + 4 <= cut:
            (size,) = struct.unpack_from(">I", data, position)
            if position + 4 + size > cut:
                break
            expected.append(bytes(data[position + 4 : position + 4 + size]))
            position += 4 + size
        reader = FrameReader(1 << 20)
        source = ChunkedSource(bytes(data[:cut]), [generator.randint(1, 50)])
        got = []
        with pytest.raises(PeerGone):
            while True:
                got.append(reader.read_frame(source))
        assert got == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(
        st.tuples(st.sampled_from([0, 1, 3, 64, 65, 320, 64 + 256, 64 + 65536, 2000]), st.integers(1, 60)),
        max_size=12,
    ),
    chunks=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=6),
)
def test_runs_of_equal_lengths_are_cut_whole_and_in_order_whatever_the_chunking(
    runs: list[tuple[int, int]], chunks: list[int]
) -> None:
    # lengths whose headers differ in one byte only (64, 320, 64 + 65536) catch a run cut too long
    generator = random.Random(len(runs))
    messages = [generator.randbytes(length) for length, count in runs for _ in range(count)]
    reader = FrameReader(1 << 20)
    assert read_all(reader, ChunkedSource(stream_of(messages), chunks)) == messages


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 64, 320, 64 + 256]),
            st.sampled_from([RUN_BLOCK_FRAMES - 1, RUN_BLOCK_FRAMES, RUN_BLOCK_FRAMES + 1, 3 * RUN_BLOCK_FRAMES + 7]),
        ),
        min_size=1,
        max_size=5,
    ),
    chunks=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=4),
)
def test_runs_longer_than_a_block_are_cut_whole_and_in_order(runs: list[tuple[int, int]], chunks: list[int]) -> None:
    # RUN_BLOCK_FRAMES payloads per unpack, the rest of the run one by one: each boundary and each frame in order
    generator = random.Random(len(runs))
    messages = [generator.randbytes(length) for length, count in runs for _ in range(count)]
    reader = FrameReader(1 << 20)
    assert read_all(reader, ChunkedSource(stream_of(messages), chunks)) == messages


CUT_CPU_SECONDS_LIMIT = 2.0
"""Cutting a full buffer of tiny frames takes ~0.03 s of CPU; scanning the buffer once per frame took ~26 s."""


def test_a_full_buffer_of_frames_of_alternating_lengths_is_cut_in_time_linear_in_its_frames() -> None:
    # no two neighbours have one length: each frame is a run of 1 (fan-in consumers read such buffers whole)
    messages = [b"x" * (index % 2) for index in range(BUFFER_SIZE // 5)]
    reader = FrameReader(1 << 20)
    started = time.process_time()
    got = [reader.read_frame(ChunkedSource(stream_of(messages))), *reader.buffered_frames(len(messages))]
    spent = time.process_time() - started
    assert got == messages
    assert spent < CUT_CPU_SECONDS_LIMIT, f"{len(messages)} frames cut in {spent:.1f} s of CPU"


def test_buffered_frames_hands_out_at_most_max_count_in_order_and_never_reads() -> None:
    messages = [bytes([index]) * (index % 7) for index in range(50)]
    source = ChunkedSource(b"".join(encode_frame(message) for message in messages) + encode_header(10) + b"par")
    reader = FrameReader(1 << 20)
    assert reader.buffered_frames(10) == []
    assert reader.read_frame(source) == messages[0]
    calls = source.calls
    assert reader.buffered_frames(0) == []  # and keeps every frame (it once dropped them all)
    assert reader.buffered_frames(10) == messages[1:11]
    assert reader.buffered_frame() == messages[11]
    assert reader.buffered_frames(1000) == messages[12:]
    assert reader.buffered_frames(1000) == []
    assert source.calls == calls
    assert reader.buffered == 7
