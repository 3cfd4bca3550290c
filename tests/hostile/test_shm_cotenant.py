"""A co-tenant against shm:// (issue 10): another user's segment, semaphore or wake-up FIFO at a ring's name
is refused and left untouched (D3); forged ring headers and another user's objects end in one line and an
exit code (D5); a killed consumer is seen within 2 s by a producer sending 1000 messages a second (D6);
a segment truncated mid-stream is an error for the sides that can tell, never SIGBUS (D8)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from podipc.address import parse_address

from .cotenant import Pod, Tenants, assert_one_line_error

pytestmark = pytest.mark.timeout(180)

URL = "shm:///data"
TOKEN = parse_address(URL).token
WAIT_SECONDS = 2
EXIT_CHANNEL_UNAVAILABLE, EXIT_PEER_TIMEOUT, EXIT_PEER_GONE, EXIT_PROTOCOL_ERROR = 3, 5, 7, 8


def with_options(url: str, **options: object) -> str:
    return url + "?" + "&".join(f"{key}={value}" for key, value in options.items())


# --- D3: another user's object at a ring's name -------------------------------------------------

SEMAPHORE = "import posix_ipc, sys; posix_ipc.Semaphore(sys.argv[1], posix_ipc.O_CREX, 0o666, 0)"
PLANTS = {
    "segment": (
        ["sh", "-c", "printf 'PODIPCSH a forged ring' > /dev/shm/data; chmod 0666 /dev/shm/data"],
        "/dev/shm/data",
    ),
    "data semaphore": ([sys.executable, "-c", SEMAPHORE, "/data.data"], "/dev/shm/sem.data.data"),
    "space semaphore": ([sys.executable, "-c", SEMAPHORE, "/data.space"], "/dev/shm/sem.data.space"),
    "wake-up FIFO": (
        ["mkfifo", "-m", "0666", f"/dev/shm/podipc.wake.{TOKEN}.data"],
        f"/dev/shm/podipc.wake.{TOKEN}.data",
    ),
}


def fingerprint(pod: Pod, path: str) -> str:
    """Owner, mode, size and modification time of `path` (and its bytes' digest for a regular file)."""
    status = pod.run(["stat", "-c", "%U %a %F %s %Y", path])
    assert status.returncode == 0, status.stderr
    content = pod.run(["sh", "-c", f"test -f {path} && sha256sum {path} || true"])
    return status.stdout + content.stdout


@pytest.mark.parametrize("what", list(PLANTS))
def test_d3_another_users_object_at_a_rings_name_is_refused_and_left_untouched(
    pod: Pod, tenants: Tenants, what: str
) -> None:
    plant, path = PLANTS[what]
    assert pod.run(plant, user=tenants.mallory).returncode == 0
    before = fingerprint(pod, path)
    channel = with_options(URL, wait=WAIT_SECONDS)
    consumed = pod.podipc("consume", channel, user=tenants.alice)
    line = assert_one_line_error(consumed, exit_code=EXIT_CHANNEL_UNAVAILABLE)
    assert path in line and "podipc-mallory" in line and "mode=0660" in line, line
    produced = pod.podipc("produce", channel, "--count", "1", user=tenants.alice)
    assert_one_line_error(produced, exit_code=EXIT_PEER_TIMEOUT)  # no consumer of alice's: nothing is written
    assert fingerprint(pod, path) == before
    left = pod.run(["sh", "-c", f"ls -a /dev/shm | grep -e '{TOKEN}' -e '^data' -e '^sem.data' || true"])
    assert left.stdout.split() == [path.removeprefix("/dev/shm/")], left.stdout  # alice left nothing behind


def test_d3_with_group_sharing_a_group_members_ring_is_used_and_an_outsiders_refused(
    pod: Pod, tenants: Tenants
) -> None:
    shared = with_options(URL, mode="0660", wait=20)
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", shared], user=tenants.bob)
    produced = pod.podipc("produce", shared, "--count", "20", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0 and json.loads(stdout.strip().splitlines()[-1])["messages"] == 20, stderr

    assert pod.run(PLANTS["data semaphore"][0], user=tenants.mallory).returncode == 0
    refused = pod.podipc("consume", with_options(URL, mode="0660", wait=WAIT_SECONDS), user=tenants.bob)
    line = assert_one_line_error(refused, exit_code=EXIT_CHANNEL_UNAVAILABLE)
    assert "/dev/shm/sem.data.data" in line and "podipc-mallory" in line, line


# --- D5: forged headers ------------------------------------------------------------------------

FORGING_CONSUMER = r"""
import fcntl, os, struct, sys, time
from podipc.address import parse_address
from podipc.presence import Presence

url, case = sys.argv[1], sys.argv[2]
address = parse_address(url)
presence = Presence(address.token, "consumer", 0o660, channel=address.location)  # alive, as a consumer is
capacity = 4096
fd = os.open("/dev/shm/" + address.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o660)
os.fchmod(fd, 0o660)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 256 + capacity + (3 if case == "a size not a multiple of 8" else 0))
os.pwrite(fd, struct.pack("<8sIIQQ", b"PODIPCSH", 1, 256, capacity, 2048), 0)
if case == "indices near 2**64":
    os.pwrite(fd, struct.pack("<Q", 2**64 - 8), 64)
    os.pwrite(fd, struct.pack("<Q", 2**64 - 8), 128)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("case", ["indices near 2**64", "a size not a multiple of 8"])
def test_d5_a_forged_ring_is_one_line_and_exit_8_for_the_producer(pod: Pod, tenants: Tenants, case: str) -> None:
    """bob, a member of the group a 0660 channel is shared with, forges the ring alice's producer attaches to."""
    url = with_options(URL, mode="0660", wait=20)
    forger = pod.popen([sys.executable, "-c", FORGING_CONSUMER, url, case], user=tenants.bob)
    assert forger.stdout is not None and forger.stdout.readline().strip() == "ready"
    produced = pod.podipc("produce", url, "--count", "1", user=tenants.alice)
    line = assert_one_line_error(produced, exit_code=EXIT_PROTOCOL_ERROR)
    assert "shm" in line, line


# --- D6: a killed consumer, seen by a producer at 1000 messages a second -------------------------


def test_d6_a_killed_consumer_is_seen_within_2_s_by_a_producer_sending_1000_a_second(
    pod: Pod, tenants: Tenants
) -> None:
    url = with_options(URL, mode="0660", wait=20)
    consumer, consumer_pid = pod.spawn([sys.executable, "-m", "podipc", "consume", url], user=tenants.bob)
    producer = pod.popen(
        [sys.executable, "-m", "podipc", "produce", url, "--rate", "1000", "--count", "1000000"], user=tenants.alice
    )
    time.sleep(1.5)  # streaming: far from a full ring (8 MiB), so only the peer monitor can tell
    assert producer.poll() is None and consumer.poll() is None
    pod.kill(consumer_pid)
    killed_at = time.monotonic()
    stdout, stderr = producer.communicate(timeout=30)
    seconds = time.monotonic() - killed_at
    line = assert_one_line_error(subprocess.CompletedProcess(producer.args, producer.returncode, stdout, stderr), 7)
    assert "PeerGone" in line and "consumer" in line, line
    assert seconds < 2, f"the producer saw its consumer's death after {seconds:.2f} s"


# --- D8: a truncated segment ----------------------------------------------------------------------

PAUSING_PRODUCER = r"""
import json, sys, time, podipc
with podipc.producer(sys.argv[1]) as out:
    for index in range(3):
        out.send(b"message %d" % index, timeout=20)
    print("sent", flush=True)
    sys.stdin.readline()  # idle until the segment was truncated
    time.sleep(1.0)
    try:
        out.send(b"after the truncation", timeout=5)
        outcome = "sent"
    except podipc.PodIPCError as error:
        outcome = f"{type(error).__name__}: {error}"
        out.abort()
print(json.dumps(outcome), flush=True)
"""


def test_d8_a_segment_truncated_by_a_group_member_is_an_error_not_sigbus(pod: Pod, tenants: Tenants) -> None:
    url = with_options(URL, mode="0660", wait=20)
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.alice)
    producer = pod.popen([sys.executable, "-c", PAUSING_PRODUCER, url], user=tenants.alice, stdin=subprocess.PIPE)
    assert producer.stdout is not None and producer.stdout.readline().strip() == "sent"
    time.sleep(0.5)  # both sides idle: the consumer waits in recv, the producer between sends
    truncated = pod.run(["truncate", "-s", "0", "/dev/shm/data"], user=tenants.bob)
    assert truncated.returncode == 0, truncated.stderr
    truncated_at = time.monotonic()
    consumed = subprocess.CompletedProcess(consumer.args, 0, *consumer.communicate(timeout=30))
    consumed.returncode = consumer.returncode
    seconds = time.monotonic() - truncated_at
    line = assert_one_line_error(consumed, exit_code=EXIT_PROTOCOL_ERROR)  # SIGBUS would be -7
    assert "truncated" in line and seconds < 2, (line, seconds)
    stdout, stderr = producer.communicate("go\n", timeout=30)
    assert producer.returncode == 0, stderr
    outcome = json.loads(stdout.strip().splitlines()[-1])
    assert outcome.startswith("ProtocolError") and "truncated" in outcome, outcome
