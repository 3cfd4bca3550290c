"""A co-tenant against udp:// (issue 10): a port has no permissions, so anyone in the pod's network namespace
can bind it first or send datagrams to it. podipc checks who owns the sockets it talks to (/proc/net/udp):
a producer sends nothing to another user's socket (D3), a consumer ignores another user's HELLO and, once
attached, the kernel drops everyone else's datagrams; a port taken first is one line and exit 3 (D5).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from podipc.address import parse_address
from podipc.presence import presence_path

from .cotenant import Pod, Tenants, assert_one_line_error

pytestmark = pytest.mark.timeout(120)

PORT = 7301
URL = f"udp://127.0.0.1:{PORT}"
MESSAGES = 200

FAKE_CONSUMER = r"""
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
print("bound", flush=True)
sock.settimeout(float(sys.argv[2]))
kinds = []
try:
    while True:
        datagram, source = sock.recvfrom(65535)
        kinds.append(chr(datagram[2]) if len(datagram) > 2 else "?")
        if datagram[:3] == b"puH":  # answer like a podipc consumer would
            sock.sendto(b"puh" + bytes(8), source)
except TimeoutError:
    pass
print(json.dumps(kinds), flush=True)
"""

FORGER = r"""
import json, socket, struct, sys, time
HEADER = struct.Struct("!2sBQ")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setblocking(False)
target, until, answers, sent = ("127.0.0.1", int(sys.argv[1])), time.monotonic() + float(sys.argv[2]), [], 0
while time.monotonic() < until:
    for datagram in (HEADER.pack(b"pu", ord("H"), 0), HEADER.pack(b"pu", ord("D"), 10**9) + b"forged", b"junk"):
        try:
            sock.sendto(datagram, target)
            sent += 1
        except OSError:  # ICMP port unreachable from an earlier one: the port is connected to someone else
            pass
    try:
        while True:
            answers.append(sock.recv(64)[:3].decode("ascii", "replace"))
    except OSError:
        pass
    time.sleep(0.005)
print(json.dumps({"sent": sent, "answers": answers}), flush=True)
"""

HOLD_PORT = r"""
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
print("bound", flush=True)
time.sleep(60)
"""


def wait_for_line(process: object, expected: str) -> None:
    stdout = process.stdout  # type: ignore[attr-defined]
    assert stdout is not None and stdout.readline().strip() == expected


def wait_for_presence(pod: Pod, role: str, seconds: float = 20) -> None:
    path = pod.host_path(presence_path(parse_address(URL).token, role))
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {role} presence at {path}"
        time.sleep(0.02)


def summary(stdout: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


def test_d3_a_producer_sends_nothing_to_a_port_another_user_holds(pod: Pod, tenants: Tenants) -> None:
    fake = pod.popen([sys.executable, "-c", FAKE_CONSUMER, str(PORT), "3"], user=tenants.mallory)
    wait_for_line(fake, "bound")
    result = pod.podipc("produce", f"{URL}?wait=5", "--count", "5", user=tenants.alice, timeout=30)
    line = assert_one_line_error(result, exit_code=3)
    assert "podipc-mallory" in line and str(PORT) in line, line
    stdout, _ = fake.communicate(timeout=30)
    kinds = json.loads(stdout.strip().splitlines()[-1])
    assert kinds and set(kinds) == {"H"}, kinds  # HELLOs only: no message, no end of stream


def test_d3_a_consumer_ignores_another_users_hello_and_forged_datagrams(pod: Pod, tenants: Tenants) -> None:
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", f"{URL}?wait=30"], user=tenants.alice)
    wait_for_presence(pod, "consumer")
    forger = pod.popen([sys.executable, "-c", FORGER, str(PORT), "3"], user=tenants.mallory)
    time.sleep(0.5)  # her HELLOs and forged messages reach the consumer before the real producer's
    produced = pod.podipc("produce", URL, "--count", str(MESSAGES), "--rate", "200", user=tenants.alice, timeout=60)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0 and "Traceback" not in stderr, stderr
    received = summary(stdout)
    assert (received["messages"], received.get("lost", 0)) == (MESSAGES, 0), received
    assert int(received.get("skipped", 0)) >= 3, received  # her HELLO, forged message and junk before ours
    forged, _ = forger.communicate(timeout=30)
    outcome = json.loads(forged.strip().splitlines()[-1])
    assert outcome["sent"] > 0 and "puh" not in outcome["answers"], outcome  # no HELLO answered for her


def test_d5_a_port_another_user_took_first_is_one_line_and_exit_3_for_the_consumer(pod: Pod, tenants: Tenants) -> None:
    holder = pod.popen([sys.executable, "-c", HOLD_PORT, str(PORT)], user=tenants.mallory)
    wait_for_line(holder, "bound")
    result = pod.podipc("consume", f"{URL}?wait=2", user=tenants.alice, timeout=30)
    line = assert_one_line_error(result, exit_code=3)
    assert "podipc-mallory" in line and "another socket holds this port" in line, line


def test_group_sharing_lets_a_producer_of_the_common_group_talk_to_the_consumer(pod: Pod, tenants: Tenants) -> None:
    shared = f"{URL}?mode=0660&wait=30"
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", shared], user=tenants.bob)
    wait_for_presence(pod, "consumer")
    produced = pod.podipc("produce", shared, "--count", "5", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0 and summary(stdout)["messages"] == 5, stderr
