"""udp://: what is special to the datagram channel, across real processes.

Loss accounting, garbage skipping, the HELLO/EOS handshake, liveness through presence
files, and the plain-socket peers shown in docs/wire/udp.md.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import podipc
from podipc.presence import PRESENCE_DIRECTORY, PRESENCE_PREFIX
from podipc.transports.udp import owners as udp_owners
from podipc.transports.udp import wire as udp_wire
from tests.commands import PODIPC

udp: Any = importlib.import_module("podipc.transports.udp")

pytestmark = pytest.mark.timeout(60)

PORTS = itertools.count(17110)
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire" / "udp.md"
PEER_GONE_SECONDS = 2.0

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


def udp_url(**options: object) -> str:
    """A fresh udp:// URL in this file's port range (17110-17139)."""
    port = next(PORTS)
    assert port < 17140, "this file's port range is used up: give it more"
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"udp://127.0.0.1:{port}" + (f"?{query}" if query else "")


def message(index: int, size: int) -> bytes:
    """The message the PRODUCER script sends at `index`."""
    return (index.to_bytes(4, "big") * (size // 4 + 1))[:size]


def start_producer(url: str, sizes: list[int], linger: float | None = None) -> subprocess.Popen[bytes]:
    """Run the PRODUCER script in its own process."""
    args = [sys.executable, "-c", PRODUCER, url, json.dumps(sizes)]
    if linger is not None:
        args.append(str(linger))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def presence_files(url: str) -> list[str]:
    """Presence files left in /dev/shm for this channel."""
    token = podipc.parse_address(url).token
    return [name for name in os.listdir(PRESENCE_DIRECTORY) if name.startswith(PRESENCE_PREFIX + token)]


def finish(process: subprocess.Popen[bytes]) -> str:
    """Wait for a helper process; fail with its stderr when it failed."""
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_messages_arrive_whole_and_in_order_including_empty_and_max_size(consumer_first: bool) -> None:
    url = udp_url()
    sizes = [0, 1, 0, 1000, udp_wire.MAX_MESSAGE_SIZE, 7, 0, 65000, 3]
    if consumer_first:
        consumer = podipc.consumer(url)
        producer = start_producer(url, sizes)
    else:
        producer = start_producer(url, sizes)
        time.sleep(0.5)
        consumer = podipc.consumer(url)
    with consumer:
        received = list(consumer)
        assert consumer.lost == 0 and consumer.skipped == 0
    finish(producer)
    assert received == [message(index, size) for index, size in enumerate(sizes)]
    assert presence_files(url) == []


def test_a_message_over_the_datagram_limit_is_refused_before_sending() -> None:
    url = udp_url(wait=0.2)
    with podipc.producer(url) as producer:
        assert producer.max_message_size == 65507 - 11
        with pytest.raises(podipc.MessageTooLarge, match=r"the UDP datagram limit.*use tcp:// or shm://"):
            producer.send(bytes(producer.max_message_size + 1))
        producer.abort()


def test_a_lone_producer_times_out_waiting_for_its_consumer() -> None:
    producer = podipc.producer(udp_url(wait=0.3))
    started = time.monotonic()
    with pytest.raises(podipc.PeerTimeout, match="no consumer appeared"):
        producer.send(b"x")
    assert time.monotonic() - started < 2
    producer.abort()


def test_a_lone_consumer_raises_timeout_then_peer_timeout() -> None:
    with podipc.consumer(udp_url(wait=0.6)) as consumer:
        with pytest.raises(podipc.Timeout) as caught:
            consumer.recv(timeout=0.1)
        assert not isinstance(caught.value, podipc.PeerTimeout)
        with pytest.raises(podipc.PeerTimeout, match="no producer appeared"):
            consumer.recv()


def test_recv_timeout_while_the_producer_is_quiet() -> None:
    url = udp_url()
    producer = start_producer(url, [5], linger=3)
    with podipc.consumer(url) as consumer:
        assert consumer.recv(timeout=10) == message(0, 5)
        started = time.monotonic()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - started < 1.5
        assert list(consumer) == []
    finish(producer)


def test_a_killed_producer_makes_the_blocked_consumer_raise_peer_gone_quickly() -> None:
    url = udp_url()
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


def test_a_killed_consumer_makes_the_producer_raise_peer_gone_quickly() -> None:
    url = udp_url()
    consumer = subprocess.Popen([sys.executable, "-c", ATTACHED_CONSUMER, url], stdout=subprocess.PIPE)
    with podipc.producer(url) as producer:
        producer.send(b"first")
        assert consumer.stdout is not None and consumer.stdout.readline() == b"attached\n"
        killed = time.monotonic()
        consumer.send_signal(signal.SIGKILL)
        consumer.wait()
        with pytest.raises(podipc.PeerGone, match=r"consumer of .* is gone"):
            while time.monotonic() - killed < 5:
                producer.send(b"more")
                time.sleep(0.01)
        assert time.monotonic() - killed < PEER_GONE_SECONDS
        with pytest.raises(podipc.PeerGone):
            producer.close(timeout=1)
    with podipc.consumer(url):  # the killed consumer's stale presence file is taken over
        pass
    assert presence_files(url) == []


def attached_pair(url: str) -> tuple[Any, Any]:
    """A producer and a consumer in this process, past the handshake (one message sent and taken)."""
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"first")  # the consumer is bound and present: the HELLO waits in its socket
    assert consumer.recv(timeout=10) == b"first"
    return producer, consumer


def test_the_end_of_stream_ack_counts_when_the_consumer_took_it_and_left_before_the_producer_looked() -> None:
    """The flaky test_garbage case, made deterministic: the ack arrives and the consumer leaves between two looks."""
    producer, consumer = attached_pair(udp_url())
    assert producer._try_close() is False  # the end of stream is out; no ack yet
    with pytest.raises(podipc.EndOfStream):
        consumer.recv(timeout=10)  # takes it, acknowledges, leaves (its presence file and port are gone)
    assert presence_files(consumer.address.url) == [presence_files(producer.address.url)[0]]
    producer._signal_peer_lost()  # what the monitor says next
    assert producer._try_close() is True  # the ack is read before the consumer is called gone
    producer.close()
    consumer.close()
    assert presence_files(producer.address.url) == []


def test_what_arrived_before_the_producer_aborted_is_read_then_peer_gone() -> None:
    producer, consumer = attached_pair(udp_url())
    for index in range(3):
        producer.send(message(index, 10))
    producer.abort()  # its presence file stays behind unlocked: the consumer learns it came and went
    started = time.monotonic()
    assert [consumer.recv(timeout=10) for _ in range(3)] == [message(index, 10) for index in range(3)]
    with pytest.raises(podipc.PeerGone, match=r"producer of .* is gone"):
        consumer.recv(timeout=10)
    assert time.monotonic() - started < PEER_GONE_SECONDS
    consumer.close()


HELD_PORT_CONSUMER = """
import os, sys, time, podipc
channel = podipc.consumer(sys.argv[1])
assert channel.recv(timeout=30) == b"first"
keeper = os.dup(channel._sock.fileno())  # the port stays bound after this process dies: no ICMP will tell
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:
        time.sleep(0.05)
    time.sleep(5)  # the test is over by then
    os._exit(0)
print("attached", flush=True)
time.sleep(120)
"""


def test_a_producer_sending_at_full_speed_sees_a_dead_consumer_within_2_s_through_the_monitor() -> None:
    url = udp_url()
    consumer = subprocess.Popen([sys.executable, "-c", HELD_PORT_CONSUMER, url], stdout=subprocess.PIPE)
    try:
        with podipc.producer(url) as producer:
            producer.send(b"first")
            assert consumer.stdout is not None and consumer.stdout.readline() == b"attached\n"
            consumer.send_signal(signal.SIGKILL)  # its forked child keeps the socket, not the presence
            killed = time.monotonic()
            with pytest.raises(podipc.PeerGone, match=r"consumer of .* is gone"):
                while time.monotonic() - killed < 10:
                    producer.send(b"more")
            assert time.monotonic() - killed < PEER_GONE_SECONDS
            producer.abort()
    finally:
        consumer.kill()
        consumer.wait()


def test_a_datagram_from_another_socket_queued_behind_the_hello_is_skipped() -> None:
    url = udp_url()
    with podipc.consumer(url) as consumer:
        target = ("127.0.0.1", consumer.address.port)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder,
        ):
            plain.connect(target)
            plain.send(udp_wire.encode(udp_wire.KIND_HELLO, 0))
            intruder.sendto(udp_wire.encode(udp_wire.KIND_DATA, 1000, b"forged"), target)  # queued before connect()
            plain.send(udp_wire.encode(udp_wire.KIND_DATA, 0, b"real"))
            plain.send(udp_wire.encode(udp_wire.KIND_EOS, 1))
            assert list(consumer) == [b"real"]
        assert (consumer.skipped, consumer.lost) == (1, 0)


def test_the_bound_on_datagrams_queued_before_connect_is_never_below_their_number() -> None:
    sizes = [0, 64, 1500, udp_wire.MAX_MESSAGE_SIZE] * 30
    with podipc.consumer(udp_url()) as consumer, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for count, size in enumerate(sizes, 1):
            sender.sendto(bytes(size), ("127.0.0.1", consumer.address.port))
            assert consumer._queued_at_most() >= count


def test_the_owners_of_udp_sockets_come_from_the_kernel_table() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        assert udp_owners.udp_socket_owners(socket.AF_INET, "127.0.0.1", port) == [os.geteuid()]
    assert udp_owners.udp_socket_owners(socket.AF_INET, "127.0.0.1", port) == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wildcard:
        wildcard.bind(("0.0.0.0", 0))
        assert udp_owners.udp_socket_owners(socket.AF_INET, "127.0.0.1", wildcard.getsockname()[1]) == [os.geteuid()]
    assert udp_owners.udp_socket_owners(socket.AF_INET, "not-an-address", port) is None


def test_proc_net_addresses_decode_to_network_order() -> None:
    little = sys.byteorder == "little"
    assert udp_owners.proc_address("0100007F" if little else "7F000001") == socket.inet_pton(
        socket.AF_INET, "127.0.0.1"
    )
    loopback6 = "00000000000000000000000001000000" if little else "00000000000000000000000000000001"
    assert udp_owners.proc_address(loopback6) == socket.inet_pton(socket.AF_INET6, "::1")
    with pytest.raises(ValueError):
        udp_owners.proc_address("7F0000")


def test_a_port_held_by_another_socket_names_its_owner() -> None:
    url = udp_url()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", podipc.parse_address(url).port))
        with pytest.raises(podipc.ChannelUnavailable, match=r"another socket holds this port \(uid \d+"):
            podipc.consumer(url)
    assert presence_files(url) == []


def test_garbage_datagrams_are_skipped_and_counted() -> None:
    url = udp_url()
    with podipc.consumer(url) as consumer:
        target = ("127.0.0.1", consumer.address.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for garbage in (
                b"",
                b"x",
                b"pu",
                b"\xff" * 40,
                udp_wire.encode(udp_wire.KIND_DATA, 0, b"early"),
                b"puZ" + bytes(8),
            ):
                raw.sendto(garbage, target)
        producer = start_producer(url, [4, 0, 9])
        assert list(consumer) == [message(0, 4), b"", message(2, 9)]
        assert consumer.skipped == 6
        assert consumer.lost == 0
    finish(producer)


def test_a_burst_into_a_tiny_receive_buffer_counts_what_was_lost() -> None:
    url = udp_url(rcvbuf=4096)
    count = 3000
    with podipc.consumer(url) as consumer:
        producer = start_producer(url, [1000] * count)
        first = consumer.recv(timeout=10)  # the handshake is done; now let the burst overflow the buffer
        assert producer.stdout is not None and producer.stdout.readline() == b"sent\n"
        received = [first, *consumer]
        finish(producer)
        assert consumer.lost > 0
        assert len(received) + consumer.lost == count
        indices = [int.from_bytes(payload[:4], "big") for payload in received]
        assert indices == sorted(indices) and len(set(indices)) == len(indices)
        assert all(payload == message(index, 1000) for index, payload in zip(indices, received, strict=True))


def test_the_cli_consumer_summary_reports_lost_datagrams() -> None:
    url = udp_url(rcvbuf=4096)
    consumer = subprocess.Popen(
        [*PODIPC, "consume", url, "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    producer = subprocess.run(
        [*PODIPC, "produce", url, "--count", "3000", "--size", "1000"],
        capture_output=True,
        timeout=30,
    )
    assert producer.returncode == 0, producer.stderr.decode()
    summary = json.loads(finish(consumer).strip().splitlines()[-1])
    assert summary["messages"] + summary.get("lost", 0) == 3000


def test_the_consumer_claims_the_port_and_refuses_a_second_consumer() -> None:
    url = udp_url()
    with podipc.consumer(url), pytest.raises(podipc.ChannelUnavailable):
        podipc.consumer(url)
    with podipc.consumer(url):  # the port and presence were released
        pass
    assert presence_files(url) == []


def doc_script(name: str) -> str:
    """The Python block in docs/wire/udp.md whose first line is `# {name}`."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    matching = [block for block in blocks if block.startswith(f"# {name}\n")]
    assert matching, f"no `# {name}` block in {DOC}"
    return matching[0]


def test_the_plain_socket_producer_from_the_docs_talks_to_a_podipc_consumer(tmp_path: Path) -> None:
    url = udp_url()
    script = tmp_path / "producer.py"
    script.write_text(doc_script("plain_udp_producer.py"))
    with podipc.consumer(url) as consumer:
        plain = subprocess.Popen([sys.executable, str(script), "127.0.0.1", str(consumer.address.port)])
        received = list(consumer)
        assert plain.wait(timeout=20) == 0
    assert received == [b"hello", b"", b"world" * 1000]


def test_the_plain_socket_consumer_from_the_docs_takes_a_podipc_stream(tmp_path: Path) -> None:
    url = udp_url()
    script = tmp_path / "consumer.py"
    script.write_text(doc_script("plain_udp_consumer.py"))
    plain = subprocess.Popen(
        [sys.executable, str(script), "127.0.0.1", str(podipc.parse_address(url).port)], stdout=subprocess.PIPE
    )
    with podipc.producer(url) as producer:
        for payload in (b"one", b"", b"three" * 3000):
            producer.send(payload)
    out, _ = plain.communicate(timeout=20)
    assert plain.returncode == 0
    assert json.loads(out) == {"messages": [3, 0, 15000], "lost": 0}


@pytest.mark.parametrize(
    "url", ["udp://127.0.0.1:7001", "udp://localhost:7001?wait=3", "UDP://[::1]:7001", "udp://0.0.0.0:65535"]
)
def test_the_presence_token_formula_in_the_docs_is_podipcs(tmp_path: Path, url: str) -> None:
    script = tmp_path / "token.py"
    script.write_text(doc_script("udp_presence_token.py"))
    printed = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == podipc.parse_address(url).token


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_the_datagram_decoder_accepts_only_well_formed_datagrams(datagram: bytes) -> None:
    decoded = udp_wire.decode(datagram)
    if decoded is None:
        return
    kind, sequence, payload = decoded
    assert datagram[:2] == b"pu" and kind in udp_wire.KINDS
    assert udp_wire.encode(kind, sequence, payload) == datagram


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=2000))
def test_every_encoded_data_datagram_decodes_to_itself(sequence: int, payload: bytes) -> None:
    assert udp_wire.decode(udp_wire.encode(udp_wire.KIND_DATA, sequence, payload)) == (
        udp_wire.KIND_DATA,
        sequence,
        payload,
    )


@pytest.fixture(scope="module")
def lone_consumer() -> Any:
    consumer = podipc.consumer(udp_url())
    yield consumer
    consumer.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_the_consumer_never_crashes_on_an_arbitrary_datagram(lone_consumer: Any, datagram: bytes) -> None:
    lone_consumer._buffer[: len(datagram)] = datagram
    skipped, lost, late = lone_consumer.skipped, lone_consumer.lost, lone_consumer.late
    try:
        result = lone_consumer._take(len(datagram))
    except podipc.EndOfStream:
        assert udp_wire.decode(datagram) is not None and datagram[2] == udp_wire.KIND_EOS
        lone_consumer._expected = 0
        return
    if result is None:
        assert lone_consumer.skipped + lone_consumer.late + lone_consumer.lost >= skipped + late + lost
    elif datagram[2] == udp_wire.KIND_BATCH:
        messages = udp_wire.split_batch(datagram[udp_wire.HEADER_SIZE :])
        assert messages is not None and [result, *reversed(lone_consumer._pending)] == messages
        lone_consumer._pending = []
        lone_consumer._expected = 0
    else:
        assert result == datagram[udp_wire.HEADER_SIZE :]
        lone_consumer._expected = 0
