"""zmq+tcp:// and zmq+ipc://: what is special to the ZeroMQ channel, across real processes.

End of stream as a two-frame message, the consumer's size limit, garbage from raw
pyzmq and TCP peers, liveness through presence files (also when blocked at the
high-water mark), the ipc socket file, and the plain pyzmq peers of docs/wire/zmq.md.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import podipc
from podipc.presence import PRESENCE_DIRECTORY, PRESENCE_PREFIX, Presence
from tests.commands import PODIPC

pytestmark = pytest.mark.timeout(60)

PORTS = itertools.count(17140)
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire" / "zmq.md"
PEER_GONE_SECONDS = 2.0
MiB = 1024 * 1024

PRODUCER = """
import json, sys, time, podipc
url, sizes = sys.argv[1], json.loads(sys.argv[2])
with podipc.producer(url) as channel:
    for index, size in enumerate(sizes):
        channel.send((index.to_bytes(4, "big") * (size // 4 + 1))[:size])
    print("sent", flush=True)
    if len(sys.argv) > 3:
        time.sleep(float(sys.argv[3]))
"""

ATTACHED_CONSUMER = """
import sys, time, podipc
channel = podipc.consumer(sys.argv[1])
channel.recv(timeout=30)
print("attached", flush=True)
time.sleep(120)
"""


@pytest.fixture(params=["zmq+tcp", "zmq+ipc"])
def url_of(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A factory of fresh URLs of one scheme: ports 17140-17169, ipc sockets under tmp_path."""
    names = itertools.count()

    def make(**options: object) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        suffix = f"?{query}" if query else ""
        if request.param == "zmq+ipc":
            return f"zmq+ipc://{tmp_path}/s{next(names)}.sock{suffix}"
        port = next(PORTS)
        assert port < 17170
        return f"zmq+tcp://127.0.0.1:{port}{suffix}"

    yield make


def tcp_url(**options: object) -> str:
    """A fresh zmq+tcp:// URL."""
    port = next(PORTS)
    assert port < 17170
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"zmq+tcp://127.0.0.1:{port}" + (f"?{query}" if query else "")


def message(index: int, size: int) -> bytes:
    """The message the PRODUCER script sends at `index`."""
    return (index.to_bytes(4, "big") * (size // 4 + 1))[:size]


def start_producer(url: str, sizes: list[int], linger: float | None = None) -> subprocess.Popen[bytes]:
    """Run the PRODUCER script in its own process."""
    args = [sys.executable, "-c", PRODUCER, url, json.dumps(sizes)]
    if linger is not None:
        args.append(str(linger))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes]) -> str:
    """Wait for a helper process; fail with its stderr when it failed."""
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


def presence_files(url: str) -> list[str]:
    """Presence files left in /dev/shm for this channel."""
    token = podipc.parse_address(url).token
    return [name for name in os.listdir(PRESENCE_DIRECTORY) if name.startswith(PRESENCE_PREFIX + token)]


def zmq_endpoint(url: str) -> str:
    """The raw libzmq endpoint of a podipc zmq URL."""
    return url.split("?", 1)[0].replace("zmq+", "", 1)


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_messages_arrive_whole_and_in_order_including_empty_and_max_size(url_of: object, consumer_first: bool) -> None:
    url = url_of(max_message_size=MiB)  # type: ignore[operator]
    sizes = [0, 1, 0, MiB, 5, 0, 70_000]
    if consumer_first:
        consumer = podipc.consumer(url)
        producer = start_producer(url, sizes)
    else:
        producer = start_producer(url, sizes)
        time.sleep(0.5)
        consumer = podipc.consumer(url)
    with consumer:
        received = list(consumer)
        assert consumer.skipped == 0
    finish(producer)
    assert received == [message(index, size) for index, size in enumerate(sizes)]
    assert presence_files(url) == []
    address = podipc.parse_address(url)
    assert not address.path or not os.path.exists(address.path)


def test_recv_view_hands_out_whole_frames_without_copying_and_stops_at_the_end(url_of: object) -> None:
    url = url_of(max_message_size=2 * MiB)  # type: ignore[operator]
    sizes = [MiB, 0, 2 * MiB, 6, 3]
    producer = start_producer(url, sizes, linger=0.2)
    views = []
    with podipc.consumer(url) as consumer:
        views.append(consumer.recv_view(timeout=10))
        assert producer.stdout is not None and producer.stdout.readline() == b"sent\n"
        time.sleep(0.2)  # all queued: the rest come straight from libzmq's buffers
        with pytest.raises(podipc.EndOfStream):
            while True:
                views.append(consumer.recv_view())
        assert consumer.ended
        with pytest.raises(podipc.EndOfStream):
            consumer.recv_view()
    finish(producer)
    assert [bytes(view) for view in views] == [message(index, size) for index, size in enumerate(sizes)]
    assert all(view.readonly for view in views)
    assert all(isinstance(view.obj, zmq.Frame) for view in views[1:])  # libzmq's buffers, not copies


def test_a_message_over_max_message_size_is_refused_before_sending() -> None:
    with podipc.producer(tcp_url(max_message_size=1000, wait=0.2)) as producer:
        with pytest.raises(podipc.MessageTooLarge, match=r"1001 bytes > the zmq max_message_size option 1000"):
            producer.send(bytes(1001))
        producer.abort()


def test_the_consumer_drops_a_frame_over_its_limit_and_keeps_receiving() -> None:
    url = tcp_url(max_message_size=1000)
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    with podipc.consumer(url) as consumer:
        raw.connect(zmq_endpoint(url))
        raw.send(b"x" * 100_000)  # libzmq drops the connection instead of allocating this
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)
        raw.send(b"after")
        raw.send_multipart([b"podipc", b"eos"])
        assert list(consumer) == [b"after"]
        assert raw.poll(5000) and raw.recv_multipart() == [b"podipc", b"eos-ack"]
    raw.close(linger=0)
    context.term()


def test_multipart_control_garbage_is_skipped_and_other_multipart_frames_arrive_one_by_one(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.connect(zmq_endpoint(url))
    with podipc.consumer(url) as consumer:
        raw.send_multipart([b"not", b"a", b"message"])
        raw.send(b"")
        raw.send_multipart([b"podipc", b"eos", b"extra"])
        raw.send_multipart([b"podipc", b"hello"])
        raw.send(b"podipc")  # a single frame is data, whatever it says
        raw.send_multipart([b"", b"podipc", b""])  # b"podipc" inside a message is data too
        raw.send_multipart([b"in", b"podipc", b"eos"])  # and never an end of stream
        raw.send(b"data")
        raw.send_multipart([b"podipc", b"eos"])
        received = list(consumer)
        assert received == [
            b"not",
            b"a",
            b"message",
            b"",
            b"podipc",
            b"",
            b"podipc",
            b"",
            b"in",
            b"podipc",
            b"eos",
            b"data",
        ]
        assert consumer.skipped == 2
    raw.close(linger=0)
    context.term()


def test_non_zmtp_bytes_on_the_port_do_not_disturb_the_consumer() -> None:
    url = tcp_url()
    with podipc.consumer(url) as consumer:
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 10 + b"\x7f" * 64, os.urandom(4096)):
            with socket.create_connection(("127.0.0.1", consumer.address.port), timeout=5) as raw:
                raw.sendall(garbage)
        producer = start_producer(url, [3, 0, 4])
        assert list(consumer) == [message(0, 3), b"", message(2, 4)]
    finish(producer)


def test_timeouts_when_the_peer_is_there_but_quiet_or_slow(url_of: object) -> None:
    url = url_of(hwm=2)  # type: ignore[operator]
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        with pytest.raises(podipc.Timeout) as caught:
            consumer.recv(timeout=0.2)
        assert not isinstance(caught.value, podipc.PeerTimeout)
        started = time.monotonic()
        with pytest.raises(podipc.Timeout):
            for _ in range(10_000):
                producer.send(bytes(100_000), timeout=0.3)
        assert time.monotonic() - started < 5
        consumer.recv(timeout=5)
        producer.abort()


def test_a_lone_side_raises_peer_timeout_after_wait(url_of: object) -> None:
    url = url_of(wait=0.3)  # type: ignore[operator]
    with podipc.producer(url) as producer:
        with pytest.raises(podipc.PeerTimeout, match="no consumer appeared"):
            producer.send(b"x")
        producer.abort()
    with podipc.consumer(url) as consumer, pytest.raises(podipc.PeerTimeout, match="no producer appeared"):
        consumer.recv()


def test_a_killed_producer_makes_the_blocked_consumer_raise_peer_gone_quickly(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    producer = start_producer(url, [10, 10], linger=120)
    with podipc.consumer(url) as consumer:
        assert [consumer.recv(timeout=10), consumer.recv(timeout=10)] == [message(0, 10), message(1, 10)]
        killed = time.monotonic()
        producer.send_signal(signal.SIGKILL)
        with pytest.raises(podipc.PeerGone, match=r"producer of .* is gone"):
            consumer.recv()
        assert time.monotonic() - killed < PEER_GONE_SECONDS
    producer.wait()
    podipc.producer(url).abort()  # a new producer takes over the killed one's stale presence file
    assert presence_files(url) == []


def test_a_killed_consumer_makes_a_producer_blocked_at_the_high_water_mark_raise_peer_gone(url_of: object) -> None:
    url = url_of(hwm=4)  # type: ignore[operator]
    consumer = subprocess.Popen([sys.executable, "-c", ATTACHED_CONSUMER, url], stdout=subprocess.PIPE)
    killed_at: list[float] = []

    def kill_consumer() -> None:
        killed_at.append(time.monotonic())
        consumer.send_signal(signal.SIGKILL)

    with podipc.producer(url) as producer:
        producer.send(b"first")
        assert consumer.stdout is not None and consumer.stdout.readline() == b"attached\n"
        timer = threading.Timer(0.5, kill_consumer)
        timer.start()
        with pytest.raises(podipc.PeerGone, match=r"consumer of .* is gone"):
            for _ in range(100_000):
                producer.send(bytes(65536))  # blocks at the high-water mark long before the end
        assert killed_at and time.monotonic() - killed_at[0] < PEER_GONE_SECONDS
        timer.join()
        producer.abort()
    consumer.wait()
    with podipc.consumer(url):  # the killed consumer's stale presence (and socket file) are taken over
        pass
    assert presence_files(url) == []


def test_the_ipc_socket_file_has_the_mode_and_is_removed_at_the_end(tmp_path: Path) -> None:
    for mode in (0o600, 0o660):
        path = tmp_path / f"mode{mode:o}.sock"
        url = f"zmq+ipc://{path}?mode=0{mode:o}"
        consumer = podipc.consumer(url)
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        producer = start_producer(url, [1])
        assert list(consumer) == [message(0, 1)]
        assert not path.exists()  # removed when the stream ended
        consumer.close()
        finish(producer)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_ipc_socket_file_is_recovered_and_a_live_or_foreign_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.listen()
    with pytest.raises(podipc.ChannelUnavailable, match="live socket"):
        podipc.consumer(f"zmq+ipc://{path}")
    stale.close()  # now a socket file nobody listens on, as a SIGKILLed consumer leaves it
    assert path.exists()
    with podipc.consumer(f"zmq+ipc://{path}") as consumer:
        producer = start_producer(f"zmq+ipc://{path}", [2])
        assert list(consumer) == [message(0, 2)]
    finish(producer)
    assert not path.exists()
    regular = tmp_path / "regular.sock"
    regular.write_text("keep me")
    with pytest.raises(podipc.ChannelUnavailable, match="not a socket"):
        podipc.consumer(f"zmq+ipc://{regular}")
    assert regular.read_text() == "keep me"


WITHOUT_PYZMQ = "import sys; sys.modules['zmq'] = None  # pyzmq cannot be imported\n"
INSTALL_ZMQ = "pip install 'podipc[zmq]'"


def without_pyzmq(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a process where `import zmq` fails."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PYZMQ + script, *arguments], capture_output=True, timeout=60, text=True
    )


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_opening_without_pyzmq_is_unavailable_with_the_extra_to_install_never_an_import_error(role: str) -> None:
    script = (
        "import podipc\n"
        f"try:\n    podipc.{role}(sys.argv[1])\n"
        "except podipc.ChannelUnavailable as exc:\n    print('unavailable:', exc)\n"
    )
    for url in ("zmq+tcp://127.0.0.1:17169", "zmq+ipc:///tmp/podipc-no-pyzmq.sock"):
        completed = without_pyzmq(script, url)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.startswith("unavailable:") and INSTALL_ZMQ in completed.stdout, completed.stdout
    rows = {row.scheme: row for row in podipc.channels()}
    assert rows["zmq+tcp"].usable and rows["zmq+tcp"].max_message_size == 64 * MiB


def test_without_pyzmq_channels_and_doctor_say_unavailable_here_and_the_other_channels_work() -> None:
    cli = "from podipc.cli import main\nmain(prog_name='podipc')\n"
    listed = without_pyzmq(cli, "channels", "--json")
    rows = {row["scheme"]: row for row in map(json.loads, listed.stdout.splitlines())}
    for scheme in ("zmq+tcp", "zmq+ipc"):
        assert not rows[scheme]["usable"] and rows[scheme]["reason"].startswith("unavailable here")
        assert INSTALL_ZMQ in rows[scheme]["reason"]
    assert rows["tcp"]["usable"] and rows["shm"]["usable"]
    report = json.loads(without_pyzmq(cli, "doctor", "--json").stdout)
    verdicts = {verdict["scheme"]: verdict for verdict in report["channels"]}
    assert verdicts["zmq+ipc"]["reason"].startswith("unavailable here") and verdicts["zmq+ipc"]["fix"] == INSTALL_ZMQ
    failed = without_pyzmq(cli, "produce", "zmq+tcp://127.0.0.1:17169", "--count", "1")
    assert failed.returncode == 3 and failed.stderr.count("\n") == 1 and INSTALL_ZMQ in failed.stderr
    assert "Traceback" not in failed.stderr


def doc_script(name: str) -> str:
    """The Python block in docs/wire/zmq.md whose first line is `# {name}`."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    matching = [block for block in blocks if block.startswith(f"# {name}\n")]
    assert matching, f"no `# {name}` block in {DOC}"
    return matching[0]


def test_the_plain_pyzmq_producer_from_the_docs_talks_to_a_podipc_consumer(url_of: object, tmp_path: Path) -> None:
    url = url_of()  # type: ignore[operator]
    script = tmp_path / "producer.py"
    script.write_text(doc_script("plain_zmq_producer.py"))
    with podipc.consumer(url) as consumer:
        plain = subprocess.Popen([sys.executable, str(script), zmq_endpoint(url)], stdout=subprocess.PIPE)
        received = list(consumer)
    out, _ = plain.communicate(timeout=30)
    assert plain.returncode == 0
    assert received == [b"hello", b"", b"world" * 1000]
    assert out.strip() == b"acknowledged"


def test_the_plain_pyzmq_consumer_from_the_docs_takes_a_podipc_stream(url_of: object, tmp_path: Path) -> None:
    url = url_of()  # type: ignore[operator]
    script = tmp_path / "consumer.py"
    script.write_text(doc_script("plain_zmq_consumer.py"))
    plain = subprocess.Popen([sys.executable, str(script), zmq_endpoint(url)], stdout=subprocess.PIPE)
    with podipc.producer(url) as producer:
        for payload in (b"one", b"", b"three" * 3000):
            producer.send(payload)
    out, _ = plain.communicate(timeout=30)
    assert plain.returncode == 0
    assert json.loads(out) == [3, 0, 15000]


def test_the_presence_token_formula_of_the_docs_names_podipcs_presence_files(tmp_path: Path) -> None:
    script = tmp_path / "presence_token.py"
    script.write_text(doc_script("presence_token.py"))
    urls = [
        "zmq+tcp://127.0.0.1:7002",
        "zmq+tcp://localhost:7002?wait=3",
        "zmq+tcp://[::1]:7002",
        "zmq+ipc:///shared/zmq.sock?mode=0660",
        f"zmq+ipc:///{'deep/' * 20}x.sock",
    ]
    for url in urls:
        printed = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, check=True)
        assert printed.stdout.strip() == podipc.parse_address(url).token, url
    with podipc.consumer(urls[0]):  # and that is the file a consumer holds
        assert presence_files(urls[0]) == [f"{PRESENCE_PREFIX}{podipc.parse_address(urls[0]).token}.consumer"]


KILLED_CONSUMER = """
import sys, podipc
channel = podipc.consumer(sys.argv[1])
print(len(channel.recv(timeout=30)), flush=True)
for _ in channel:
    pass
"""


def test_a_consumer_restarted_at_once_ends_the_stream_instead_of_taking_its_tail(url_of: object) -> None:
    url = url_of(wait=3)  # type: ignore[operator]
    first = subprocess.Popen([sys.executable, "-c", KILLED_CONSUMER, url], stdout=subprocess.PIPE)
    produce = [*PODIPC, "produce", url, "--count", "2000", "--size", "64", "--rate", "200"]
    producer = subprocess.Popen(produce, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stdout is not None and first.stdout.readline().strip() == b"64"
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    received: list[bytes] = []
    second = podipc.consumer(url)  # at once: zmq reconnects the producer to it
    with second, pytest.raises((podipc.PeerGone, podipc.PeerTimeout)) as caught:
        while True:
            received.append(second.recv())
    out, err = producer.communicate(timeout=30)
    assert received == []  # never a tail of the stream the killed consumer began
    if isinstance(caught.value, podipc.PeerGone):  # it got a message of that stream, or saw its producer die
        assert re.search("joined a stream under way|producer of .* is gone", str(caught.value))
    assert producer.returncode == 7, err.decode()  # PeerGone: the stream is broken, not delivered
    assert b"PeerGone: the consumer of" in err and out == b""
    assert presence_files(url) == []


def test_a_podipc_producer_starts_its_stream_with_a_start_of_stream_message(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.bind(zmq_endpoint(url))
    producer = start_producer(url, [3, 0])
    frames = []
    while len(frames) < 4 and raw.poll(10_000):
        frames.append(raw.recv_multipart())
    assert frames == [[b"podipc", b"sos"], [message(0, 3)], [b""], [b"podipc", b"eos"]]
    raw.send_multipart([b"podipc", b"eos-ack"])
    finish(producer)
    raw.close(linger=0)
    context.term()


def test_data_before_the_start_of_stream_from_a_podipc_producer_is_a_stream_joined_under_way(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.connect(zmq_endpoint(url))
    held = Presence(podipc.parse_address(url).token, "producer")
    held.declare("start-of-stream")  # as a podipc producer does: its streams begin with sos
    try:
        with podipc.consumer(url) as consumer:
            raw.send(b"tail")
            raw.send_multipart([b"podipc", b"eos"])
            with pytest.raises(podipc.PeerGone, match="joined a stream under way"):
                consumer.recv(timeout=10)
            with pytest.raises(podipc.PeerGone, match="joined a stream under way"):
                consumer.recv(timeout=10)  # nor is the end of that stream acknowledged
            assert not raw.poll(300)
    finally:
        held.close()
        raw.close(linger=0)
        context.term()


def test_a_raw_producer_holding_an_unmarked_presence_file_may_send_data_first(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.connect(zmq_endpoint(url))
    held = Presence(podipc.parse_address(url).token, "producer")  # for liveness only, as a raw peer may
    try:
        with podipc.consumer(url) as consumer:
            raw.send(b"first")
            raw.send_multipart([b"podipc", b"eos"])
            assert list(consumer) == [b"first"]
            assert raw.poll(5000) and raw.recv_multipart() == [b"podipc", b"eos-ack"]
    finally:
        held.close()
        raw.close(linger=0)
        context.term()


def test_a_second_start_of_stream_is_a_new_producer_and_ends_the_stream(url_of: object) -> None:
    url = url_of()  # type: ignore[operator]
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.connect(zmq_endpoint(url))
    with podipc.consumer(url) as consumer:
        raw.send_multipart([b"podipc", b"sos"])
        raw.send(b"one")
        raw.send_multipart([b"podipc", b"sos"])
        raw.send(b"two")
        assert consumer.recv(timeout=10) == b"one"
        with pytest.raises(podipc.PeerGone, match="a new stream started"):
            consumer.recv(timeout=10)
        assert consumer.skipped == 0
    raw.close(linger=0)
    context.term()


# --- the endpoint contract: what is special to zmq --------------------------------------------

PACED = """
import sys, time, podipc
sent = 0
try:
    with podipc.producer(sys.argv[1]) as out:
        while True:
            out.send(b"%d" % sent)  # 1000 msg/s, far below the high-water mark: no send ever waits
            sent += 1
            if sent == 100:
                print("sending", flush=True)
            time.sleep(0.001)
except podipc.PeerGone as error:
    print(f"PeerGone: {error}", flush=True)
"""


def test_a_killed_consumer_is_seen_within_2_s_by_a_producer_whose_sends_never_wait(url_of: object) -> None:
    url = url_of(hwm=1_000_000)  # type: ignore[operator]
    consumer = subprocess.Popen([sys.executable, "-c", ATTACHED_CONSUMER, url], stdout=subprocess.PIPE)
    producer = subprocess.Popen([sys.executable, "-c", PACED, url], stdout=subprocess.PIPE, text=True)
    assert consumer.stdout is not None and consumer.stdout.readline() == b"attached\n"
    assert producer.stdout is not None and producer.stdout.readline() == "sending\n"
    consumer.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    line = producer.stdout.readline()
    seen_after = time.monotonic() - killed_at
    producer.wait(30)
    consumer.wait()
    assert line.startswith("PeerGone: the consumer of"), line
    assert seen_after < PEER_GONE_SECONDS, f"seen after {seen_after:.2f} s"


def test_a_close_from_a_signal_handler_inside_the_fast_send_ends_the_stream_as_the_send_leaves(
    url_of: object,
) -> None:
    """What a SIGTERM handler calling close() does when it lands inside send()'s own fast path (not the base's)."""
    url = url_of()  # type: ignore[operator]
    received: list[bytes] = []
    with podipc.consumer(url) as consumer:
        reader = threading.Thread(target=lambda: received.extend(consumer))
        reader.start()
        producer = podipc.producer(url)
        producer.send(b"first")  # rendezvous done: the next send of bytes takes the fast path
        real_send = producer._send_frame  # type: ignore[attr-defined]
        closing: list[float] = []

        def send_then_close(data: bytes) -> None:
            real_send(data)
            started = time.monotonic()
            producer.close(timeout=10)  # as a handler would, between two bytecodes of the fast path
            closing.append(time.monotonic() - started)

        producer._send_frame = send_then_close  # type: ignore[attr-defined]
        producer.send(b"second")
        reader.join(10)
    assert closing and closing[0] < 0.5, closing  # left to the send's exit, not waited for
    assert received == [b"first", b"second"]
    assert producer.closed


def test_an_async_task_whose_edge_another_call_took_still_gets_the_message(url_of: object) -> None:
    """zmq's descriptor is edge-triggered: a receive outside the task (another thread, or sync code on the loop)
    takes the edge the task waits on and leaves a message behind; the task re-checks every EDGE_RECHECK_SECONDS."""
    import asyncio
    import select

    import podipc.aio

    url = url_of()  # type: ignore[operator]
    inbox = podipc.aio.consumer(url)
    producer = podipc.producer(url)

    async def main() -> tuple[bytes | None, bytes, float]:
        waiting = asyncio.ensure_future(inbox.recv(timeout=10))
        await asyncio.sleep(0.2)  # the task waits on the descriptor now
        producer.send(b"one")
        producer.send(b"two")
        taken, deadline = None, time.monotonic() + 5
        while taken is None and time.monotonic() < deadline:  # the loop does not run the task meanwhile
            select.select([inbox.fileno()], [], [], 0.5)  # an edge came (a message, or libzmq's own commands)
            taken = inbox.endpoint.try_recv()  # processes libzmq's commands (the edge is gone), leaves "two"
        started = time.monotonic()
        return taken, await waiting, time.monotonic() - started

    taken, then, seconds = asyncio.run(main())
    producer.abort()
    inbox.close()
    assert (taken, then) == (b"one", b"two")
    assert seconds < 1.0, f"the task got the message left behind after {seconds:.2f} s"


def test_a_consumer_that_leaves_as_its_ack_travels_still_ends_the_stream_cleanly(url_of: object) -> None:
    """A consumer acks, then leaves; the producer's peer monitor may see it gone before the ack arrives."""
    url = url_of()  # type: ignore[operator]
    held = Presence(podipc.parse_address(url).token, "consumer")  # a consumer's presence, as podipc's holds it
    context = zmq.Context()
    raw = context.socket(zmq.PAIR)
    raw.bind(zmq_endpoint(url))
    frames: list[list[bytes]] = []

    def consume_then_leave_before_acking() -> None:
        while not frames or frames[-1] != [b"podipc", b"eos"]:
            assert raw.poll(10_000)
            frames.append(raw.recv_multipart())
        held.close()  # gone for the producer's monitor...
        time.sleep(0.6)  # ...which probes every 0.2 s
        raw.send_multipart([b"podipc", b"eos-ack"])  # ...before the ack comes

    consumer = threading.Thread(target=consume_then_leave_before_acking)
    consumer.start()
    try:
        with podipc.producer(url) as producer:
            producer.send(b"one")
        consumer.join(10)
        assert frames == [[b"podipc", b"sos"], [b"one"], [b"podipc", b"eos"]]
    finally:
        held.close()
        raw.close(linger=0)
        context.term()
