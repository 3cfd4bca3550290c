"""Hot paths, in one process: framing, and one send + receive on every channel.

Run: `python -m pytest benchmarks -p no:cacheprovider --benchmark-only` (add
`--benchmark-json FILE` to keep the figures). One process means no context switch
per message, so these figures show podipc's own cost per call; `podipc bench` measures
between processes. Each message here fits the channel's buffer, so a send returns
before the receive in the same thread.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

import podipc
from benchmarks.conftest import channel_url
from podipc import framing
from podipc.transport import schemes

SCHEMES = schemes()
SIZES = (64, 4096)
SOCKET_BUFFER_ROOM = 32768


def available(scheme: str) -> str | None:
    """Why a channel cannot run here (None: it can)."""
    row = next(row for row in podipc.channels() if row.scheme == scheme)
    return None if row.usable else row.reason


@pytest.mark.parametrize("size", [64, 4096, 1 << 20])
def test_encode_frame(benchmark: Callable[..., object], size: int) -> None:
    payload = bytes(size)
    frame = benchmark(framing.encode_frame, payload)
    assert isinstance(frame, bytes) and len(frame) == size + framing.HEADER_SIZE


@pytest.mark.parametrize("size", [64, 4096])
def test_read_frame_from_a_socket(benchmark: Callable[..., object], size: int) -> None:
    writer, reader = socket.socketpair()
    count = max(1, SOCKET_BUFFER_ROOM // (size + framing.HEADER_SIZE))  # all frames fit the socket buffer
    frames = framing.encode_frame(bytes(size)) * count
    frame_reader = framing.FrameReader(1 << 20)
    try:

        def write_then_read_all() -> None:
            writer.sendall(frames)
            for _ in range(count):
                frame_reader.read_frame(reader)

        benchmark(write_then_read_all)
    finally:
        writer.close()
        reader.close()


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


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pair", SCHEMES, indirect=True)
def test_send_then_receive_one_message(
    benchmark: Callable[..., object], pair: tuple[podipc.Producer, podipc.Consumer], size: int
) -> None:
    producer, consumer = pair
    payload = bytes(size)
    send = producer.send
    receive = consumer.recv_view if producer.address.scheme == "shm" else consumer.recv
    send(payload)
    assert len(receive(5.0)) == size  # the rendezvous happens here, outside the timed part

    def round_trip() -> int:
        send(payload)
        return len(receive())

    assert benchmark(round_trip) == size
