"""A co-tenant against the kernel queues (issue 10, D3 and D7): a queue another user created first gets none of
our messages and feeds us none of hers; a queue podipc cannot prove it created for the channel is never
consumed from or removed, whoever owns it; modes that grant "other" users anything are refused."""

from __future__ import annotations

import json
import sys

import pytest

from podipc.address import parse_address

from .cotenant import Pod, Tenants, User, assert_one_line_error

pytestmark = pytest.mark.timeout(180)

QUEUE_SCHEMES = ("mq", "sysvmq")
WAIT_SECONDS = 2
FORGED = "forged by mallory"

MAKE_QUEUE = r"""
import os, sys
import posix_ipc, sysv_ipc
from podipc.address import parse_address

address, mode, message = parse_address(sys.argv[1]), int(sys.argv[2], 8), sys.argv[3].encode()
if address.scheme == "mq":
    queue = posix_ipc.MessageQueue("/" + address.name, posix_ipc.O_CREX, mode, 10, 8192)
    os.fchmod(queue.mqd, mode)  # mq_open applies the umask
    if message:
        queue.send(message, priority=1)
    queue.close()
else:
    queue = sysv_ipc.MessageQueue(address.key, sysv_ipc.IPC_CREX, mode, 8192)
    if message:
        queue.send(message, True, 1)
"""

READ_QUEUE = r"""
import json, sys
import posix_ipc, sysv_ipc
from podipc.address import parse_address

address = parse_address(sys.argv[1])
try:
    if address.scheme == "mq":
        queue = posix_ipc.MessageQueue("/" + address.name, 0)
        queue.block = False
        read = lambda: queue.receive()[0]
        busy = posix_ipc.BusyError
    else:
        queue = sysv_ipc.MessageQueue(address.key)
        read = lambda: queue.receive(False)[0]
        busy = sysv_ipc.BusyError
except (posix_ipc.ExistentialError, sysv_ipc.ExistentialError):
    print(json.dumps(None))
    raise SystemExit(0)
messages = []
while True:
    try:
        messages.append(read().decode())
    except busy:
        break
print(json.dumps(messages))
"""

REMOVE_QUEUE = r"""
import sys
import posix_ipc, sysv_ipc
from podipc.address import parse_address

address = parse_address(sys.argv[1])
if address.scheme == "mq":
    posix_ipc.unlink_message_queue("/" + address.name)
else:
    sysv_ipc.MessageQueue(address.key).remove()
"""


def url_of(scheme: str, name: str = "data") -> str:
    return f"mq:///{name}" if scheme == "mq" else f"sysvmq://{name}"


def with_options(url: str, **options: object) -> str:
    return url + "?" + "&".join(f"{key}={value}" for key, value in options.items())


def make_queue(pod: Pod, user: User, url: str, mode: int, message: str = "") -> None:
    made = pod.python(MAKE_QUEUE, url, f"{mode:o}", message, user=user)
    assert made.returncode == 0, made.stderr


def queue_contents(pod: Pod, user: User | None, url: str) -> list[str] | None:
    """The messages in the channel's queue, taken out by `user` (None: there is no queue)."""
    result = pod.python(READ_QUEUE, url, user=user)
    assert result.returncode == 0, result.stderr
    contents: list[str] | None = json.loads(result.stdout)
    return contents


@pytest.mark.parametrize("sharing", [False, True], ids=["default", "mode-0660"])
@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_d3_a_queue_another_user_created_first_gets_no_message_and_feeds_none(
    pod: Pod, tenants: Tenants, scheme: str, sharing: bool
) -> None:
    url = url_of(scheme)
    make_queue(pod, tenants.mallory, url, 0o666, FORGED)
    options: dict[str, object] = {"wait": WAIT_SECONDS, **({"mode": "0660"} if sharing else {})}
    for args in (
        ["consume", with_options(url, **options)],
        ["consume", with_options(url, adopt="true", **options)],
        ["produce", with_options(url, **options), "--count", "3"],
    ):
        result = pod.podipc(*args, user=tenants.alice, timeout=60)
        line = assert_one_line_error(result, exit_code=3)
        assert "podipc-mallory" in line, line
    assert queue_contents(pod, tenants.mallory, url) == [FORGED]  # only her own message: none of alice's


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_d3_a_world_writable_queue_of_a_group_member_is_refused_too(pod: Pod, tenants: Tenants, scheme: str) -> None:
    url = url_of(scheme)
    make_queue(pod, tenants.bob, url, 0o666)
    for adopt in ("false", "true"):
        result = pod.podipc(
            "consume", with_options(url, mode="0660", adopt=adopt, wait=WAIT_SECONDS), user=tenants.alice
        )
        line = assert_one_line_error(result, exit_code=3)
        assert "podipc-bob" in line, line
    assert queue_contents(pod, tenants.bob, url) == []


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_group_sharing_carries_a_stream_between_two_users_of_the_group(pod: Pod, tenants: Tenants, scheme: str) -> None:
    url = with_options(url_of(scheme), mode="0660", wait=20)
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.bob)
    produced = pod.podipc("produce", url, "--count", "50", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["messages"] == 50 and summary["sha256"] == json.loads(produced.stdout)["sha256"]
    assert queue_contents(pod, None, url) is None  # the consumer removed its queue


@pytest.mark.parametrize("owner", ["alice", "mallory"])
@pytest.mark.parametrize("message", ["", "the application's own"], ids=["empty", "holding-a-message"])
@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_d7_a_queue_podipc_did_not_create_is_never_consumed_or_removed(
    pod: Pod, tenants: Tenants, scheme: str, message: str, owner: str
) -> None:
    """Another application's queue at the channel's name or key: refused at once, by its owner and by root."""
    url = url_of(scheme, "orders")
    maker = tenants.alice if owner == "alice" else tenants.mallory
    make_queue(pod, maker, url, 0o600, message)
    for user in (tenants.alice, None):
        result = pod.podipc("consume", with_options(url, wait=1), user=user)
        line = assert_one_line_error(result, exit_code=3)
        assert "already exists" in line or "belongs to another user" in line, line
    assert queue_contents(pod, maker, url) == ([message] if message else [])


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_d7_adopt_consumes_ones_own_plain_queue_and_leaves_it_in_place(pod: Pod, tenants: Tenants, scheme: str) -> None:
    """The opt-in for a plain producer that creates the queue first: consumed, ended, and left to its creator."""
    url = url_of(scheme, "orders")
    make_queue(pod, tenants.alice, url, 0o600, "first")
    consumer = pod.popen(
        [sys.executable, "-m", "podipc", "consume", with_options(url, adopt="true", wait=20)], user=tenants.alice
    )
    produced = pod.podipc("produce", with_options(url, wait=20), "--count", "3", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["messages"] == 4  # the plain producer's, then podipc's
    assert queue_contents(pod, tenants.alice, url) == []  # still there: podipc never removes an adopted queue
    assert pod.python(REMOVE_QUEUE, url, user=tenants.alice).returncode == 0


@pytest.mark.parametrize("mode", ["0644", "0606", "0666", "0604"])
@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_modes_granting_other_users_anything_are_refused_for_queues(
    pod: Pod, tenants: Tenants, scheme: str, mode: str
) -> None:
    url = with_options(url_of(scheme), mode=mode, wait=1)
    for args in (["consume", url], ["produce", url, "--count", "1"]):
        line = assert_one_line_error(pod.podipc(*args, user=tenants.alice), exit_code=2)
        assert f"mode {mode}" in line and "refused" in line, line
    assert queue_contents(pod, None, url) is None
    token = parse_address(url).token
    assert pod.run(["sh", "-c", f"ls /dev/shm | grep -c {token} || true"]).stdout.strip() == "0"
