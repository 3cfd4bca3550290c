"""The work queue (pattern=queue) across real processes: one producer, many consumers sharing one mq:// or
sysvmq:// queue, each message to exactly one of them.

Every payload carries its index in the producer's stream, so the union of what the consumers got
is checked against the stream (nothing lost, nothing twice) and each consumer's share against the
producer's order. A SIGKILLed consumer loses at most what it had taken; the others finish and the
producer's close() still means delivered. Pair and queue consumers refuse each other; the last
consumer removes the queue (and `podipc clean` does once all died); the endpoint contract (close
from another thread, timeout=0), the CLI and the asyncio consumer hold with pattern=queue.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import struct
import subprocess
import threading
import time
from typing import Any

import pytest

import podipc
import podipc.aio
from tests.commands import PODIPC

from .harness import CONTEXT, leftovers, url_for, wait_until

pytestmark = pytest.mark.timeout(120)

SCHEMES = ("mq", "sysvmq")
INDEX = struct.Struct(">Q")
BODY = bytes(range(24))
"""With the index: 32-byte messages."""
STREAM_COUNT = 100_000
CLOSE_WAKE_LIMIT_SECONDS = 0.1


def message(index: int) -> bytes:
    return INDEX.pack(index) + BODY


def send_in_a_thread(url: str, *messages: bytes) -> threading.Thread:
    """Produce `messages` from a thread: close() returns only once the consumers took their end markers."""

    def produce() -> None:
        with podipc.producer(url) as out:
            for data in messages:
                out.send(data)

    thread = threading.Thread(target=produce)
    thread.start()
    return thread


def queue_url(scheme: str) -> str:
    return url_for(scheme, pattern="queue", wait=30)


def consume_indices(url: str, results: Any, pace: float = 0.0, record: str = "") -> None:
    """Consume until the end marker; report (pid, indices in the order taken). `record`: also append each index
    to that file as it is taken (what a consumer SIGKILLed mid-stream had taken)."""
    taken: list[int] = []
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if record else -1
    with podipc.consumer(url) as inbox:
        results.put(("ready", os.getpid()))
        for payload in inbox:
            index = INDEX.unpack_from(payload)[0]
            taken.append(index)
            if fd >= 0:
                os.write(fd, INDEX.pack(index))
            if pace:
                time.sleep(pace)
    results.put((os.getpid(), taken))


def produce_stream(url: str, count: int) -> None:
    with podipc.producer(url) as out:
        for index in range(count):
            out.send(message(index))


def start_consumers(url: str, count: int, results: Any, **kwargs: Any) -> list[Any]:
    processes = [CONTEXT.Process(target=consume_indices, args=(url, results), kwargs=kwargs) for _ in range(count)]
    for process in processes:
        process.start()
    for _ in processes:
        assert results.get(timeout=30)[0] == "ready"
    return processes


def collect(results: Any, count: int) -> dict[int, list[int]]:
    return dict(results.get(timeout=60) for _ in range(count))


def assert_each_in_producer_order(shares: dict[int, list[int]]) -> None:
    for share in shares.values():
        assert all(earlier < later for earlier, later in itertools.pairwise(share))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_message_reaches_exactly_one_of_three_consumers_in_producer_order(scheme: str) -> None:
    url = queue_url(scheme)
    results = CONTEXT.Queue()
    consumers = start_consumers(url, 3, results)
    produce_stream(url, STREAM_COUNT)  # close() returns once each consumer took its end marker
    shares = collect(results, 3)
    for process in consumers:
        process.join(30)
        assert process.exitcode == 0
    union = sorted(index for share in shares.values() for index in share)
    assert union == list(range(STREAM_COUNT))  # every message once: none lost, none twice
    assert_each_in_producer_order(shares)
    assert leftovers(url) == []  # the last consumer removed the queue, every slot left


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_consumer_killed_mid_stream_loses_at_most_what_it_took_and_the_others_finish(
    scheme: str, tmp_path: Any
) -> None:
    url = queue_url(scheme)
    count = 20_000
    results = CONTEXT.Queue()
    survivors = start_consumers(url, 2, results, pace=0.00002)
    record = str(tmp_path / "victim")
    victim = start_consumers(url, 1, results, pace=0.001, record=record)[0]
    producer = CONTEXT.Process(target=produce_stream, args=(url, count))
    producer.start()
    assert wait_until(lambda: os.path.exists(record) and os.path.getsize(record) >= 50 * INDEX.size, 30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    producer.join(60)
    assert producer.exitcode == 0  # the survivors took everything else and their end markers: delivered
    shares = collect(results, 2)
    for process in survivors:
        process.join(30)
        assert process.exitcode == 0
    with open(record, "rb") as file:
        recorded = {INDEX.unpack_from(chunk)[0] for chunk in iter(lambda: file.read(INDEX.size), b"")}
    got = [index for share in shares.values() for index in share]
    assert len(got) == len(set(got)) and not set(got) & recorded  # nobody got a message twice
    missing = set(range(count)) - set(got) - recorded
    assert len(missing) <= 1  # at most the one the victim had taken and not yet recorded
    assert_each_in_producer_order(shares)
    assert wait_until(lambda: leftovers(url) == [], 5), leftovers(url)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pair_and_queue_sides_refuse_each_other_naming_the_pattern(scheme: str) -> None:
    url = url_for(scheme, wait=2)
    with podipc.consumer(url, pattern="queue"):
        with pytest.raises(podipc.ChannelUnavailable, match="pattern=queue"):
            podipc.consumer(url)
        out = podipc.producer(url)
        with pytest.raises(podipc.ChannelUnavailable, match="pattern=queue"):
            out.send(b"x")
        out.abort()
    with podipc.consumer(url):
        with pytest.raises(podipc.ChannelUnavailable, match="pattern=pair"):
            podipc.consumer(url, pattern="queue")
        out = podipc.producer(url, pattern="queue")
        with pytest.raises(podipc.ChannelUnavailable, match="pattern=pair"):
            out.send(b"x")
        out.abort()
    assert leftovers(url) == []


def test_other_transports_refuse_pattern_queue_naming_where_it_runs() -> None:
    with pytest.raises(podipc.AddressError, match="mq://, sysvmq://"):
        podipc.consumer(url_for("unix"), pattern="queue")
    with pytest.raises(podipc.AddressError, match="mq://, sysvmq://"):
        podipc.producer(url_for("shm") + "?pattern=queue")
    with pytest.raises(podipc.AddressError, match=r"unix://.*mq://"):
        podipc.consumer(url_for("shm"), pattern="fanin")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_queue_stays_while_a_consumer_lives_and_the_last_one_removes_it(scheme: str) -> None:
    url = queue_url(scheme)
    first = podipc.consumer(url)
    second = podipc.consumer(url)
    assert (first.slot, second.slot) == (1, 2)  # type: ignore[attr-defined]
    first.close()
    assert any("slot" not in entry and "lock" not in entry for entry in leftovers(url)), leftovers(url)
    producer = send_in_a_thread(url, b"still here")
    assert second.recv(timeout=5) == b"still here"
    with pytest.raises(podipc.EndOfStream):
        second.recv(timeout=5)
    producer.join(5)
    assert not producer.is_alive()
    second.close()
    assert leftovers(url) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_close_from_another_thread_wakes_a_blocked_recv_and_timeout_zero_tries_once(scheme: str) -> None:
    url = queue_url(scheme)
    with podipc.consumer(url) as other, podipc.consumer(url) as inbox:
        with pytest.raises(podipc.Timeout):
            inbox.recv(timeout=0)
        outcome: list[BaseException] = []
        woke = threading.Event()

        def blocked() -> None:
            try:
                inbox.recv()
            except BaseException as exc:
                outcome.append(exc)
            woke.set()

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        inbox.close()
        assert woke.wait(2)
        assert time.monotonic() - started < CLOSE_WAKE_LIMIT_SECONDS
        thread.join(2)
        assert isinstance(outcome[0], podipc.ChannelClosed)
        producer = send_in_a_thread(url, b"after")  # the other consumer still has the queue
        assert other.recv(timeout=5) == b"after"
        with pytest.raises(podipc.EndOfStream):
            other.recv(timeout=5)
        producer.join(5)
        assert not producer.is_alive()
    assert leftovers(url) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_consumers_killed_leave_what_podipc_clean_removes(scheme: str) -> None:
    url = queue_url(scheme)
    results = CONTEXT.Queue()
    consumers = start_consumers(url, 2, results)
    for process in consumers:
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    assert leftovers(url) != []
    result = subprocess.run([*PODIPC, "clean", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: leftovers(url) == [], 5), leftovers(url)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cli_consumers_counts_add_up_to_the_producers(scheme: str) -> None:
    url = queue_url(scheme)
    base = url.split("?", 1)[0]
    # the producer starts first: --consumers 2 makes it wait for both before its first message
    producer = subprocess.Popen(
        [*PODIPC, "produce", f"{base}?wait=30", "--consumers", "2", "--count", "5000", "--size", "100", "--random"],
        stdout=subprocess.PIPE,
        text=True,
    )
    consumers = [subprocess.Popen([*PODIPC, "consume", url], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        out, _ = producer.communicate(timeout=60)
        lines = [json.loads(process.communicate(timeout=60)[0].strip().splitlines()[-1]) for process in consumers]
    finally:
        for process in (producer, *consumers):
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert [process.returncode for process in (producer, *consumers)] == [0, 0, 0]
    total = json.loads(out.strip().splitlines()[-1])
    assert sum(line["messages"] for line in lines) == total["messages"] == 5000
    assert sum(line["bytes"] for line in lines) == total["bytes"]
    assert leftovers(url) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_asyncio_consumer_shares_the_queue(scheme: str) -> None:
    url = queue_url(scheme)
    count = 10_000
    results = CONTEXT.Queue()
    others = start_consumers(url, 1, results)

    async def consume() -> list[int]:
        taken = []
        async with podipc.aio.consumer(url) as inbox:
            producer = CONTEXT.Process(target=produce_stream, args=(url, count))
            producer.start()
            while True:
                try:
                    payload = await inbox.recv(timeout=60)
                except podipc.EndOfStream:
                    break
                taken.append(INDEX.unpack_from(payload)[0])
        producer.join(30)
        assert producer.exitcode == 0
        return taken

    mine = asyncio.run(consume())
    shares = collect(results, 1)
    others[0].join(30)
    shares[0] = mine
    assert sorted(index for share in shares.values() for index in share) == list(range(count))
    assert_each_in_producer_order(shares)
    assert leftovers(url) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_threads_sharing_a_work_queue_consumer_get_each_message_once(scheme: str) -> None:
    url = queue_url(scheme)
    count = 20_000
    results = CONTEXT.Queue()
    others = start_consumers(url, 1, results)
    taken: list[list[int]] = [[], []]
    with podipc.consumer(url) as inbox:

        def drain(share: list[int]) -> None:
            for payload in inbox:
                share.append(INDEX.unpack_from(payload)[0])

        threads = [threading.Thread(target=drain, args=(share,)) for share in taken]
        for thread in threads:
            thread.start()
        produce_stream(url, count)
        for thread in threads:
            thread.join(30)
    shares = collect(results, 1)
    others[0].join(30)
    shares[1], shares[2] = taken
    assert sorted(index for share in shares.values() for index in share) == list(range(count))
    assert_each_in_producer_order(shares)
    assert leftovers(url) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_producer_raises_peer_gone_once_no_consumer_is_left(scheme: str) -> None:
    url = queue_url(scheme)
    results = CONTEXT.Queue()
    consumers = start_consumers(url, 2, results, pace=0.01)
    with pytest.raises(podipc.PeerGone), podipc.producer(url) as out:  # in a send, or in close()
        for index in range(20_000):
            out.send(message(index))
            if index == 50:
                for process in consumers:
                    os.kill(process.pid, signal.SIGKILL)
    for process in consumers:
        process.join(10)
    subprocess.run([*PODIPC, "clean"], capture_output=True, timeout=60, check=False)
    assert wait_until(lambda: leftovers(url) == [], 5), leftovers(url)
