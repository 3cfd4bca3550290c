"""The batch calls (issue 13): send_many, recv_many and flush on every channel, across real processes.

Every scheme runs every test: tcp:// and unix:// batch for real (gathered writes, one read cut
in one pass); the others through the base's defaults built on their hooks, with the same
errors, end of stream, thread and close semantics. udp:// is unreliable: a test that counts
messages there counts the ones it reports lost too (as test_contract.py does).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import pytest

import podipc
from podipc.address import parse_address
from podipc.channel import channel_class

from .harness import CONTEXT, RELIABLE, SCHEMES, leftovers, mixed_sizes, payload, url_for, wait_until
from .test_lifecycle import CONTRACT_SCHEMES, TAG, WAKE_SECONDS, Blocked, tagged

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    row = {row.scheme: row for row in podipc.channels()}[name.removesuffix("-abstract")]
    if not row.usable:
        pytest.fail(f"{name} is not usable on this host: {row.reason}")
    return name


def limit_of(scheme: str) -> int:
    """The largest message the scheme carries here."""
    row = {row.scheme: row for row in podipc.channels()}[scheme.removesuffix("-abstract")]
    return row.max_message_size or 0


# --- helpers run in other processes ------------------------------------------------


def consume_in_batches(url: str, max_count: int, results: Any) -> None:
    """recv_many until the end of stream; report (messages, largest batch, lost, how it ended)."""
    messages: list[bytes] = []
    largest, ending = 0, "end of stream"
    with podipc.consumer(url, wait=60) as channel:
        try:
            while True:
                batch = channel.recv_many(max_count, timeout=60)
                assert batch, "recv_many returned an empty list"
                largest = max(largest, len(batch))
                messages += batch
        except podipc.EndOfStream:
            pass
        except podipc.PodIPCError as error:
            ending = type(error).__name__
        results.put((messages, largest, channel.lost, ending))


def consume_all(url: str, start_reading: Any, results: Any) -> None:
    """Attach, read only once told to, then everything to the end; report the messages and how it ended."""
    messages: list[bytes] = []
    ending = "end of stream"
    with podipc.consumer(url, wait=60) as channel:
        start_reading.wait(120)
        try:
            messages += channel
        except podipc.PodIPCError as error:
            ending = type(error).__name__
    results.put((messages, ending))


def send_in_two_groups(url: str, first_sent: Any, pause: float) -> None:
    """send_many five messages, say so, wait `pause` seconds, send_many five more, end the stream."""
    with podipc.producer(url, wait=60) as channel:
        assert channel.send_many(payload(index, 100) for index in range(5)) == 5
        first_sent.set()
        time.sleep(pause)
        assert channel.send_many([payload(index, 100) for index in range(5, 10)]) == 5


def send_then_end(url: str, count: int) -> None:
    """send_many `count` messages and end the stream."""
    with podipc.producer(url, wait=60) as channel:
        channel.send_many([payload(index, 100) for index in range(count)])


def start(target: Any, *args: Any) -> Any:
    process = CONTEXT.Process(target=target, args=args)
    process.start()
    return process


# --- send_many and recv_many carry every message ---------------------------------------


def test_batches_arrive_whole_and_in_order_and_recv_many_never_returns_more_than_asked(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = start(consume_in_batches, url, 37, results)
    limit = limit_of(scheme)
    batches = [
        [payload(index, size) for index, size in enumerate(mixed_sizes(200, min(limit, 100_000), seed))]
        for seed in range(3)
    ]
    if scheme == "udp":  # no flow control: keep each batch well inside the receive buffer
        batches = [batch[:40] for batch in batches]
    sent: list[bytes] = []
    with podipc.producer(url, wait=60) as producer:
        for batch in batches:
            assert producer.send_many(batch) == len(batch)
            sent += batch
            if scheme == "udp":
                time.sleep(0.05)
    messages, largest, lost, ending = results.get(timeout=120)
    consumer.join(30)
    assert ending == "end of stream"
    assert largest <= 37
    if scheme == "udp" and lost:
        assert len(messages) + lost == len(sent)
        return
    assert messages == sent
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


def test_recv_many_takes_what_is_there_and_waits_only_for_the_first_message(scheme: str) -> None:
    url = url_for(scheme)
    first_sent = CONTEXT.Event()
    producer = start(send_in_two_groups, url, first_sent, 3.0)
    try:
        with podipc.consumer(url, wait=60) as consumer:
            assert first_sent.wait(60)
            time.sleep(0.5)  # all five are in the channel now; the next five come 2.5 s later
            started = time.monotonic()
            assert consumer.recv_many(100, timeout=30) == [payload(index, 100) for index in range(5)]
            assert time.monotonic() - started < 1.5
            later = consumer.recv_many(100, timeout=30)
            while len(later) < 5:  # the second group may be taken as it arrives
                later += consumer.recv_many(100, timeout=30)
            assert later == [payload(index, 100) for index in range(5, 10)]
            with pytest.raises(podipc.EndOfStream):
                consumer.recv_many(100, timeout=30)
    finally:
        producer.join(30)
    assert producer.exitcode == 0


def test_a_batch_reaching_the_end_of_stream_returns_its_messages_and_the_next_call_raises(scheme: str) -> None:
    url = url_for(scheme)
    producer = start(send_then_end, url, 3)
    try:
        with podipc.consumer(url, wait=60) as consumer:
            assert consumer.poll(60)  # the first message is kept for the next call
            time.sleep(0.5)  # the other two and the end of stream are there too
            assert consumer.recv_many(100, timeout=30) == [payload(index, 100) for index in range(3)]
            with pytest.raises(podipc.EndOfStream):
                consumer.recv_many(100, timeout=30)
            assert consumer.ended
            with pytest.raises(podipc.EndOfStream):
                consumer.recv(timeout=30)
    finally:
        producer.join(30)
    assert producer.exitcode == 0


def test_recv_many_raises_timeout_like_recv_and_refuses_a_count_below_one(scheme: str) -> None:
    url = url_for(scheme, wait=60)
    with podipc.consumer(url) as consumer:
        with pytest.raises(podipc.Timeout) as caught:
            consumer.recv_many(10, timeout=0)
        with pytest.raises(podipc.Timeout) as caught_by_recv:
            consumer.recv(timeout=0)
        assert type(caught.value) is type(caught_by_recv.value)  # what recv raises; on the contract, Timeout
        if scheme in CONTRACT_SCHEMES:
            assert not isinstance(caught.value, podipc.PeerTimeout)
        started = time.monotonic()
        with pytest.raises(podipc.Timeout):
            consumer.recv_many(10, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 1.5
        for wrong in (0, -1, True, 2.5):
            with pytest.raises(ValueError, match="max_count"):
                consumer.recv_many(wrong)  # type: ignore[arg-type]
    url = url_for(scheme, wait=0.2)
    with podipc.consumer(url) as consumer:
        time.sleep(0.3)
        with pytest.raises(podipc.PeerTimeout):
            consumer.recv_many(10, timeout=5)


def test_a_too_large_message_in_a_batch_is_refused_before_anything_of_the_batch_is_sent(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = start(consume_in_batches, url, 100, results)
    limit = limit_of(scheme)
    with podipc.producer(url, wait=60) as producer:
        with pytest.raises(podipc.MessageTooLarge) as caught:
            producer.send_many([b"before", bytes(limit + 1), b"after"])
        assert caught.value.sent == 0
        assert producer.send_many([]) == 0
        assert producer.send_many([b"only this"]) == 1
    messages, _, _, ending = results.get(timeout=60)
    consumer.join(30)
    assert (messages, ending) == ([b"only this"], "end of stream")


# --- full channels, threads, close, fork -------------------------------------------------


@pytest.mark.parametrize("scheme", RELIABLE, indirect=True)
def test_send_many_on_a_full_channel_says_how_many_went_and_loses_nothing(scheme: str) -> None:
    url = url_for(scheme)
    options = {option.name for option in channel_class(parse_address(url).scheme, "producer").options}
    if scheme == "file" and "depth" in options:
        url = url_for(scheme, depth=8)
    start_reading, results = CONTEXT.Event(), CONTEXT.Queue()
    consumer = start(consume_all, url, start_reading, results)
    size = min(limit_of(scheme), 4096)
    sent: list[bytes] = []
    try:
        with podipc.producer(url, wait=60) as producer:
            producer.send(payload(0, size), timeout=30)
            sent.append(payload(0, size))
            deadline = time.monotonic() + 60
            with pytest.raises(podipc.Timeout) as caught:
                while time.monotonic() < deadline:
                    batch = [payload(len(sent) + index, size) for index in range(64)]
                    try:
                        producer.send_many(batch, timeout=0.5)
                    except podipc.Timeout as error:
                        sent += batch[: error.sent]
                        raise
                    sent += batch
            assert not isinstance(caught.value, podipc.PeerTimeout)
            assert caught.value.sent is not None and 0 <= caught.value.sent < 64
            start_reading.set()
        messages, ending = results.get(timeout=120)
    finally:
        start_reading.set()
        consumer.join(30)
    assert ending == "end of stream"
    assert len(messages) == len(sent)
    assert messages == sent


@pytest.mark.parametrize("scheme", RELIABLE, indirect=True)
def test_threads_sharing_a_producer_never_interleave_their_batches(scheme: str) -> None:
    url = url_for(scheme)
    start_reading, results = CONTEXT.Event(), CONTEXT.Queue()
    start_reading.set()
    consumer = start(consume_all, url, start_reading, results)
    batches, batch_size = 6, 40

    def send_batches(thread: int, producer: podipc.Producer) -> None:
        for number in range(batches):
            first = number * batch_size
            producer.send_many([tagged(thread, first + index) for index in range(batch_size)])

    with podipc.producer(url, wait=60) as producer:
        threads = [threading.Thread(target=send_batches, args=(thread, producer)) for thread in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    messages, ending = results.get(timeout=120)
    consumer.join(30)
    assert ending == "end of stream"
    assert len(messages) == 4 * batches * batch_size
    tags = [TAG.unpack_from(message) for message in messages]
    assert all(message == tagged(*tag) for message, tag in zip(messages, tags, strict=True))
    for start_index in range(0, len(tags), batch_size):
        batch = tags[start_index : start_index + batch_size]
        thread, first = batch[0]
        assert first % batch_size == 0, f"a batch of thread {thread} does not begin at a batch boundary: {batch}"
        assert batch == [(thread, first + index) for index in range(batch_size)], "a batch was interleaved"


@pytest.mark.parametrize(
    "scheme", [s for s in CONTRACT_SCHEMES if s in RELIABLE], indirect=True
)  # udp never waits for room
def test_close_from_another_thread_wakes_a_blocked_send_many_which_says_how_many_went(scheme: str) -> None:
    url = url_for(scheme)
    start_reading, results = CONTEXT.Event(), CONTEXT.Queue()
    consumer = start(consume_all, url, start_reading, results)
    producer = podipc.producer(url, wait=60)
    try:
        batch = [payload(index, 4096) for index in range(20_000)]  # more than any buffer, queue or ring holds
        blocked = Blocked(lambda: producer.send_many(batch))
        # views of 20,000 messages take a while on a loaded machine: close once the batch holds the gate
        assert wait_until(lambda: not producer._token, 30), "the batch never began"  # type: ignore[attr-defined]
        time.sleep(0.5)
        assert blocked.thread.is_alive(), "the batch did not block"
        closed_at = time.monotonic()
        closer = Blocked(lambda: producer.close(timeout=60))
        blocked.join()
        assert isinstance(blocked.error, podipc.ChannelClosed)
        assert blocked.woke_at - closed_at < WAKE_SECONDS
        went = blocked.error.sent
        assert went is not None and 0 < went < len(batch)
        start_reading.set()
        closer.join()
        assert closer.returned, closer.error
        messages, ending = results.get(timeout=120)
        consumer.join(30)
        assert ending == "end of stream"
        assert messages == batch[:went]
    finally:
        producer.abort()  # a failed assertion must not leave the consumer waiting for the stream forever
        consumer.join(5)
        if consumer.is_alive():
            consumer.kill()


def test_flush_returns_and_the_stream_stays_whole(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = start(consume_in_batches, url, 1000, results)
    with podipc.producer(url, wait=60) as producer:
        for index in range(50):
            producer.send(payload(index, 100))
        producer.flush(timeout=30)
        producer.send_many([payload(index, 100) for index in range(50, 60)])
        producer.flush()
    messages, _, lost, ending = results.get(timeout=60)
    consumer.join(30)
    assert ending == "end of stream"
    assert len(messages) + lost == 60
    if not lost:
        assert messages == [payload(index, 100) for index in range(60)]
    with pytest.raises(podipc.ChannelClosed):
        producer.flush()
    with pytest.raises(podipc.ChannelClosed):
        producer.send_many([b"late"])


def use_inherited_batch_calls(producer: podipc.Producer, consumer: podipc.Consumer, results: Any) -> None:
    """In a forked child: report what each batch call of the parent's endpoints raised."""
    outcomes = []
    for call in (lambda: producer.send_many([b"x"]), producer.flush, lambda: consumer.recv_many(5, timeout=1)):
        try:
            call()
            outcomes.append("returned")
        except podipc.PodIPCError as error:
            outcomes.append(type(error).__name__ + (": before fork" if "before fork()" in str(error) else ""))
    results.put(outcomes)


def test_batch_calls_of_an_endpoint_inherited_across_fork_raise_channel_closed(scheme: str) -> None:
    url = url_for(scheme, wait=60)
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    results = CONTEXT.Queue()
    child = start(use_inherited_batch_calls, producer, consumer, results)
    try:
        assert results.get(timeout=60) == ["ChannelClosed: before fork"] * 3
        child.join(30)
        assert child.exitcode == 0
    finally:
        producer.abort()
        consumer.close()
    assert os.getpid() != child.pid
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


def test_each_message_of_a_batch_is_delivered_once_with_its_digest(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = start(consume_in_batches, url, 500, results)
    batch = [payload(index, index % 300) for index in range(300 if scheme != "udp" else 40)]
    with podipc.producer(url, wait=60) as producer:
        producer.send_many(iter(batch))  # any iterable
    messages, _, lost, ending = results.get(timeout=60)
    consumer.join(30)
    assert ending == "end of stream"
    if scheme == "udp" and lost:
        assert len(messages) + lost == len(batch)
        return
    digest = hashlib.sha256(b"".join(batch)).hexdigest()
    assert hashlib.sha256(b"".join(messages)).hexdigest() == digest
