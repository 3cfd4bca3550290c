"""mq:// and sysvmq:// across real processes, every test on both queues: order and boundaries,
limits, timeouts, liveness, stale queues, garbage, raw peers and the CLI.

What only one queue has (its limits' options, its tags' grammar, the SysV key and wake-up)
is tested in test_posix_mq.py and test_sysv_mq.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address
from podipc.queue import DATA, END, GARBAGE
from tests.commands import PODIPC
from tests.unit.queues import (
    FORK,
    KITS,
    QueueKit,
    consume_after,
    consume_forever,
    consume_then_hang,
    produce,
    produce_then_hang,
    sample_messages,
)

pytestmark = pytest.mark.timeout(60)

FILLER = b"x" * 64
"""A message that fills a queue made with queue_options(1, 64)."""


@pytest.fixture(params=KITS, ids=repr)
def queue(request: pytest.FixtureRequest) -> QueueKit:
    """Each kernel queue in turn."""
    kit: QueueKit = request.param
    return kit


@pytest.fixture
def url(queue: QueueKit) -> Iterator[str]:
    """A fresh channel URL on that queue; the test fails if the channel leaves anything behind."""
    yield from queue.fresh_url()


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_messages_arrive_whole_and_in_order_across_processes(queue: QueueKit, url: str, consumer_first: bool) -> None:
    messages = sample_messages(queue.kernel_max)
    child = FORK.Process(target=produce, args=(url, messages, 0.3 if consumer_first else 0.0))
    child.start()
    if not consumer_first:
        time.sleep(0.3)
    with podipc.consumer(url) as consumer:
        received = list(consumer)
        assert consumer.skipped == 0
    child.join(10)
    assert child.exitcode == 0
    assert received == messages


def test_fileno_asked_after_the_end_of_stream_watches_no_descriptor_the_consumer_closed(url: str) -> None:
    child = FORK.Process(target=produce, args=(url, [b"one", b"two"], 0.0))
    child.start()
    with podipc.consumer(url) as consumer:
        assert list(consumer) == [b"one", b"two"]
        # the queue's descriptor was closed at the end of stream; its number is free for the new epoll
        descriptor = consumer.fileno()
        assert descriptor >= 0
        with pytest.raises(podipc.EndOfStream):
            consumer.recv(timeout=0)
    child.join(10)
    assert child.exitcode == 0


def test_a_message_over_the_kernel_limit_is_refused_naming_the_limit_and_fix(queue: QueueKit, url: str) -> None:
    limit = queue.kernel_max
    with podipc.producer(url, wait=0.1) as producer:
        assert producer.max_message_size == limit
        with pytest.raises(podipc.MessageTooLarge) as caught:
            producer.send(b"x" * (limit + 808))
        producer.abort()
    text = str(caught.value)
    assert f"{limit + 808} bytes > {queue.limit_source} {limit}" in text
    assert "securityContext.sysctls" in text and "shm://" in text


def test_a_max_message_size_above_the_kernel_limit_is_unavailable_with_the_fix(queue: QueueKit, url: str) -> None:
    source = re.escape(queue.limit_source)
    with pytest.raises(podipc.ChannelUnavailable, match=rf"{source}.*securityContext\.sysctls"):
        podipc.consumer(url, max_message_size=queue.kernel_max + 1)
    with pytest.raises(podipc.ChannelUnavailable, match=source):
        podipc.producer(url, max_message_size=queue.kernel_max + 1)


def test_a_producer_adopts_the_smaller_limit_of_the_queue_the_consumer_made(queue: QueueKit, url: str) -> None:
    with podipc.consumer(url, **queue.queue_options(1, 100)) as consumer, podipc.producer(url) as producer:
        producer.send(b"s" * 100)
        with pytest.raises(podipc.MessageTooLarge, match=queue.adopted_limit_words):
            producer.send(b"L" * 101)
        assert producer.max_message_size == 100
        assert consumer.recv(timeout=1) == b"s" * 100
        producer.abort()


def test_full_queue_send_timeout_raises_timeout_and_loses_nothing(queue: QueueKit, url: str) -> None:
    consumer = podipc.consumer(url, **queue.queue_options(2, 8))
    producer = podipc.producer(url, max_message_size=8)
    producer.send(b"one-----")
    producer.send(b"two-----")
    started = time.monotonic()
    with pytest.raises(podipc.Timeout):
        producer.send(b"three---", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 1.5
    assert consumer.recv(timeout=1) == b"one-----"
    producer.send(b"three---", timeout=1)
    closing = threading.Thread(target=producer.close)
    closing.start()
    assert list(consumer) == [b"two-----", b"three---"]
    closing.join(5)
    assert producer.closed and not closing.is_alive()
    consumer.close()


def test_a_recv_timeout_raises_timeout_on_time_while_the_producer_lives(url: str) -> None:
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        producer.send(b"first")
        assert consumer.recv(timeout=1) == b"first"
        for timeout in (0.0, 0.3):
            started = time.monotonic()
            with pytest.raises(podipc.Timeout) as caught:
                consumer.recv(timeout=timeout)
            assert not isinstance(caught.value, podipc.PeerTimeout)
            assert timeout <= time.monotonic() - started < timeout + 0.5
        producer.send(b"after the timeouts")
        assert consumer.recv() == b"after the timeouts"
        producer.abort()


def test_sigkilled_producer_makes_the_waiting_consumer_raise_peer_gone_within_2s(url: str) -> None:
    child = FORK.Process(target=produce_then_hang, args=(url, [b"hello"]))
    child.start()
    try:
        with podipc.consumer(url) as consumer:
            assert consumer.recv(timeout=10) == b"hello"
            os.kill(child.pid or 0, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(podipc.PeerGone):
                consumer.recv()
            assert time.monotonic() - killed < 2.0
    finally:
        child.kill()
        child.join()
    # the survivor removed the queue and the dead side's presence file: nothing is left (see the fixture)


def assert_a_blocked_send_raises_peer_gone_within_2s_of(producer: podipc.Producer, event: Callable[[], None]) -> None:
    """Block a send on the full queue, let `event` happen 0.3 s later: the send must raise PeerGone within 2 s."""
    happened_at: list[float] = []

    def happen() -> None:
        happened_at.append(time.monotonic())
        event()

    threading.Timer(0.3, happen).start()
    with pytest.raises(podipc.PeerGone):
        producer.send(b"blocked until the consumer is gone")
    assert time.monotonic() - happened_at[0] < 2.0


def test_sigkilled_consumer_makes_the_blocked_producer_raise_peer_gone_within_2s(queue: QueueKit, url: str) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=consume_then_hang, args=(url, queue.queue_options(1, 64), ready))
    child.start()
    try:
        assert ready.wait(10)
        producer = podipc.producer(url)
        producer.send(FILLER)
        assert_a_blocked_send_raises_peer_gone_within_2s_of(producer, lambda: os.kill(child.pid or 0, signal.SIGKILL))
        producer.abort()
    finally:
        child.kill()
        child.join()
        queue.scrub(url)  # the dead consumer's queue stays for the next consumer (or clean) to recover


def test_a_consumer_replaced_by_a_new_one_makes_the_blocked_producer_raise_peer_gone(queue: QueueKit, url: str) -> None:
    first_ready, second_ready = FORK.Event(), FORK.Event()
    first = FORK.Process(target=consume_then_hang, args=(url, queue.queue_options(1, 64), first_ready))
    first.start()
    second = FORK.Process(target=consume_then_hang, args=(url, queue.queue_options(1, 64), second_ready))
    try:
        assert first_ready.wait(10)
        producer = podipc.producer(url)
        producer.send(FILLER)

        def replace() -> None:
            os.kill(first.pid or 0, signal.SIGKILL)
            first.join()
            second.start()  # recovers the dead consumer's queue and takes its place at once
            second_ready.wait(10)

        assert_a_blocked_send_raises_peer_gone_within_2s_of(producer, replace)
        producer.abort()
        assert second_ready.wait(10)
    finally:
        for child in (first, second):
            if child.pid is not None:
                child.kill()
                child.join()
        queue.scrub(url)


def test_a_consumer_killed_while_the_producer_sends_at_full_speed_is_seen_within_2s(queue: QueueKit, url: str) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=consume_forever, args=(url, ready))
    child.start()
    try:
        assert ready.wait(10)
        producer = podipc.producer(url)
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(child.pid or 0, signal.SIGKILL)

        threading.Timer(0.5, kill).start()
        sent = 0
        with pytest.raises(podipc.PeerGone):
            while True:
                producer.send(b"x" * 64)
                sent += 1
        assert time.monotonic() - killed_at[0] < 2.0
        assert sent > 100
        producer.abort()
    finally:
        child.kill()
        child.join()
        queue.scrub(url)  # the dead consumer's queue stays for the next consumer (or clean) to recover


class Interrupted(Exception):
    pass


def test_a_signal_handler_that_raises_gets_through_a_recv_blocked_mid_stream(url: str) -> None:
    """The fast path too: a handler's exception (sys.exit in a sidecar) is never swallowed, and the stream goes on."""
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"first")
    assert consumer.recv() == b"first"  # data flowed: recv() now takes the fast path

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            consumer.recv()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 1.0
    producer.send(b"second")
    assert consumer.recv() == b"second"
    producer.abort()
    consumer.close()


def test_a_signal_handler_that_only_sets_a_flag_leaves_a_blocked_send_working(queue: QueueKit, url: str) -> None:
    results = FORK.Queue()
    child = FORK.Process(target=consume_after, args=(url, 0.5, results))
    child.start()
    ticks = [0]

    def tick(signum: int, frame: object) -> None:
        ticks[0] += 1

    previous = signal.signal(signal.SIGALRM, tick)
    messages = [payload for payload in (bytes([index]) * 64 for index in range(200))]
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
        with podipc.producer(url, max_message_size=64) as producer:
            for message in messages:
                producer.send(message)  # the queue fills: sends wait for the consumer, signals keep coming
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert results.get(timeout=30) == messages
    child.join(10)
    assert ticks[0] > 20


def test_a_queue_at_a_dead_consumers_name_that_is_not_its_queue_is_refused_and_kept(queue: QueueKit, url: str) -> None:
    """A dead consumer's record proves only the queue it declared: another queue put there since is not taken."""
    ready = FORK.Event()
    child = FORK.Process(target=consume_then_hang, args=(url, {}, ready))
    child.start()
    assert ready.wait(10)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    queue.remove_queue(url)
    queue.create_raw(url)  # another application's queue, at the name the dead consumer used
    queue.raw_send(url, b"the application's", queue.data_mark)
    try:
        with pytest.raises(podipc.ChannelUnavailable, match="already exists"):
            podipc.consumer(url, wait=1)
        assert queue.raw_receive(url) == b"the application's"
    finally:
        queue.scrub(url)


def test_a_stale_queue_left_by_a_sigkilled_run_is_recovered(queue: QueueKit, url: str) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=consume_then_hang, args=(url, queue.queue_options(1, 64), ready))
    child.start()
    assert ready.wait(10)
    queue.raw_send(url, b"stale", queue.data_mark)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    fresh = FORK.Process(target=produce, args=(url, [b"fresh"], 0.2))
    fresh.start()
    with podipc.consumer(url) as consumer:
        assert isinstance(consumer, queue.consumer_class) and consumer.recovered
        assert list(consumer) == [b"fresh"]
    fresh.join(10)
    assert fresh.exitcode == 0


def test_a_second_consumer_is_refused_and_leaves_the_live_queue_alone(url: str) -> None:
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        producer.send(b"kept")
        with pytest.raises(podipc.ChannelUnavailable, match="another consumer"):
            podipc.consumer(url)
        assert consumer.recv(timeout=1) == b"kept"
        producer.abort()


def test_consumer_without_producer_raises_peer_timeout_after_wait(url: str) -> None:
    with podipc.consumer(url, wait=0.4) as consumer:
        started = time.monotonic()
        with pytest.raises(podipc.PeerTimeout):
            consumer.recv()
        assert 0.35 <= time.monotonic() - started < 1.5


def test_a_recv_timeout_before_any_producer_appeared_is_a_plain_timeout(url: str) -> None:
    """The rule of every channel: the call's own timeout, when it comes first, is Timeout, not PeerTimeout."""
    with podipc.consumer(url) as consumer:
        started = time.monotonic()
        with pytest.raises(podipc.Timeout) as caught:
            consumer.recv(timeout=0.2)
        assert type(caught.value) is podipc.Timeout
        assert time.monotonic() - started < 1.0


def test_a_producer_abort_ends_in_peer_gone_after_its_messages_and_leaves_nothing(url: str) -> None:
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"one")
    producer.send(b"two")
    producer.abort()  # before the consumer ever looked: it must still learn the producer came and went
    assert consumer.recv(timeout=5) == b"one"
    assert consumer.recv(timeout=5) == b"two"
    started = time.monotonic()
    with pytest.raises(podipc.PeerGone):
        consumer.recv(timeout=5)
    assert time.monotonic() - started < 2.0
    consumer.close()


def test_a_consumer_closing_mid_stream_makes_the_producer_raise_peer_gone(queue: QueueKit, url: str) -> None:
    consumer = podipc.consumer(url, **queue.queue_options(1, 64))
    producer = podipc.producer(url)
    producer.send(b"taken")
    assert consumer.recv(timeout=1) == b"taken"
    consumer.close()
    started = time.monotonic()
    with pytest.raises(podipc.PeerGone):
        for _ in range(3):
            producer.send(b"x" * 64)
    assert time.monotonic() - started < 2.0
    producer.abort()


def test_producer_without_consumer_raises_peer_timeout_after_wait(url: str) -> None:
    producer = podipc.producer(url, wait=0.3)
    with pytest.raises(podipc.PeerTimeout):
        producer.send(b"nobody")
    producer.abort()


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_the_queue_is_created_with_the_mode_option(queue: QueueKit, url: str, mode: int) -> None:
    old_umask = os.umask(0o077)
    try:
        consumer = podipc.consumer(url) if mode == 0o600 else podipc.consumer(url, mode=f"{mode:o}")
    finally:
        os.umask(old_umask)
    try:
        assert queue.queue_mode(url) == mode
    finally:
        consumer.close()


def test_garbage_from_a_raw_peer_is_skipped_and_counted(queue: QueueKit, url: str) -> None:
    data, end = queue.data_mark, queue.end_mark
    with podipc.consumer(url) as consumer:
        queue.raw_send(url, b"first", data)
        queue.raw_send(url, b"wrong tag", queue.garbage_mark)
        queue.raw_send(url, b"not an end marker", end)
        queue.raw_send(url, b"", data)
        queue.raw_send(url, b"second", data)
        queue.raw_send(url, b"", end)
        assert list(consumer) == [b"first", b"", b"second"]
        assert consumer.skipped == 2


PLAIN_LINES = b"".join(f"line {i} {'x' * (i * 53 % 300)}\n".encode() for i in range(200))


def run_plain_producer_beside_podipc_consume(
    queue: QueueKit, url: str, script: str, plain_first: bool, consume_url: str | None = None
) -> None:
    """Run a plain producer from the wire doc and `podipc consume`, in the given order; check every line arrived."""
    name = parse_address(url).name
    consume = [*PODIPC, "consume", consume_url or url, "-o", "-"]
    plain = subprocess.Popen([sys.executable, "-c", script, name], stdin=subprocess.PIPE)
    if plain_first:
        time.sleep(0.3)
    consumer = subprocess.Popen(consume, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert plain.stdin is not None
    plain.stdin.write(PLAIN_LINES)
    plain.stdin.close()
    output, errors = consumer.communicate(timeout=30)
    assert plain.wait(timeout=30) == 0
    assert consumer.returncode == 0, errors
    assert output == PLAIN_LINES
    assert json.loads(errors)["messages"] == 200


@pytest.mark.parametrize("plain_first", [False, True], ids=["consumer-first", "plain-producer-first"])
def test_the_plain_producer_from_the_docs_feeds_podipc_consume(queue: QueueKit, url: str, plain_first: bool) -> None:
    """It waits for the consumer's queue, so either may start first."""
    run_plain_producer_beside_podipc_consume(queue, url, queue.plain_script("plain-producer"), plain_first)


def test_a_plain_producer_that_creates_the_queue_feeds_podipc_consume_with_adopt(queue: QueueKit, url: str) -> None:
    """The documented opt-in: podipc consumes the queue a plain producer created first, and leaves it to it."""
    script = queue.plain_script("plain-creating-producer")
    run_plain_producer_beside_podipc_consume(queue, url, script, True, consume_url=f"{url}?adopt=true")
    assert not queue.queue_exists(url)  # the plain producer removed it; podipc never did


def test_without_adopt_a_queue_a_plain_producer_created_is_refused_and_left_alone(queue: QueueKit, url: str) -> None:
    script = queue.plain_script("plain-creating-producer")
    plain = subprocess.Popen([sys.executable, "-c", script, parse_address(url).name], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not queue.queue_exists(url):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        result = subprocess.run([*PODIPC, "consume", f"{url}?wait=2"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 3, result.stderr
        assert "already exists" in result.stderr and "adopt=true" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert queue.queue_exists(url)
    finally:
        plain.kill()
        plain.wait()
        queue.remove_queue(url)


def test_podipc_produce_feeds_the_plain_consumer_from_the_docs(queue: QueueKit, url: str, tmp_path: Path) -> None:
    name = parse_address(url).name
    received = tmp_path / "received"
    with received.open("wb") as output:
        plain = subprocess.Popen([sys.executable, "-c", queue.plain_script("plain-consumer"), name], stdout=output)
        produced = subprocess.run(
            [*PODIPC, "produce", url, "--count", "300", "--random", "--size", str(queue.kernel_max)],
            capture_output=True,
            check=True,
            timeout=30,
        )
        assert plain.wait(timeout=30) == 0
    summary = json.loads(produced.stdout)
    data = received.read_bytes()
    assert hashlib.sha256(data).hexdigest() == summary["sha256"]
    assert len(data) == summary["bytes"]


def test_cli_streams_random_messages_with_matching_digests(queue: QueueKit, url: str) -> None:
    consumer = subprocess.Popen([*PODIPC, "consume", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    produced = subprocess.run(
        [*PODIPC, "produce", url, "--count", "1000", "--random", "--size", str(queue.kernel_max)],
        capture_output=True,
        check=True,
        timeout=30,
    )
    output, errors = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, errors
    sent, got = json.loads(produced.stdout), json.loads(output)
    assert sent["messages"] == got["messages"] == 1000
    assert sent["sha256"] == got["sha256"]


@pytest.mark.parametrize("name", ["jobs", "a.b", "podipc-test_1", "x" * 60, "..weird..name--", "0x4d2", "1234"])
def test_the_presence_token_formula_in_the_wire_doc_is_podipcs(queue: QueueKit, name: str) -> None:
    found = re.search(r"<!-- presence-token -->\s*```python\n(.*?)```", queue.wire_doc.read_text(), re.DOTALL)
    assert found, f"{queue.wire_doc} lost its presence-token block"
    scope: dict[str, object] = {}
    exec(found.group(1), scope)
    token = scope["presence_token"](name)  # type: ignore[operator]
    url = f"mq:///{name}" if queue.scheme == "mq" else f"sysvmq://{name}"
    assert token == parse_address(url).token


def test_availability_and_host_limit_come_from_this_host(queue: QueueKit) -> None:
    assert queue.module.availability() is None
    with open(queue.limit_source) as limit:
        assert queue.module.host_max_message_size() == int(limit.read())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draw=st.data())
def test_any_raw_message_mix_yields_the_data_messages_the_kernel_hands_out_before_the_first_end(
    queue: QueueKit, url: str, draw: st.DataObject
) -> None:
    sent = draw.draw(st.lists(st.tuples(st.sampled_from(queue.raw_marks), st.binary(max_size=200)), max_size=8))
    expected: list[bytes] = []
    skipped = 0
    for mark, data in queue.delivery_order([*sent, (queue.end_mark, b"")]):
        kind = queue.module.classify(mark, data)
        if kind is END:
            break
        if kind is DATA:
            expected.append(data)
        skipped += kind is GARBAGE
    with podipc.consumer(url) as consumer:
        for mark, data in sent:
            queue.raw_send(url, data, mark)
        queue.raw_send(url, b"", queue.end_mark)
        received = []
        with contextlib.suppress(podipc.EndOfStream):
            while True:
                received.append(consumer.recv(timeout=2))
        assert received == expected
        assert consumer.skipped == skipped
