"""The endpoint contract (issues 11, 12): shutdown from anywhere, timeout=0, the timeout rule, threads, fork,
signals and readiness, across real processes.

Every scheme in CONTRACT_SCHEMES runs every test. A transport that implements the endpoint contract
(podipc.endpoint._Endpoint's docstring) adds its scheme here and nothing else.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import podipc

from .harness import CONTEXT, RELIABLE, leftovers, payload, url_for, wait_until

pytestmark = pytest.mark.timeout(120)

CONTRACT_SCHEMES = ("tcp", "unix", "unix-abstract", "shm", "mq", "sysvmq", "udp", "zmq+tcp", "zmq+ipc", "file")
"""Schemes whose transports implement the endpoint contract: every transport (a new one joins here)."""
WAKE_SECONDS = 0.1
"""Issue 11: a blocked call wakes within 100 ms of close()/abort()."""
TAG = struct.Struct(">II")


SPOOLS = ("file",)
"""Channels whose producer writes into a spool without a consumer until it holds `depth` messages
(docs/wire/file.md): where a test needs a send that waits for the consumer, such a producer gets
depth=1 and one message first (producer_that_waits)."""


def producer_that_waits(scheme: str, **options: object) -> podipc.Producer:
    """A producer, just opened, whose first send waits for a consumer (a spool's is full already)."""
    if scheme not in SPOOLS:
        return podipc.producer(url_for(scheme, **options))
    url = url_for(scheme, **{**options, "depth": 1})
    filler = podipc.producer(url)
    filler.send(b"fills the spool")
    filler.abort()  # the stream stays in the spool; the producer opened next resumes it, full
    return podipc.producer(url)


@pytest.fixture(params=CONTRACT_SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --- helpers run in other processes ------------------------------------------------


def send_then_hold(url: str, count: int, done: Any) -> None:
    """Send `count` messages, then keep the connection open until told to end the stream."""
    with contextlib.suppress(podipc.PeerGone), podipc.producer(url) as channel:
        for index in range(count):
            channel.send(payload(index, 100))
        done.wait(60)


def send_paced(url: str, count: int, pause: float) -> None:
    """Send `count` messages `pause` seconds apart, then end the stream."""
    with podipc.producer(url) as channel:
        for index in range(count):
            channel.send(payload(index, 100))
            time.sleep(pause)


def consume_when_told(url: str, start_reading: Any, results: Any, open_when_told: bool, wait: float) -> None:
    """Attach, wait for the signal to read, then read to the end; report (count, sha256, how it ended).

    open_when_told: wait for the signal before even opening (the channel has no consumer until then).
    """
    digest, count = hashlib.sha256(), 0
    ending = "end of stream"
    if open_when_told:
        start_reading.wait(60)
    with podipc.consumer(url, wait=wait) as channel:
        channel.poll(wait)
        start_reading.wait(60)
        try:
            for message in channel:
                digest.update(message)
                count += 1
        except podipc.PodIPCError as error:
            ending = type(error).__name__
    results.put((count, digest.hexdigest(), ending))


def spawn_consumer(url: str, reading: bool, open_when_told: bool = False, wait: float = 60) -> tuple[Any, Any, Any]:
    """A consume_when_told process on `url`: (process, the event that lets it read, its results queue)."""
    start_reading, results = CONTEXT.Event(), CONTEXT.Queue()
    if reading:
        start_reading.set()
    consumer = CONTEXT.Process(target=consume_when_told, args=(url, start_reading, results, open_when_told, wait))
    consumer.start()
    return consumer, start_reading, results


def consume_tags(url: str, results: Any) -> None:
    """Read to the end; report every (thread, sequence) tag, how many bodies were damaged, and how many were lost."""
    tags, damaged = [], 0
    with podipc.consumer(url, wait=60) as channel:
        for message in channel:
            thread, sequence = TAG.unpack_from(message)
            tags.append((thread, sequence))
            damaged += message != tagged(thread, sequence)
    results.put((tags, damaged, channel.lost))


def tagged(thread: int, sequence: int) -> bytes:
    """A message that names its thread and sequence and whose body depends on both."""
    return TAG.pack(thread, sequence) + payload(thread * 100_003 + sequence, 24 + sequence % 200)


# --- shutdown from anywhere ------------------------------------------------------


class Blocked:
    """Run `call` in a thread and record what it raised and when."""

    def __init__(self, call: Any) -> None:
        self.error: BaseException | None = None
        self.returned = False
        self.woke_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Any) -> None:
        try:
            call()
            self.returned = True
        except BaseException as error:
            self.error = error
        self.woke_at = time.monotonic()

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the blocked call never woke"


@pytest.fixture
def attached_consumer(scheme: str) -> Iterator[tuple[podipc.Consumer, str]]:
    """A consumer in this process with a producer process attached (one message taken), holding the stream open."""
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    done = CONTEXT.Event()
    producer = CONTEXT.Process(target=send_then_hold, args=(url, 1, done))
    producer.start()
    assert consumer.recv(timeout=30) == payload(0, 100)
    yield consumer, url
    consumer.close()
    done.set()
    producer.join(30)


def test_close_from_another_thread_wakes_a_recv_blocked_on_an_attached_producer(
    attached_consumer: tuple[podipc.Consumer, str],
) -> None:
    consumer, _ = attached_consumer
    blocked = Blocked(consumer.recv)
    time.sleep(0.3)
    closed_at = time.monotonic()
    consumer.close()
    blocked.join()
    assert isinstance(blocked.error, podipc.ChannelClosed)
    assert blocked.woke_at - closed_at < WAKE_SECONDS


def test_an_attached_producer_dropped_without_close_is_collected_and_its_consumer_sees_it_gone(scheme: str) -> None:
    """Nothing of the library (the peer monitor's watch least of all) keeps a dropped endpoint alive: it is
    collected, its __del__ aborts it, and its watch ends (found as a peer monitor that never stopped)."""
    url = url_for(scheme, wait=60)
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"first", timeout=30)
    assert consumer.recv(timeout=30) == b"first"
    dropped = weakref.ref(producer)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del producer
        # the peer monitor's thread holds the endpoint for the moment of a probe (its watch is weak): when the
        # del falls in that moment, the endpoint is collected as the probe ends, in that thread
        wait_until(lambda: gc.collect() >= 0 and dropped() is None, 5)
    assert dropped() is None, gc.get_referrers(dropped())
    with pytest.raises(podipc.PeerGone):
        consumer.recv(timeout=10)
    consumer.close()


def test_close_from_another_thread_wakes_a_recv_waiting_for_the_producer(scheme: str) -> None:
    url = url_for(scheme, wait=60)
    consumer = podipc.consumer(url)
    blocked = Blocked(consumer.recv)
    time.sleep(0.3)
    closed_at = time.monotonic()
    consumer.close()
    blocked.join()
    assert isinstance(blocked.error, podipc.ChannelClosed)
    assert blocked.woke_at - closed_at < WAKE_SECONDS
    assert wait_until(lambda: not leftovers(url), 5)


class LeftRunning:
    """What a test started that must not outlive it when an assertion fails midway: a producer that a thread of
    the test keeps sending on (to a consumer that may be reading by then), the consumer's process."""

    def __init__(self) -> None:
        self.producers: list[podipc.Producer] = []
        self.processes: list[Any] = []

    def producer(self, url: str) -> podipc.Producer:
        """podipc.producer(url), aborted at the end of the test (a no-op once it was closed)."""
        producer = podipc.producer(url)
        self.producers.append(producer)
        return producer

    def stop(self) -> None:
        """Abort the producers (which wakes a sender thread with ChannelClosed) and kill the processes left."""
        for producer in self.producers:
            producer.abort()
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(10)


@pytest.fixture
def left_running() -> Iterator[LeftRunning]:
    """A LeftRunning stopped after the test, passed or failed."""
    kept = LeftRunning()
    yield kept
    kept.stop()


def waits_for_room(scheme: str) -> bool:
    """False for udp: its sends never wait for room (a datagram that does not fit is dropped and counted in
    `lost`, its documented semantics); a udp send waits only for the consumer to appear."""
    return scheme in RELIABLE


def spawn_stalling_consumer(scheme: str, url: str, wait: float = 60) -> tuple[Any, Any, Any]:
    """A consumer process that makes the producer's sends wait until told to read: attached but not reading
    (the channel fills), or on udp not even open yet (see waits_for_room)."""
    return spawn_consumer(url, reading=False, open_when_told=not waits_for_room(scheme), wait=wait)


def block_a_send(scheme: str, producer: podipc.Producer, digest: Any) -> Blocked:
    """A send blocked by a spawn_stalling_consumer: the channel filled (the digest covers what went out), or on
    udp the first send, waiting for the consumer to appear."""
    if waits_for_room(scheme):
        return fill_until_blocked(producer, digest)
    blocked = Blocked(lambda: producer.send(b"never sent"))
    time.sleep(0.3)
    assert blocked.thread.is_alive(), blocked.error
    return blocked


def fill_until_blocked(producer: podipc.Producer, digest: Any) -> Blocked:
    """Send in a thread until a send blocks; the digest covers every send that returned.

    The count is judged only once the first send returned: that one waits for the consumer process to attach,
    which on a loaded machine takes longer than the 0.3 s the count is given to move."""
    sent = [0]

    def send_forever() -> None:
        while True:
            message = payload(sent[0], 4096)
            producer.send(message)
            digest.update(message)
            sent[0] += 1

    blocked = Blocked(send_forever)
    assert wait_until(lambda: sent[0] > 0 or not blocked.thread.is_alive(), 30), "the first send never returned"
    assert sent[0] > 0, blocked.error
    previous = -1
    while previous != sent[0]:  # the count stops moving once a send blocks
        previous = sent[0]
        time.sleep(0.3)
    assert sent[0] > 0
    return blocked


def test_close_from_another_thread_wakes_a_blocked_send_and_still_ends_the_stream(
    scheme: str, left_running: LeftRunning
) -> None:
    url = url_for(scheme)
    consumer, start_reading, results = spawn_stalling_consumer(scheme, url)
    left_running.processes.append(consumer)
    producer = left_running.producer(url)
    digest = hashlib.sha256()
    blocked = block_a_send(scheme, producer, digest)
    closed_at = time.monotonic()
    closer = Blocked(lambda: producer.close(timeout=30))
    blocked.join()
    assert isinstance(blocked.error, podipc.ChannelClosed)
    assert blocked.woke_at - closed_at < WAKE_SECONDS
    start_reading.set()
    closer.join()
    assert closer.returned, closer.error
    count, received, ending = results.get(timeout=60)
    consumer.join(30)
    assert ending == "end of stream"
    assert received == digest.hexdigest(), f"the consumer got {count} messages, not what the producer sent"


def test_a_send_that_finds_the_closer_holding_the_producer_raises_channel_closed_at_once(
    scheme: str, left_running: LeftRunning
) -> None:
    """The closer keeps the call gate while it waits for the consumer's ack; a call waiting for the gate must not
    wait with it (found as a hang of test_close_from_another_thread_wakes_a_blocked_send... on tcp, ~1 run in 6).
    On udp, whose sends never wait for room, the send and the closer wait for the consumer to appear (filling the
    channel never blocked there: the test itself hung)."""
    url = url_for(scheme)
    consumer, start_reading, results = spawn_stalling_consumer(scheme, url)
    left_running.processes.append(consumer)
    producer = left_running.producer(url)
    digest = hashlib.sha256()
    blocked = block_a_send(scheme, producer, digest)
    closer = Blocked(lambda: producer.close(timeout=30))
    blocked.join()
    time.sleep(0.3)  # the closer holds the gate now, waiting for an ack (udp: a consumer) that cannot come yet
    started = time.monotonic()
    late = Blocked(lambda: producer.send(b"late"))
    late.join()
    assert isinstance(late.error, podipc.ChannelClosed), late.error
    assert late.woke_at - started < WAKE_SECONDS
    start_reading.set()
    closer.join()
    assert closer.returned, closer.error
    count, received, ending = results.get(timeout=60)
    consumer.join(30)
    assert (received, ending) == (digest.hexdigest(), "end of stream"), count


def test_abort_from_another_thread_wakes_a_blocked_send_and_the_consumer_sees_peer_gone(
    scheme: str, left_running: LeftRunning
) -> None:
    url = url_for(scheme)
    consumer, start_reading, results = spawn_stalling_consumer(scheme, url, wait=2)
    left_running.processes.append(consumer)
    producer = left_running.producer(url)
    blocked = block_a_send(scheme, producer, hashlib.sha256())
    aborted_at = time.monotonic()
    producer.abort()
    blocked.join()
    assert isinstance(blocked.error, podipc.ChannelClosed)
    assert blocked.woke_at - aborted_at < WAKE_SECONDS
    start_reading.set()
    _, _, ending = results.get(timeout=60)
    consumer.join(30)
    # udp: the aborted producer never met its consumer, which then finds no producer (and nothing left behind)
    assert ending == ("PeerGone" if waits_for_room(scheme) else "PeerTimeout")


def test_close_from_a_signal_handler_wakes_the_recv_it_interrupted_and_frees_after(scheme: str) -> None:
    url = url_for(scheme, wait=60)
    consumer = podipc.consumer(url)
    handled: list[float] = []

    def close_now(signum: int, frame: object) -> None:
        handled.append(time.monotonic())
        consumer.close()

    previous = signal.signal(signal.SIGALRM, close_now)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(podipc.ChannelClosed):
            consumer.recv()
        woke_at = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert woke_at - handled[0] < WAKE_SECONDS
    with podipc.consumer(url):  # the address was freed as the interrupted recv left
        pass


def test_close_from_a_signal_handler_during_a_blocked_send_ends_the_stream_as_the_send_leaves(
    scheme: str, left_running: LeftRunning
) -> None:
    url = url_for(scheme)
    consumer, start_reading, results = spawn_stalling_consumer(scheme, url)
    left_running.processes.append(consumer)
    producer = left_running.producer(url)
    digest = hashlib.sha256()

    def close_now(signum: int, frame: object) -> None:
        start_reading.set()
        producer.close(timeout=30)

    previous = signal.signal(signal.SIGALRM, close_now)
    sent = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(podipc.ChannelClosed):
            while True:
                message = payload(sent, 4096)
                producer.send(message)
                digest.update(message)
                sent += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    count, received, ending = results.get(timeout=60)
    consumer.join(30)
    assert (count, received, ending) == (sent, digest.hexdigest(), "end of stream")


def test_two_hundred_closes_from_another_thread_never_crash_or_hang(scheme: str) -> None:
    for round_number in range(200):
        url = url_for(scheme, wait=60)
        consumer = podipc.consumer(url)
        producer = None
        if round_number % 2:
            producer = podipc.producer(url)
            producer.send(b"one")
            assert consumer.recv(timeout=30) == b"one"
        blocked = Blocked(consumer.recv)
        time.sleep(0.002 * (round_number % 5))
        consumer.close()
        blocked.join()
        assert isinstance(blocked.error, podipc.ChannelClosed), blocked.error
        if producer is not None:
            producer.abort()


# --- timeout=0, the timeout rule, waiting forever ---------------------------------


def test_recv_with_timeout_zero_returns_each_of_ten_waiting_messages(scheme: str) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    done = CONTEXT.Event()
    producer = CONTEXT.Process(target=send_then_hold, args=(url, 10, done))
    producer.start()
    try:
        assert consumer.poll(30)
        time.sleep(0.3)  # all ten are in the socket buffer now
        assert [consumer.recv(timeout=0) for _ in range(10)] == [payload(index, 100) for index in range(10)]
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0)
        assert consumer.try_recv() is None
        done.set()
        with pytest.raises(podipc.EndOfStream):
            consumer.recv(timeout=30)
    finally:
        done.set()
        producer.join(30)
        consumer.close()


def test_send_with_timeout_zero_goes_out_on_an_idle_connection(scheme: str) -> None:
    url = url_for(scheme)
    consumer, _, results = spawn_consumer(url, reading=True)
    digest = hashlib.sha256()
    with podipc.producer(url) as producer:
        deadline = time.monotonic() + 30
        while not producer.try_send(b"first"):  # connecting and the hello take a few attempts
            assert time.monotonic() < deadline
            producer.poll(0.1)
        digest.update(b"first")
        time.sleep(0.2)
        producer.send(b"second", timeout=0)
        assert producer.try_send(b"third")
        digest.update(b"second" + b"third")
    count, received, ending = results.get(timeout=60)
    consumer.join(30)
    assert (count, received, ending) == (3, digest.hexdigest(), "end of stream")


def elapsed(call: Any) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()
    except podipc.PodIPCError as error:
        return error, time.monotonic() - started
    return None, time.monotonic() - started


def test_the_calls_own_timeout_raises_timeout_even_before_the_peer_appeared(scheme: str) -> None:
    consumer = podipc.consumer(url_for(scheme, wait=30))
    error, seconds = elapsed(lambda: consumer.recv(timeout=0.3))
    consumer.close()
    assert type(error) is podipc.Timeout and 0.25 <= seconds < 2
    producer = producer_that_waits(scheme, wait=30)
    error, seconds = elapsed(lambda: producer.send(b"x", timeout=0.3))
    producer.abort()
    assert type(error) is podipc.Timeout and 0.25 <= seconds < 2


def test_the_wait_deadline_raises_peer_timeout_when_it_comes_first(scheme: str) -> None:
    consumer = podipc.consumer(url_for(scheme, wait=0.3))
    error, seconds = elapsed(lambda: consumer.recv(timeout=10))
    assert isinstance(error, podipc.PeerTimeout) and 0.25 <= seconds < 2
    with pytest.raises(podipc.PeerTimeout):
        consumer.try_recv()
    consumer.close()
    producer = producer_that_waits(scheme, wait=0.3)
    error, seconds = elapsed(lambda: producer.send(b"x", timeout=10))
    assert isinstance(error, podipc.PeerTimeout) and 0.25 <= seconds < 2
    with pytest.raises(podipc.PeerTimeout):
        producer.try_send(b"x")
    producer.abort()


def test_try_calls_before_the_wait_deadline_say_not_yet(scheme: str) -> None:
    url = url_for(scheme, wait=30)
    consumer = podipc.consumer(url)
    assert consumer.try_recv() is None
    assert not consumer.poll(0)
    consumer.close()


def test_once_the_peer_was_seen_a_timeout_is_never_peer_timeout(
    attached_consumer: tuple[podipc.Consumer, str],
) -> None:
    consumer, _ = attached_consumer
    consumer.wait_deadline = time.monotonic() - 1  # long past: only the call's own timeout counts now
    error, _ = elapsed(lambda: consumer.recv(timeout=0.2))
    assert type(error) is podipc.Timeout


@pytest.mark.parametrize("forever", [None, "inf", "forever", "none"])
def test_wait_forever_never_raises_peer_timeout(scheme: str, forever: object) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url, wait=forever)
    assert consumer.wait_deadline == math.inf
    error, _ = elapsed(lambda: consumer.recv(timeout=0.3))
    assert type(error) is podipc.Timeout
    producer = CONTEXT.Process(target=send_paced, args=(url, 1, 0.0))
    producer.start()
    try:
        assert list(consumer) == [payload(0, 100)]
    finally:
        producer.join(30)
        consumer.close()


def test_wait_forever_in_the_url(scheme: str) -> None:
    producer = producer_that_waits(scheme, wait="inf")
    assert producer.wait_deadline == math.inf
    error, _ = elapsed(lambda: producer.send(b"x", timeout=0.3))
    producer.abort()
    assert type(error) is podipc.Timeout


# --- threads -------------------------------------------------------------------


def test_four_threads_sharing_a_producer_deliver_every_message_whole_once_and_in_order_per_thread(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    consumer = CONTEXT.Process(target=consume_tags, args=(url, results))
    consumer.start()
    threads_count, per_thread = 4, 3000
    with podipc.producer(url) as producer:
        # the main thread is one of the four: a call that waits there for another thread's turn must not be
        # taken for one interrupted by a signal handler (found as RuntimeError on mq's fast path)
        senders = [
            threading.Thread(target=lambda n=n: [producer.send(tagged(n, i)) for i in range(per_thread)])
            for n in range(1, threads_count)
        ]
        for sender in senders:
            sender.start()
        for index in range(per_thread):
            producer.send(tagged(0, index))
        for sender in senders:
            sender.join(60)
    tags, damaged, lost = results.get(timeout=60)
    consumer.join(30)
    assert damaged == 0
    # udp may drop (counted in `lost`, never on the reliable channels): what arrived plus what was lost is all
    assert len(tags) + lost == threads_count * per_thread and lost <= threads_count * per_thread // 100
    for n in range(threads_count):
        sequences = [sequence for thread, sequence in tags if thread == n]
        assert sequences == sorted(set(sequences)) and set(sequences) <= set(range(per_thread))


def test_three_threads_sharing_a_consumer_get_every_message_once(scheme: str) -> None:
    url = url_for(scheme)
    count = 6000
    consumer = podipc.consumer(url)
    producer = CONTEXT.Process(target=send_paced, args=(url, count, 0.0))
    producer.start()
    taken: list[list[bytes]] = [[], [], []]

    def take(into: list[bytes], timeout: float | None = 30) -> None:
        try:
            while True:
                into.append(consumer.recv(timeout=timeout))
        except podipc.EndOfStream:
            pass

    # the main thread reads too, without a timeout (the fast paths' case), while the others wait their turn
    readers = [threading.Thread(target=take, args=(into,)) for into in taken[1:]]
    for reader in readers:
        reader.start()
    take(taken[0], None)
    for reader in readers:
        reader.join(60)
    producer.join(30)
    consumer.close()
    received = [m for part in taken for m in part]
    # udp may drop (counted in `lost`, never on the reliable channels): what arrived plus what was lost is all
    assert len(received) + consumer.lost == count and consumer.lost <= count // 100
    assert len(set(received)) == len(received) and set(received) <= {payload(index, 100) for index in range(count)}
    for part in taken:  # order per thread: each thread saw increasing indexes
        indexes = [struct.unpack_from(">Q", message)[0] for message in part]
        assert indexes == sorted(indexes)


def hold_the_turn(endpoint: Any, seconds: float) -> threading.Thread:
    """A thread that holds `endpoint`'s call gate for `seconds`, as a call of its own would (it has taken it on return)."""
    taken = threading.Event()

    def hold() -> None:
        endpoint._enter(None)
        taken.set()
        time.sleep(seconds)
        endpoint._token.append(None)
        if endpoint._state:
            endpoint._after_call()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(5)
    return holder


def test_every_call_on_the_main_thread_waits_its_turn_behind_another_threads_call(scheme: str) -> None:
    """The main thread is where signal handlers run, so a call there that finds the gate taken looks up its stack
    for an interrupted call of its own; a transport's fast path that handed over to the base's call must not count
    as one (mq, sysvmq and zmq's did: RuntimeError instead of waiting)."""
    url = url_for(scheme, wait=60)
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"m", timeout=30)  # attached: each call below has its peer
    sent = 1
    producer_calls: list[tuple[str, Any]] = [
        ("send", lambda: producer.send(b"m")),
        ("send with a timeout", lambda: producer.send(b"m", timeout=30)),
        ("try_send", lambda: producer.try_send(b"m")),
        ("send_many", lambda: producer.send_many([b"m", b"m"], timeout=30)),
        ("flush", lambda: producer.flush(30)),
        ("poll", lambda: producer.poll(0)),
    ]
    for name, call in producer_calls:
        holder = hold_the_turn(producer, 0.05)
        result = call()
        holder.join(5)
        sent += {"send": 1, "send with a timeout": 1, "try_send": 1 if result else 0, "send_many": 2}.get(name, 0)
    received = [consumer.recv(timeout=30)]

    def poll_receiving_nothing() -> list[bytes]:
        consumer.poll(0)
        return []

    consumer_calls: list[tuple[str, Any]] = [
        ("recv", lambda: [consumer.recv()]),
        ("recv with a timeout", lambda: [consumer.recv(timeout=30)]),
        ("recv_many", lambda: consumer.recv_many(1, timeout=30)),
        ("try_recv", lambda: [m for m in [consumer.try_recv()] if m is not None]),
        ("poll", poll_receiving_nothing),
    ]
    if hasattr(consumer, "recv_view"):
        consumer_calls.append(("recv_view", lambda: [bytes(consumer.recv_view(timeout=30))]))
    for _, call in consumer_calls:
        if len(received) == sent:
            break
        holder = hold_the_turn(consumer, 0.05)
        received += call()
        holder.join(5)
    while len(received) < sent:
        received.append(consumer.recv(timeout=30))
    assert received == [b"m"] * sent
    closer = Blocked(producer.close)  # a producer's close waits for its consumer to take the end
    with pytest.raises(podipc.EndOfStream):
        consumer.recv(timeout=30)
    closer.join()
    assert closer.error is None
    consumer.close()


# --- fork ------------------------------------------------------------------------


def use_inherited(endpoint: Any, results: Any) -> None:
    """In a forked child: using the parent's endpoint must say to open it again; close() must touch nothing."""
    try:
        if isinstance(endpoint, podipc.Producer):
            endpoint.send(b"from the child")
        else:
            endpoint.recv(timeout=1)
    except podipc.ChannelClosed as error:
        results.put(str(error))
    else:
        results.put("no error")
    endpoint.close()


def test_a_forked_child_cannot_use_the_parents_endpoints_and_the_parents_stream_goes_on(scheme: str) -> None:
    url = url_for(scheme)
    consumer, _, results = spawn_consumer(url, reading=True)
    digest = hashlib.sha256()
    with podipc.producer(url) as producer:
        for index in range(100):
            producer.send(payload(index, 300))
            digest.update(payload(index, 300))
        answers = CONTEXT.Queue()
        child = CONTEXT.Process(target=use_inherited, args=(producer, answers))
        child.start()
        message = answers.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0
        assert f"opened in process {os.getpid()} before fork(); open it again in the child" in message
        for index in range(100, 200):
            producer.send(payload(index, 300))
            digest.update(payload(index, 300))
    assert results.get(timeout=60) == (200, digest.hexdigest(), "end of stream")
    consumer.join(30)


def test_a_forked_child_cannot_use_the_parents_consumer_and_the_parent_reads_on(scheme: str) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    producer = CONTEXT.Process(target=send_paced, args=(url, 50, 0.01))
    producer.start()
    received = [consumer.recv(timeout=30)]
    answers = CONTEXT.Queue()
    child = CONTEXT.Process(target=use_inherited, args=(consumer, answers))
    child.start()
    assert "before fork(); open it again in the child" in answers.get(timeout=30)
    child.join(30)
    received += list(consumer)
    producer.join(30)
    consumer.close()
    assert received == [payload(index, 100) for index in range(50)]


# --- signals ---------------------------------------------------------------------


def test_a_handler_that_only_sets_a_flag_leaves_blocking_calls_working(scheme: str) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    producer = CONTEXT.Process(target=send_paced, args=(url, 20, 0.05))
    ticks = [0]

    def tick(signum: int, frame: object) -> None:
        ticks[0] += 1

    previous = signal.signal(signal.SIGALRM, tick)
    producer.start()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
        received = list(consumer)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        producer.join(30)
        consumer.close()
    assert received == [payload(index, 100) for index in range(20)]
    assert ticks[0] > 20


class Interrupted(Exception):
    pass


def test_a_handler_that_raises_gets_through_a_blocked_recv_promptly(scheme: str) -> None:
    consumer = podipc.consumer(url_for(scheme, wait=60))

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
    assert consumer.try_recv() is None  # still usable
    consumer.close()


SIGTERMED_PRODUCER = """
import hashlib, json, sys, time, podipc
sys.path.insert(0, {tests!r})
from integration.harness import payload
digest, count = hashlib.sha256(), 0
with podipc.producer(sys.argv[1]) as out, podipc.close_on_signals(out) as stop:
    while True:
        message = payload(count, 100)
        out.send(message)
        digest.update(message)
        count += 1
        if count == 20:
            print("sending", flush=True)
        time.sleep(0.001)
print(json.dumps({{"count": count, "sha256": digest.hexdigest(), "signal": stop.received}}), flush=True)
"""

SIGTERMED_CONSUMER = """
import json, sys, podipc
count = 0
with podipc.consumer(sys.argv[1]) as inbox, podipc.close_on_signals(inbox) as stop:
    print("ready", flush=True)
    for message in inbox:
        count += 1
print(json.dumps({"count": count, "signal": stop.received, "ended": inbox.ended}), flush=True)
"""


def test_sigterm_to_a_producer_under_close_on_signals_ends_the_stream_gracefully(scheme: str) -> None:
    url = url_for(scheme)
    consumer, _, results = spawn_consumer(url, reading=True)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = SIGTERMED_PRODUCER.format(tests=tests)
    producer = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True)
    assert producer.stdout is not None
    # its handler is in place and the stream flows (a fixed delay was too short on a loaded machine)
    assert producer.stdout.readline().strip() == "sending"
    time.sleep(0.3)
    producer.send_signal(signal.SIGTERM)
    output, _ = producer.communicate(timeout=10)
    assert producer.returncode == 0
    summary = json.loads(output)
    assert summary["signal"] == signal.SIGTERM and summary["count"] > 20
    assert results.get(timeout=30) == (summary["count"], summary["sha256"], "end of stream")
    consumer.join(30)


def test_sigterm_to_a_consumer_under_close_on_signals_stops_it_quietly(scheme: str) -> None:
    url = url_for(scheme, wait=60)
    consumer = subprocess.Popen([sys.executable, "-c", SIGTERMED_CONSUMER, url], stdout=subprocess.PIPE, text=True)
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    signalled = time.monotonic()
    consumer.send_signal(signal.SIGTERM)
    output, _ = consumer.communicate(timeout=10)
    assert time.monotonic() - signalled < 2
    assert consumer.returncode == 0
    assert '"signal": 15' in output and '"ended": false' in output
    assert wait_until(lambda: not leftovers(url), 5)


# --- readiness -------------------------------------------------------------------


SPURIOUS_WAKES = 5
"""At most this many wakes without a message in a row (zmq: libzmq's own commands, a peer connecting)."""


def selected_message(selector: selectors.BaseSelector, consumer: podipc.Consumer, scheme: str) -> bytes | None:
    """Wait on the selector, then try_recv(); on zmq a wake may bring nothing: wait again (a few times at most)."""
    for _ in range(SPURIOUS_WAKES):
        if not selector.select(10):
            return None
        message = consumer.try_recv()
        if message is not None:
            return message
        assert scheme.startswith("zmq+"), "a wake without a message"
    return None


def test_fileno_works_with_a_selector(scheme: str) -> None:
    """fileno() as documented (README, "Waiting on many"): after it fires, try_recv() until None.

    zmq's descriptor is edge-triggered and also fires for libzmq's own commands (a peer
    connecting), so a wake may bring no message there; the stream channels never wake spuriously.
    """
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    selector = selectors.DefaultSelector()
    selector.register(consumer.fileno(), selectors.EVENT_READ)
    try:
        for _ in range(SPURIOUS_WAKES):
            if not selector.select(0.2):
                break
            assert scheme.startswith("zmq+"), "a wake without a message"
            assert consumer.try_recv() is None
        producer.send(b"ready?")
        assert selected_message(selector, consumer, scheme) == b"ready?"
        assert consumer.try_recv() is None
        fd = consumer.fileno()
        producer.send(b"again")
        assert consumer.fileno() == fd
        assert selected_message(selector, consumer, scheme) == b"again"
    finally:
        selector.close()
        producer.abort()
        consumer.close()


def test_poll_says_whether_recv_would_wait_and_keeps_the_message(scheme: str) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    assert not consumer.poll(0.2)
    producer.send(b"kept")
    assert consumer.poll(10)
    assert consumer.poll(0)
    assert consumer.recv(timeout=0) == b"kept"
    assert producer.poll(5)
    closer = Blocked(lambda: producer.close(timeout=10))
    assert consumer.poll(5)
    with pytest.raises(podipc.EndOfStream):
        consumer.recv(timeout=0)
    closer.join()
    assert closer.returned, closer.error
    consumer.close()


def test_wait_returns_the_ready_endpoints_across_mixed_channels(scheme: str) -> None:
    urls = [url_for(scheme), url_for("tcp"), url_for("mq")]
    consumers = [podipc.consumer(url) for url in urls]
    producers = [podipc.producer(url) for url in urls]
    try:
        assert podipc.wait(consumers, timeout=0.2) == []
        producers[0].send(b"first")
        assert podipc.wait(consumers, timeout=10) == [consumers[0]]
        assert consumers[0].recv(timeout=0) == b"first"
        producers[2].send(b"third")  # mq:// has no readiness descriptor yet: wait() checks it periodically
        assert podipc.wait(consumers, timeout=10) == [consumers[2]]
        assert consumers[2].recv(timeout=1) == b"third"
        producers[1].send(b"second")
        assert podipc.wait(consumers, timeout=10) == [consumers[1]]
    finally:
        for producer in producers:
            producer.abort()
        for consumer in consumers:
            consumer.close()


# --- large messages ----------------------------------------------------------------


def echo(inbound: str, outbound: str) -> None:
    """Send back every message from `inbound` on `outbound` until the end of stream."""
    with podipc.consumer(inbound) as inbox, podipc.producer(outbound) as out:
        for message in inbox:
            out.send(message)


def test_a_send_returns_only_when_a_large_message_can_arrive_whole(scheme: str) -> None:
    """A frame larger than the socket buffer must not wait for a later call to finish going out."""
    there, back = url_for(scheme), url_for(scheme)
    echoer = CONTEXT.Process(target=echo, args=(there, back))
    echoer.start()
    with podipc.producer(there) as out, podipc.consumer(back) as inbox:
        # kernel queues carry at most their max_message_size (8 KiB in a pod), udp one datagram: they send their largest
        size = min(1 << 20, out.max_message_size)
        for index in range(5):
            message = payload(index, size)
            out.send(message, timeout=30)  # a timed send takes the attempt-and-wait path
            assert inbox.recv(timeout=30) == message
            out.send(message)
            assert inbox.recv(timeout=30) == message
        out.close()
        assert list(inbox) == []
    echoer.join(30)
    assert echoer.exitcode == 0
