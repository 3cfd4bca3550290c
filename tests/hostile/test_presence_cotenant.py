"""A co-tenant against the presence layer (issue 10): what another user of the pod puts at a presence
path never hangs (D2) or crashes (D5) a side, at most one producer claims a channel however many
start at once (D4), and a process that forks does not keep its liveness in its child."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from podipc.address import parse_address
from podipc.presence import presence_path

from .cotenant import Pod, Tenants, User, assert_one_line_error

pytestmark = pytest.mark.timeout(180)

WAIT_SECONDS = 2
"""The channels' `wait` option in these tests: a side gives up on its peer this long after opening."""
LIMIT_AFTER_WAIT_SECONDS = 2
"""The issue's bound: nothing may hang longer than `wait` + 2 s."""
PRESENCE_SCHEMES = ("shm", "mq", "sysvmq", "udp", "zmq+tcp", "zmq+ipc")
"""The channels whose liveness is podipc.presence files in /dev/shm (unix only records its socket there)."""
CLAIMERS = 30
CLAIM_ROUNDS = 3


def url_of(scheme: str, pod: Pod, name: str = "data") -> str:
    """The URL of a channel `name` of `scheme` inside the pod (paths on the pod's volume)."""
    if scheme in ("udp", "zmq+tcp", "tcp"):
        return f"{scheme}://127.0.0.1:7{sum(map(ord, name)) % 1000:03d}"
    if scheme in ("unix", "zmq+ipc"):
        return f"{scheme}://{pod.volume}/{name}.sock"
    if scheme == "sysvmq":
        return f"sysvmq://{name}"
    return f"{scheme}:///{name}"


def with_options(url: str, **options: object) -> str:
    return url + "?" + "&".join(f"{key}={value}" for key, value in options.items())


def startup_seconds(pod: Pod, user: User) -> float:
    """How long starting podipc as `user` in this pod takes now (the machine may be loaded)."""
    started = time.monotonic()
    pod.podipc("--version", user=user)
    return time.monotonic() - started


def timed(pod: Pod, user: User | None, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = pod.podipc(*args, user=user, timeout=60)
    return result, time.monotonic() - started


# --- D2: a FIFO at a presence path ---------------------------------------------------------


@pytest.mark.parametrize("role", ["consumer", "producer"])
@pytest.mark.parametrize("scheme", PRESENCE_SCHEMES)
def test_d2_a_fifo_at_a_presence_path_hangs_no_side_and_not_clean(
    pod: Pod, tenants: Tenants, scheme: str, role: str
) -> None:
    url = url_of(scheme, pod)
    fifo = presence_path(parse_address(url).token, role)
    assert pod.run(["mkfifo", "-m", "0666", fifo], user=tenants.mallory).returncode == 0
    limit = WAIT_SECONDS + LIMIT_AFTER_WAIT_SECONDS + startup_seconds(pod, tenants.alice)
    channel = with_options(url, wait=WAIT_SECONDS)
    for args in (["consume", channel], ["produce", channel, "--count", "1"]):
        result, seconds = timed(pod, tenants.alice, *args)
        assert seconds < limit, f"podipc {' '.join(args)} took {seconds:.1f} s > wait + 2 s"
        line = assert_one_line_error(result, exit_code=3 if args[0] == role[:7] else result.returncode)
        assert result.returncode in (3, 5), line  # ChannelUnavailable for the FIFO, or PeerTimeout
        if result.returncode == 3:
            assert fifo in line and "FIFO" in line and "podipc-mallory" in line, line
    for user in (None, tenants.alice):
        result, seconds = timed(pod, user, "clean", "--dry-run")
        assert seconds < limit and result.returncode == 0 and "Traceback" not in result.stderr, result
        assert f"refused: path {fifo}: it is a FIFO" in result.stdout, result.stdout
    assert pod.run(["test", "-p", fifo]).returncode == 0  # still there: not podipc's to remove


# --- D5: another user's file, a directory or a symlink at a presence path --------------------


@pytest.mark.parametrize("role", ["consumer", "producer"])
@pytest.mark.parametrize("kind", ["a 0644 file", "a directory", "a symlink"])
def test_d5_something_of_another_user_at_our_presence_path_is_one_line_and_exit_3(
    pod: Pod, tenants: Tenants, kind: str, role: str
) -> None:
    url = url_of("shm", pod)
    path = presence_path(parse_address(url).token, role)
    plant = {
        "a 0644 file": f"printf '1 evil\\n' > {path} && chmod 0644 {path}",
        "a directory": f"mkdir -m 0755 {path}",
        "a symlink": f"ln -s /etc/passwd {path}",
    }[kind]
    assert pod.run(["sh", "-c", plant], user=tenants.mallory).returncode == 0
    channel = with_options(url, wait=WAIT_SECONDS)
    own = ["consume", channel] if role == "consumer" else ["produce", channel, "--count", "1"]
    result, _ = timed(pod, tenants.alice, *own)
    line = assert_one_line_error(result, exit_code=3)
    assert path in line and "podipc-mallory" in line, line


@pytest.mark.parametrize("scheme", PRESENCE_SCHEMES)
def test_d5_another_users_presence_file_is_refused_by_every_presence_channel(
    pod: Pod, tenants: Tenants, scheme: str
) -> None:
    url = url_of(scheme, pod)
    path = presence_path(parse_address(url).token, "consumer")
    assert pod.run(["sh", "-c", f"echo 1 evil > {path}; chmod 0644 {path}"], user=tenants.mallory).returncode == 0
    result, _ = timed(pod, tenants.alice, "consume", with_options(url, wait=WAIT_SECONDS))
    line = assert_one_line_error(result, exit_code=3)
    assert "podipc-mallory" in line and "mode 0644" in line, line


def test_group_sharing_trusts_the_common_group_only(pod: Pod, tenants: Tenants) -> None:
    """mode=0660: alice and bob (group podipc-pod) talk; a 0660 file of mallory's own group is refused."""
    shared = with_options(url_of("shm", pod), mode="0660", wait=20)
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", shared], user=tenants.bob)
    produced = pod.podipc("produce", shared, "--count", "5", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0 and json.loads(stdout.strip().splitlines()[-1])["messages"] == 5, stderr

    other = url_of("shm", pod, "other")
    path = presence_path(parse_address(other).token, "producer")
    assert pod.run(["sh", "-c", f"echo 1 x > {path}; chmod 0660 {path}"], user=tenants.mallory).returncode == 0
    result, _ = timed(pod, tenants.alice, "consume", with_options(other, mode="0660", wait=WAIT_SECONDS))
    line = assert_one_line_error(result, exit_code=3)
    assert "group is not one of ours" in line and "podipc-mallory" in line, line


# --- D4: at most one producer across 30 simultaneous starts ---------------------------------

RACE = r"""
import json, os, sys
import podipc

url, count = sys.argv[1], int(sys.argv[2])
go_read, go_write = os.pipe()
done_read, done_write = os.pipe()
results_read, results_write = os.pipe()
children = []
for _ in range(count):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.close(done_write)
        os.read(go_read, 1)  # every child waits here; the parent's close releases all at once
        try:
            producer = podipc.producer(url)
            outcome = "holder"
        except podipc.PodIPCError as error:
            outcome = f"refused {type(error).__name__}: {error}"
        except BaseException as error:
            outcome = f"crashed {error!r}"
        os.write(results_write, (json.dumps(outcome[:1000]) + "\n").encode())
        os.read(done_read, 1)  # keep the role until every claimer has reported
        os._exit(0)
    children.append(pid)
os.close(go_read)
os.close(go_write)
outcomes, buffer = [], b""
while len(outcomes) < count:
    buffer += os.read(results_read, 65536)
    *lines, buffer = buffer.split(b"\n")
    outcomes += [json.loads(line) for line in lines]
os.close(done_write)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps(outcomes))
"""


@pytest.mark.parametrize("scheme", PRESENCE_SCHEMES)
def test_d4_thirty_producers_started_at_once_give_at_most_one_holder(pod: Pod, tenants: Tenants, scheme: str) -> None:
    url = url_of(scheme, pod)
    for _ in range(CLAIM_ROUNDS):
        result = pod.python(RACE, url, str(CLAIMERS), user=tenants.alice, timeout=120)
        assert result.returncode == 0, result.stderr
        outcomes: list[str] = json.loads(result.stdout)
        holders = [outcome for outcome in outcomes if outcome == "holder"]
        refused = [outcome for outcome in outcomes if outcome.startswith("refused ChannelUnavailable")]
        assert len(holders) == 1 and len(refused) == CLAIMERS - 1, outcomes
        assert all("another producer is attached" in outcome for outcome in refused), refused
        # the holders of the rounds exit without closing: the next round takes over a dead holder's file


# --- fork: a child does not keep its parent's liveness -----------------------------------------

FORKING_PRODUCER = r"""
import os, sys, time
import podipc

producer = podipc.producer(sys.argv[1])
producer.send(b"before fork", timeout=20)
child = os.fork()
if child == 0:
    time.sleep(120)  # a long-lived child: a worker, a daemonised helper
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("scheme", ["shm", "mq", "sysvmq", "udp"])
def test_a_producer_killed_after_forking_is_seen_dead_by_another_users_consumer_within_2_s(
    pod: Pod, tenants: Tenants, scheme: str
) -> None:
    url = with_options(url_of(scheme, pod), mode="0660", wait=20)
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.bob)
    producer = pod.popen([sys.executable, "-c", FORKING_PRODUCER, url], user=tenants.alice)
    assert producer.stdout is not None
    parent, child = map(int, producer.stdout.readline().split())
    time.sleep(0.5)
    assert consumer.poll() is None, consumer.communicate()
    pod.kill(parent)
    killed_at = time.monotonic()
    try:
        stdout, stderr = consumer.communicate(timeout=10)
        seconds = time.monotonic() - killed_at
    finally:
        pod.kill(child)
    assert "Traceback" not in stderr and consumer.returncode == 7, (consumer.returncode, stderr)  # PeerGone
    assert seconds < 2, f"the parent's death was seen after {seconds:.2f} s while its child lives"
    assert json.loads(stdout.strip().splitlines()[-1])["messages"] == 1
