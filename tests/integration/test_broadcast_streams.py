"""pattern=broadcast over unix:// and tcp:// (podipc.stream_broadcast): what only the stream sockets have.

The behaviour every broadcast channel shares is in test_broadcast.py; here: strangers at the
producer's socket, the other patterns' sides refused, a blocked send woken by close, the
Timeout of slow=wait at its deadline, and a subscriber that leaves early.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

import podipc
from podipc.address import parse_address
from podipc.framing import BROADCAST_HELLO, HELLO
from podipc.stream_broadcast import StreamBroadcastProducer
from podipc.transports.tcp import tcp_endpoint
from podipc.transports.unix import socket_address
from tests.integration.test_broadcast import STREAMS, collect, payload, plain_url, start_subscribers, url


def connect_raw(address: str) -> socket.socket:
    """A plain socket connected to the channel at `address` (a stranger, not a podipc side)."""
    parsed = parse_address(address)
    if parsed.scheme == "unix":
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.connect(socket_address(parsed))
        return stranger
    family, endpoint = tcp_endpoint(parsed)
    stranger = socket.socket(family, socket.SOCK_STREAM)
    stranger.connect(endpoint)
    return stranger


def answer_to(stranger: socket.socket) -> bytes:
    """What the producer said to a stranger before it closed the connection (b"" when nothing, or reset)."""
    try:
        return stranger.recv(16)
    except ConnectionResetError:
        return b""  # closed with the stranger's unread bytes


@pytest.mark.parametrize("scheme", STREAMS)
def test_strangers_at_the_producers_socket_are_dropped_and_counted_and_the_subscribers_go_on(
    reap: list[Any], scheme: str
) -> None:
    address = url("hostile", scheme, subscribers=2)
    with podipc.producer(address) as out:
        assert isinstance(out, StreamBroadcastProducer)
        garbage = connect_raw(address)
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
        pair_producer = connect_raw(address)
        pair_producer.sendall(HELLO)
        processes, results = start_subscribers(address, 2)
        reap.extend(processes)
        digest = hashlib.sha256()
        for index in range(5000):
            out.send(payload(index), timeout=20)
            digest.update(payload(index))
        assert answer_to(garbage) == b""  # dropped without an answer
        assert answer_to(pair_producer) == BROADCAST_HELLO  # told a broadcast producer is here, then closed
        garbage.close()
        pair_producer.close()
    for report in collect(processes, results, 2):
        assert (report["count"], report["sha256"], report["lost"]) == (5000, digest.hexdigest(), 0)
    assert out.rejected == 1
    assert sorted(report.state for report in out.subscriber_reports()) == ["ended", "ended"]


@pytest.mark.parametrize("scheme", STREAMS)
def test_the_other_patterns_sides_are_refused_with_a_protocol_error(scheme: str) -> None:
    address = url("mismatch", scheme, subscribers=1, wait=5)
    out = podipc.producer(address)
    pair_producer = podipc.producer(address.partition("?")[0] + "?wait=5")
    try:
        with pytest.raises(podipc.ProtocolError, match="a broadcast producer"):
            pair_producer.send(b"x")
    finally:
        pair_producer.abort()
        out.abort()
    plain = f"{plain_url(scheme, 'mismatch-pair')}?wait=5"
    with podipc.consumer(plain) as pair_consumer:
        with pytest.raises(podipc.ProtocolError, match="broadcast producer"):
            podipc.consumer(f"{plain}&pattern=broadcast")
        assert pair_consumer.rejected == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("scheme", STREAMS)
def test_slow_wait_send_raises_timeout_at_its_deadline_and_close_from_another_thread_wakes_it(
    reap: list[Any], scheme: str
) -> None:
    address = url("wake-send", scheme, subscribers=2)
    processes, results = start_subscribers(address, 2)
    reap.extend(processes)
    digest = hashlib.sha256()
    out = podipc.producer(address)
    out.send(payload(0))
    digest.update(payload(0))
    os.kill(processes[1].pid, signal.SIGSTOP)
    index = 1
    began = time.monotonic()
    with pytest.raises(podipc.Timeout):
        while True:  # until the stopped subscriber's socket buffers are full
            began = time.monotonic()
            out.send(payload(index), timeout=0.3)
            digest.update(payload(index))
            index += 1
    assert 0.3 <= time.monotonic() - began < 1.0
    closer = threading.Thread(target=lambda: (time.sleep(0.3), out.close(timeout=20)))
    closer.start()
    began = time.monotonic()
    with pytest.raises(podipc.ChannelClosed):
        out.send(payload(index))  # blocked without a timeout: the close wakes it, having sent nothing
    assert time.monotonic() - began < 1.5
    os.kill(processes[1].pid, signal.SIGCONT)
    closer.join(20)
    assert out.closed
    for report in collect(processes, results, 2):  # nothing lost, nothing of the woken send
        assert (report["count"], report["sha256"], report["lost"]) == (index, digest.hexdigest(), 0)


@pytest.mark.parametrize("scheme", STREAMS)
def test_a_subscriber_that_closes_early_is_reported_left_and_the_other_completes(scheme: str) -> None:
    address = url("left", scheme, subscribers=2)
    with podipc.producer(address) as out:
        first, second = podipc.consumer(address), podipc.consumer(address)
        out.send(b"one", timeout=5)
        assert first.recv(timeout=5) == second.recv(timeout=5) == b"one"
        first.close()
        for _ in range(200):  # the producer finds out when it writes to it
            out.send(b"more", timeout=5)
        assert second.recv(timeout=5) == b"more"
        closer = threading.Thread(target=out.close, kwargs={"timeout": 10})
        closer.start()
        assert len(list(second)) == 199
        closer.join(10)
    states = {report.slot: report.state for report in out.subscriber_reports()}
    assert states == {first.slot: "left", second.slot: "ended"}  # type: ignore[attr-defined]
