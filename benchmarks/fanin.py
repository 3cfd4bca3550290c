"""Fan-in throughput: aggregate msg/s of 1, 2 and 4 producer processes into one fan-in consumer (issue 14).

    .venv/bin/python benchmarks/fanin.py [--messages 400000] [--size 64] [--scheme unix] [--repeat 3]

Each producer process sends its share of the messages (64 B by default) as fast as it can;
the consumer counts them all. The aggregate rate is messages / (first send to the last
message received). Target (issue 14): 4 producers >= 0.9x one producer's aggregate msg/s.
Beside it, the consumer's messages per CPU-second it used: on a machine with fewer cores
than producers + 1, the wall-clock rate also measures how the kernel shares the CPUs.
Not yet a `podipc bench` cell: the bench's links are one sender and one receiver each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from typing import Any

import podipc

PRODUCER_COUNTS = (1, 2, 4)
TARGET_RATIO = 0.9
CONTEXT = multiprocessing.get_context("fork")


def produce(url: str, name: str, count: int, size: int, start: Any) -> None:
    payload = b"x" * size
    with podipc.producer(url, name=name, wait=30) as channel:
        start.wait()
        send = channel.send
        for _ in range(count):
            send(payload)


def aggregate_rate(scheme: str, producers: int, messages: int, size: int) -> tuple[float, float]:
    """(messages per second, messages per consumer CPU-second) of `producers` processes into one consumer."""
    url = f"unix://@podipc-fanin-bench-{os.getpid()}-{producers}" if scheme == "unix" else "tcp://127.0.0.1:47321"
    share = messages // producers
    start = CONTEXT.Event()
    with podipc.consumer(url, pattern="fanin", producers=producers, wait=30) as consumer:
        processes = [
            CONTEXT.Process(target=produce, args=(url, f"p{index}", share, size, start)) for index in range(producers)
        ]
        for process in processes:
            process.start()
        time.sleep(0.3)  # every producer connected and waiting
        started, cpu_started = time.perf_counter(), time.process_time()
        start.set()
        received = 0
        for _ in consumer:
            received += 1
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    for process in processes:
        process.join()
    assert received == share * producers, (received, share * producers)
    return received / seconds, received / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scheme", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    rates, per_cpu = {}, {}
    for producers in PRODUCER_COUNTS:
        runs = [
            aggregate_rate(arguments.scheme, producers, arguments.messages, arguments.size)
            for _ in range(arguments.repeat)
        ]
        rates[producers] = statistics.median(rate for rate, _ in runs)
        per_cpu[producers] = statistics.median(efficiency for _, efficiency in runs)
        print(
            f"fanin-{arguments.scheme} {producers} producer(s) {arguments.size} B: {rates[producers]:,.0f} msg/s, "
            f"{per_cpu[producers]:,.0f} msg per consumer CPU-second"
        )
    print(f"consumer msg per CPU-second, 4 producers / 1 producer = {per_cpu[4] / per_cpu[1]:.2f}")
    ratio = rates[4] / rates[1]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"4 producers / 1 producer = {ratio:.2f} (target >= {TARGET_RATIO}): {verdict}")


if __name__ == "__main__":
    main()
