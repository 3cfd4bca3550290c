"""The contract every channel keeps, run over every scheme with producer and consumer in separate processes."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time

import pytest

import podipc
from podipc.address import parse_address
from podipc.channel import channel_class

from .harness import (
    CONTEXT,
    RELIABLE,
    SCHEMES,
    Pair,
    SideResult,
    leftovers,
    mixed_sizes,
    pace_for,
    payload,
    run_consumer,
    url_for,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


@functools.cache
def host_limits() -> dict[str, int]:
    """The largest message each scheme carries on this host."""
    return {row.scheme: row.max_message_size or 0 for row in podipc.channels()}


def max_size(scheme: str) -> int:
    return host_limits()["unix" if scheme == "unix-abstract" else scheme]


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    row = {row.scheme: row for row in podipc.channels()}["unix" if name == "unix-abstract" else name]
    if not row.usable:
        pytest.fail(f"{name} is not usable on this host: {row.reason}")
    return name


def assert_no_leftovers(url: str) -> None:
    assert wait_until(lambda: not leftovers(url), 5), f"left behind: {leftovers(url)}"


def assert_same_stream(produced: SideResult, consumed: SideResult, scheme: str) -> None:
    assert produced.ok, f"producer failed: {produced.error_type}: {produced.error}"
    assert consumed.ok, f"consumer failed: {consumed.error_type}: {consumed.error}"
    assert consumed.out_of_order == 0
    if scheme == "udp":
        assert consumed.messages + consumed.lost == produced.messages
        assert consumed.lost <= produced.messages // 100, f"udp lost {consumed.lost} of {produced.messages}"
        if consumed.lost:
            return
    assert (consumed.messages, consumed.bytes, consumed.sha256) == (produced.messages, produced.bytes, produced.sha256)


def test_ten_thousand_mixed_size_messages_arrive_whole_and_in_order(scheme: str) -> None:
    url = url_for(scheme)
    sizes = mixed_sizes(10_000, max_size(scheme), seed=len(scheme))
    assert 0 in sizes and max_size(scheme) in sizes
    produced, consumed = Pair(url, sizes, consumer_first=True, pace=pace_for(scheme)).run()
    assert_same_stream(produced, consumed, scheme)
    assert produced.messages == 10_000
    assert_no_leftovers(url)


def test_producer_started_first_waits_for_the_consumer(scheme: str) -> None:
    url = url_for(scheme)
    sizes = mixed_sizes(300, min(max_size(scheme), 4096), seed=1)
    produced, consumed = Pair(url, sizes, consumer_first=False, delay=1.0, pace=pace_for(scheme)).run()
    assert_same_stream(produced, consumed, scheme)
    assert_no_leftovers(url)


def test_consumer_started_first_waits_for_the_producer(scheme: str) -> None:
    url = url_for(scheme)
    sizes = mixed_sizes(300, min(max_size(scheme), 4096), seed=2)
    produced, consumed = Pair(url, sizes, consumer_first=True, delay=1.0, pace=pace_for(scheme)).run()
    assert_same_stream(produced, consumed, scheme)
    assert_no_leftovers(url)


def test_zero_length_messages_are_data_not_the_end(scheme: str) -> None:
    url = url_for(scheme)
    produced, consumed = Pair(url, [0, 0, 5, 0], pace=pace_for(scheme)).run()
    assert_same_stream(produced, consumed, scheme)
    assert consumed.messages == 4 and consumed.bytes == 5


def test_consumer_without_producer_fails_after_the_wait_timeout(scheme: str) -> None:
    url = url_for(scheme, wait=0.5)
    consumer = podipc.consumer(url)
    started = time.monotonic()
    with pytest.raises(podipc.PeerTimeout, match=r"(?i)producer"):
        consumer.recv()
    assert 0.4 <= time.monotonic() - started < 5
    consumer.close()
    assert_no_leftovers(url)


def test_producer_without_consumer_fails_after_the_wait_timeout(scheme: str) -> None:
    url = url_for(scheme, wait=0.5)
    producer = podipc.producer(url)
    started = time.monotonic()
    with pytest.raises(podipc.PeerTimeout, match=r"(?i)consumer"):
        producer.send(b"hello")
        producer.close()
    assert 0.4 <= time.monotonic() - started < 5
    producer.abort()
    if scheme == "file":
        # A spool keeps an unfinished stream for a consumer that comes later (docs/wire/file.md).
        kept = sorted(os.path.basename(path) for path in leftovers(url))
        assert kept == ["podipc.directory", "podipc.seg.00000000000000000000"]  # the message, then the END record
        shutil.rmtree(parse_address(url).path)
    assert_no_leftovers(url)


def slow_producer(url: str) -> None:
    with podipc.producer(url) as channel:
        channel.send(b"first")
        time.sleep(1.5)
        channel.send(b"second")


def test_recv_timeout_raises_timeout_and_the_stream_goes_on(scheme: str) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    producer = CONTEXT.Process(target=slow_producer, args=(url,))
    producer.start()
    try:
        assert consumer.recv(timeout=30) == b"first"
        started = time.monotonic()
        with pytest.raises(podipc.Timeout) as caught:
            consumer.recv(timeout=0.3)
        assert not isinstance(caught.value, podipc.PeerTimeout)
        assert 0.25 <= time.monotonic() - started < 1.2
        assert consumer.recv(timeout=30) == b"second"
        with pytest.raises(podipc.EndOfStream):
            consumer.recv(timeout=30)
    finally:
        consumer.close()
        producer.join(30)
    assert producer.exitcode == 0
    assert_no_leftovers(url)


def deferred_consumer(url: str, start_reading: object, results: object) -> None:
    """A consumer that attaches at once but reads only once told to."""
    digest, count = hashlib.sha256(), 0
    with podipc.consumer(url) as channel:
        start_reading.wait(120)  # type: ignore[attr-defined]
        for message in channel:
            digest.update(message)
            count += 1
    results.put((count, digest.hexdigest()))  # type: ignore[attr-defined]


@pytest.mark.parametrize("scheme", RELIABLE, indirect=True)
def test_send_timeout_on_a_full_channel_loses_nothing(scheme: str) -> None:
    url = url_for(scheme)
    bounds = {option.name for option in channel_class(parse_address(url).scheme, "producer").options}
    if scheme == "file" and "depth" in bounds:
        url = url_for(scheme, depth=8)
    start_reading, results = CONTEXT.Event(), CONTEXT.Queue()
    consumer = CONTEXT.Process(target=deferred_consumer, args=(url, start_reading, results))
    consumer.start()
    size = min(max_size(scheme), 4096)
    digest, sent = hashlib.sha256(), 0
    try:
        with podipc.producer(url) as producer:
            message = payload(0, size)
            producer.send(message, timeout=30)
            digest.update(message)
            sent = 1
            deadline = time.monotonic() + 60
            with pytest.raises(podipc.Timeout) as caught:
                while time.monotonic() < deadline:
                    message = payload(sent, size)
                    producer.send(message, timeout=0.5)
                    digest.update(message)
                    sent += 1
            assert not isinstance(caught.value, podipc.PeerTimeout)
            start_reading.set()
        count, received_digest = results.get(timeout=60)
    finally:
        start_reading.set()
        consumer.join(30)
    assert (count, received_digest) == (sent, digest.hexdigest())
    assert_no_leftovers(url)


def test_a_too_large_message_is_refused_before_anything_is_sent(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = CONTEXT.Process(target=run_consumer, args=(url, results, 30.0))
    consumer.start()
    limit = max_size(scheme)
    try:
        with podipc.producer(url) as producer:
            assert producer.max_message_size == limit
            with pytest.raises(podipc.MessageTooLarge, match=f"{limit + 1} bytes > .*{limit}") as caught:
                producer.send(bytes(limit + 1))
            assert caught.value.limit == limit
            producer.send(b"after")
        consumed: SideResult = results.get(timeout=60)
    finally:
        consumer.join(30)
    assert consumed.ok, consumed.error
    assert (consumed.messages, consumed.sha256) == (1, hashlib.sha256(b"after").hexdigest())
    assert_no_leftovers(url)


def test_closing_twice_and_using_after_close(scheme: str) -> None:
    url = url_for(scheme, wait=0.2)
    consumer = podipc.consumer(url)
    consumer.close()
    consumer.close()
    with pytest.raises(podipc.ChannelClosed):
        consumer.recv()
    producer = podipc.producer(url)
    producer.abort()
    producer.abort()
    with pytest.raises(podipc.ChannelClosed):
        producer.send(b"x")
    assert_no_leftovers(url)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("tcp://127.0.0.1:7000?depth=-1", r"option 'depth' is not for tcp://: only .*mq://.* take it"),
        ("tcp://127.0.0.1:7000?dpeth=1", "unknown option 'dpeth'"),
        ("mq:///contract?depth=zero", "depth='zero'"),
        ("mq:///contract?max_message_size=huge", "max_message_size='huge'"),
        ("shm:///contract?capacity=-4", "capacity='-4'"),
        ("tcp://127.0.0.1:7000?wait=never", "wait='never'"),
        ("unix://@x?mode=0777", "world-writable"),
    ],
)
def test_malformed_options_raise_address_error(url: str, error: str) -> None:
    with pytest.raises(podipc.AddressError, match=error):
        podipc.consumer(url)
