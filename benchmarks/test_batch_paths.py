"""Batches in one process: the cost per message of 100 messages sent and received, at equal counts across sizes.

Run: `python -m pytest benchmarks/test_batch_paths.py -p no:cacheprovider --benchmark-only`.
Each round sends 100 messages and receives them: with a loop of send()/recv(), or with one
send_many() and recv_many() calls, so the two ways of every channel compare per message
(divide a round's time by 100). 100 messages of 4 KiB fit every channel's buffer here except
the queues' default depth of 10, the spool's and a unix socket's (~208 KiB in flight, the
kernel's default), which run fewer per round instead (`COUNT_BY_SCHEME`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import podipc
from benchmarks.conftest import channel_url
from benchmarks.test_hot_paths import available
from podipc.transport import schemes

SIZES = (64, 4096)
COUNT = 100
COUNT_BY_SCHEME = {"mq": 10, "sysvmq": 2, "file": 10, "unix": 32}
"""Channels whose default depth holds fewer than COUNT messages (sysvmq: 16 KiB of 4 KiB messages; unix: a
socket's default send buffer, 208 KiB, holds ~40 of them in one thread with no reader)."""


@pytest.fixture
def pair(request: pytest.FixtureRequest, short_directory: str) -> Iterator[tuple[podipc.Producer, podipc.Consumer]]:
    scheme = request.param
    problem = available(scheme)
    if problem:
        pytest.skip(problem)
    url = channel_url(scheme, short_directory)
    consumer = podipc.consumer(url, wait=10)
    producer = podipc.producer(url, wait=10)
    try:
        yield producer, consumer
    finally:
        producer.abort()
        consumer.close()


def rendezvous(producer: podipc.Producer, consumer: podipc.Consumer) -> None:
    producer.send(b"first")
    assert consumer.recv(5.0) == b"first"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("way", ["single", "batch"])
@pytest.mark.parametrize("pair", schemes(), indirect=True)
def test_a_round_of_messages_sent_and_received(
    benchmark: Callable[..., object], pair: tuple[podipc.Producer, podipc.Consumer], size: int, way: str
) -> None:
    producer, consumer = pair
    rendezvous(producer, consumer)
    count = COUNT_BY_SCHEME.get(producer.address.scheme, COUNT)
    messages = [bytes([index]) * size for index in range(count)]

    def singles() -> int:
        send, recv = producer.send, consumer.recv
        for message in messages:
            send(message)
        producer.flush()
        return sum(len(recv(5.0)) for _ in messages)

    def batches() -> int:
        producer.send_many(messages)
        received = 0
        while received < count * size:
            received += sum(len(message) for message in consumer.recv_many(count, 5.0))
        return received

    assert benchmark(batches if way == "batch" else singles) == count * size
