"""A co-tenant against zmq+ipc:// and zmq+tcp:// (issue 10): the socket file is trusted only when ours (D3, D5,
D7), a dead peer is seen within 2 s across users (D6), and what another user can do over a port.

The rows of docs/reliability.md's "Who can do what" for zmq+ipc and zmq+tcp are these tests.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from .cotenant import Pod, Tenants, assert_one_line_error
from .test_presence_cotenant import FORKING_PRODUCER

pytestmark = pytest.mark.timeout(180)

WAIT_SECONDS = 2
PEER_GONE_SECONDS = 2.0
SOCKET = "/tmp/volume/data.sock"
IPC_URL = f"zmq+ipc://{SOCKET}"
TCP_URL = "zmq+tcp://127.0.0.1:7410"

LISTENER = r"""
import os, sys, time, zmq
endpoint, mode, seconds = sys.argv[1], int(sys.argv[2], 8), float(sys.argv[3])
context = zmq.Context()
sock = context.socket(zmq.PAIR)
sock.bind(endpoint)
if endpoint.startswith("ipc://"):
    os.chmod(endpoint[len("ipc://"):], mode)
print("listening", flush=True)
received = []
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if sock.poll(50):
        received.append(sock.recv_multipart())
print(repr(received), flush=True)
sock.close(linger=0)
context.term()
"""
"""Mallory's raw pyzmq PAIR listener: binds ENDPOINT (an ipc socket file gets MODE), prints what it gets in SECONDS."""

STALE_SOCKET = r"""
import os, socket, sys
path, mode = sys.argv[1], int(sys.argv[2], 8)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, mode)
listener.close()  # a socket file nobody listens on, as a killed consumer leaves it
"""

INJECTOR = r"""
import sys, zmq
context = zmq.Context()
sock = context.socket(zmq.PAIR)
sock.connect(sys.argv[1])
sock.send(b"forged")
sock.send_multipart([b"podipc", b"eos"])
answered = sock.poll(int(float(sys.argv[2]) * 1000)) and sock.recv_multipart() == [b"podipc", b"eos-ack"]
print("acknowledged" if answered else "no ack", flush=True)
sock.close(linger=0)
context.term()
"""


def mode_of(pod: Pod, path: str) -> str:
    return pod.run(["stat", "-c", "%U %a %F", path]).stdout.strip()


def consume(pod: Pod, user: object, url: str) -> object:
    return pod.popen([sys.executable, "-m", "podipc", "consume", url], user=user)  # type: ignore[arg-type]


def summary(stdout: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


# --- zmq+ipc: the socket file -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["her live listener", "her stale socket", "a regular file", "a FIFO", "a symlink"])
def test_d3_her_object_at_the_socket_path_is_refused_by_the_consumer_and_left_alone(
    pod: Pod, tenants: Tenants, kind: str
) -> None:
    plant = {
        "her stale socket": [sys.executable, "-c", STALE_SOCKET, SOCKET, "0777"],
        "a regular file": ["sh", "-c", f"echo mine > {SOCKET}"],
        "a FIFO": ["mkfifo", "-m", "0666", SOCKET],
        "a symlink": ["ln", "-s", "/etc/passwd", SOCKET],
    }
    listener = None
    if kind == "her live listener":
        listener = pod.popen([sys.executable, "-c", LISTENER, f"ipc://{SOCKET}", "0777", "20"], user=tenants.mallory)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    else:
        assert pod.run(plant[kind], user=tenants.mallory).returncode == 0
    before = mode_of(pod, SOCKET)
    result = pod.podipc("consume", f"{IPC_URL}?wait={WAIT_SECONDS}", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert SOCKET in line and "podipc-mallory" in line, line
    assert mode_of(pod, SOCKET) == before, "her object was changed or removed"
    if listener is not None:
        listener.kill()


def test_d3_a_producer_sends_nothing_to_her_socket_at_the_path(pod: Pod, tenants: Tenants) -> None:
    listener = pod.popen([sys.executable, "-c", LISTENER, f"ipc://{SOCKET}", "0777", "6"], user=tenants.mallory)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    result = pod.podipc("produce", f"{IPC_URL}?wait={WAIT_SECONDS}", "--count", "5", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert SOCKET in line and "podipc-mallory" in line, line
    stdout, _ = listener.communicate(timeout=30)
    assert stdout.strip().splitlines()[-1] == "[]", f"she received {stdout}"


def test_d5_a_socket_file_other_users_may_connect_to_is_refused_even_when_ours(pod: Pod, tenants: Tenants) -> None:
    assert pod.run([sys.executable, "-c", STALE_SOCKET, SOCKET, "0777"], user=tenants.alice).returncode == 0
    result = pod.podipc("consume", f"{IPC_URL}?wait={WAIT_SECONDS}", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert "lets every user of the pod connect" in line and "mode 0777" in line, line
    assert mode_of(pod, SOCKET) == "podipc-alice 777 socket"


def test_group_sharing_over_a_socket_file_lets_the_group_in_and_not_her(pod: Pod, tenants: Tenants) -> None:
    """mode=0660 in a group's directory (an emptyDir with fsGroup): bob's stale socket is replaced by alice's
    consumer, bob's producer gets through, mallory cannot connect (the socket file's mode)."""
    directory = f"{pod.volume}/shared"
    made = pod.run(["sh", "-c", f"mkdir -m 2775 {directory} && chgrp {tenants.group} {directory}"])
    assert made.returncode == 0, made.stderr
    path = f"{directory}/data.sock"
    assert pod.run([sys.executable, "-c", STALE_SOCKET, path, "0660"], user=tenants.bob).returncode == 0
    shared = f"zmq+ipc://{path}?mode=0660&wait=20"
    consumer = consume(pod, tenants.alice, shared.replace("wait=20", "wait=60"))
    deadline = time.monotonic() + 20
    while "podipc-alice" not in mode_of(pod, path):
        assert time.monotonic() < deadline and consumer.poll() is None, (mode_of(pod, path), consumer.communicate())  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert mode_of(pod, path) == "podipc-alice 660 socket"
    injected = pod.run([sys.executable, "-c", INJECTOR, f"ipc://{path}", "3"], user=tenants.mallory, timeout=40)
    assert injected.stdout.strip() == "no ack", injected  # connect(2) needs write permission on the file
    produced = pod.podipc("produce", shared, "--count", "5", user=tenants.bob)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)  # type: ignore[attr-defined]
    assert consumer.returncode == 0, stderr  # type: ignore[attr-defined]
    assert summary(stdout)["messages"] == 5
    assert pod.run(["test", "-e", path]).returncode != 0  # removed at the end of the stream


def test_a_group_members_stale_socket_in_a_sticky_directory_is_one_line_naming_the_owner(
    pod: Pod, tenants: Tenants
) -> None:
    assert pod.run([sys.executable, "-c", STALE_SOCKET, SOCKET, "0660"], user=tenants.bob).returncode == 0
    result = pod.podipc("consume", f"{IPC_URL}?mode=0660&wait={WAIT_SECONDS}", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert "cannot replace the stale socket file" in line and "podipc-bob" in line and "sticky" in line, line
    assert mode_of(pod, SOCKET) == "podipc-bob 660 socket"


# --- peer death across users (D6) --------------------------------------------------------------

PACED_PRODUCER = r"""
import sys, time, podipc
sent = 0
try:
    with podipc.producer(sys.argv[1]) as out:
        print("sending", flush=True)
        while True:
            out.send(b"%d" % sent)  # 1000 msg/s, far below the high-water mark: never waits
            sent += 1
            time.sleep(0.001)
except podipc.PeerGone as error:
    print(f"PeerGone after {sent} messages: {error}", flush=True)
"""


@pytest.mark.parametrize("url", [IPC_URL, TCP_URL])
def test_d6_a_killed_consumer_is_seen_within_2_s_by_a_producer_sending_1000_per_second(
    pod: Pod, tenants: Tenants, url: str
) -> None:
    shared = f"{url}?mode=0660&wait=20&hwm=100000"
    consumer, pid = pod.spawn([sys.executable, "-m", "podipc", "consume", shared], user=tenants.bob)
    producer = pod.popen([sys.executable, "-c", PACED_PRODUCER, shared], user=tenants.alice)
    assert producer.stdout is not None and producer.stdout.readline().strip() == "sending"
    time.sleep(1.0)
    pod.kill(pid)
    killed_at = time.monotonic()
    stdout, stderr = producer.communicate(timeout=20)
    seen_after = time.monotonic() - killed_at
    assert "Traceback" not in stderr, stderr
    assert stdout.strip().startswith("PeerGone after"), f"the producer never saw its consumer die: {stdout} {stderr}"
    assert seen_after < PEER_GONE_SECONDS + 0.5, f"seen after {seen_after:.2f} s"  # + the producer's exit
    consumer.kill()


@pytest.mark.parametrize("url", [IPC_URL, TCP_URL])
def test_d6_a_producer_killed_after_forking_is_seen_dead_by_another_users_consumer_within_2_s(
    pod: Pod, tenants: Tenants, url: str
) -> None:
    shared = f"{url}?mode=0660&wait=20"
    consumer = consume(pod, tenants.bob, shared)
    producer = pod.popen([sys.executable, "-c", FORKING_PRODUCER, shared], user=tenants.alice)
    assert producer.stdout is not None
    parent, child = map(int, producer.stdout.readline().split())
    time.sleep(0.5)
    pod.kill(parent)
    killed_at = time.monotonic()
    try:
        stdout, stderr = consumer.communicate(timeout=10)  # type: ignore[attr-defined]
        seconds = time.monotonic() - killed_at
    finally:
        pod.kill(child)
    assert "Traceback" not in stderr and consumer.returncode == 7, (consumer.returncode, stderr)  # type: ignore[attr-defined]
    assert seconds < PEER_GONE_SECONDS + 0.5, f"the parent's death was seen after {seconds:.2f} s while its child lives"
    assert summary(stdout)["messages"] == 1


# --- zmq+tcp: a port has no permissions --------------------------------------------------------


def test_she_can_take_the_port_first_and_the_consumer_refuses_in_one_line(pod: Pod, tenants: Tenants) -> None:
    listener = pod.popen([sys.executable, "-c", LISTENER, "tcp://127.0.0.1:7410", "0", "20"], user=tenants.mallory)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    result = pod.podipc("consume", f"{TCP_URL}?wait={WAIT_SECONDS}", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert "Address already in use" in line and "another process uses this address" in line, line
    listener.kill()


def test_she_can_listen_on_the_port_and_a_producer_takes_her_for_a_plain_consumer(pod: Pod, tenants: Tenants) -> None:
    """A plain pyzmq consumer (no presence file) is found through the socket monitor, so over a port a producer
    cannot tell her listener from one; it then waits in vain for the end-of-stream ack."""
    listener = pod.popen([sys.executable, "-c", LISTENER, "tcp://127.0.0.1:7410", "0", "8"], user=tenants.mallory)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    result = pod.podipc("produce", f"{TCP_URL}?wait={WAIT_SECONDS}", "--count", "2", "--size", "8", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=6)  # Timeout: no ack for the end of stream
    assert "did not take the end of stream" in line, line
    stdout, _ = listener.communicate(timeout=30)
    received = stdout.strip().splitlines()[-1]
    assert received.startswith("[[b'podipc', b'sos'], [b'") and received.endswith("[b'podipc', b'eos']]"), received


def test_she_can_send_to_a_consumer_whose_producer_has_not_connected_yet(pod: Pod, tenants: Tenants) -> None:
    """No permissions on a port: a ZMTP 3 peer of any user reaches the consumer (the start-of-stream marker and the
    ZAP domain authenticate nobody). Use zmq+ipc (a 0600/0660 socket file) between users who do not trust each other."""
    consumer = consume(pod, tenants.alice, f"{TCP_URL}?wait=20")
    time.sleep(1.0)
    injected = pod.run([sys.executable, "-c", INJECTOR, "tcp://127.0.0.1:7410", "20"], user=tenants.mallory, timeout=40)
    assert injected.stdout.strip() == "acknowledged", injected
    stdout, stderr = consumer.communicate(timeout=30)  # type: ignore[attr-defined]
    assert consumer.returncode == 0 and "Traceback" not in stderr, stderr  # type: ignore[attr-defined]
    assert summary(stdout)["messages"] == 1
