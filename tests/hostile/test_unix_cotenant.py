"""A co-tenant against unix:// (issue 10): socket files on a shared volume, and abstract names.

mallory (another user of the pod, outside alice's group) can put a socket file, a link or a
listener of her own at a channel's path. A side never replaces, follows or talks to it: one
line and exit 3 (ChannelUnavailable) naming her and the fix. With group sharing (mode=0660)
alice and bob talk while mallory stays out. An abstract name has no owner: anyone in the pod
can connect, and what podipc does then (HELLO, one producer, garbage dropped and counted) is
what docs/reliability.md says it cannot prevent.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from .cotenant import Pod, Tenants, assert_one_line_error

pytestmark = pytest.mark.timeout(180)

WAIT_SECONDS = 2

LISTENER = """
import os, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path if path.startswith("/") else "\\0" + path)
if path.startswith("/"):
    os.chmod(path, 0o777)
sock.listen(8)
print("listening", flush=True)
sock.settimeout(0.2)
accepted = received = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        connection, _ = sock.accept()
    except socket.timeout:
        continue
    accepted += 1
    connection.settimeout(0.5)
    try:
        received += len(connection.recv(65536))
    except OSError:
        pass
    connection.close()
print(f"accepted {accepted} received {received}", flush=True)
"""

STALE = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
os.chmod(sys.argv[1], int(sys.argv[2], 8))
sock.close()  # the file stays: a socket nobody listens on
"""

GARBAGE = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
sock.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n")
sock.close()
"""


def start_listener(pod: Pod, tenants: Tenants, path: str, seconds: float) -> object:
    """mallory listens at `path` (a file of mode 0777, or an abstract name); returns the process."""
    listener = pod.popen([sys.executable, "-c", LISTENER, path, str(seconds)], user=tenants.mallory)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "listening"
    return listener


def listener_report(listener: object) -> str:
    stdout, stderr = listener.communicate(timeout=30)  # type: ignore[attr-defined]
    assert listener.returncode == 0, stderr  # type: ignore[attr-defined]
    return str(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["0600", "0777"])
def test_another_users_stale_socket_file_is_neither_replaced_nor_used(pod: Pod, tenants: Tenants, mode: str) -> None:
    path = f"{pod.volume}/data.sock"
    assert pod.python(STALE, path, mode, user=tenants.mallory).returncode == 0
    url = f"unix://{path}?wait={WAIT_SECONDS}"
    for args in (["consume", url], ["produce", url, "--count", "1"]):
        line = assert_one_line_error(pod.podipc(*args, user=tenants.alice), exit_code=3)
        assert path in line and "podipc-mallory" in line and "mode=0660" in line, line
    assert pod.run(["test", "-S", path]).returncode == 0  # still hers: never replaced or removed
    assert pod.run(["stat", "-c", "%U", path]).stdout.strip() == "podipc-mallory"


def test_a_producer_never_talks_to_another_users_listener(pod: Pod, tenants: Tenants) -> None:
    path = f"{pod.volume}/data.sock"
    listener = start_listener(pod, tenants, path, 4)
    started = time.monotonic()
    result = pod.podipc("produce", f"unix://{path}?wait={WAIT_SECONDS}", "--count", "3", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert "podipc-mallory" in line and "mode 0777" in line, line
    assert time.monotonic() - started < 10
    assert listener_report(listener) == "accepted 0 received 0"


def test_a_link_at_the_socket_path_is_never_followed(pod: Pod, tenants: Tenants) -> None:
    hers, path = f"{pod.volume}/hers.sock", f"{pod.volume}/data.sock"
    listener = start_listener(pod, tenants, hers, 6)
    assert pod.run(["ln", "-s", hers, path], user=tenants.mallory).returncode == 0
    url = f"unix://{path}?wait={WAIT_SECONDS}"
    for args in (["produce", url, "--count", "1"], ["consume", url]):
        line = assert_one_line_error(pod.podipc(*args, user=tenants.alice), exit_code=3)
        assert "symbolic link" in line and "podipc-mallory" in line, line
    assert pod.run(["test", "-L", path]).returncode == 0
    assert listener_report(listener) == "accepted 0 received 0"


def test_group_sharing_lets_the_group_in_and_keeps_mallory_out(pod: Pod, tenants: Tenants) -> None:
    url = f"unix://{pod.volume}/shared.sock?mode=0660&wait=20"
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.alice)
    deadline = time.monotonic() + 20
    while pod.run(["test", "-S", f"{pod.volume}/shared.sock"]).returncode != 0:
        assert time.monotonic() < deadline, "the consumer never created its socket"
        time.sleep(0.1)
    refused = pod.podipc("produce", url, "--count", "1", user=tenants.mallory)
    line = assert_one_line_error(refused, exit_code=3)
    assert "podipc-alice" in line and "not one of ours" in line, line
    produced = pod.podipc("produce", url, "--count", "3", user=tenants.bob)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["messages"] == 3


def test_anyone_in_the_pod_may_connect_to_an_abstract_name_and_garbage_is_only_dropped(
    pod: Pod, tenants: Tenants
) -> None:
    name = "podipc-hostile-abstract"
    url = f"unix://@{name}?wait=20"
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.alice)
    deadline = time.monotonic() + 20
    while pod.run(["grep", "-q", f"@{name}$", "/proc/net/unix"]).returncode != 0:
        assert time.monotonic() < deadline, "the consumer never listened"
        time.sleep(0.1)
    garbage = pod.python(GARBAGE, name, user=tenants.mallory)
    assert garbage.returncode == 0, garbage.stderr  # no permission stops her: an abstract name has no owner
    produced = pod.podipc("produce", url, "--count", "2", user=tenants.bob)  # another user's producer is let in too
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0 and "Traceback" not in stderr, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["messages"] == 2
