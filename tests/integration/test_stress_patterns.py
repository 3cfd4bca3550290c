"""Load on the multi-party patterns: fan-in, broadcast, work queue and request/reply, every side its own process.

Each test moves COUNT messages (PODIPC_STRESS_COUNT, 20,000 by default in CI) through one pattern
on one channel and checks that nothing was lost, duplicated, reordered or corrupted, that every
process's peak RSS stayed under PEAK_MEMORY_LIMIT_KIB, and that nothing was left behind. The
full run covers this module and the pairs' (test_stress.py):
`PODIPC_STRESS_COUNT=1000000 .venv/bin/python -m pytest -m stress -s tests/integration/test_stress.py
tests/integration/test_stress_patterns.py`, which prints one line of figures per test.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

import podipc

from .harness import CONTEXT, INDEX, SideResult, leftovers, payload, peak_rss, run_producer, url_for, wait_until
from .load import COUNT, PEAK_MEMORY_LIMIT_KIB, CyclingSizes, gather_reports, mib, peak_rss_of, report_peak_rss
from .test_broadcast import subscribe
from .test_broadcast import url as broadcast_url
from .test_rpc import ServerProcess
from .test_work_queue import assert_each_in_producer_order, message, produce_stream, queue_url

pytestmark = [pytest.mark.stress, pytest.mark.timeout(3600)]

PRODUCERS = 4
SUBSCRIBERS = 2
QUEUE_CONSUMERS = 3
CLIENT_PROCESSES = 2
THREADS_PER_CLIENT = 2
DROP_RING_CAPACITY = "32KiB"
"""Small enough that a producer that never waits overruns its subscribers again and again, mid-copy too."""
WAIT_SECONDS = 30
RESULT_TIMEOUT_SECONDS = 3000
"""How long the test waits for a process's report: the 10^6 run of the slowest pattern takes minutes."""
CALLER = struct.Struct(">HH")
"""The (client process, thread) tag that opens every request, so a reply given to the wrong call shows."""


def figures(pattern: str, messages: int, seconds: float, checked: str, peaks: dict[str, int], lost: str = "0") -> None:
    """Print the test's line of figures: messages, rate, what was checked, every process's peak RSS."""
    rate = messages / seconds if seconds else 0
    memory = "  ".join(f"{role} {mib(kib)}" for role, kib in peaks.items())
    print(
        f"\nstress {pattern:16} {messages:>9} messages  lost {lost}  {checked}  {rate:>9.0f} msg/s  peak RSS {memory}"
    )


def assert_memory_bounded(peaks: dict[str, int]) -> None:
    """Every process stayed under the limit."""
    assert all(kib < PEAK_MEMORY_LIMIT_KIB for kib in peaks.values()), peaks


def collect_peaks(peaks: Any, processes: Sequence[Any]) -> dict[int, tuple[int, float]]:
    """The (peak RSS in KiB, seconds) report_peak_rss put for each process, by pid; then join them."""
    reports = {pid: (kib, seconds) for pid, kib, seconds in gather_reports(peaks, processes, len(processes), 60)}
    for process in processes:
        process.join(30)
        assert process.exitcode == 0, process
    return reports


# --- fan-in -----------------------------------------------------------------


def gather(url: str, sizes: Sequence[int], results: Any) -> None:
    """The fan-in consumer: take every producer's stream, checking each message against what that producer sent.

    Reports messages per producer, the first few wrong ones, the consumer's per-producer summary,
    the seconds from the first message to the end of stream, and peak RSS.
    """
    taken: dict[str, int] = {}
    wrong: list[str] = []
    started = 0.0
    with podipc.consumer(url, pattern="fanin", producers=PRODUCERS, wait=WAIT_SECONDS) as consumer:
        while True:
            try:
                name, received = consumer.recv_from(timeout=60)  # type: ignore[attr-defined]
            except podipc.EndOfStream:
                break
            index = taken.get(name, 0)
            if not index and not taken:
                started = time.monotonic()
            if (index >= len(sizes) or received != payload(index, sizes[index])) and len(wrong) < 10:
                wrong.append(f"{name}: message {index} of {len(received)} bytes is not the one it sent")
            taken[name] = index + 1
        seconds = time.monotonic() - started
        summary = consumer.summary()  # type: ignore[attr-defined]
    results.put({"taken": taken, "wrong": wrong, "summary": summary, "seconds": seconds, "peak_rss_kib": peak_rss()})


@pytest.mark.parametrize("scheme", ["unix", "tcp", "mq", "sysvmq", "zmq+ipc", "zmq+tcp"])
def test_fanin_four_producers_each_deliver_their_whole_stream_in_order(scheme: str, reap: list[Any]) -> None:
    url = url_for(scheme)
    sizes = CyclingSizes(COUNT // PRODUCERS)
    gathered = CONTEXT.Queue()
    consumer = CONTEXT.Process(target=gather, args=(url, sizes, gathered))
    reap.append(consumer)
    consumer.start()
    names = [f"app-{number}" for number in range(PRODUCERS)]
    sent = {name: CONTEXT.Queue() for name in names}
    producers = [
        CONTEXT.Process(
            target=run_producer, args=(f"{url}?name={name}&wait={WAIT_SECONDS}", sizes, sent[name], 0, None)
        )
        for name in names
    ]
    reap.extend(producers)
    for process in producers:
        process.start()
    everyone = [*producers, consumer]
    produced: dict[str, SideResult] = {
        name: gather_reports(sent[name], everyone, 1, RESULT_TIMEOUT_SECONDS)[0] for name in names
    }
    (consumed,) = gather_reports(gathered, everyone, 1, RESULT_TIMEOUT_SECONDS)
    for process in (*producers, consumer):
        process.join(30)
        assert process.exitcode == 0, process
    for name, result in produced.items():
        assert result.ok, f"{name}: {result.error}"
    assert consumed["wrong"] == []
    assert consumed["taken"] == dict.fromkeys(names, len(sizes))
    summaries = {entry["name"]: entry for entry in consumed["summary"]}
    assert sorted(summaries) == names
    for name, result in produced.items():
        entry = summaries[name]
        assert (entry["messages"], entry["bytes"], entry["sha256"]) == (result.messages, result.bytes, result.sha256)
        assert entry["ended"] == "end of stream"
    peaks = {"consumer": consumed["peak_rss_kib"], "producers": max(r.peak_rss_kib for r in produced.values())}
    figures(f"fanin+{scheme}", PRODUCERS * len(sizes), consumed["seconds"], "in order  sha256 ok", peaks)
    assert_memory_bounded(peaks)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


# --- broadcast --------------------------------------------------------------


def broadcast_to_subscribers(address: str, reap: list[Any]) -> tuple[SideResult, list[dict[str, Any]], dict[str, int]]:
    """Start the subscribers, then a producer of COUNT indexed messages; (producer's result, subscribers' reports, peaks)."""
    reports, peaks = CONTEXT.Queue(), CONTEXT.Queue()
    subscribers = [
        CONTEXT.Process(target=report_peak_rss, args=(peaks, subscribe, address, reports)) for _ in range(SUBSCRIBERS)
    ]
    reap.extend(subscribers)
    for process in subscribers:
        process.start()
    sent = CONTEXT.Queue()
    producer = CONTEXT.Process(
        target=run_producer, args=(address, CyclingSizes(COUNT, smallest=INDEX.size), sent, 0, None)
    )
    reap.append(producer)
    producer.start()
    everyone = [producer, *subscribers]
    (produced,) = gather_reports(sent, everyone, 1, RESULT_TIMEOUT_SECONDS)
    received = gather_reports(reports, everyone, SUBSCRIBERS, RESULT_TIMEOUT_SECONDS)
    producer.join(30)
    assert producer.exitcode == 0
    subscriber_peaks = collect_peaks(peaks, subscribers)
    memory = {"producer": produced.peak_rss_kib, "subscribers": max(kib for kib, _ in subscriber_peaks.values())}
    return produced, received, memory


@pytest.mark.parametrize("scheme", ["shm", "unix", "tcp"])
def test_broadcast_slow_wait_every_subscriber_gets_every_message_in_order(scheme: str, reap: list[Any]) -> None:
    address = broadcast_url("stress-wait", scheme, subscribers=SUBSCRIBERS, slow="wait")
    produced, received, peaks = broadcast_to_subscribers(address, reap)
    assert produced.ok, produced.error
    for report in received:
        assert report["in_order"]
        assert (report["count"], report["sha256"], report["gaps"], report["lost"]) == (
            COUNT,
            produced.sha256,
            0,
            0,
        )
    figures(f"broadcast+wait+{scheme}", COUNT, produced.seconds, "in order  sha256 ok", peaks)
    assert_memory_bounded(peaks)
    assert wait_until(lambda: not leftovers(address), 5), leftovers(address)


@pytest.mark.parametrize("scheme", ["shm", "unix", "tcp"])
def test_broadcast_slow_drop_every_subscriber_accounts_for_every_message(scheme: str, reap: list[Any]) -> None:
    address = broadcast_url("stress-drop", scheme, subscribers=SUBSCRIBERS, slow="drop", capacity=DROP_RING_CAPACITY)
    produced, received, peaks = broadcast_to_subscribers(address, reap)
    assert produced.ok, produced.error
    for report in received:
        assert report["in_order"]  # no message twice, none out of order
        assert report["lost"] == report["gaps"]  # every message missed is counted, none twice
        assert report["count"] + report["lost"] == COUNT
    lost = "+".join(str(report["lost"]) for report in received)
    figures(
        f"broadcast+drop+{scheme}",
        COUNT,
        produced.seconds,
        "in order  delivered + lost == sent",
        peaks,
        f"{lost} (counted)",
    )
    assert_memory_bounded(peaks)
    assert wait_until(lambda: not leftovers(address), 5), leftovers(address)


# --- work queue -------------------------------------------------------------


def take_share(url: str, results: Any) -> None:
    """A work-queue consumer: take messages until the end marker; report (pid, indices in order taken, their sha256)."""
    taken: list[int] = []
    digest = hashlib.sha256()
    with podipc.consumer(url) as inbox:
        results.put(("ready", os.getpid(), ""))
        for received in inbox:
            taken.append(INDEX.unpack_from(received)[0])
            digest.update(received)
    results.put((os.getpid(), taken, digest.hexdigest()))


def sha256_of_share(share: list[int]) -> str:
    """The sha256 of the work-queue messages with these indices, in this order."""
    digest = hashlib.sha256()
    for index in share:
        digest.update(message(index))
    return digest.hexdigest()


@pytest.mark.parametrize("scheme", ["mq", "sysvmq"])
def test_work_queue_every_message_reaches_exactly_one_of_three_consumers_in_producer_order(
    scheme: str, reap: list[Any]
) -> None:
    url = queue_url(scheme)
    results, peaks = CONTEXT.Queue(), CONTEXT.Queue()
    consumers = [
        CONTEXT.Process(target=report_peak_rss, args=(peaks, take_share, url, results)) for _ in range(QUEUE_CONSUMERS)
    ]
    reap.extend(consumers)
    for process in consumers:
        process.start()
    ready = gather_reports(results, consumers, QUEUE_CONSUMERS, WAIT_SECONDS)
    assert [report[0] for report in ready] == ["ready"] * QUEUE_CONSUMERS
    producer = CONTEXT.Process(target=report_peak_rss, args=(peaks, produce_stream, url, COUNT))
    reap.append(producer)
    producer.start()
    reports = gather_reports(results, [producer, *consumers], QUEUE_CONSUMERS, RESULT_TIMEOUT_SECONDS)
    timings = collect_peaks(peaks, [producer, *consumers])
    shares = {pid: taken for pid, taken, _ in reports}
    union = sorted(itertools.chain.from_iterable(shares.values()))
    assert union == list(range(COUNT))  # every message once: none lost, none twice
    assert_each_in_producer_order(shares)
    for _, taken, sha256 in reports:
        assert sha256 == sha256_of_share(taken)  # every message whole
    producer_kib, producer_seconds = timings[producer.pid]
    peaks_by_role = {"producer": producer_kib, "consumers": max(timings[pid][0] for pid in shares)}
    figures(f"queue+{scheme}", COUNT, producer_seconds, "each once  sha256 ok", peaks_by_role)
    assert_memory_bounded(peaks_by_role)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


# --- request/reply ----------------------------------------------------------


def call_from_threads(url: str, client_number: int, calls_per_thread: int, results: Any) -> None:
    """A client process: THREADS_PER_CLIENT threads share one client, each making its calls and checking each reply.

    Every request is the caller's tag and an indexed payload of a cycling size; the report
    holds the calls answered, the first few wrong replies or errors, and peak RSS.
    """
    sizes = CyclingSizes(calls_per_thread)
    answered = [0] * THREADS_PER_CLIENT
    wrong: list[str] = []
    with podipc.client(url, wait=WAIT_SECONDS) as client:

        def calls(thread_number: int) -> None:
            tag = CALLER.pack(client_number, thread_number)
            try:
                for index, size in enumerate(sizes):
                    request = tag + payload(index, size)
                    reply = client.call(request, timeout=60)
                    if reply != request:
                        wrong.append(f"{client_number}.{thread_number}: call {index} got a reply of {len(reply)} bytes")
                        return
                    answered[thread_number] += 1
            except podipc.PodIPCError as error:
                wrong.append(f"{client_number}.{thread_number}: call {answered[thread_number]}: {error!r}")

        threads = [threading.Thread(target=calls, args=(number,)) for number in range(THREADS_PER_CLIENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    results.put({"answered": sum(answered), "wrong": wrong, "peak_rss_kib": peak_rss()})


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_request_reply_every_call_from_four_threads_gets_its_own_reply(scheme: str, reap: list[Any]) -> None:
    url = url_for(scheme)
    server = ServerProcess(url, workers=THREADS_PER_CLIENT * CLIENT_PROCESSES)
    try:
        calls_per_thread = COUNT // (CLIENT_PROCESSES * THREADS_PER_CLIENT)
        results = CONTEXT.Queue()
        clients = [
            CONTEXT.Process(target=call_from_threads, args=(url, number, calls_per_thread, results))
            for number in range(CLIENT_PROCESSES)
        ]
        reap.extend(clients)
        started = time.monotonic()
        for process in clients:
            process.start()
        reports = gather_reports(results, clients, CLIENT_PROCESSES, RESULT_TIMEOUT_SECONDS)
        seconds = time.monotonic() - started
        for process in clients:
            process.join(30)
            assert process.exitcode == 0, process
        server_kib = peak_rss_of(server.process.pid)
        counts = server.stop()
    finally:
        server.kill()
    assert [report["wrong"] for report in reports] == [[]] * CLIENT_PROCESSES
    calls = CLIENT_PROCESSES * THREADS_PER_CLIENT * calls_per_thread
    assert sum(report["answered"] for report in reports) == calls
    assert counts["calls"] == counts["replied"] == calls
    assert (counts["failed"], counts["expired"], counts["rejected"]) == (0, 0, 0)
    peaks = {"server": server_kib, "clients": max(report["peak_rss_kib"] for report in reports)}
    figures(f"rpc+{scheme}", calls, seconds, "replies match", peaks)
    assert_memory_bounded(peaks)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)
