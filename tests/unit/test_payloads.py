"""Generated messages are reproducible from (seed, index); the summary digests payloads in order."""

from __future__ import annotations

import hashlib
import io

from podipc.payloads import StreamSummary, fixed_message, generated_messages, random_message, stdin_chunks


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


def test_stdin_is_cut_into_chunks() -> None:
    assert list(stdin_chunks(io.BytesIO(b"abcdefg"), 3)) == [b"abc", b"def", b"g"]


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
