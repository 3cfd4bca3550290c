"""One measurement of whichever podipc PYTHONPATH names: run by benchmarks/versions.py, once per tree and round.

    PYTHONPATH=TREE python benchmarks/version_probe.py URL throughput|latency SIZE COUNT

Prints one JSON object: {"rate": msg/s} for throughput (a producer process sends COUNT
messages of SIZE bytes as fast as it can; the figure is COUNT over the consumer's time from
its first message to its last), {"p50_us": ...} for latency (COUNT round trips over two
channels, URL and URL with "-back" appended to its name, the echo in a child process) or
{"call_ns": ...} for calls (both ends in this process and thread: CALLS_BURST sends, then as
many receives, COUNT times; the least time per send + receive over the bursts, which the
machine's other work can only make longer: the per-call CPU cost, without the scheduler).
Only podipc.producer/consumer, send and recv are used, so any revision of podipc runs it.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import threading
import time
from typing import Any

import podipc

CONTEXT = multiprocessing.get_context("fork")
PEER_WAIT = "30"
LATENCY_WARMUP = 1000
CALLS_BURST = 8
"""Sends, then receives, per burst of the calls mode: fewer than the smallest queue holds (mq: 10 by default)."""


def with_wait(url: str) -> str:
    """`url` with the peer wait this probe uses (either side may open first)."""
    return f"{url}{'&' if '?' in url else '?'}wait={PEER_WAIT}"


def back_url(url: str) -> str:
    """The return channel of a round trip: the same scheme, "-back" appended to the path or port + 1."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    if scheme.startswith("tcp") or scheme.startswith("udp") or scheme == "zmq+tcp":
        host, _, port = rest.rpartition(":")
        rest = f"{host}:{int(port) + 1}"
    else:
        rest = f"{rest}-back"
    return f"{scheme}://{rest}" + (f"?{query}" if query else "")


def produce(url: str, size: int, count: int) -> None:
    payload = b"x" * size
    with podipc.producer(with_wait(url)) as producer:
        send = producer.send
        for _ in range(count):
            send(payload)


def take_the_end(consumer: Any) -> None:
    """Receive the end of stream, so the producer's close (which waits for it) returns."""
    try:
        consumer.recv()
    except podipc.EndOfStream:
        return
    raise RuntimeError("a message more than was sent")


def throughput(url: str, size: int, count: int) -> dict[str, float]:
    """COUNT messages one way, a producer process into this process's consumer."""
    sender = CONTEXT.Process(target=produce, args=(url, size, count))
    with podipc.consumer(with_wait(url)) as consumer:
        sender.start()
        recv = consumer.recv
        recv()
        started = time.perf_counter()
        for _ in range(count - 1):
            recv()
        seconds = time.perf_counter() - started
        take_the_end(consumer)
    sender.join(60)
    return {"rate": (count - 1) / seconds}


def echo(url: str, back: str, count: int) -> None:
    with podipc.consumer(with_wait(url)) as requests, podipc.producer(with_wait(back)) as replies:
        for _ in range(count):
            replies.send(requests.recv())
        take_the_end(requests)


def latency(url: str, size: int, count: int) -> dict[str, float]:
    """COUNT round trips (after LATENCY_WARMUP) to an echo process; the median in microseconds."""
    back = back_url(url)
    total = count + LATENCY_WARMUP
    echoer = CONTEXT.Process(target=echo, args=(url, back, total))
    echoer.start()
    payload = b"x" * size
    samples: list[float] = []
    with podipc.producer(with_wait(url)) as requests, podipc.consumer(with_wait(back)) as replies:
        for index in range(total):
            started = time.perf_counter()
            requests.send(payload)
            replies.recv()
            if index >= LATENCY_WARMUP:
                samples.append(time.perf_counter() - started)
        requests.close()
        take_the_end(replies)
    echoer.join(60)
    return {"p50_us": statistics.median(samples) * 1e6}


def calls(url: str, size: int, count: int) -> dict[str, float]:
    """COUNT bursts of CALLS_BURST sends then as many receives in this thread: the least ns per send + receive."""
    payload = b"x" * size
    with podipc.consumer(with_wait(url)) as consumer:
        producer = podipc.producer(with_wait(url))
        send, recv = producer.send, consumer.recv
        send(payload)
        recv()
        least = float("inf")
        clock = time.perf_counter
        for _ in range(count):
            started = clock()
            for _ in range(CALLS_BURST):
                send(payload)
            for _ in range(CALLS_BURST):
                recv()
            least = min(least, (clock() - started) / CALLS_BURST)
        closer = threading.Thread(target=producer.close)  # a producer's close waits for its consumer to take the end
        closer.start()
        take_the_end(consumer)
        closer.join(30)
    return {"call_ns": least * 1e9}


def main(argv: list[str]) -> None:
    url, mode, size, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    measure: Any = {"throughput": throughput, "latency": latency, "calls": calls}[mode]
    print(json.dumps(measure(url, size, count)))


if __name__ == "__main__":
    main(sys.argv[1:])
