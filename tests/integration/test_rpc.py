"""Request/reply across real processes: a server process, clients in this one (threads) and in others."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import podipc
from podipc.rpc.wire import HELLO, REQUEST, encode_frame
from tests.integration.harness import url_for

SERVER_SCRIPT = """
import json, sys, time
import podipc

def handler(request):
    if request.startswith(b"sleep:"):
        time.sleep(float(request.split(b":")[1]))
    elif request == b"boom":
        raise ValueError("boom went the handler")
    return request

url, workers = sys.argv[1], int(sys.argv[2])
with podipc.server(url) as server, podipc.close_on_signals(server):
    print("listening", flush=True)
    server.serve(handler, workers=workers)
print(json.dumps({"calls": server.calls, "replied": server.replied, "failed": server.failed,
                  "expired": server.expired, "rejected": server.rejected, "clients": server.clients}), flush=True)
"""


class ServerProcess:
    """A server in its own process, answering with the handler above."""

    def __init__(self, url: str, workers: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, url, str(workers)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "listening\n"

    def stop(self) -> dict[str, int]:
        """SIGTERM, and the counts it printed on its way out."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        assert self.process.returncode == 0, out
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        """SIGKILL (what a test of a dying server does)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def finish(self) -> None:
        """After a test: SIGTERM, so the server removes what it made (shm:// rings), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def serving(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    """A server process on a fresh unix://@name URL (workers: the indirect parameter, default 4)."""
    url = url_for("unix-abstract")
    server = ServerProcess(url, getattr(request, "param", 4))
    try:
        yield url, server
    finally:
        server.finish()


@pytest.fixture(params=["unix-abstract", "shm"])
def serving_any(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    """A server process (4 workers) on a fresh unix://@name or shm:///name: for what every scheme shares."""
    url = url_for(request.param)
    server = ServerProcess(url, 4)
    try:
        yield url, server
    finally:
        server.finish()


def in_thread(function: object, *args: object) -> tuple[threading.Thread, list[object]]:
    """Run function(*args) in a thread; the list gets its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(function(*args))  # type: ignore[operator]
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("scheme", ["unix", "unix-abstract", "tcp", "shm"])
def test_four_threads_share_one_client_and_every_reply_matches_its_request(scheme: str) -> None:
    url = url_for(scheme)
    server = ServerProcess(url, workers=4)
    try:
        with podipc.client(url, wait=10) as client:
            mismatches: list[tuple[bytes, bytes]] = []

            def calls(thread: int) -> None:
                for index in range(500):
                    request = f"{thread}-{index}-".encode() * (index % 7 + 1)
                    reply = client.call(request, timeout=30)
                    if reply != request:
                        mismatches.append((request, reply))

            threads = [threading.Thread(target=calls, args=(number,)) for number in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert mismatches == []
        counts = server.stop()
        assert counts["calls"] == counts["replied"] == 2000
        assert counts["clients"] == 1
    finally:
        server.finish()


def test_a_call_past_its_deadline_raises_timeout_while_the_others_in_flight_succeed(
    serving_any: tuple[str, ServerProcess],
) -> None:
    url, _ = serving_any
    with podipc.client(url, wait=10) as client:
        slow, slow_outcome = in_thread(client.call, b"sleep:1.0", 0.3)
        fast = [in_thread(client.call, b"sleep:0.5:%d" % n, 10) for n in range(3)]
        slow.join(5)
        assert isinstance(slow_outcome[0], podipc.Timeout)
        for thread, _ in fast:
            thread.join(10)
        assert [outcome[0] for _, outcome in fast] == [b"sleep:0.5:%d" % n for n in range(3)]
        time.sleep(0.8)  # the slow call's reply has come by now: the next call reads it and drops it
        assert client.call(b"after", timeout=5) == b"after"
        assert client.discarded == 1


@pytest.mark.parametrize("serving", [2], indirect=True)
def test_the_server_skips_a_request_whose_deadline_passed_before_its_turn(serving: tuple[str, ServerProcess]) -> None:
    url, server = serving
    with podipc.client(url, wait=10) as client:
        busy = [in_thread(client.call, b"sleep:0.8", 10) for _ in range(2)]
        time.sleep(0.2)  # both workers are busy with them
        with pytest.raises(podipc.Timeout):
            client.call(b"too late", timeout=0.2)
        for thread, _ in busy:
            thread.join(10)
        assert [outcome for _, outcome in busy] == [[b"sleep:0.8"]] * 2
        assert client.call(b"next", timeout=5) == b"next"
    counts = server.stop()
    assert counts["expired"] == 1
    assert counts["replied"] == 3


def test_every_call_in_flight_gets_peer_gone_within_2_s_when_the_server_is_killed_and_the_next_call_reconnects(
    serving_any: tuple[str, ServerProcess],
) -> None:
    url, server = serving_any
    with podipc.client(url, wait=10) as client:
        assert client.call(b"up", timeout=5) == b"up"
        calls = [in_thread(client.call, b"sleep:30", 60) for _ in range(4)]
        time.sleep(0.3)
        server.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for thread, _ in calls:
            thread.join(5)
        assert time.monotonic() - killed < 2.0
        assert all(isinstance(outcome[0], podipc.PeerGone) for _, outcome in calls), calls
        with pytest.raises(podipc.Timeout):
            client.call(b"nobody there", timeout=0.3)  # it waits for a server to come back, within its timeout
        later, later_outcome = in_thread(client.call, b"back", 20)  # waits for the restarted server
        time.sleep(0.3)
        restarted = ServerProcess(url, workers=1)
        try:
            later.join(20)
            assert later_outcome == [b"back"]
            assert client.call(b"and again", timeout=5) == b"and again"
            assert client.connections == 2
        finally:
            restarted.finish()


def test_close_from_another_thread_wakes_a_blocked_call_with_channel_closed(
    serving_any: tuple[str, ServerProcess],
) -> None:
    url, _ = serving_any
    client = podipc.client(url, wait=10)
    assert client.call(b"up", timeout=5) == b"up"
    calls = [in_thread(client.call, b"sleep:30", None) for _ in range(2)]  # one reads, one waits its turn
    time.sleep(0.3)
    closed = time.monotonic()
    client.close()
    for thread, _ in calls:
        thread.join(5)
    assert time.monotonic() - closed < 1.0
    assert all(isinstance(outcome[0], podipc.ChannelClosed) for _, outcome in calls), calls
    with pytest.raises(podipc.ChannelClosed):
        client.call(b"after close")


def test_a_handler_exception_becomes_remote_error_and_the_server_keeps_serving(
    serving_any: tuple[str, ServerProcess],
) -> None:
    url, server = serving_any
    with podipc.client(url, wait=10) as client:
        with pytest.raises(podipc.RemoteError, match="ValueError: boom went the handler"):
            client.call(b"boom", timeout=5)
        assert client.call(b"still here", timeout=5) == b"still here"
    counts = server.stop()
    assert (counts["failed"], counts["replied"]) == (1, 1)


GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="not-the-hello"),
    pytest.param(HELLO + struct.pack(">I", 3) + b"abc", id="frame-shorter-than-a-call-header"),
    pytest.param(HELLO + struct.pack(">IBBHQI", 16, 9, 1, 0, 1, 0), id="bad-version"),
    pytest.param(HELLO + struct.pack(">I", 0xFFFFFF00) + b"x" * 64, id="huge-length"),
    pytest.param(HELLO + encode_frame(2, 1, b"a reply"), id="a-reply-sent-to-the-server"),
]


def dropped(connection: socket.socket) -> bytes:
    """Read until the server closes the connection (a reset, when it closed with our bytes unread); what came."""
    received = b""
    try:
        while chunk := connection.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_client_writing_garbage_is_dropped_and_the_others_keep_being_served(
    serving: tuple[str, ServerProcess], garbage: bytes
) -> None:
    url, server = serving
    with podipc.client(url, wait=10) as client:
        assert client.call(b"before", timeout=5) == b"before"
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connected, says nothing: harms nobody
        idle.connect("\0" + url.removeprefix("unix://@"))
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.connect("\0" + url.removeprefix("unix://@"))
        hostile.settimeout(5)
        hostile.sendall(garbage)
        assert dropped(hostile) in (b"", HELLO)  # what it answered first: at most the hello
        assert client.call(b"after", timeout=5) == b"after"
        idle.close()
        hostile.close()
    assert server.stop()["rejected"] == 1


def test_a_raw_socket_client_speaking_the_documented_wire_gets_its_reply(serving: tuple[str, ServerProcess]) -> None:
    url, _ = serving
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect("\0" + url.removeprefix("unix://@"))
        raw.settimeout(5)
        raw.sendall(HELLO)
        assert raw.recv(8, socket.MSG_WAITALL) == HELLO
        raw.sendall(encode_frame(REQUEST, 7, b"plain", deadline=5000))
        length = struct.unpack(">I", raw.recv(4, socket.MSG_WAITALL))[0]
        assert raw.recv(length, socket.MSG_WAITALL) == struct.pack(">BBHQI", 1, 2, 0, 7, 0) + b"plain"


def test_the_plain_client_script_of_the_wire_doc_gets_every_reply(serving: tuple[str, ServerProcess]) -> None:
    url, _ = serving
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire" / "rpc.md").read_text()
    match = re.search(r"<!-- plain_client.py -->\n```python\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/wire/rpc.md lost its plain client"
    where = url.removeprefix("unix://")
    result = subprocess.run(
        [sys.executable, "-c", match.group(1), "unix", where, "sleep:0.3", "boom", "quick"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert sorted(lines) == ["1 reply sleep:0.3", "2 error ValueError: boom went the handler", "3 reply quick"]
    assert lines[-1] == "1 reply sleep:0.3"  # the slow one came last: replies in completion order


def test_requests_written_in_one_go_are_all_answered(serving: tuple[str, ServerProcess]) -> None:
    url, _ = serving
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect("\0" + url.removeprefix("unix://@"))
        raw.settimeout(10)
        raw.sendall(HELLO + b"".join(encode_frame(REQUEST, n, b"%d" % n) for n in range(1, 301)))
        assert raw.recv(8, socket.MSG_WAITALL) == HELLO
        answered = set()
        for _ in range(300):
            length = struct.unpack(">I", raw.recv(4, socket.MSG_WAITALL))[0]
            frame = raw.recv(length, socket.MSG_WAITALL)
            call_id = struct.unpack(">Q", frame[4:12])[0]
            assert frame[16:] == b"%d" % call_id
            answered.add(call_id)
        assert answered == set(range(1, 301))


def test_calls_from_several_client_processes_are_answered_at_once(serving: tuple[str, ServerProcess]) -> None:
    url, _ = serving
    script = (
        "import podipc, sys\n"
        "with podipc.client(sys.argv[1], wait=10) as c:\n"
        "    for i in range(200):\n"
        "        r = b'%s-%d' % (sys.argv[2].encode(), i)\n"
        "        assert c.call(r, timeout=10) == r\n"
        "    assert c.call(b'sleep:0.5', timeout=10) == b'sleep:0.5'\n"
    )
    started = time.monotonic()
    clients = [subprocess.Popen([sys.executable, "-c", script, url, str(n)]) for n in range(4)]
    assert [process.wait(60) for process in clients] == [0, 0, 0, 0]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_a_client_with_no_server_raises_peer_timeout_after_wait(scheme: str) -> None:
    with podipc.client(url_for(scheme), wait=0.3) as client:
        started = time.monotonic()
        with pytest.raises(podipc.PeerTimeout, match="no server listening"):
            client.call(b"anyone?")
        assert 0.3 <= time.monotonic() - started < 2.0


def test_a_request_over_max_message_size_raises_before_anything_is_sent(serving_any: tuple[str, ServerProcess]) -> None:
    url, server = serving_any
    with podipc.client(url, wait=10, max_message_size=1024) as client:
        with pytest.raises(podipc.MessageTooLarge, match="1025 bytes > max_message_size option 1024"):
            client.call(b"x" * 1025)
        assert client.call(b"x" * 1024, timeout=5) == b"x" * 1024
    assert server.stop()["calls"] == 1


def test_the_server_creates_its_socket_file_and_removes_it_at_close(tmp_path: object) -> None:
    url = url_for("unix")
    path = url.removeprefix("unix://").split("?")[0]
    with podipc.server(url) as server:
        assert os.path.exists(path)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with pytest.raises(podipc.ChannelUnavailable, match="another server listens"):
            podipc.server(url)
    assert server.closed
    assert not os.path.exists(path)


def test_a_producer_meeting_a_server_and_a_client_meeting_a_consumer_are_refused() -> None:
    url = url_for("unix-abstract")
    with podipc.server(url) as server, podipc.producer(url, wait=5) as producer:
        serving, _ = in_thread(server.serve, bytes)
        with pytest.raises(podipc.ProtocolError, match="not a podipc consumer"):
            producer.send(b"x", timeout=5)
        producer.abort()
    serving.join(5)
    assert server.rejected == 1
    url = url_for("unix-abstract")
    with (
        podipc.consumer(url),
        podipc.client(url, wait=5) as client,
        pytest.raises(podipc.ProtocolError, match="not a podipc server"),
    ):
        client.call(b"x", timeout=5)


def test_request_reply_refuses_schemes_it_does_not_run_over() -> None:
    with pytest.raises(podipc.AddressError, match="request/reply runs over unix://, tcp://"):
        podipc.client("mq:///calls")


def test_close_from_a_signal_handler_wakes_the_call_blocked_in_the_main_thread(
    serving_any: tuple[str, ServerProcess],
) -> None:
    url, _ = serving_any
    client = podipc.client(url, wait=10)
    previous = signal.signal(signal.SIGALRM, lambda number, frame: client.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        started = time.monotonic()
        with pytest.raises(podipc.ChannelClosed):
            client.call(b"sleep:30")
        assert time.monotonic() - started < 1.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_close_from_another_thread_ends_serve_within_a_second(scheme: str) -> None:
    url = url_for(scheme)
    server = podipc.server(url)
    serving, outcome = in_thread(server.serve, bytes)
    with podipc.client(url, wait=10) as client:
        assert client.call(b"up", timeout=5) == b"up"
        closed = time.monotonic()
        server.close()
        serving.join(5)
        assert not serving.is_alive() and outcome == [None]
        assert time.monotonic() - closed < 1.0
        with pytest.raises(podipc.Timeout):
            client.call(b"after", timeout=0.5)  # the server is gone: the call waits for one to come back


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_a_reply_over_max_message_size_becomes_remote_error_and_serving_goes_on(scheme: str) -> None:
    url = url_for(scheme)
    with podipc.server(url, max_message_size=1024) as server, podipc.client(url, wait=10) as client:
        serving, _ = in_thread(server.serve, lambda request: request * 600)
        with pytest.raises(podipc.RemoteError, match="the reply is too large: 1200 bytes > max_message_size"):
            client.call(b"xx", timeout=5)
        assert client.call(b"x", timeout=5) == b"x" * 600
        server.close()
        serving.join(5)


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_a_call_with_a_timeout_shorter_than_wait_raises_timeout_not_peer_timeout(scheme: str) -> None:
    with podipc.client(url_for(scheme), wait=30) as client:
        started = time.monotonic()
        with pytest.raises(podipc.Timeout) as raised:
            client.call(b"anyone?", timeout=0.3)
        assert not isinstance(raised.value, podipc.PeerTimeout)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="not-the-hello"),
        pytest.param(HELLO + struct.pack(">I", 5) + b"short", id="frame-shorter-than-a-call-header"),
        pytest.param(HELLO + encode_frame(REQUEST, 1, b"a request"), id="a-request-sent-to-the-client"),
        pytest.param(HELLO + struct.pack(">I", 0xFFFFFF00), id="huge-length"),
    ],
)
def test_a_hostile_server_gives_protocol_error_never_a_hang(answer: bytes) -> None:
    url = url_for("unix-abstract")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + url.removeprefix("unix://@"))
        listener.listen()

        def hostile() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(8)
                connection.sendall(answer)
                time.sleep(2)

        thread, _ = in_thread(hostile)
        with podipc.client(url, wait=5) as client, pytest.raises(podipc.ProtocolError):
            client.call(b"hello?", timeout=5)
        thread.join(5)


def test_a_forked_child_refuses_the_parents_client_and_server_and_its_close_leaves_them_working() -> None:
    url = url_for("unix")
    path = url.removeprefix("unix://")
    with podipc.server(url) as server, podipc.client(url, wait=10) as client:
        serving, _ = in_thread(server.serve, bytes)
        assert client.call(b"before", timeout=5) == b"before"
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit code
            code = 0
            try:
                client.call(b"from the child", timeout=1)
                code = 1
            except podipc.ChannelClosed as error:
                code = 0 if "before fork()" in str(error) else 2
            client.close()
            server.close()
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.path.exists(path)
        assert client.call(b"after", timeout=5) == b"after"
        server.close()
        serving.join(5)


def test_import_podipc_loads_request_reply_and_its_transports_only_when_used() -> None:
    script = (
        "import sys, podipc\n"
        "print(sorted(m for m in sys.modules if m.startswith(('podipc.rpc', 'podipc.transports'))))\n"
        "podipc.Client\n"
        "print('podipc.rpc' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "True"]


def test_a_connection_that_never_says_hello_is_dropped_after_the_hello_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("podipc.rpc.replying.HELLO_SECONDS", 0.3)
    url = url_for("unix-abstract")
    with podipc.server(url) as server, podipc.client(url, wait=10) as client:
        serving, _ = in_thread(server.serve, bytes)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect("\0" + url.removeprefix("unix://@"))
        mumbling = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mumbling.connect("\0" + url.removeprefix("unix://@"))
        mumbling.sendall(HELLO[:3])
        for connection in (silent, mumbling):
            connection.settimeout(5)
            assert dropped(connection) == b""
            connection.close()
        assert client.call(b"still served", timeout=5) == b"still served"
        assert server.rejected == 1  # the one that sent something else than the hello
        server.close()
        serving.join(5)
