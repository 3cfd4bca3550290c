"""tcp:// and unix:// at batch speed (issue 13): coalesced sends, gathered writes, whole reads cut in one pass.

What is observed: the writes the producer's socket makes (a socket subclass counts them and
who made them), and what a plain socket on the other side receives and when. A plain
consumer speaks the documented stream protocol (docs/wire/stream.md): HELLO back, then frames.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import podipc
from podipc import coalescing, stream_producer
from podipc.address import parse_address
from podipc.flushing import BURST_HOLD_SECONDS, STREAM_BURST_START_SECONDS
from podipc.framing import ACK, END_OF_STREAM, HEADER, HELLO, encode_frame, encode_header
from podipc.options import resolve_options
from podipc.transports.tcp import TCPProducer
from podipc.transports.unix import UnixProducer
from tests.threads import cpu_seconds, named

pytestmark = pytest.mark.timeout(60)

KINDS = ("tcp", "unix", "unix-abstract")
PORTS = itertools.count(17110)
NAMES = itertools.count()
CONTEXT = multiprocessing.get_context("fork")
MESSAGE = bytes(range(64))


# --- a producer whose socket counts its writes ----------------------------------------------


class CountingSocket(socket.socket):
    """A socket that records which thread made each write; while `refusing` is set, it has no room (EAGAIN)."""

    def __init__(self, family: int, kind: int) -> None:
        super().__init__(family, kind)
        self.writers: list[int] = []
        self.refusing = threading.Event()

    def send(self, data: Any, flags: int = 0, /) -> int:
        if self.refusing.is_set():
            raise BlockingIOError("refused by the test")
        self.writers.append(threading.get_ident())
        return super().send(data, flags)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None, /) -> int:
        if self.refusing.is_set():
            raise BlockingIOError("refused by the test")
        self.writers.append(threading.get_ident())
        return super().sendmsg(buffers, ancdata, flags)


class CountingTCPProducer(TCPProducer):
    """tcp:// producer on a CountingSocket."""

    counted: CountingSocket | None = None

    def _connection_socket(self) -> tuple[socket.socket, Any]:
        _, where = super()._connection_socket()
        self.counted = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        return self.counted, where


class CountingUnixProducer(UnixProducer):
    """unix:// producer on a CountingSocket."""

    counted: CountingSocket | None = None

    def _connection_socket(self) -> tuple[socket.socket, Any]:
        _, where = super()._connection_socket()
        self.counted = CountingSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        return self.counted, where


def counting_producer(url: str, **options: object) -> CountingTCPProducer | CountingUnixProducer:
    """A producer for `url` whose writes are counted."""
    address = parse_address(url)
    cls = CountingTCPProducer if address.scheme == "tcp" else CountingUnixProducer
    return cls(address, resolve_options(address, cls.options, {"wait": 30, **options}))


def writes(producer: CountingTCPProducer | CountingUnixProducer) -> list[int]:
    assert producer.counted is not None
    return producer.counted.writers


# --- a plain consumer -------------------------------------------------------------------------


class Endpoint:
    """Where a plain consumer listens, and the podipc URL of it."""

    def __init__(self, kind: str, directory: str) -> None:
        self.kind = kind
        if kind == "tcp":
            port = next(PORTS)
            assert port < 17200
            self.family, self.address, self.url = socket.AF_INET, ("127.0.0.1", port), f"tcp://127.0.0.1:{port}"
        elif kind == "unix":
            path = os.path.join(directory, f"s{next(NAMES)}")
            self.family, self.address, self.url = socket.AF_UNIX, path, f"unix://{path}"
        else:
            name = f"podipc-test-batching-{os.getpid()}-{next(NAMES)}"
            self.family, self.address, self.url = socket.AF_UNIX, "\0" + name, f"unix://@{name}"

    def listen(self) -> socket.socket:
        listener = socket.socket(self.family, socket.SOCK_STREAM)
        if self.family == socket.AF_INET:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.address)
        listener.listen(1)
        return listener


class PlainConsumer:
    """Accepts one producer on a plain socket (in a thread, so a producer here can connect), then reads frames."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.listener = endpoint.listen()
        self.connection: socket.socket | None = None
        self.buffer = b""
        self._accepted = threading.Thread(target=self._accept, daemon=True)
        self._accepted.start()

    def _accept(self) -> None:
        connection, _ = self.listener.accept()
        connection.settimeout(10)
        assert receive_exactly(connection, len(HELLO)) == HELLO
        connection.sendall(HELLO)
        self.connection = connection

    def frames(self, count: int, timeout: float = 10) -> list[bytes]:
        """The next `count` frames' payloads, waiting at most `timeout` seconds in all."""
        self._accepted.join(10)
        assert self.connection is not None
        deadline = time.monotonic() + timeout
        found: list[bytes] = []
        buffer, offset = self.buffer, 0
        while True:
            while len(found) < count and len(buffer) - offset >= HEADER.size:
                (length,) = HEADER.unpack_from(buffer, offset)
                if len(buffer) - offset < HEADER.size + length:
                    break
                found.append(buffer[offset + HEADER.size : offset + HEADER.size + length])
                offset += HEADER.size + length
            if len(found) == count:
                break
            self.connection.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.connection.recv(1 << 20)
            assert chunk, "the producer closed the connection"
            buffer = buffer[offset:] + chunk
            offset = 0
        self.buffer = buffer[offset:]
        return found

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.listener.close()


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(params=KINDS)
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    directory = tempfile.mkdtemp(prefix="pbt", dir="/tmp")
    yield Endpoint(request.param, directory)
    for entry in os.listdir(directory):
        os.unlink(os.path.join(directory, entry))
    os.rmdir(directory)


@pytest.fixture
def plain(endpoint: Endpoint) -> Iterator[PlainConsumer]:
    consumer = PlainConsumer(endpoint)
    yield consumer
    consumer.close()


def numbered(index: int) -> bytes:
    return index.to_bytes(8, "big") + MESSAGE[8:]


# --- coalescing -------------------------------------------------------------------------------


def test_a_message_after_an_idle_period_is_written_within_its_send(endpoint: Endpoint, plain: PlainConsumer) -> None:
    producer = counting_producer(endpoint.url)
    try:
        producer.send(b"first")
        assert plain.frames(1) == [b"first"]
        for index in range(20):
            time.sleep(0.01)
            before = len(writes(producer))
            producer.send(numbered(index))
            assert writes(producer)[before:] == [threading.get_ident()]
            assert plain.frames(1) == [numbered(index)]
    finally:
        producer.abort()


def test_a_tight_loop_of_sends_leaves_in_far_fewer_writes_than_messages(
    endpoint: Endpoint, plain: PlainConsumer
) -> None:
    producer = counting_producer(endpoint.url)
    count = 20_000
    # made beforehand: the loop between two sends does a tight loop's own work and no more (building each
    # message in the loop took more than BURST_START_SECONDS on a loaded machine, and nothing coalesced)
    messages = [numbered(index) for index in range(count)]
    received: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: received.append(plain.frames(count, 30)), daemon=True)
    try:
        producer.send(messages[0])
        reader.start()
        send = producer.send
        for message in messages[1:]:
            send(message)
        producer.flush()
        reader.join(30)
        assert received == [messages]
        assert len(writes(producer)) < count // 4
    finally:
        producer.abort()


class SteppingClock:
    """The producer's clock in a test: 0.1 µs passes at each reading (a tight loop), and whatever `advance` says."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        self.now += 1e-7
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def own_writes(producer: CountingTCPProducer | CountingUnixProducer) -> int:
    """How many writes this thread made (the flusher thread's are left out)."""
    return writes(producer).count(threading.get_ident())


BETWEEN_START_AND_HOLD = (STREAM_BURST_START_SECONDS + BURST_HOLD_SECONDS) / 2
"""A gap between two sends that goes on a burst but does not start one."""


def test_a_burst_goes_on_after_its_outbox_is_written_until_a_pause(
    endpoint: Endpoint, plain: PlainConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppingClock()
    monkeypatch.setattr(stream_producer, "_monotonic", clock)
    producer = counting_producer(endpoint.url)
    try:
        producer.send(numbered(0))
        assert plain.frames(1) == [numbered(0)]
        producer.send(numbered(1))  # written alone (the first send's wait for the consumer is no burst), or joins
        index = 2
        before = own_writes(producer)
        while own_writes(producer) == before:  # the burst's outbox fills and leaves at 64 KiB
            producer.send(numbered(index))
            index += 1
            assert index < 100_000, "the outbox was never written"
        clock.advance(BETWEEN_START_AND_HOLD)
        before = own_writes(producer)
        producer.send(numbered(index))
        assert own_writes(producer) == before, "the burst ended when its outbox was written"
        clock.advance(2 * BURST_HOLD_SECONDS)
        producer.send(numbered(index + 1))
        assert own_writes(producer) == before + 1, "a message after a pause was not written within its send"
        clock.advance(BETWEEN_START_AND_HOLD)
        producer.send(numbered(index + 2))
        assert own_writes(producer) == before + 2, (
            "after a pause, a burst started later than STREAM_BURST_START_SECONDS"
        )
        assert plain.frames(index + 2) == [numbered(number) for number in range(1, index + 3)]
    finally:
        producer.abort()


def test_a_send_that_waited_for_room_goes_on_as_a_burst(
    endpoint: Endpoint, plain: PlainConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppingClock()
    monkeypatch.setattr(stream_producer, "_monotonic", clock)
    producer = counting_producer(endpoint.url)
    try:
        producer.send(numbered(0))
        assert plain.frames(1) == [numbered(0)]
        assert producer.counted is not None
        producer.counted.refusing.set()
        room = threading.Timer(0.2, producer.counted.refusing.clear)
        clock.advance(2 * BURST_HOLD_SECONDS)
        started = time.monotonic()
        room.start()
        producer.send(numbered(1))  # no room: waits until the timer makes some, then writes it
        assert time.monotonic() - started >= 0.2
        room.join()
        before = own_writes(producer)
        clock.advance(BETWEEN_START_AND_HOLD)
        producer.send(numbered(2))
        assert own_writes(producer) == before, "the send after a wait for room was written alone"
        producer.flush()
        assert plain.frames(2) == [numbered(1), numbered(2)]
    finally:
        producer.abort()


def test_coalesce_false_writes_every_message_within_its_send(endpoint: Endpoint, plain: PlainConsumer) -> None:
    producer = counting_producer(endpoint.url, coalesce="false")
    count = 2000
    received: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: received.append(plain.frames(count, 30)), daemon=True)
    try:
        producer.send(numbered(0))
        reader.start()
        for index in range(1, count):
            before = len(writes(producer))
            producer.send(numbered(index))
            assert len(writes(producer)) > before, f"message {index} was not written within its send"
        reader.join(30)
        assert received == [[numbered(index) for index in range(count)]]
    finally:
        producer.abort()


def test_flush_writes_what_waits_in_the_outbox_now(
    endpoint: Endpoint, plain: PlainConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Asleep:
        def wake(self) -> None:
            """A flusher that never runs: only flush() (or a later call) writes the outbox."""

    monkeypatch.setattr(coalescing, "flusher", Asleep)
    producer = counting_producer(endpoint.url)
    try:
        producer.send(numbered(0))
        assert plain.frames(1) == [numbered(0)]
        batch = [numbered(index) for index in range(1, 11)]
        for _attempt in range(100):  # a tight loop coalesces; preemption on a busy machine may break one up
            sent_before = len(writes(producer))
            for message in batch:
                producer.send(message)
            if len(writes(producer)) == sent_before + 1:  # one write, then nine messages held back
                break
            producer.flush()
            assert plain.frames(len(batch)) == batch
        else:
            pytest.fail("ten sends in a tight loop were never coalesced")
        assert producer._outbox, "nothing waits in the outbox"
        before = len(writes(producer))
        producer.flush()
        assert writes(producer)[before:] == [threading.get_ident()]
        assert not producer._outbox
        assert plain.frames(len(batch)) == batch
    finally:
        producer.abort()


def read_frames_in_a_process(url_kind: str, address: Any, count: int, results: Any) -> None:
    """A plain consumer in its own process: report when (monotonic) the last of `count` frames arrived."""
    family = socket.AF_INET if url_kind == "tcp" else socket.AF_UNIX
    listener = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(1)
    results.put("listening")
    connection, _ = listener.accept()
    connection.settimeout(30)
    receive_exactly(connection, len(HELLO))
    connection.sendall(HELLO)
    wanted = count * (HEADER.size + len(MESSAGE))
    received = 0
    while received < wanted:
        chunk = connection.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    results.put((received == wanted, time.monotonic()))
    time.sleep(2)
    connection.close()
    listener.close()


@pytest.mark.parametrize("then", ["sleeps", "computes"])
def test_the_last_message_of_a_burst_goes_out_without_flush(endpoint: Endpoint, then: str) -> None:
    results = CONTEXT.Queue()
    reader = CONTEXT.Process(target=read_frames_in_a_process, args=(endpoint.kind, endpoint.address, 2000, results))
    reader.start()
    assert results.get(timeout=10) == "listening"
    producer = podipc.producer(endpoint.url, wait=30)
    try:
        for index in range(2000):
            producer.send(numbered(index))
        last_sent = time.monotonic()
        if then == "sleeps":
            time.sleep(3)
        else:  # Python code that never blocks: the flusher gets the interpreter within its switch interval
            end = time.monotonic() + 3
            while time.monotonic() < end:
                pass
        complete, arrived = results.get(timeout=10)
        assert complete
        assert arrived - last_sent < 0.5  # the bound is ~1 ms (a flusher tick) + the switch interval (5 ms)
    finally:
        producer.abort()
        reader.join(10)


def test_a_stalled_consumer_costs_no_cpu_and_the_outbox_goes_out_once_it_reads(
    endpoint: Endpoint, plain: PlainConsumer
) -> None:
    producer = podipc.producer(endpoint.url, wait=30)
    try:
        producer.send(numbered(0))
        assert plain.frames(1) == [numbered(0)]
        batch = [numbered(index) for index in range(1, 200_001)]  # 13 MB: more than the kernel holds
        with pytest.raises(podipc.Timeout) as caught:
            producer.send_many(batch, timeout=0)
        sent = caught.value.sent
        assert sent is not None
        assert producer._outbox, "nothing waits in the outbox"
        # this thread and the flusher, which now waits for room: not what other tests may have left running
        waiting = [threading.main_thread(), *named("podipc-flusher")]
        before = cpu_seconds(waiting)
        time.sleep(1.0)
        used = cpu_seconds(waiting) - before
        assert used < 0.2, f"{used:.2f} s of CPU in 1 s of waiting for a stalled consumer"
        assert plain.frames(sent, 60) == batch[:sent]  # no send, no flush: the flusher writes the outbox
    finally:
        producer.abort()


# --- gathered writes and whole reads ----------------------------------------------------------


def test_send_many_leaves_in_a_few_gathered_writes(endpoint: Endpoint, plain: PlainConsumer) -> None:
    producer = counting_producer(endpoint.url)
    try:
        producer.send(numbered(0))
        assert plain.frames(1) == [numbered(0)]
        batch = [numbered(index) for index in range(1, 1001)] + [bytes(100_000), b"", numbered(1001)]
        before = len(writes(producer))
        reader: list[list[bytes]] = []
        thread = threading.Thread(target=lambda: reader.append(plain.frames(len(batch), 30)), daemon=True)
        thread.start()
        assert producer.send_many(batch) == len(batch)
        thread.join(30)
        assert reader == [batch]
        assert len(writes(producer)) - before <= 10
    finally:
        producer.abort()


def plain_producer(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.connect(endpoint.address)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    sock.sendall(HELLO)
    assert receive_exactly(sock, len(HELLO)) == HELLO
    return sock


def test_recv_many_cuts_every_frame_of_a_read_in_one_call(endpoint: Endpoint) -> None:
    lengths = [64] * 300 + [65] * 2 + [64] * 200 + [0] * 50 + [3000] + [7] * 400 + [1] + [64] * 47
    messages = [bytes([index % 251]) * length for index, length in enumerate(lengths)]
    with podipc.consumer(endpoint.url, wait=30) as consumer:
        sock = plain_producer(endpoint)
        try:
            sock.sendall(b"".join(encode_frame(message) for message in messages))
            time.sleep(0.3)  # all of it is in the consumer's socket now
            assert consumer.recv_many(5000, timeout=10) == messages
            sock.sendall(encode_frame(b"last") + encode_header(END_OF_STREAM))
            assert consumer.recv_many(5000, timeout=10) == [b"last"]
            with pytest.raises(podipc.EndOfStream):
                consumer.recv_many(5000, timeout=10)
            assert receive_exactly(sock, 1) == ACK
        finally:
            sock.close()


def test_recv_after_recv_many_and_poll_keeps_order(endpoint: Endpoint) -> None:
    messages = [struct.pack(">I", index) * (1 + index % 5) for index in range(1000)]
    with podipc.consumer(endpoint.url, wait=30) as consumer:
        sock = plain_producer(endpoint)
        try:
            sock.sendall(b"".join(encode_frame(message) for message in messages) + encode_header(END_OF_STREAM))
            got: list[bytes] = []
            while len(got) < len(messages):
                if len(got) % 3 == 0:
                    got += consumer.recv_many(7, timeout=10)
                elif len(got) % 3 == 1:
                    assert consumer.poll(10)
                    got.append(consumer.recv())
                else:
                    message = consumer.try_recv()
                    got.append(message if message is not None else consumer.recv(timeout=10))
            assert got == messages
            with pytest.raises(podipc.EndOfStream):
                consumer.recv()
        finally:
            sock.close()
