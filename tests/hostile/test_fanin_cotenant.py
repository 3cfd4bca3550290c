"""A co-tenant against a fan-in consumer (issue 14 on issue 10's rules): unix:// (its socket file) and mq://, sysvmq://,
zmq+ipc://, zmq+tcp:// (its presence file, and the queue or the socket file) keep her out.

alice's fan-in consumer creates its socket file 0600: mallory (another user of the pod) cannot
join as a producer under any name, while alice's own producers deliver; with group sharing
(mode=0660) bob joins and mallory still cannot.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from podipc.address import parse_address

from .cotenant import Pod, Tenants, assert_one_line_error

pytestmark = pytest.mark.timeout(180)


def wait_for_socket(pod: Pod, path: str) -> None:
    deadline = time.monotonic() + 20
    while pod.run(["test", "-S", path]).returncode != 0:
        assert time.monotonic() < deadline, "the consumer never created its socket"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["0600", "0660"])
def test_another_user_cannot_join_a_fanin_consumer(pod: Pod, tenants: Tenants, mode: str) -> None:
    path = f"{pod.volume}/fanin.sock"
    url = f"unix://{path}?mode={mode}&wait=20"
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url, "--producers", "2"], user=tenants.alice)
    wait_for_socket(pod, path)
    refused = pod.podipc("produce", url, "--name", "mallory", "--count", "1", user=tenants.mallory)
    line = assert_one_line_error(refused, exit_code=3)
    assert "podipc-alice" in line, line
    friend = tenants.bob if mode == "0660" else tenants.alice
    for name in ("one", "two"):
        produced = pod.podipc("produce", url, "--name", name, "--count", "3", user=friend)
        assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert sorted(entry["name"] for entry in summary["producers"]) == ["one", "two"]
    assert summary["messages"] == 6


@pytest.mark.parametrize("mode", ["0600", "0660"])
@pytest.mark.parametrize("scheme", ["mq", "sysvmq", "zmq+ipc", "zmq+tcp"])
def test_another_user_cannot_join_a_fanin_queue_nor_take_its_producer_slots(
    pod: Pod, tenants: Tenants, scheme: str, mode: str
) -> None:
    """mallory can neither pose as a producer (the consumer's presence and queue or socket are alice's) nor, by
    squatting a producer slot file, keep alice's producers out: they claim the next slot and are counted as they sent."""
    base = {
        "mq": "mq:///fanin",
        "sysvmq": "sysvmq://fanin",
        "zmq+ipc": f"zmq+ipc://{pod.volume}/fanin-zmq.sock",
        "zmq+tcp": "zmq+tcp://127.0.0.1:7431",
    }[scheme]
    url = f"{base}?mode={mode}&wait=20"
    token = parse_address(url).token
    squatted = pod.run(["touch", f"/dev/shm/podipc.presence.{token}.slot1.producer"], user=tenants.mallory)
    assert squatted.returncode == 0, squatted.stderr
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url, "--producers", "2"], user=tenants.alice)
    wait_for_presence(pod, f"/dev/shm/podipc.presence.{token}.consumer")
    refused = pod.podipc("produce", url, "--name", "mallory", "--count", "1", user=tenants.mallory)
    line = assert_one_line_error(refused, exit_code=3)
    assert "podipc-alice" in line, line
    friend = tenants.bob if mode == "0660" else tenants.alice
    for name in ("one", "two"):
        produced = pod.podipc("produce", url, "--name", name, "--count", "3", user=friend)
        assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert sorted(entry["name"] for entry in summary["producers"]) == ["one", "two"]
    assert all(entry["messages"] == 3 and entry["ended"] == "end of stream" for entry in summary["producers"])
    assert summary["messages"] == 6 and summary.get("skipped", 0) == 0


def wait_for_presence(pod: Pod, path: str) -> None:
    deadline = time.monotonic() + 20
    while pod.run(["test", "-f", path]).returncode != 0:
        assert time.monotonic() < deadline, "the consumer never claimed its presence"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["0666", "0644"])
@pytest.mark.parametrize("scheme", ["mq", "sysvmq"])
def test_a_lock_file_another_user_put_in_place_is_refused_in_one_line_naming_it(
    pod: Pod, tenants: Tenants, scheme: str, mode: str
) -> None:
    """The channel's lock decides producers' names; a file of mallory's at its path is never used (nor removed)."""
    url = ("mq:///fanin" if scheme == "mq" else "sysvmq://fanin") + "?wait=5"
    lock = f"/dev/shm/podipc.presence.{parse_address(url).token}.queue-lock"
    squatted = pod.run(["sh", "-c", f"touch {lock} && chmod {mode} {lock}"], user=tenants.mallory)
    assert squatted.returncode == 0, squatted.stderr
    refused = pod.podipc("produce", url, "--name", "one", "--count", "1", user=tenants.alice)
    line = assert_one_line_error(refused, exit_code=3)
    assert "podipc-mallory" in line, line
    assert pod.run(["test", "-f", lock]).returncode == 0
