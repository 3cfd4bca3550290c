"""Generated messages are reproducible from (seed, index); framing cuts input into messages and writes them
back exactly; the summary digests payloads in order."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
from collections.abc import Iterator

import pytest

from podipc.errors import MessageTooLarge, ProtocolError
from podipc.payloads import (
    LENGTH_PREFIX,
    Framing,
    MessageWriter,
    RateLimiter,
    StreamSummary,
    fixed_message,
    generated_messages,
    random_message,
    read_messages,
)
from podipc.waking import Waker


def test_fixed_messages_have_the_size_and_carry_their_index() -> None:
    assert fixed_message(5, 0) == b""
    assert fixed_message(5, 3) == b"\x00\x00\x00"
    message = fixed_message(258, 10000)
    assert len(message) == 10000 and message[:8] == (258).to_bytes(8, "big")


def test_random_messages_are_reproducible_and_within_the_size() -> None:
    first = [random_message(7, index, 1000) for index in range(50)]
    assert first == [random_message(7, index, 1000) for index in range(50)]
    assert all(len(message) <= 1000 for message in first)
    assert len({len(message) for message in first}) > 10
    assert first != [random_message(8, index, 1000) for index in range(50)]


def test_a_resumed_stream_continues_the_same_messages() -> None:
    whole = list(generated_messages(20, 100, True, 3))
    assert whole[:7] + list(generated_messages(20, 100, True, 3, start=7)) == whole


def too_large(size: int) -> MessageTooLarge:
    return MessageTooLarge(size, 100, "the test's limit")


def framed(data: bytes, framing: Framing, chunk_size: int = 65536, max_size: int = 1 << 20) -> list[bytes]:
    """The messages read_messages() cuts from `data`, written into a pipe by another thread in small pieces."""
    read_end, write_end = os.pipe()

    def write() -> None:
        with os.fdopen(write_end, "wb", buffering=0) as pipe:
            for start in range(0, len(data), 4093):  # pieces that split lines, headers and frames
                pipe.write(data[start : start + 4093])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return list(read_messages(read_end, framing, chunk_size=chunk_size, max_size=max_size, too_large=too_large))
    finally:
        writer.join()
        os.close(read_end)


def written(messages: list[bytes], framing: Framing) -> bytes:
    stream = io.BytesIO()
    writer = MessageWriter(stream, framing)
    for message in messages:
        writer.write(message)
    writer.flush()
    return stream.getvalue()


def test_lines_are_one_message_each_without_their_newline() -> None:
    text = b'{"level": "info", "msg": "a"}\n\n{"level": "warn"}\r\nno newline at the end'
    assert framed(text, Framing.LINES) == [
        b'{"level": "info", "msg": "a"}',
        b"",
        b'{"level": "warn"}\r',
        b"no newline at the end",
    ]


@pytest.mark.parametrize("framing", list(Framing))
def test_what_is_read_with_a_framing_is_written_back_exactly(framing: Framing) -> None:
    generator = random.Random(3)
    if framing is Framing.LINES:
        lines = [generator.randbytes(generator.randint(0, 3000)).replace(b"\n", b".") for _ in range(300)]
        data = b"".join(line + b"\n" for line in lines)
    elif framing is Framing.LENGTH:
        payloads = [generator.randbytes(generator.randint(0, 3000)) for _ in range(300)] + [b"", b"\n\n"]
        data = b"".join(LENGTH_PREFIX.pack(len(payload)) + payload for payload in payloads)
    else:
        data = generator.randbytes(200_000)
    messages = framed(data, framing, chunk_size=1000)
    assert written(messages, framing) == data
    if framing is Framing.RAW:
        assert all(0 < len(message) <= 1000 for message in messages)


def test_a_line_longer_than_the_limit_fails_before_it_is_buffered_whole() -> None:
    with pytest.raises(MessageTooLarge, match="> the test's limit 100"):
        framed(b"x" * 101 + b"\n", Framing.LINES, max_size=100)
    with pytest.raises(MessageTooLarge):
        framed(b"y" * 5000, Framing.LINES, max_size=100)  # no newline at all: refused, not buffered forever


def test_a_length_prefix_above_the_limit_fails_at_once() -> None:
    with pytest.raises(MessageTooLarge, match="4294967295 bytes"):
        framed(LENGTH_PREFIX.pack(2**32 - 1), Framing.LENGTH, max_size=100)


def test_length_framed_input_cut_inside_a_message_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="ended inside a length-prefixed message"):
        framed(LENGTH_PREFIX.pack(10) + b"short", Framing.LENGTH)


def test_each_line_is_handed_on_as_soon_as_it_is_read() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"first\n")
    messages = read_messages(read_end, Framing.LINES, max_size=100, too_large=too_large)
    try:
        assert next(messages) == b"first"  # the pipe stays open and holds nothing more: no wait for more
        os.write(write_end, b"sec")
        os.write(write_end, b"ond\nthird")
        assert next(messages) == b"second"
        os.close(write_end)
        assert list(messages) == [b"third"]
    finally:
        os.close(read_end)


def test_reading_stops_when_the_stop_descriptor_is_woken() -> None:
    read_end, write_end = os.pipe()
    stop = Waker()
    messages: Iterator[bytes] = read_messages(
        read_end, Framing.LINES, max_size=100, too_large=too_large, stop_fd=stop.fileno()
    )
    threading.Timer(0.2, stop.wake).start()
    started = time.monotonic()
    try:
        assert list(messages) == []
        assert time.monotonic() - started < 2
    finally:
        stop.close()
        os.close(read_end)
        os.close(write_end)


def test_the_rate_limiter_stops_waiting_when_its_sleep_says_so() -> None:
    slept: list[float] = []
    limiter = RateLimiter(0.5, sleep=lambda seconds: slept.append(seconds) or True)
    limiter.wait()
    limiter.wait()
    assert slept and slept[0] > 1


def test_summary_digests_the_concatenated_payloads() -> None:
    summary = StreamSummary("consumer", "mq:///x")
    for payload in (b"ab", b"", b"c"):
        summary.add(payload)
    assert summary.as_dict(extra=1) == {
        "role": "consumer",
        "url": "mq:///x",
        "messages": 3,
        "bytes": 3,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
        "extra": 1,
    }
