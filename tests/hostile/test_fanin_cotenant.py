"""A co-tenant against a unix:// fan-in consumer (issue 14 on issue 10's rules): its socket file keeps her out.

alice's fan-in consumer creates its socket file 0600: mallory (another user of the pod) cannot
join as a producer under any name, while alice's own producers deliver; with group sharing
(mode=0660) bob joins and mallory still cannot.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

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
