"""A pod in miniature: producer and consumer in their own pid and mount namespaces, sharing net and IPC.

That is what the containers of a pod are: the infra ("pause") process holds a network
and an IPC namespace, and each container joins them with its own pid and mount
namespaces. Here `unshare` makes the holder and `nsenter` + `unshare` the containers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.commands import PODIPC, system_tool

from .harness import SCHEMES, leftovers, url_for, wait_until

pytestmark = [
    pytest.mark.namespaces,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not system_tool("unshare"), reason="needs root and util-linux unshare"),
]

NAMESPACES = ("net", "ipc", "pid", "mnt")


@pytest.fixture
def pod() -> Iterator[int]:
    """An infra process holding a fresh net + ipc namespace with loopback up; yields its pid."""
    holder = subprocess.Popen(["unshare", "--net", "--ipc", "--", "sleep", "600"])
    try:
        assert wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 5)
        subprocess.run(["nsenter", "-t", str(holder.pid), "--net", "ip", "link", "set", "lo", "up"], check=True)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def container(pod_pid: int, *podipc_args: str) -> subprocess.Popen[str]:
    """Start `podipc ARGS` as a container of the pod: the pod's net+ipc, its own pid+mount namespaces."""
    report = " ".join(f"$(readlink /proc/self/ns/{name})" for name in NAMESPACES)
    script = f'echo "namespaces {report}" >&2; exec "$0" "$@"'
    command = [
        "nsenter",
        "-t",
        str(pod_pid),
        "--net",
        "--ipc",
        "--",
        "unshare",
        "--pid",
        "--mount",
        "--fork",
        "--mount-proc",
        "--",
        "sh",
        "-c",
        script,
        *PODIPC,
        *podipc_args,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Wait for a container; return its JSON summary and its namespace ids."""
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr
    line = next(line for line in stderr.splitlines() if line.startswith("namespaces "))
    return json.loads(stdout.strip().splitlines()[-1]), dict(zip(NAMESPACES, line.split()[1:], strict=True))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_pair_in_a_miniature_pod_shares_net_and_ipc_but_not_pid_or_mount(pod: int, scheme: str) -> None:
    url = url_for(scheme, wait=20)
    rate = ["--rate", "2000"] if scheme == "udp" else []
    consumer = container(pod, "consume", url)
    producer = container(pod, "produce", url, "--count", "500", "--random", "--size", "2000", "--seed", "7", *rate)
    produced, producer_ns = finish(producer)
    consumed, consumer_ns = finish(consumer)
    assert (
        (consumed["messages"], consumed["sha256"])
        == (produced["messages"], produced["sha256"])
        == (500, produced["sha256"])
    )
    assert producer_ns["net"] == consumer_ns["net"] != os.readlink("/proc/self/ns/net")
    assert producer_ns["ipc"] == consumer_ns["ipc"] != os.readlink("/proc/self/ns/ipc")
    assert producer_ns["pid"] != consumer_ns["pid"]
    assert producer_ns["mnt"] != consumer_ns["mnt"]
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


def test_the_pod_queue_is_invisible_outside_the_pod(pod: int) -> None:
    name = f"podipc-contract-isolated-{os.getpid()}"
    creator = [
        "nsenter",
        "-t",
        str(pod),
        "--ipc",
        "--",
        sys.executable,
        "-c",
        f"import posix_ipc; posix_ipc.MessageQueue('/{name}', posix_ipc.O_CREAT, mode=0o600)",
    ]
    subprocess.run(creator, check=True)
    import posix_ipc

    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(f"/{name}")
    remover = [
        "nsenter",
        "-t",
        str(pod),
        "--ipc",
        "--",
        sys.executable,
        "-c",
        f"import posix_ipc; posix_ipc.unlink_message_queue('/{name}')",
    ]
    subprocess.run(remover, check=True)
