"""udp:// BATCH datagrams (issue 13): send_many and coalesced sends, the BATCH-OK rule, the consumer's side.

What is observed: what arrives (whole, in order, sha256 of the stream), the consumer's loss
accounting, and which datagrams carried it (the consumer's BATCH handler wrapped to count).
A plain socket plays the producer where a test needs datagrams podipc would never send.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import podipc
from podipc.transports.udp import wire as udp_wire
from tests.unit.test_udp import doc_script

pytestmark = pytest.mark.timeout(60)

PORTS = itertools.count(17200)
COUNT = 20_000
MODES = ("send_many", "send")

PRODUCER = """
import json, sys, time, podipc
url, mode, count, linger = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
messages = [(index.to_bytes(4, "big") * 60)[: 4 + index % 200] for index in range(count)]
with podipc.producer(url) as channel:
    channel.send(messages[0])
    time.sleep(0.2)  # the consumer takes message 0 and answers the HELLO meanwhile
    if mode == "send_many":
        for start in range(1, count, 1000):
            channel.send_many(messages[start : start + 1000])
    else:
        send = channel.send
        for message in messages[1:]:
            send(message)
    print(json.dumps({"sent": count, "takes_batches": channel._takes_batches}), flush=True)
    time.sleep(linger)
"""


def udp_url(**options: object) -> str:
    """A fresh udp:// URL in this file's port range (17200-17239)."""
    port = next(PORTS)
    assert port < 17240, "this file's port range is used up: give it more"
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"udp://127.0.0.1:{port}" + (f"?{query}" if query else "")


def message(index: int) -> bytes:
    """The PRODUCER script's message `index` (4 to 203 bytes, starting with its index)."""
    return (index.to_bytes(4, "big") * 60)[: 4 + index % 200]


def digest(messages: list[bytes]) -> str:
    """sha256 of a stream of messages, each behind its length."""
    hashed = hashlib.sha256()
    for payload in messages:
        hashed.update(len(payload).to_bytes(4, "big"))
        hashed.update(payload)
    return hashed.hexdigest()


def start_producer(url: str, mode: str, count: int = COUNT, linger: float = 0.0) -> subprocess.Popen[bytes]:
    """Run the PRODUCER script in its own process."""
    args = [sys.executable, "-c", PRODUCER, url, mode, str(count), str(linger)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def producer_report(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The PRODUCER script's line after sending (fails with its stderr when it died)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.stderr.read().decode() if process.stderr else "no output"
    report: dict[str, Any] = json.loads(line)
    return report


def finish(process: subprocess.Popen[bytes]) -> None:
    """Wait for a helper process; fail with its stderr when it failed."""
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()


class BatchCount:
    """Counts the BATCH datagrams a consumer takes, and the messages they carried."""

    def __init__(self, consumer: Any) -> None:
        self.datagrams = 0
        self.messages = 0
        take_batch = consumer._take_batch

        def counting(size: int) -> bytes | None:
            first = take_batch(size)
            if first is not None:
                self.datagrams += 1
                self.messages += 1 + len(consumer._pending)
            return first

        consumer._take_batch = counting


@contextmanager
def attached_pair(url: str) -> Iterator[tuple[Any, Any]]:
    """A producer and a consumer in this process, past the handshake ("first" sent and taken); both freed after."""
    consumer: Any = podipc.consumer(url)
    producer: Any = podipc.producer(url)
    try:
        producer.send(b"first")  # attached through the consumer's presence file: no answer read yet
        assert consumer.recv(timeout=10) == b"first"  # answers the HELLO: BATCH-OK, HELLO-ACK
        yield producer, consumer
    finally:
        producer.abort()
        consumer.close()


@pytest.fixture
def plain_producer() -> Iterator[Any]:
    """A consumer here, and a plain socket that said HELLO to it (what it answered: the reply kinds, in order)."""
    consumer: Any = podipc.consumer(udp_url())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("127.0.0.1", consumer.address.port))
        sock.settimeout(10)
        sock.send(udp_wire.encode(udp_wire.KIND_HELLO, 0))
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.05)  # reads the HELLO and answers it
        replies = [sock.recv(64), sock.recv(64)]
        yield consumer, sock, [reply[2] for reply in replies]
    finally:
        sock.close()
        consumer.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_arrives_whole_and_in_order_mostly_in_batch_datagrams(mode: str) -> None:
    url = udp_url()
    with podipc.consumer(url) as consumer:
        batches = BatchCount(consumer)
        producer = start_producer(url, mode)
        received = list(consumer)
        report = producer_report(producer)
        finish(producer)
        assert (consumer.lost, consumer.skipped, consumer.late) == (0, 0, 0)
    expected = [message(index) for index in range(COUNT)]
    assert len(received) == COUNT and digest(received) == digest(expected)
    assert received == expected
    assert report["takes_batches"] is True
    assert batches.messages > COUNT // 2, f"{batches.messages} of {COUNT} messages came in BATCH datagrams"
    assert batches.datagrams < COUNT // 20


@pytest.mark.parametrize("mode", MODES)
def test_a_tiny_receive_buffer_loses_whole_batches_and_counts_every_message_lost(mode: str) -> None:
    url = udp_url(rcvbuf=4096)
    with podipc.consumer(url) as consumer:
        batches = BatchCount(consumer)
        producer = start_producer(url, mode)
        first = consumer.recv(timeout=10)  # the handshake is done; the rest overflows the buffer unread
        assert producer_report(producer)["sent"] == COUNT
        received = [first, *consumer]
        finish(producer)
        assert consumer.lost > 0
        assert batches.datagrams > 0 or mode == "send"  # a burst's first sends may leave as DATA, and fill it
        assert len(received) + consumer.lost == COUNT
        assert (consumer.skipped, consumer.late) == (0, 0)
    indices = [int.from_bytes(payload[:4], "big") for payload in received]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert digest(received) == digest([message(index) for index in indices])


def test_a_lone_send_leaves_within_the_call() -> None:
    with attached_pair(udp_url()) as (producer, consumer):
        producer.send_many([b"learn", b"batch-ok"])  # reads the consumer's replies: BATCH from now on
        assert consumer.recv_many(2, timeout=10) == [b"learn", b"batch-ok"]
        assert producer._takes_batches is True
        for index in range(20):
            time.sleep(0.01)
            producer.send(message(index))
            assert consumer.try_recv() == message(index)  # no flusher, no flush: it is in the socket already


def test_the_last_messages_of_a_burst_arrive_without_flush_or_close() -> None:
    url = udp_url()
    with podipc.consumer(url) as consumer:
        producer = start_producer(url, "send", count=5000, linger=20)
        try:
            received = [consumer.recv(timeout=10) for _ in range(5000)]
            assert received == [message(index) for index in range(5000)]
        finally:
            producer.kill()
            producer.wait()


def test_coalesce_false_sends_every_message_as_data_but_send_many_still_batches() -> None:
    with attached_pair(udp_url(coalesce="false")) as (producer, consumer):
        batches = BatchCount(consumer)
        producer.send_many([message(index) for index in range(100)])
        assert consumer.recv_many(100, timeout=10) == [message(index) for index in range(100)]
        assert batches.datagrams == 1
        for index in range(2000):
            producer.send(message(index))
        received = consumer.recv_many(2000, timeout=10)
        while len(received) < 2000:
            received += consumer.recv_many(2000, timeout=10)
        assert received == [message(index) for index in range(2000)]
        assert batches.datagrams == 1


def test_the_plain_consumer_from_the_docs_gets_every_message_as_data(tmp_path: Path) -> None:
    url = udp_url()
    script = tmp_path / "consumer.py"
    script.write_text(doc_script("plain_udp_consumer.py"))
    plain = subprocess.Popen(
        [sys.executable, str(script), "127.0.0.1", str(podipc.parse_address(url).port)], stdout=subprocess.PIPE
    )
    messages = [message(index) for index in range(100)]  # what a plain consumer's default buffer holds
    with podipc.producer(url) as producer:
        producer.send_many(messages[:40])
        send = producer.send
        for payload in messages[40:]:
            send(payload)
        assert producer._takes_batches is False
    out, _ = plain.communicate(timeout=20)
    assert plain.returncode == 0
    assert json.loads(out) == {"messages": [len(payload) for payload in messages], "lost": 0}


@pytest.mark.parametrize("mode", MODES)
def test_a_consumer_that_answers_without_batch_ok_gets_only_data(mode: str) -> None:
    url = udp_url()
    with podipc.consumer(url) as consumer:
        consumer._say_hello_back = lambda: consumer._reply(udp_wire.KIND_HELLO_ACK)  # as podipc before BATCH
        batches = BatchCount(consumer)
        producer = start_producer(url, mode, count=3000)
        received = list(consumer)
        report = producer_report(producer)
        finish(producer)
        assert (consumer.lost, consumer.skipped) == (0, 0)
    assert received == [message(index) for index in range(3000)]
    assert report["takes_batches"] is False
    assert batches.datagrams == 0


def test_a_producer_attached_through_presence_learns_batch_ok_from_the_replies() -> None:
    with attached_pair(udp_url()) as (producer, consumer):
        batches = BatchCount(consumer)
        assert producer._takes_batches is None
        producer.send_many([message(index) for index in range(50)])
        assert producer._takes_batches is True
        assert consumer.recv_many(50, timeout=10) == [message(index) for index in range(50)]
        assert batches.datagrams == 1


def test_the_consumer_says_batch_ok_before_its_hello_ack(plain_producer: Any) -> None:
    _, _, replies = plain_producer
    assert replies == [udp_wire.KIND_BATCH_OK, udp_wire.KIND_HELLO_ACK]


def test_malformed_and_late_batches_are_skipped_and_counted_and_later_messages_delivered(plain_producer: Any) -> None:
    consumer, sock, _ = plain_producer
    header = udp_wire.HEADER.pack
    for datagram in (
        udp_wire.encode(udp_wire.KIND_DATA, 0, b"zero"),
        header(b"pu", udp_wire.KIND_BATCH, 1) + b"\x00\x00",  # a length cut short
        header(b"pu", udp_wire.KIND_BATCH, 1) + b"\x00\x00\x00\x09abc",  # a length past the end
        header(b"pu", udp_wire.KIND_BATCH, 1),  # no entry
        udp_wire.encode_batch(1, [b"one", b"", b"three"]),
        udp_wire.encode(udp_wire.KIND_DATA, 4, b"four"),
        header(b"pu", udp_wire.KIND_BATCH, 5)
        + udp_wire.LENGTH.pack(1)
        + b"five"
        + udp_wire.LENGTH.pack(0),  # a length short
        udp_wire.encode(udp_wire.KIND_DATA, 7, b"seven"),
        udp_wire.encode_batch(2, [b"late", b"late"]),  # a duplicate: messages 2 and 3 again
        udp_wire.encode_batch(6, [b"six", b"seven", b"eight"]),  # only a forger overlaps: 8 is new
        udp_wire.encode(udp_wire.KIND_EOS, 9),
    ):
        sock.send(datagram)
    assert list(consumer) == [b"zero", b"one", b"", b"three", b"four", b"seven", b"eight"]
    assert (consumer.skipped, consumer.lost, consumer.late) == (4, 2, 4)


def test_poll_try_recv_and_recv_many_serve_a_batch_in_order(plain_producer: Any) -> None:
    consumer, sock, _ = plain_producer
    batch = [bytes([index]) * index for index in range(6)]
    sock.send(udp_wire.encode_batch(0, batch))
    sock.send(udp_wire.encode(udp_wire.KIND_DATA, 6, b"data"))
    assert consumer.poll(timeout=10)
    assert consumer.try_recv() == batch[0]
    assert consumer._readiness()[2] == 0  # messages are waiting: ready now, whatever the socket says
    assert consumer.recv_many(3) == batch[1:4]
    assert consumer.recv(timeout=0) == batch[4]
    assert consumer.recv_many(10, timeout=10) == [batch[5], b"data"]
    assert consumer._readiness()[2] is None


def test_an_aio_consumer_takes_batches() -> None:
    url = udp_url()

    async def receive() -> list[bytes]:
        async with podipc.aio.consumer(url) as inbox:
            producer = start_producer(url, "send_many", count=3000)
            received = [message async for message in inbox]
            finish(producer)
            return received

    assert asyncio.run(receive()) == [message(index) for index in range(3000)]


def test_close_from_another_thread_wakes_a_consumer_blocked_after_a_batch(plain_producer: Any) -> None:
    consumer, sock, _ = plain_producer
    sock.send(udp_wire.encode_batch(0, [b"a", b"b", b"c"]))
    assert [consumer.recv(timeout=10) for _ in range(3)] == [b"a", b"b", b"c"]
    closer = threading.Timer(0.2, consumer.close)
    closer.start()
    started = time.monotonic()
    with pytest.raises(podipc.ChannelClosed):
        consumer.recv()
    assert time.monotonic() - started < 2
    closer.join()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_every_encoded_batch_decodes_and_splits_into_its_messages(sequence: int, messages: list[bytes]) -> None:
    datagram = udp_wire.encode_batch(sequence, messages)
    assert udp_wire.decode(datagram) == (udp_wire.KIND_BATCH, sequence, datagram[udp_wire.HEADER_SIZE :])
    assert udp_wire.split_batch(datagram[udp_wire.HEADER_SIZE :]) == messages


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_entries_split_only_when_their_lengths_end_exactly_at_the_end(entries: bytes) -> None:
    messages = udp_wire.split_batch(entries)
    if messages is not None:
        assert messages and udp_wire.encode_batch(0, messages)[udp_wire.HEADER_SIZE :] == entries
