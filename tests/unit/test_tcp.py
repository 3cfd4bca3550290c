"""tcp://: what is special to the TCP stream channel, across real processes.

Helpers here are shared with test_unix.py (both channels speak the same stream protocol).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import podipc
from podipc.framing import ACK, END_OF_STREAM, HELLO, encode_frame, encode_header
from tests.commands import PODIPC

pytestmark = pytest.mark.timeout(60)

PORTS = itertools.count(17001)
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire" / "stream.md"
PEER_GONE_SECONDS = 2.0

SLOW_PRODUCER = """
import sys, time, podipc
with podipc.producer(sys.argv[1]) as channel:
    index = 0
    while True:
        channel.send(index.to_bytes(8, "big") * (int(sys.argv[2]) // 8))
        index += 1
        time.sleep(float(sys.argv[3]))
"""

STALLED_CONSUMER = """
import sys, time, podipc
with podipc.consumer(sys.argv[1]) as channel:
    channel.recv(timeout=30)
    print("attached", flush=True)
    time.sleep(120)
"""


def tcp_url(**options: object) -> str:
    """A fresh tcp:// URL in this test file's port range (17000-17099)."""
    port = next(PORTS)
    assert port < 17100
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"tcp://127.0.0.1:{port}" + (f"?{query}" if query else "")


def cli(*args: str) -> list[str]:
    """The podipc command line, run by this interpreter."""
    return [*PODIPC, *args]


def summary(output: bytes) -> dict[str, object]:
    """The JSON summary line a podipc command printed last."""
    result: dict[str, object] = json.loads(output.decode().strip().splitlines()[-1])
    return result


def cli_round_trip(url: str, consumer_first: bool, count: int = 500, size: int = 10_000) -> None:
    """Run `podipc consume` and `podipc produce --random` on url; both must report the same digest."""
    consume_args = cli("consume", url, "--timeout", "30")
    produce_args = cli("produce", url, "--count", str(count), "--random", "--size", str(size))
    first_args, second_args = (consume_args, produce_args) if consumer_first else (produce_args, consume_args)
    first = subprocess.Popen(first_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    second = subprocess.Popen(second_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = {}
    for name, process in (("first", first), ("second", second)):
        out, err = process.communicate(timeout=45)
        assert process.returncode == 0, f"{name} failed: {err.decode()}"
        outputs[name] = summary(out)
    produced, consumed = (
        (outputs["second"], outputs["first"]) if consumer_first else (outputs["first"], outputs["second"])
    )
    assert produced["messages"] == consumed["messages"] == count
    assert produced["sha256"] == consumed["sha256"]
    assert produced["bytes"] == consumed["bytes"]


def start_python(code: str, *args: str) -> subprocess.Popen[bytes]:
    """Run a snippet in a fresh interpreter."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_consumer_sees_producer_killed(url: str, size: int) -> None:
    """kill -9 the producer mid-stream: the consumer's recv raises PeerGone within 2 s."""
    with podipc.consumer(url) as channel:
        producer = start_python(SLOW_PRODUCER, url, str(size), "0.001")
        try:
            for _ in range(5):
                assert len(channel.recv(timeout=30)) == size // 8 * 8
            producer.kill()
            killed_at = time.monotonic()
            with pytest.raises(podipc.PeerGone):
                while True:
                    channel.recv(timeout=10)
            assert time.monotonic() - killed_at < PEER_GONE_SECONDS
        finally:
            producer.kill()
            producer.wait()


def assert_blocked_producer_sees_consumer_killed(url: str) -> None:
    """kill -9 a consumer that stopped reading: the producer blocked in send raises PeerGone within 2 s."""
    consumer = start_python(STALLED_CONSUMER, url)
    outcome: dict[str, object] = {}
    progress = [0]

    def fill() -> None:
        try:
            with podipc.producer(url) as channel:
                message = b"m" * 65536
                while True:
                    channel.send(message)
                    progress[0] += 1
        except podipc.PodIPCError as error:
            outcome["error"], outcome["at"] = error, time.monotonic()

    sender = threading.Thread(target=fill, daemon=True)
    try:
        assert consumer.stdout is not None
        sender.start()
        assert consumer.stdout.readline() == b"attached\n"
        assert wait_for_stall(progress), "the producer never blocked"
        consumer.kill()
        killed_at = time.monotonic()
        sender.join(10)
        assert isinstance(outcome.get("error"), podipc.PeerGone), outcome
        assert float(outcome["at"]) - killed_at < PEER_GONE_SECONDS  # type: ignore[arg-type]
    finally:
        consumer.kill()
        consumer.wait()


def wait_for_stall(progress: list[int], quiet: float = 0.4, limit: float = 20) -> bool:
    """Wait until a counter stops moving for `quiet` seconds (the sender is blocked)."""
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if progress[0] != last:
            last, since = progress[0], time.monotonic()
        elif progress[0] > 0 and time.monotonic() - since >= quiet:
            return True
        time.sleep(0.05)
    return False


def doc_script(name: str) -> str:
    """A plain script shown in docs/wire/stream.md, by its marker comment."""
    match = re.search(rf"<!-- {re.escape(name)} -->\n```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"{name} not found in {DOC}"
    return match.group(1)


def plain_consumer_receives_from_podipc(url: str, target: list[str], ready: Callable[[], bool]) -> None:
    """The documented plain consumer script takes a podipc producer's messages."""
    consumer = start_python(doc_script("plain_consumer.py"), *target)
    try:
        deadline = time.monotonic() + 10
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        with podipc.producer(url) as channel:
            for message in (b"alpha", b"", b"gamma"):
                channel.send(message)
        out, err = consumer.communicate(timeout=20)
        assert consumer.returncode == 0, err.decode()
        assert out == b"alpha\n\ngamma\n"
    finally:
        consumer.kill()
        consumer.wait()


def podipc_consumer_receives_from_plain_producer(url: str, target: list[str]) -> None:
    """A podipc consumer takes the documented plain producer script's messages, then its end of stream."""
    with podipc.consumer(url) as channel:
        producer = subprocess.Popen(
            [sys.executable, "-c", doc_script("plain_producer.py"), *target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert producer.stdin is not None
            producer.stdin.write(b"alpha\n\ngamma\n")
            producer.stdin.close()
            assert [channel.recv(timeout=20) for _ in range(3)] == [b"alpha", b"", b"gamma"]
            with pytest.raises(podipc.EndOfStream):
                channel.recv(timeout=20)
            assert producer.wait(20) == 0
        finally:
            producer.kill()
            producer.wait()


def raw_producer_socket(family: int, address: object) -> socket.socket:
    """Connect a plain socket to a podipc consumer and do the hello."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    sock.sendall(HELLO)
    assert recv_exactly(sock, len(HELLO)) == HELLO
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_partial_frame_then_timeout_keeps_position(url: str, family: int, address: object) -> None:
    """Half a frame, a recv timeout, then the rest: the message arrives whole and the stream goes on."""
    with podipc.consumer(url) as channel:
        sock = raw_producer_socket(family, address)
        try:
            sock.sendall(encode_header(10) + b"12345")
            with pytest.raises(podipc.Timeout) as caught:
                channel.recv(timeout=0.3)
            assert not isinstance(caught.value, podipc.PeerTimeout)
            sock.sendall(b"67890" + encode_frame(b"next") + encode_header(END_OF_STREAM))
            assert channel.recv(timeout=10) == b"1234567890"
            assert channel.recv(timeout=10) == b"next"
            with pytest.raises(podipc.EndOfStream):
                channel.recv(timeout=10)
            assert recv_exactly(sock, 1) == ACK
        finally:
            sock.close()


def assert_garbage_connection_is_rejected_and_reported(url: str, family: int, address: object) -> None:
    """An HTTP client is not a producer: the consumer keeps waiting, then PeerTimeout says what it saw."""
    with podipc.consumer(url) as channel:
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.connect(address)
        probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # dropped without an answer
            assert probe.recv(100) == b""
        probe.close()
        started = time.monotonic()
        with pytest.raises(podipc.PeerTimeout, match=r"rejected 1 connection\(s\).*first bytes b'GET / HT'"):
            channel.recv()
        assert time.monotonic() - started < 5


def assert_a_stranger_is_dropped_though_a_copy_of_its_connection_lives(url: str, family: int, address: object) -> None:
    """A child forked while the acceptor thread held a connection keeps a copy of it; the stranger still sees it end."""
    with podipc.consumer(url) as channel:
        acceptor = channel._acceptor  # type: ignore[attr-defined]
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.settimeout(5)
        probe.connect(address)
        deadline = time.monotonic() + 10
        while not acceptor._pending:
            assert time.monotonic() < deadline, "the acceptor never took the connection"
            time.sleep(0.005)
        ((connection, _, _),) = list(acceptor._pending.values())
        copy = os.dup(connection.fileno())  # what a child forked in that moment holds
        try:
            probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # dropped without an answer, not left hanging
                assert probe.recv(100) == b""
        finally:
            os.close(copy)
            probe.close()


def assert_frame_length_garbage_is_protocol_error(url: str, family: int, address: object) -> None:
    """After a valid hello, a frame length above max_message_size is a ProtocolError, not an allocation."""
    with podipc.consumer(url) as channel:
        sock = raw_producer_socket(family, address)
        try:
            sock.sendall(b"\x7f\xff\xff\xf0garbage")
            with pytest.raises(podipc.ProtocolError, match="max_message_size"):
                channel.recv(timeout=10)
        finally:
            sock.close()


def assert_second_producer_is_refused(url: str) -> None:
    """One producer per channel: a second one gets ChannelUnavailable at its first send."""
    with podipc.consumer(url) as channel:
        first = podipc.producer(url)
        second = podipc.producer(url)
        try:
            first.send(b"one", timeout=10)
            with pytest.raises(podipc.ChannelUnavailable, match="another producer"):
                second.send(b"two", timeout=10)
            assert channel.recv(timeout=10) == b"one"
        finally:
            first.abort()
            second.abort()


# --- the tests ---------------------------------------------------------------


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_cli_round_trip_random_sizes_matches_digest(consumer_first: bool) -> None:
    cli_round_trip(tcp_url(), consumer_first)


def test_killed_producer_mid_stream_is_peer_gone_within_two_seconds() -> None:
    assert_consumer_sees_producer_killed(tcp_url(), 1 << 20)


def test_killed_consumer_unblocks_a_blocked_producer_with_peer_gone() -> None:
    assert_blocked_producer_sees_consumer_killed(tcp_url())


def test_partial_frame_before_a_timeout_does_not_corrupt_the_next_recv() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])
    assert_partial_frame_then_timeout_keeps_position(url, socket.AF_INET, ("127.0.0.1", port))


def test_http_client_is_rejected_and_named_in_peer_timeout() -> None:
    url = tcp_url(wait=1)
    port = int(url.split("?")[0].rsplit(":", 1)[1])
    assert_garbage_connection_is_rejected_and_reported(url, socket.AF_INET, ("127.0.0.1", port))


def test_a_stranger_is_dropped_though_a_forked_child_holds_a_copy_of_its_connection() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])
    assert_a_stranger_is_dropped_though_a_copy_of_its_connection_lives(url, socket.AF_INET, ("127.0.0.1", port))


def test_huge_frame_length_from_a_raw_peer_is_protocol_error() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])
    assert_frame_length_garbage_is_protocol_error(url, socket.AF_INET, ("127.0.0.1", port))


def test_second_producer_is_refused() -> None:
    assert_second_producer_is_refused(tcp_url())


def serve_once(port: int, answer: bytes | None, hold: float = 0.0) -> threading.Thread:
    """A plain TCP server that accepts one connection, sends `answer` (None: nothing) and closes."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)

    def serve() -> None:
        connection, _ = listener.accept()
        if answer is not None:
            connection.sendall(answer)
        time.sleep(hold)
        connection.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_producer_talking_to_an_http_server_gets_protocol_error() -> None:
    url = tcp_url()
    server = serve_once(int(url.rsplit(":", 1)[1]), b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(podipc.ProtocolError, match="not a podipc consumer"), podipc.producer(url) as channel:
        channel.send(b"hello")
    server.join(5)


def test_producer_to_a_server_that_hangs_up_gets_protocol_error() -> None:
    url = tcp_url()
    server = serve_once(int(url.rsplit(":", 1)[1]), None)
    refused = pytest.raises(podipc.ProtocolError, match=r"without answering|instead of answering")
    with refused, podipc.producer(url) as channel:
        channel.send(b"hello")
    server.join(5)


def test_producer_to_a_silent_server_times_out_instead_of_hanging() -> None:
    url = tcp_url(wait=0.5)
    server = serve_once(int(url.split("?")[0].rsplit(":", 1)[1]), None, hold=4)
    started = time.monotonic()
    with pytest.raises(podipc.PeerTimeout, match="no podipc consumer answered"), podipc.producer(url) as channel:
        channel.send(b"hello")
    assert time.monotonic() - started < 4
    server.join(5)


def test_port_in_use_is_channel_unavailable() -> None:
    url = tcp_url()
    with podipc.consumer(url), pytest.raises(podipc.ChannelUnavailable, match="in use"):
        podipc.consumer(url)


def test_consumer_with_smaller_max_message_size_refuses_larger_frames() -> None:
    url = tcp_url()
    with podipc.consumer(url, max_message_size=1000) as channel:
        producer = podipc.producer(url, max_message_size=2000)
        try:
            producer.send(b"x" * 1500, timeout=10)
            with pytest.raises(podipc.ProtocolError, match="1500 bytes"):
                channel.recv(timeout=10)
        finally:
            producer.abort()


def test_max_message_size_option_is_the_limit_on_both_sides() -> None:
    url = tcp_url(max_message_size="1KiB", wait=0.2)
    producer = podipc.producer(url)
    try:
        assert producer.max_message_size == 1024
        with pytest.raises(podipc.MessageTooLarge, match="1025 bytes > max_message_size option 1024"):
            producer.send(bytes(1025))
    finally:
        producer.abort()
    with pytest.raises(podipc.AddressError, match="max_message_size"):
        podipc.consumer(tcp_url(max_message_size=2**32))


def test_plain_socket_consumer_from_the_docs_takes_podipc_messages() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])

    plain_consumer_receives_from_podipc(url, ["tcp", f"127.0.0.1:{port}"], lambda: port_listening(port))


def port_listening(port: int) -> bool:
    """True once something listens on the port (checked without connecting)."""
    with open("/proc/net/tcp") as table:
        return any(
            line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in table.readlines()[1:]
        )


def test_podipc_consumer_takes_the_plain_producer_script_from_the_docs() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])
    podipc_consumer_receives_from_plain_producer(url, ["tcp", f"127.0.0.1:{port}"])


def test_availability_and_host_limit() -> None:
    from podipc.transports import tcp

    assert tcp.availability() is None
    assert tcp.host_max_message_size() == 64 * 1024 * 1024


@pytest.mark.parametrize("size", [4000, 32 << 20], ids=["small", "larger-than-the-socket-buffers"])
def test_sends_after_a_send_timeout_keep_every_frame_whole_and_in_order(size: int) -> None:
    """A message partly out at its deadline counts as sent and is finished first by the next send or close."""
    url = tcp_url()
    received: list[bytes] = []
    with podipc.consumer(url) as consumer:
        producer = podipc.producer(url)
        sent: list[bytes] = []
        with pytest.raises(podipc.Timeout):
            for index in range(100_000):
                message = index.to_bytes(4, "big") * (size // 4)
                producer.send(message, timeout=0.2)
                sent.append(message)
        reader = threading.Thread(target=lambda: received.extend(consumer), daemon=True)
        reader.start()
        for index in range(len(sent), len(sent) + 3):
            message = index.to_bytes(4, "big") * (size // 4)
            producer.send(message)
            sent.append(message)
        producer.close(timeout=20)
        reader.join(20)
    assert [len(message) for message in received] == [len(message) for message in sent]
    assert received == sent


def signal_then_sleep(started: Any) -> None:
    started.set()
    time.sleep(5)


def test_a_forked_child_does_not_keep_the_parents_port() -> None:
    url = tcp_url()
    consumer = podipc.consumer(url)
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=signal_then_sleep, args=(started,))
    child.start()
    try:
        assert started.wait(20)
        consumer.close()
        with podipc.consumer(url):
            pass
    finally:
        child.kill()
        child.join()


def test_consumer_keeps_waiting_for_a_real_producer_after_garbage() -> None:
    url = tcp_url()
    port = int(url.rsplit(":", 1)[1])
    with podipc.consumer(url) as channel:
        with socket.create_connection(("127.0.0.1", port)) as probe:
            probe.sendall(b"\x16\x03\x01\x02\x00 TLS hello")
        producer = subprocess.Popen(cli("produce", url, "--count", "3", "--size", "10"), stdout=subprocess.DEVNULL)
        try:
            assert len(list(channel)) == 3
            assert producer.wait(30) == 0
        finally:
            producer.kill()
            producer.wait()
        assert channel.rejected == 1  # type: ignore[attr-defined]
