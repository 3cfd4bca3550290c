"""Bad input: raw garbage from a peer that is not podipc, on every channel.

Each case runs `podipc consume` in a real process and feeds it garbage with the plain
library of the transport (socket, posix_ipc, sysv_ipc, pyzmq, mmap, files). The outcome
is what docs/wire/*.md promise: a one-line podipc error with its exit code (ProtocolError,
PeerTimeout...) or the garbage skipped and counted ("skipped" in the summary) while good
messages still arrive; never a traceback, a hang, or an allocation sized by the garbage.
The hypothesis tests at the end fuzz the decoders no unit test fuzzes yet: the stream
HELLO, zmq control frames and the shm record decoder.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import posix_ipc
import pytest
import sysv_ipc
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address
from podipc.cli import EXIT_CODES
from podipc.errors import ChannelUnavailable, PeerTimeout, ProtocolError
from podipc.framing import HELLO
from podipc.presence import Presence
from podipc.transports.shm import layout as shm_ring
from podipc.transports.spool.wire import encode_record, segment_name
from tests.commands import PODIPC
from tests.spools import END, MESSAGE, NEXT, messages_segment, write_segment

from .harness import leftovers, url_for, wait_until

pytestmark = pytest.mark.timeout(90)
CLI_SECONDS = 30
FOUR_GIB_MINUS_TWO = 0xFFFFFFFE


class Consume:
    """`podipc consume URL` in a subprocess; `finish()` returns (exit code, summary, stderr lines)."""

    def __init__(self, url: str, *arguments: str) -> None:
        self.url = url
        self.process = subprocess.Popen(
            [*PODIPC, "consume", url, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def finish(self) -> tuple[int, dict[str, Any], list[str]]:
        try:
            stdout, stderr = self.process.communicate(timeout=CLI_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
            pytest.fail(f"podipc consume hung on garbage: {stderr}")
        summary = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
        lines = stderr.strip().splitlines()
        assert "Traceback" not in stderr, stderr
        return self.process.returncode, summary, lines

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@contextlib.contextmanager
def consuming(url: str, *arguments: str) -> Iterator[Consume]:
    consume = Consume(url, *arguments)
    try:
        yield consume
    finally:
        consume.kill()


def assert_one_line_error(code: int, lines: list[str], error: type[podipc.PodIPCError], *words: str) -> None:
    assert code == EXIT_CODES[error], (code, lines)
    assert len(lines) == 1 and lines[0].startswith(f"podipc: error: {error.__name__}: "), lines
    for word in words:
        assert word in lines[0], lines


def connect_when_listening(family: int, where: Any, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(where)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def stream_endpoint(url: str) -> tuple[int, Any]:
    address = parse_address(url)
    if address.scheme in ("tcp", "zmq+tcp"):
        return socket.AF_INET, (address.host, address.port)
    return socket.AF_UNIX, address.path


def produce(url: str, messages: list[bytes]) -> None:
    with podipc.producer(url) as channel:
        for message in messages:
            channel.send(message, timeout=20)
        channel.close(20)


# --- byte streams: tcp, unix ------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_a_frame_claiming_4_gib_is_a_protocol_error_before_any_allocation(scheme: str) -> None:
    url = url_for(scheme)
    with consuming(url) as consume:
        sock = connect_when_listening(*stream_endpoint(url))
        with sock:
            sock.sendall(HELLO)
            assert sock.recv(len(HELLO)) == HELLO
            sock.sendall(struct.pack(">I", FOUR_GIB_MINUS_TWO) + b"x" * 100)
            code, summary, lines = consume.finish()
    assert_one_line_error(code, lines, ProtocolError, str(FOUR_GIB_MINUS_TWO))
    assert summary["messages"] == 0 and "ProtocolError" in summary["error"]
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_a_client_that_is_not_podipc_is_rejected_and_named_in_the_peer_timeout(scheme: str) -> None:
    url = url_for(scheme, wait=2)
    with consuming(url) as consume, connect_when_listening(*stream_endpoint(url)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        code, _, lines = consume.finish()
    assert_one_line_error(code, lines, PeerTimeout, "rejected 1 connection", "GET / HT")


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_a_raw_peer_that_sends_half_a_frame_and_hangs_up_is_peer_gone(scheme: str) -> None:
    url = url_for(scheme)
    with consuming(url) as consume:
        with connect_when_listening(*stream_endpoint(url)) as sock:
            sock.sendall(HELLO)
            assert sock.recv(len(HELLO)) == HELLO
            sock.sendall(struct.pack(">I", 1000) + b"half")
        code, summary, lines = consume.finish()
    assert_one_line_error(code, lines, podipc.PeerGone)
    assert summary["messages"] == 0


# --- udp ------------------------------------------------------------------------------------


def test_udp_garbage_datagrams_are_skipped_and_counted_and_good_messages_still_arrive() -> None:
    url = url_for("udp")
    address = parse_address(url)
    with consuming(url) as consume:
        assert wait_until(lambda: any(address.token in entry for entry in os.listdir("/dev/shm")), 10)
        garbage = [b"", b"pu", b"xx" + bytes(9), b"puZ" + bytes(8), b"puE" + bytes(8) + b"payload"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for datagram in garbage:
                raw.sendto(datagram, (address.host, address.port))
        time.sleep(0.2)
        produce(url, [b"one", b"", b"three"])
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert summary["messages"] == 3 and summary["bytes"] == 8
    assert summary.get("skipped", 0) >= len(garbage) - 1, summary  # an empty datagram may be indistinguishable


# --- zmq ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["zmq+tcp", "zmq+ipc"])
def test_zmq_raw_bytes_that_are_not_zmtp_do_not_disturb_the_consumer(scheme: str) -> None:
    url = url_for(scheme)
    with consuming(url) as consume:
        for garbage in (b"\xff" + bytes(8) + b"\x7f" + b"junk" * 100, b"GET / HTTP/1.0\r\n\r\n", bytes(64)):
            with connect_when_listening(*stream_endpoint(url)) as sock:
                sock.sendall(garbage)
                with contextlib.suppress(OSError):
                    sock.recv(64)
        produce(url, [b"a", b"bb", b""])
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"]) == (3, 3)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


@pytest.mark.parametrize("scheme", ["zmq+tcp", "zmq+ipc"])
def test_zmq_a_raw_peer_that_stays_connected_does_not_take_the_producers_place(scheme: str) -> None:
    # libzmq reads a first byte other than 0xFF as a ZMTP 1.0 greeting; such a peer, while
    # connected, would hold the consumer's one PAIR slot and the producer's stream would go nowhere.
    url = url_for(scheme)
    with consuming(url) as consume, connect_when_listening(*stream_endpoint(url)) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        produce(url, [b"a", b"bb", b""])
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"]) == (3, 3)


def test_zmq_control_garbage_from_a_raw_pyzmq_peer_is_skipped_and_counted() -> None:
    url = url_for("zmq+ipc")
    address = parse_address(url)
    with consuming(url) as consume:
        presence = Presence(address.token, "producer")
        context = zmq.Context()
        sock = context.socket(zmq.PAIR)
        try:
            sock.connect(f"ipc://{address.path}")
            sock.send_multipart([b"podipc", b"no-such-control"])
            sock.send_multipart([b"podipc", b"eos", b"extra"])
            sock.send(b"data")
            sock.send_multipart([b"podipc", b"eos"])
            assert sock.poll(20_000), "no eos-ack"
            assert sock.recv_multipart() == [b"podipc", b"eos-ack"]
            code, summary, lines = consume.finish()
        finally:
            sock.close(linger=0)
            context.term()
            presence.close()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"], summary.get("skipped")) == (1, 4, 2)


# --- queues ----------------------------------------------------------------------------------


def test_mq_messages_of_unexpected_priority_are_skipped_and_counted() -> None:
    url = url_for("mq")
    name = "/" + parse_address(url).name
    with consuming(url) as consume:
        assert wait_until(lambda: os.path.exists(f"/dev/mqueue{name}"), 10)
        queue = posix_ipc.MessageQueue(name)
        try:
            queue.send(b"high", priority=7)
            queue.send(b"not empty", priority=0)
            queue.send(b"data", priority=1)
            queue.send(b"", priority=1)
            queue.send(b"", priority=0)
        finally:
            queue.close()
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"], summary.get("skipped")) == (2, 4, 2)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


def test_sysvmq_messages_of_unexpected_type_are_skipped_and_counted() -> None:
    url = url_for("sysvmq")
    key = parse_address(url).key

    def queue_exists() -> bool:
        try:
            sysv_ipc.MessageQueue(key)
        except sysv_ipc.ExistentialError:
            return False
        return True

    with consuming(url) as consume:
        assert wait_until(queue_exists, 10)
        queue = sysv_ipc.MessageQueue(key)
        queue.send(b"odd type", type=9)
        queue.send(b"end with a body", type=2)
        queue.send(b"data", type=1)
        queue.send(b"", type=1)
        queue.send(b"", type=2)
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"], summary.get("skipped")) == (2, 4, 2)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


# --- shm ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corruption",
    ["huge-record", "unknown-kind", "write-index-beyond-capacity", "misaligned-write-index", "wrap-at-start"],
)
def test_a_corrupt_shm_ring_is_a_protocol_error(corruption: str) -> None:
    url = url_for("shm", capacity="64KiB", wait=5)
    address = parse_address(url)
    path = f"/dev/shm/{address.name}"
    with consuming(url) as consume:
        assert wait_until(lambda: os.path.exists(path), 10)
        presence = Presence(address.token, "producer")  # a raw producer announces itself like podipc's
        try:
            with open(path, "r+b") as segment, mmap.mmap(segment.fileno(), 0) as ring:
                capacity = shm_ring.INDEX.unpack_from(ring, 16)[0]
                record, write_index = {
                    "huge-record": (shm_ring.RECORD_HEADER.pack(FOUR_GIB_MINUS_TWO, shm_ring.KIND_DATA), 8),
                    "unknown-kind": (shm_ring.RECORD_HEADER.pack(0, 77), 8),
                    "write-index-beyond-capacity": (shm_ring.RECORD_HEADER.pack(0, shm_ring.KIND_DATA), capacity * 4),
                    "misaligned-write-index": (shm_ring.RECORD_HEADER.pack(0, shm_ring.KIND_DATA), 12),
                    "wrap-at-start": (shm_ring.RECORD_HEADER.pack(0, shm_ring.KIND_WRAP), 8),
                }[corruption]
                ring[shm_ring.HEADER_SIZE : shm_ring.HEADER_SIZE + 8] = record
                shm_ring.INDEX.pack_into(ring, shm_ring.PRODUCER_FLAGS_OFFSET, shm_ring.PRODUCER_ATTACHED)
                shm_ring.INDEX.pack_into(ring, shm_ring.WRITE_INDEX_OFFSET, write_index)
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.Semaphore(f"/{address.name}.data").release()
            code, summary, lines = consume.finish()
        finally:
            presence.close()
    assert_one_line_error(code, lines, ProtocolError, "shm")
    # a misaligned index may first let the (valid, empty) record at 0 through
    assert summary["messages"] <= (1 if corruption == "misaligned-write-index" else 0)
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


# --- file spool ------------------------------------------------------------------------------


def test_oversized_records_are_skipped_and_counted_and_good_messages_arrive(tmp_path: Any) -> None:
    spool = tmp_path / "spool"
    messages = [b"first", b"x" * 17, b"", b"y" * 1000, b"last"]  # two over max_message_size=16
    write_segment(spool, 0, messages_segment(0, messages, END))
    (spool / "podipc.seg.12x").write_bytes(b"a name that is not a segment's")
    (spool / "unrelated.txt").write_bytes(b"not the spool's")
    with consuming(f"file://{spool}?max_message_size=16") as consume:
        code, summary, lines = consume.finish()
    assert code == 0, lines
    assert (summary["messages"], summary["bytes"], summary.get("skipped")) == (3, 9, 2), summary
    assert sorted(os.listdir(spool)) == ["podipc.seg.12x", "unrelated.txt"]


@pytest.mark.parametrize(
    ("garbage", "error", "words"),
    [
        ("gap", ProtocolError, ("message 1 is missing",)),
        ("fifo", ChannelUnavailable, ("FIFO",)),
        ("symlink", ChannelUnavailable, ("symbolic link",)),
        ("other stream", ProtocolError, ("another stream",)),
    ],
)
def test_spool_garbage_is_a_one_line_error(tmp_path: Any, garbage: str, error: Any, words: tuple[str, ...]) -> None:
    spool = tmp_path / "spool"
    if garbage == "gap":  # message 1 removed by hand: 0 then 2
        write_segment(spool, 0, messages_segment(0, [b"zero"]) + encode_record(MESSAGE, 2, b"two"))
    elif garbage == "other stream":  # NEXT leads to a segment of another stream
        write_segment(spool, 0, messages_segment(0, [b"zero"], NEXT))
        write_segment(spool, 1, messages_segment(1, [b"one"], stream_id=99))
    else:  # what a careless writer may leave where the next segment belongs
        write_segment(spool, 0, messages_segment(0, [b"zero"], NEXT))
        if garbage == "fifo":
            os.mkfifo(spool / segment_name(1), 0o600)
        else:
            os.symlink("/etc/passwd", spool / segment_name(1))
    with consuming(f"file://{spool}?wait=2") as consume:
        code, summary, lines = consume.finish()
    assert_one_line_error(code, lines, error, *words)
    assert summary.get("messages", 1) == 1


# --- fuzzing the decoders not fuzzed by the unit tests --------------------------------------------


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def unix_consumer() -> Iterator[tuple[str, Any]]:
    """A podipc unix consumer kept across examples; a real producer must still get through at the end."""
    url = url_for("unix")
    channel = podipc.consumer(url)
    try:
        yield url, channel
        producing = threading.Thread(target=produce, args=(url, [b"real"]))
        producing.start()
        assert channel.recv(timeout=10) == b"real"
        with pytest.raises(podipc.EndOfStream):
            channel.recv(timeout=10)
        producing.join()
    finally:
        channel.close()
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


@FUZZ
@given(first_bytes=st.binary(min_size=1, max_size=64).filter(lambda data: not HELLO.startswith(data[:8])))
def test_fuzz_any_first_bytes_but_hello_are_rejected_and_counted(
    unix_consumer: tuple[str, Any], first_bytes: bytes
) -> None:
    """The acceptor's HELLO check: a connection that does not start with HELLO is dropped and counted."""
    url, channel = unix_consumer
    rejected_before = channel.rejected
    with connect_when_listening(socket.AF_UNIX, parse_address(url).path) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(first_bytes)
        sock.settimeout(10)
        with contextlib.suppress(OSError):
            assert sock.recv(64) == b"", "a rejected connection gets no answer, only closed"
    assert wait_until(lambda: channel.rejected == rejected_before + 1, 10), (channel.rejected, rejected_before)


@pytest.fixture(scope="module")
def zmq_pair() -> Iterator[tuple[Any, Any]]:
    """A podipc zmq consumer and a raw pyzmq PAIR peer, kept across examples."""
    url = url_for("zmq+ipc")
    address = parse_address(url)
    channel = podipc.consumer(url)
    presence = Presence(address.token, "producer")
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.connect(f"ipc://{address.path}")
    try:
        yield channel, sock
    finally:
        sock.close(linger=0)
        context.term()
        presence.close()
        channel.close()


ZMQ_CONTROL_MESSAGES = ([b"podipc", b"sos"], [b"podipc", b"eos"])
"""The real start and end of stream: not garbage (a second sos or an eos ends the stream), so the fuzz never sends them."""
ZMQ_FRAMES = st.one_of(st.sampled_from([b"", b"podipc", b"sos", b"eos", b"sentinel"]), st.binary(max_size=32))
"""Frames the consumer looks at (b"podipc", the control words, the test's sentinel) come up often, any bytes too."""


@FUZZ
@example(frames=[b"", b"podipc", b""], podipc_first=False)  # b"podipc" inside a message is data (found by hypothesis)
@example(frames=[b"data", b"podipc", b"eos"], podipc_first=False)  # not an end of stream either
@example(frames=[b"podipc"], podipc_first=True)
@example(frames=[b"sos", b"x"], podipc_first=True)
@given(frames=st.lists(ZMQ_FRAMES, min_size=1, max_size=4), podipc_first=st.booleans())
def test_fuzz_zmq_multipart_messages_are_data_frames_or_skipped_never_an_error(
    zmq_pair: tuple[Any, Any], frames: list[bytes], podipc_first: bool
) -> None:
    """From a producer that sent no start of stream: a multipart message starting with b"podipc" is skipped
    and counted; every frame of any other multipart message arrives as a message of its own (docs/wire/zmq.md)."""
    channel, sock = zmq_pair
    if podipc_first:
        frames = [b"podipc", *frames]
    if frames in ZMQ_CONTROL_MESSAGES:
        frames = [*frames, b"x"]  # the real markers are not garbage; with a third frame they are
    skipped_before = channel.skipped
    sock.send_multipart(frames)
    sock.send(b"sentinel")
    received = []
    while True:
        message = channel.recv(timeout=10)
        if message == b"sentinel" and (len(received) >= len(frames) or channel.skipped > skipped_before):
            break
        received.append(message)
    if frames[0] == b"podipc" and len(frames) > 1:
        assert received == [] and channel.skipped == skipped_before + 1
    else:
        assert received == frames and channel.skipped == skipped_before


CAPACITY = 4096


@settings(max_examples=300, deadline=None)
@given(
    noise=st.binary(max_size=64),
    read_index=st.integers(0, 1 << 40).map(lambda value: value * 8),
    available=st.integers(-16, CAPACITY + 16),
    max_message_size=st.integers(0, CAPACITY),
    record=st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
)
def test_fuzz_shm_record_decoder_stays_inside_the_ring_or_raises_protocol_error(
    noise: bytes, read_index: int, available: int, max_message_size: int, record: tuple[int, int]
) -> None:
    buffer = bytearray(shm_ring.HEADER_SIZE + CAPACITY)
    position = read_index % CAPACITY
    start = shm_ring.HEADER_SIZE + position
    buffer[start : start + len(noise)] = noise[: len(buffer) - start]
    shm_ring.RECORD_HEADER.pack_into(buffer, shm_ring.HEADER_SIZE + position, *record)
    write_index = read_index + available
    try:
        decoded = shm_ring.decode_record(buffer, CAPACITY, max_message_size, read_index, write_index)
    except ProtocolError as error:
        assert str(error).startswith("shm ")
        return
    assert read_index < decoded.next_read_index <= write_index
    assert decoded.payload_offset >= shm_ring.HEADER_SIZE
    assert decoded.payload_offset + decoded.length <= shm_ring.HEADER_SIZE + CAPACITY
    assert decoded.length <= max_message_size
