"""Hot paths, in one process: framing, and one send + receive on every channel, per message.

Run: `python -m pytest benchmarks -p no:cacheprovider --benchmark-only` (add
`--benchmark-json FILE` to keep the figures). One process means no context switch per
message, so these figures show podipc's own cost per call; `podipc bench` measures
between processes.

Every benchmark handles the same number of messages at every size (64 B, 64 KiB, 1 MiB):
ROUNDS rounds of ITERATIONS messages, each figure the time per message. So the figures of
one benchmark compare across sizes, and the message count never depends on how fast a
size is (pytest-benchmark's own calibration would give a fast size more rounds).
PODIPC_HOT_PATH_ROUNDS changes the number of rounds (default 200, so 2000 messages).

A blocking send() then recv() in one thread works only when the message fits what the
channel holds in flight (a stream socket's kernel buffers hold less than 1 MiB): where it
does not, the blocking pair is skipped with that reason, and the non-blocking pair
(try_send / try_recv, which podipc.aio runs on) measures every channel at every size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

import podipc
from benchmarks.conftest import channel_url
from podipc import framing
from podipc.errors import Timeout
from podipc.transport import schemes

SCHEMES = schemes()
SIZES = (64, 64 * 1024, 1 << 20)
ROUNDS = int(os.environ.get("PODIPC_HOT_PATH_ROUNDS", "200"))
ITERATIONS = 10
"""Messages per round: every figure is the time of one message over ROUNDS x ITERATIONS of them."""
WARMUP_ROUNDS = 5
PROBE_SECONDS = 2.0
"""How long the fixture waits for a probe message to arrive whole (longer means it cannot, in one thread)."""

Pair = tuple[podipc.Producer, podipc.Consumer, bytes, bool]


def per_message(benchmark: Callable[..., object], function: Callable[[], object], size: int) -> object:
    """Time `function` (one message) ROUNDS x ITERATIONS times, the same count at every size."""
    extra_info: dict[str, object] = benchmark.extra_info  # type: ignore[attr-defined]
    extra_info.update(message_size=size, messages=ROUNDS * ITERATIONS)
    pedantic: Callable[..., object] = benchmark.pedantic  # type: ignore[attr-defined]
    return pedantic(function, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=WARMUP_ROUNDS)


def available(scheme: str) -> str | None:
    """Why a channel cannot run here (None: it can)."""
    row = next(row for row in podipc.channels() if row.scheme == scheme)
    return None if row.usable else row.reason


@pytest.mark.parametrize("size", SIZES)
def test_encode_frame(benchmark: Callable[..., object], size: int) -> None:
    payload = bytes(size)
    frame = per_message(benchmark, lambda: framing.encode_frame(payload), size)
    assert isinstance(frame, bytes) and len(frame) == size + framing.HEADER_SIZE


class ReplayedStream:
    """A stream source holding one frame, rewound before each read: FrameReader's own cost, no system call."""

    def __init__(self, frame: bytes) -> None:
        self.frame = memoryview(frame)
        self.position = 0

    def rewind(self) -> None:
        """Offer the frame again from its first byte."""
        self.position = 0

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        """Copy up to `nbytes` of what is left into `buffer`, as a socket would."""
        count = min(nbytes or len(buffer), len(self.frame) - self.position)
        buffer[:count] = self.frame[self.position : self.position + count]
        self.position += count
        return count

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        """Up to `bufsize` bytes of what is left, as a new bytes object (one copy, as from the kernel)."""
        data = self.frame[self.position : self.position + bufsize].tobytes()
        self.position += len(data)
        return data


@pytest.mark.parametrize("size", SIZES)
def test_read_frame_from_a_stream(benchmark: Callable[..., object], size: int) -> None:
    source = ReplayedStream(framing.encode_frame(bytes(size)))
    reader = framing.FrameReader(2 << 20)
    rewind, read_frame = source.rewind, reader.read_frame

    def read_one() -> int:
        rewind()
        return len(read_frame(source))

    assert per_message(benchmark, read_one, size) == size


def fits_in_flight(producer: podipc.Producer, consumer: podipc.Consumer, payload: bytes) -> bool:
    """Send a probe (the rendezvous): True when the channel took it whole within send(), so send() then recv() in
    one thread cannot deadlock.

    A blocking send whose time runs out with part of a frame still unsent counts the message
    as sent and keeps the rest pending (the producer has no room: poll(0) is False); that
    rest is pushed out by the non-blocking pair. A receive in the same process could carry
    it too (a stream consumer flushes its process's producers before it blocks), but a
    send() with no timeout would still wait for room no receive of this thread can make.
    """
    producer.send(payload, PROBE_SECONDS)
    whole = producer.poll(0)
    try:
        received = consumer.recv(PROBE_SECONDS) if whole else None
    except Timeout:
        received = None
    if received is None:
        non_blocking_pair(producer, consumer, payload, send_first=False)()
        return False
    return len(received) == len(payload)


def non_blocking_pair(
    producer: podipc.Producer, consumer: podipc.Consumer, payload: bytes, send_first: bool = True
) -> Callable[[], int]:
    """One message through try_send / try_recv in one thread: the size received.

    A try that fails is retried (after a producer poll(0), which pushes out the pending
    tail of a frame larger than a stream socket took) for at most PROBE_SECONDS: a channel
    whose timeout=0 never tries fails here with that said, rather than hanging the suite.
    """
    try_send, try_recv, flush = producer.try_send, consumer.try_recv, producer.poll
    scheme = producer.address.scheme

    def one() -> int:
        if send_first and not try_send(payload):
            deadline = time.monotonic() + PROBE_SECONDS
            while not try_send(payload):
                flush(0)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{scheme}: try_send() found no room in {PROBE_SECONDS} s with nothing queued")
        message = try_recv()
        if message is None:
            deadline = time.monotonic() + PROBE_SECONDS
            while message is None:
                flush(0)
                message = try_recv()
                if message is None and time.monotonic() > deadline:
                    raise TimeoutError(f"{scheme}: try_recv() got nothing in {PROBE_SECONDS} s after a send")
        return len(message)

    return one


@pytest.fixture
def pair(request: pytest.FixtureRequest, short_directory: str) -> Iterator[Pair]:
    scheme, size = request.param
    problem = available(scheme)
    if problem:
        pytest.skip(problem)
    url = channel_url(scheme, short_directory)
    consumer = podipc.consumer(url, wait=10)
    producer = podipc.producer(url, wait=10)
    try:
        if size > min(producer.max_message_size, consumer.max_message_size):
            pytest.skip(f"{scheme}:// carries at most {consumer.max_message_size} bytes here")
        payload = bytes(size)
        yield producer, consumer, payload, fits_in_flight(producer, consumer, payload)
    finally:
        producer.abort()
        consumer.close()


CASES = [(scheme, size) for size in SIZES for scheme in SCHEMES]
IDS = [f"{scheme}-{size}" for scheme, size in CASES]


@pytest.mark.parametrize("pair", CASES, ids=IDS, indirect=True)
def test_send_then_receive_one_message(benchmark: Callable[..., object], pair: Pair) -> None:
    producer, consumer, payload, fits = pair
    if not fits:
        pytest.skip(
            f"{len(payload)} bytes do not fit what {producer.address.scheme}:// holds in flight: a blocking send() "
            "would wait for a receive this thread cannot make (test_try_send_then_try_receive measures it)"
        )
    send = producer.send
    receive = consumer.recv_view if producer.address.scheme == "shm" else consumer.recv

    def round_trip() -> int:
        send(payload)
        return len(receive())

    assert per_message(benchmark, round_trip, len(payload)) == len(payload)


@pytest.mark.parametrize("pair", CASES, ids=IDS, indirect=True)
def test_try_send_then_try_receive_one_message(benchmark: Callable[..., object], pair: Pair) -> None:
    producer, consumer, payload, _ = pair
    assert per_message(benchmark, non_blocking_pair(producer, consumer, payload), len(payload)) == len(payload)
