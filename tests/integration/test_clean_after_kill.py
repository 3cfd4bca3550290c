"""`podipc clean` after kill -9: it lists (dry run) and then removes exactly what a killed pair left
(queue, segment, semaphores, socket file, presence files, spool temporaries), and never
what is not podipc's or still alive.

Note: `podipc clean` searches all of /dev/shm, so it also removes leftovers of other dead
podipc runs on this machine; that is its job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import posix_ipc
import pytest
import sysv_ipc

import podipc
from podipc.address import parse_address
from tests.commands import PODIPC

from .harness import CONTEXT, SCHEMES, SOCKETS_ONLY, leftovers, payload, url_for, wait_until

pytestmark = pytest.mark.timeout(90)


def steady_producer(url: str, sent: Any) -> None:
    """Send a 100-byte message every 2 ms until killed."""
    with podipc.producer(url) as channel:
        index = 0
        while True:
            channel.send(payload(index, 100))
            index += 1
            sent.value = index
            time.sleep(0.002)


def slow_consumer(url: str, received: Any) -> None:
    """Receive a message every 10 ms until killed (so the channel holds some)."""
    with podipc.consumer(url) as channel:
        while True:
            channel.recv()
            received.value += 1
            time.sleep(0.01)


def spool_directory(url: str) -> str | None:
    address = parse_address(url)
    return address.path if address.scheme == "file" else None


def clean(*arguments: str) -> list[dict[str, str]]:
    """Run `podipc clean --json ARGS`; the JSON lines it printed."""
    result = subprocess.run([*PODIPC, "clean", "--json", *arguments], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def presence_files(url: str) -> list[str]:
    """This channel's presence files and their temporaries, in /dev/shm and (file://) the spool."""
    address = parse_address(url)
    found = [f"/dev/shm/{entry}" for entry in os.listdir("/dev/shm") if address.token in entry]
    spool = spool_directory(url)
    if spool and os.path.isdir(spool):
        found += [f"{spool}/{entry}" for entry in os.listdir(spool) if entry.startswith("podipc.presence.")]
    return found


def what_remains(url: str) -> list[str]:
    """Everything of this channel still there, the stream of an unfinished spool aside (kept by design)."""
    kept = ("podipc.seg.", "podipc.position", "podipc.directory")
    found = set(leftovers(url)) | set(presence_files(url))
    return sorted(path for path in found if not os.path.basename(path).startswith(kept))


def kill_a_pair_mid_stream(url: str) -> None:
    """Start a consumer and a producer, let messages flow, then SIGKILL both."""
    sent, received = CONTEXT.Value("q", 0), CONTEXT.Value("q", 0)
    consumer = CONTEXT.Process(target=slow_consumer, args=(url, received))
    producer = CONTEXT.Process(target=steady_producer, args=(url, sent))
    consumer.start()
    producer.start()
    try:
        assert wait_until(lambda: received.value >= 10 and sent.value > received.value, 30), (
            sent.value,
            received.value,
        )
    finally:
        for process in (producer, consumer):
            os.kill(process.pid or 0, signal.SIGKILL)
            process.join()


def mine(entries: list[dict[str, str]], url: str) -> list[dict[str, str]]:
    """The entries of `podipc clean` output that belong to this channel."""
    address = parse_address(url)
    marks = [address.token, address.name, address.path, str(address.key) if address.key else ""]
    return [entry for entry in entries if any(mark and mark in entry["name"] for mark in marks)]


NOTHING_TO_LEAVE = SOCKETS_ONLY  # the kernel frees a dead process's sockets; no presence files
CASES = [scheme for scheme in SCHEMES if scheme not in NOTHING_TO_LEAVE]


@pytest.mark.parametrize("scheme", NOTHING_TO_LEAVE)
def test_a_killed_pair_of_a_socket_channel_leaves_nothing_to_clean(scheme: str) -> None:
    url = url_for(scheme)
    kill_a_pair_mid_stream(url)
    assert what_remains(url) == []
    assert mine(clean("--dry-run"), url) == []


@pytest.mark.parametrize("scheme", CASES)
def test_dry_run_lists_what_a_killed_pair_left_and_clean_removes_it(scheme: str) -> None:
    url = url_for(scheme)
    kill_a_pair_mid_stream(url)
    spool = spool_directory(url)
    if spool:  # as a producer killed while starting a segment leaves it
        with open(f"{spool}/podipc.part.{10**19:020d}", "wb") as part:
            part.write(b"half a segment header")
    left = what_remains(url)
    assert left, "a killed pair leaves its presence files at least"
    directories = ["--dir", spool_directory(url) or "/dev/shm"]

    listed = mine(clean("--dry-run", *directories), url)
    assert listed and {entry["action"] for entry in listed} == {"would remove"}
    assert what_remains(url) == left, "a dry run removed something"
    # every object this channel left is listed (SysV queues by key, the rest by path/name)
    listed_names = " ".join(entry["name"] for entry in listed)
    address = parse_address(url)
    for item in left:
        if item.startswith("SysV queue"):
            assert str(address.key) in listed_names, f"{item} is not listed"
        elif item.startswith("/dev/mqueue/"):
            assert "/" + os.path.basename(item) in listed_names, f"{item} is not listed"
        elif item.startswith("/dev/shm/sem."):
            assert "/" + os.path.basename(item)[4:] in listed_names, f"{item} is not listed"
        elif item.startswith("/dev/shm/") and not os.path.basename(item).startswith("podipc."):
            assert "/" + os.path.basename(item) in listed_names, f"{item} is not listed"
        else:
            assert item in listed_names, f"{item} is not listed"

    removed = mine(clean(*directories), url)
    assert {entry["action"] for entry in removed} == {"removed"}
    assert what_remains(url) == [], what_remains(url)
    if spool:
        names = os.listdir(spool)
        assert not [name for name in names if name.startswith(("podipc.part.", "podipc.presence."))], names
        assert [name for name in names if name.startswith("podipc.seg.")], "the unread messages must stay"
        assert "podipc.position" in names, "the consumer's position must stay"
    assert mine(clean("--dry-run", *directories), url) == []


def test_clean_never_touches_foreign_objects_or_a_live_channel(tmp_path: Any) -> None:
    suffix = f"{os.getpid()}-{time.monotonic_ns()}"
    foreign_queue = posix_ipc.MessageQueue(f"/podipc-test-foreign-{suffix}", posix_ipc.O_CREX, mode=0o600)
    foreign_sysv = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    foreign_file = f"/dev/shm/podipc-test-foreign-{suffix}"
    foreign_spool_file = tmp_path / "podipc.part.00000000000000000001"  # looks like podipc's, no presence
    for path in (foreign_file, str(foreign_spool_file)):
        with open(path, "wb") as handle:
            handle.write(b"not podipc's")
    live_url = url_for("shm")
    live_consumer = podipc.consumer(live_url)
    live_producer = podipc.producer(live_url)
    try:
        live_producer.send(b"before", timeout=10)
        live_objects = leftovers(live_url)
        assert live_objects

        entries = clean("--dir", str(tmp_path))
        names = " ".join(entry["name"] for entry in entries)
        for mine_only in (foreign_queue.name, str(foreign_sysv.key), foreign_file, str(foreign_spool_file)):
            assert mine_only not in names
        assert not mine(entries, live_url)
        posix_ipc.MessageQueue(foreign_queue.name).close()
        sysv_ipc.MessageQueue(foreign_sysv.key)
        assert os.path.exists(foreign_file) and foreign_spool_file.exists()
        assert set(leftovers(live_url)) == set(live_objects)
        live_producer.send(b"after", timeout=10)
        assert (live_consumer.recv(timeout=10), live_consumer.recv(timeout=10)) == (b"before", b"after")
    finally:
        live_producer.abort()
        live_consumer.close()
        foreign_queue.close()
        foreign_queue.unlink()
        foreign_sysv.remove()
        os.unlink(foreign_file)
    assert wait_until(lambda: not leftovers(live_url), 5), leftovers(live_url)
