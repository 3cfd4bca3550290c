"""podipc doctor between two processes arranged like containers, with unshare and nsenter (needs root).

A pod in miniature: a holder process keeps a fresh net + IPC namespace (the pod's infra
container); each "container" joins it with nsenter and gets its own pid and mount
namespaces from unshare. Two pods are two holders; there each container also mounts its
own tmpfs on /dev/shm, as a pod does, so the only thing the two pods share is an
exchange directory (the --exchange volume).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.commands import PODIPC, system_tool

pytestmark = [
    pytest.mark.namespaces,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        os.geteuid() != 0 or not system_tool("unshare") or not system_tool("nsenter"),
        reason="needs root and util-linux unshare/nsenter",
    ),
]

ADDRESS = "127.0.0.1:7191"  # inside fresh network namespaces; the port also names /dev/shm/podipc-doctor-7191.json
OWN_DEV_SHM = 'mount -t tmpfs -o size=64m,mode=1777 shm /dev/shm && exec "$0" "$@"'


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll a condition until it holds or the time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def make_pod() -> Iterator[Callable[[], int]]:
    """Make pods: each an infra process holding a fresh net + IPC namespace with loopback up; yields a factory."""
    holders: list[subprocess.Popen[bytes]] = []

    def make() -> int:
        holder = subprocess.Popen(["unshare", "--net", "--ipc", "--", "sleep", "120"])
        holders.append(holder)
        own = os.readlink("/proc/self/ns/net")
        assert wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != own, 5)
        subprocess.run(["nsenter", "-t", str(holder.pid), "--net", "ip", "link", "set", "lo", "up"], check=True)
        return holder.pid

    yield make
    for holder in holders:
        holder.kill()
        holder.wait()


def container(pod_pid: int, *doctor_args: str, own_dev_shm: bool = False) -> subprocess.Popen[str]:
    """Run `podipc doctor ARGS` as a container of a pod: its net + IPC, its own pid and mount namespaces."""
    command = ["nsenter", "-t", str(pod_pid), "--net", "--ipc", "--",
               "unshare", "--pid", "--mount", "--fork", "--mount-proc", "--"]  # fmt: skip
    if own_dev_shm:
        command += ["sh", "-c", OWN_DEV_SHM]
    command += [*PODIPC, "doctor", "--json", *doctor_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], expected_exit: int = 0) -> dict[str, Any]:
    """Wait for a container, check its exit code, return its JSON report."""
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == expected_exit, stderr
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return report


def shared(report: dict[str, Any], kind: str) -> bool | None:
    """Whether the peer comparison found a namespace shared."""
    value: bool | None = report["peer"]["namespaces"][kind]["shared"]
    return value


@pytest.mark.parametrize("server_first", [True, False], ids=["server-first", "peer-first"])
def test_containers_of_one_pod_share_net_ipc_and_dev_shm_but_not_pid_or_mnt(
    make_pod: Callable[[], int], server_first: bool
) -> None:
    pod = make_pod()
    start_server = lambda: container(pod, "--serve", ADDRESS, "--once", "--serve-for", "40")  # noqa: E731
    start_peer = lambda: container(pod, "--peer", ADDRESS, "--wait", "30")  # noqa: E731
    first = start_server() if server_first else start_peer()
    time.sleep(0.5)
    second = start_peer() if server_first else start_server()
    server, peer = (first, second) if server_first else (second, first)

    report = finish(peer)
    served = finish(server)

    assert report["peer"]["found"] is True
    assert shared(report, "net") is True
    assert shared(report, "ipc") is True
    assert shared(report, "pid") is False
    assert shared(report, "mnt") is False
    assert report["peer"]["dev_shm"]["shared"] is True
    net_evidence = " ".join(report["peer"]["namespaces"]["net"]["evidence"])
    assert "loopback port 127.0.0.1:7191" in net_evidence and "abstract Unix socket" in net_evidence
    ipc_evidence = " ".join(report["peer"]["namespaces"]["ipc"]["evidence"])
    assert "SysV shm segment" in ipc_evidence and "POSIX queue" in ipc_evidence
    assert report["peer"]["namespaces"]["net"]["peer"] == served["facts"]["namespaces"]["net"]
    assert report["peer"]["namespaces"]["pid"]["peer"] == served["facts"]["namespaces"]["pid"]
    assert served["serving"]["published"] and set(served["serving"]["published"].values()) == {"ok"}
    assert not os.path.exists("/dev/shm/podipc-doctor-7191.json")
    assert not os.path.exists("/dev/shm/podipc-doctor-7191.json.done")


def test_containers_of_two_pods_share_neither_net_nor_ipc_nor_dev_shm(
    make_pod: Callable[[], int], tmp_path: Path
) -> None:
    first_pod, second_pod = make_pod(), make_pod()
    exchange = ["--exchange", str(tmp_path)]
    server = container(first_pod, "--serve", ADDRESS, "--once", "--serve-for", "40", *exchange, own_dev_shm=True)
    peer = container(second_pod, "--peer", ADDRESS, "--wait", "30", *exchange, own_dev_shm=True)

    report = finish(peer)
    finish(server)

    assert report["peer"]["found"] is True
    assert report["peer"]["seen_via"] == [f"exchange {tmp_path}"]
    for kind in ("net", "ipc", "pid", "mnt"):
        assert shared(report, kind) is False, kind
    assert report["peer"]["dev_shm"]["shared"] is False
    assert report["facts"]["dev_shm"]["size"] == 64 * 1024 * 1024
    assert sorted(os.listdir(tmp_path)) == []


def test_peer_that_reaches_no_server_says_so_and_exits_5(make_pod: Callable[[], int]) -> None:
    first_pod, second_pod = make_pod(), make_pod()
    server = container(first_pod, "--serve", ADDRESS, "--serve-for", "5", own_dev_shm=True)
    try:
        peer = container(second_pod, "--peer", ADDRESS, "--wait", "1", own_dev_shm=True)
        report = finish(peer, expected_exit=5)
    finally:
        server.kill()
        server.communicate()

    assert report["peer"]["found"] is False
    assert shared(report, "net") is None
    assert "share none of these" in report["peer"]["problems"][0]
