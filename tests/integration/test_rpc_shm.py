"""Request/reply over shm:// across real processes: what is special to its pair of rings (one client at a time,
session after session). The behaviour it shares with the socket schemes is tested in test_rpc.py, with shm among them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import podipc
from tests.integration.harness import url_for
from tests.integration.test_rpc import ServerProcess, in_thread

CLIENT_SCRIPT = """
import sys, time
import podipc
with podipc.client(sys.argv[1], wait=10) as client:
    for index in range(100):
        request = b"%s-%d" % (sys.argv[2].encode(), index)
        assert client.call(request, timeout=10) == request
    print("called", flush=True)
    if sys.argv[3] == "hang":
        client.call(b"sleep:1", timeout=60)
"""


@pytest.fixture
def serving(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    """A server process on a fresh shm:///name (workers: the indirect parameter, default 4)."""
    url = url_for("shm")
    server = ServerProcess(url, getattr(request, "param", 4))
    try:
        yield url, server
    finally:
        server.kill()


def ring_files(url: str) -> list[str]:
    """The files of the two rings of `url` in /dev/shm (segments, semaphores, presence files)."""
    name = url.removeprefix("shm:///").split("?")[0]
    return sorted(entry for entry in os.listdir("/dev/shm") if name in entry)


def run_client(url: str, tag: str, then: str = "leave") -> subprocess.Popen[str]:
    """A client process making 100 calls (printing `called`), then leaving or hanging in a slow call."""
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, url, tag, then], stdout=subprocess.PIPE, text=True)


def test_one_client_after_another_is_served_by_the_same_server_and_a_killed_one_too(
    serving: tuple[str, ServerProcess],
) -> None:
    url, server = serving
    first = run_client(url, "first")
    assert first.wait(30) == 0
    killed = run_client(url, "killed", then="hang")
    assert killed.stdout is not None
    assert killed.stdout.readline() == "called\n"
    time.sleep(0.3)  # its last call is in the handler
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    with podipc.client(url, wait=10) as client:
        assert client.call(b"after the killed one", timeout=10) == b"after the killed one"
    counts = server.stop()
    assert counts["clients"] == 3
    assert counts["calls"] == 100 + 101 + 1
    assert counts["replied"] == 100 + 101 + 1  # the killed client's last one answered too (undelivered)


def test_a_second_client_is_refused_with_channel_unavailable_while_the_first_is_attached(
    serving: tuple[str, ServerProcess],
) -> None:
    url, _ = serving
    with podipc.client(url, wait=10) as first:
        assert first.call(b"mine", timeout=5) == b"mine"
        with podipc.client(url, wait=10) as second:
            started = time.monotonic()
            with pytest.raises(podipc.ChannelUnavailable, match="serves one client at a time"):
                second.call(b"and mine?", timeout=5)
            assert time.monotonic() - started < 1.0
        assert first.call(b"still mine", timeout=5) == b"still mine"
    with podipc.client(url, wait=10) as next_one:
        assert next_one.call(b"my turn", timeout=5) == b"my turn"


def test_calls_in_flight_get_peer_gone_when_the_server_dies_before_its_first_reply() -> None:
    url = url_for("shm")
    server = ServerProcess(url, workers=1)
    try:
        with podipc.client(url, wait=10) as client:
            calls = [in_thread(client.call, b"sleep:30", 60) for _ in range(2)]  # the handler never replies
            time.sleep(0.5)
            server.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            for thread, _ in calls:
                thread.join(5)
            assert time.monotonic() - killed < 2.0
            assert all(isinstance(outcome[0], podipc.PeerGone) for _, outcome in calls), calls
    finally:
        server.kill()


def test_the_server_removes_its_rings_at_close_and_the_client_its_own(serving: tuple[str, ServerProcess]) -> None:
    url, server = serving
    with podipc.client(url, wait=10) as client:
        assert client.call(b"x", timeout=5) == b"x"
        assert any(".reply" in name for name in ring_files(url))
    server.stop()
    deadline = time.monotonic() + 5
    while ring_files(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ring_files(url) == []


def test_a_client_closed_while_a_call_is_in_the_handler_leaves_the_server_serving_the_next(
    serving: tuple[str, ServerProcess],
) -> None:
    url, server = serving
    client = podipc.client(url, wait=10)
    call, outcome = in_thread(client.call, b"sleep:0.5", 10)
    time.sleep(0.2)
    client.close()
    call.join(5)
    assert isinstance(outcome[0], podipc.ChannelClosed)
    with podipc.client(url, wait=10) as next_one:
        assert next_one.call(b"next", timeout=5) == b"next"
    counts = server.stop()
    assert counts["clients"] == 2
    assert counts["replied"] == 2  # the closed client's reply went nowhere


def test_options_that_do_not_fit_the_ring_are_an_address_error() -> None:
    with pytest.raises(podipc.AddressError, match="do not fit a ring of capacity=65536"):
        podipc.server(url_for("shm"), capacity=65536, max_message_size=65536)
    with pytest.raises(podipc.AddressError, match="option 'coalesce' is not for shm://"):
        podipc.client(url_for("shm"), coalesce=True)


def test_max_message_size_bounds_the_body_and_its_header_fits_the_ring() -> None:
    url = url_for("shm")
    with (
        podipc.server(url, capacity=65536, max_message_size=1024) as server,
        podipc.client(url, wait=10, capacity=65536, max_message_size=1024) as client,
    ):
        serving, _ = in_thread(server.serve, bytes)
        with pytest.raises(podipc.MessageTooLarge, match="1025 bytes > max_message_size option 1024"):
            client.call(b"x" * 1025)
        assert client.call(b"x" * 1024, timeout=5) == b"x" * 1024
        server.close()
        serving.join(5)


def test_clients_opened_and_closed_in_quick_succession_are_each_served(serving: tuple[str, ServerProcess]) -> None:
    url, server = serving
    for index in range(20):
        with podipc.client(url, wait=10) as client:
            request = b"client %d" % index
            assert client.call(request, timeout=10) == request
    counts = server.stop()
    assert (counts["clients"], counts["replied"]) == (20, 20)


def test_the_asyncio_client_refuses_shm_and_says_what_to_use() -> None:
    with pytest.raises(podipc.AddressError, match="runs over unix:// and tcp:// only"):
        podipc.aio.client(url_for("shm"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_closed_while_serving_frees_its_rings_once_serve_returns(workers: int) -> None:
    url = url_for("shm")
    server = podipc.server(url)
    serving, outcome = in_thread(server.serve, bytes, workers)
    with podipc.client(url, wait=10) as client:
        assert client.call(b"x", timeout=5) == b"x"
        server.close()
        serving.join(5)
        assert outcome == [None]
    deadline = time.monotonic() + 5
    while ring_files(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ring_files(url) == []
