"""A co-tenant against `podipc clean` (issue 10, D1 and D2): forged presence files make it delete nothing,
a FIFO or link at a presence path never hangs or redirects it, and it says what it refused and why."""

from __future__ import annotations

import json
import sys
import time

import pytest

from podipc.address import parse_address
from podipc.presence import presence_path

from .cotenant import Pod, Tenants

pytestmark = pytest.mark.timeout(120)

ROOT_QUEUE_KEY = 4242
LIVE = "shm:///data"


def wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def clean(pod: Pod, *args: str, user: object = None) -> list[dict[str, str]]:
    result = pod.podipc("clean", "--json", *args, user=user, timeout=30)  # type: ignore[arg-type]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


LIVE_PRODUCER = r"""
import os, sys, time
import podipc

url, stop = sys.argv[1], sys.argv[2]
sent = 0
with podipc.producer(url) as producer:
    while not os.path.exists(stop):
        producer.send(b"%d" % sent, timeout=20)
        sent += 1
        time.sleep(0.005)
print(sent)
"""


def test_d1_forged_presence_files_make_clean_delete_nothing(pod: Pod, tenants: Tenants) -> None:
    precious = "/tmp/x"  # the pod's own /tmp: exactly the reproduction
    stop = f"{pod.volume}/stop"
    assert pod.run(["sh", "-c", f"echo keep > {precious}"]).returncode == 0
    made = pod.python(f"import sysv_ipc; sysv_ipc.MessageQueue({ROOT_QUEUE_KEY}, sysv_ipc.IPC_CREX, mode=0o600)")
    assert made.returncode == 0, made.stderr
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", LIVE])  # root's live channel, mid-stream
    producer = pod.popen([sys.executable, "-c", LIVE_PRODUCER, LIVE, stop])
    token = parse_address(LIVE).token
    assert wait_until(lambda: all(_exists(pod, presence_path(token, role)) for role in ("producer", "consumer")), 20)

    # the reproduction; then records naming the live channel's segment and semaphores: with
    # the live channel's name in another token, and in the token of another spelling of its URL
    alias = parse_address(LIVE.upper().replace("/DATA", "/data"))
    objects = "posix_shm /data\\nposix_sem /data.data\\nposix_sem /data.space\\n"
    forgeries = {
        "/dev/shm/podipc.presence.evil-x-00000000.producer": f"1 e\\npath {precious}\\nsysv_mq {ROOT_QUEUE_KEY}\\n",
        "/dev/shm/podipc.presence.evil-y-00000000.producer": f"1 e\\nchannel {LIVE}\\n{objects}",
        presence_path(alias.token, "producer"): f"1 e\\nchannel {alias.location}\\n{objects}",
    }
    plant = "; ".join(f"printf '{text}' > {path}" for path, text in forgeries.items())
    assert pod.run(["sh", "-c", plant], user=tenants.mallory).returncode == 0

    for user in (None, tenants.alice, tenants.mallory):  # root, a bystander, and mallory herself
        for args in (["--dry-run"], []):
            entries = clean(pod, *args, user=user)
            assert entries and {entry["action"] for entry in entries} == {"refused"}, (user, entries)
    as_root = {entry["name"]: entry["reason"] for entry in clean(pod, "--dry-run")}
    for path in forgeries:
        assert "written by another user" in as_root[path] and "podipc-mallory" in as_root[path], as_root
    as_mallory = {entry["name"]: entry["reason"] for entry in clean(pod, "--dry-run", user=tenants.mallory)}
    assert "names no channel" in as_mallory[precious] and "names no channel" in as_mallory[str(ROOT_QUEUE_KEY)]
    assert as_mallory["/data"].startswith("not ours (owner uid 0 (root)"), as_mallory

    assert pod.run(["cat", precious]).stdout == "keep\n"
    assert pod.python(f"import sysv_ipc; sysv_ipc.MessageQueue({ROOT_QUEUE_KEY})").returncode == 0
    for name in ("/dev/shm/data", "/dev/shm/sem.data.data", "/dev/shm/sem.data.space"):
        assert _exists(pod, name), f"{name} of the live channel was removed"
    assert pod.run(["touch", stop]).returncode == 0
    sent, produced_errors = producer.communicate(timeout=30)
    received, consumed_errors = consumer.communicate(timeout=30)
    assert producer.returncode == 0 and consumer.returncode == 0, (produced_errors, consumed_errors)
    assert json.loads(received.strip().splitlines()[-1])["messages"] == int(sent) > 0


def test_d1_clean_as_root_leaves_a_dead_tenants_leftovers_to_that_tenant(pod: Pod, tenants: Tenants) -> None:
    """Root does not act on another user's records (it would trust what that user wrote); the owner does."""
    killed, pid = pod.spawn([sys.executable, "-m", "podipc", "consume", "mq:///jobs"], user=tenants.alice)
    token = parse_address("mq:///jobs").token
    assert wait_until(lambda: _exists(pod, presence_path(token, "consumer")), 20)
    pod.kill(pid)
    killed.communicate(timeout=10)
    entries = clean(pod)
    assert {entry["action"] for entry in entries} == {"refused"}, entries
    assert _exists(pod, "/dev/mqueue/jobs")
    entries = clean(pod, user=tenants.alice)
    assert {(entry["kind"], entry["name"], entry["action"]) for entry in entries} == {
        ("posix_mq", "/jobs", "removed"),
        ("path", presence_path(token, "consumer"), "removed"),
    }
    assert not _exists(pod, "/dev/mqueue/jobs")


def test_d2_clean_dry_run_returns_with_fifos_links_and_directories_at_presence_paths(
    pod: Pod, tenants: Tenants
) -> None:
    token = parse_address("shm:///data").token
    fifo, link, directory = (presence_path(token, role) for role in ("consumer", "producer", "consumer.1.x.tmp"))
    plant = f"mkfifo -m 0666 {fifo}; ln -s {pod.volume} {link}; mkdir {directory}"
    assert pod.run(["sh", "-c", plant], user=tenants.mallory).returncode == 0
    started = time.monotonic()
    entries = clean(pod, "--dry-run", user=tenants.alice) + clean(pod)
    assert time.monotonic() - started < 20
    reasons = [(entry["name"], entry["reason"]) for entry in entries]
    assert (fifo, reasons[0][1]) in reasons and "FIFO" in dict(reasons)[fifo]
    assert "symbolic link" in dict(reasons)[link] and "directory" in dict(reasons)[directory]
    assert all(_exists(pod, path) for path in (fifo, link, directory))


def _exists(pod: Pod, path: str) -> bool:
    return pod.run(["test", "-e", path, "-o", "-L", path]).returncode == 0
