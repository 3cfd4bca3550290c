"""podipc doctor in real pods (podman kube play): what the containers of one pod share, and of two pods.

Manifests: k8s/doctor/doctor-pod.yaml (server + peer in one pod, an emptyDir between them),
k8s/doctor/doctor-two-pods.yaml (server and peer in two pods that share only a hostPath
exchange directory) and k8s/doctor/doctor-check.yaml (doctor as an initContainer check).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.pods import PodError, play

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ONE_POD = "k8s/doctor/doctor-pod.yaml"
TWO_PODS = "k8s/doctor/doctor-two-pods.yaml"
CHECK = "k8s/doctor/doctor-check.yaml"
EXCHANGE_IN_MANIFEST = "/tmp/podipc-doctor-exchange"
MIB = 1024 * 1024


def sharing(report: dict[str, Any]) -> dict[str, bool | None]:
    """Namespace kind -> shared with the peer, as the peer's doctor reported it."""
    return {kind: value["shared"] for kind, value in report["peer"]["namespaces"].items()}


def test_containers_of_one_pod_share_net_ipc_uts_dev_shm_and_the_emptydir(podipc_image: str) -> None:
    # The server starts 3 s late: the peer, started first, must wait for it.
    with play(ONE_POD, start_delay={"server": 3}) as pods:
        assert pods.wait("peer", timeout=120) == 0, pods.describe()
        assert pods.wait("server", timeout=60) == 0, pods.describe()
        report, served = pods.summary("peer"), pods.summary("server")

    shared = sharing(report)
    assert {kind: shared[kind] for kind in ("net", "ipc", "uts", "pid", "mnt")} == {
        "net": True, "ipc": True, "uts": True, "pid": False, "mnt": False,
    }  # fmt: skip
    assert report["peer"]["namespaces"]["pid"]["peer"] == served["facts"]["namespaces"]["pid"]
    assert set(report["peer"]["seen_via"]) == {"tcp 127.0.0.1:7099", "abstract unix @podipc-doctor-7099",
                                               "dev_shm", "sysv_shm", "posix_mq"}  # fmt: skip
    assert report["peer"]["dev_shm"]["shared"] is True
    assert [volume["path"] for volume in report["peer"]["volumes"]] == ["/shared"]
    assert set(served["serving"]["published"].values()) == {"ok"}, served["serving"]

    dev_shm = report["facts"]["dev_shm"]
    assert dev_shm["memory_backed"] is True and dev_shm["fstype"] == "tmpfs"
    assert 60 * MIB <= dev_shm["size"] <= 64 * MIB  # Podman's 64 MB default, like Kubernetes'
    assert report["facts"]["limits"]["mqueue"]["msg_max"] == 10
    assert report["facts"]["limits"]["mqueue"]["msgsize_max"] == 8192
    assert report["facts"]["identity"]["uid"] == 10001 and report["facts"]["identity"]["capabilities"] == []
    assert report["urls"] == [{"url": "unix:///shared/podipc.sock", "ok": True, "problems": []}]


def test_containers_of_two_pods_share_no_namespace_and_no_dev_shm(podipc_image: str, tmp_path: Path) -> None:
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    os.chmod(exchange, 0o1777)  # the containers run as uid 10001

    with play(TWO_PODS, {EXCHANGE_IN_MANIFEST: str(exchange)}, start_delay={"peer": 2}) as pods:
        assert pods.wait("peer", timeout=120) == 0, pods.describe()
        assert pods.wait("server", timeout=60) == 0, pods.describe()
        report = pods.summary("peer")

    assert report["peer"]["found"] is True
    assert report["peer"]["seen_via"] == ["exchange /exchange"]  # not loopback, not /dev/shm, not IPC
    assert sharing(report) | {"cgroup": None, "user": None} == {
        "net": False, "ipc": False, "uts": False, "pid": False, "mnt": False, "cgroup": None, "user": None,
    }  # fmt: skip
    assert report["peer"]["dev_shm"]["shared"] is False
    assert list(exchange.iterdir()) == []  # the server withdrew its facts; the acknowledgement was taken


def test_startup_check_lets_the_pod_start_when_its_channels_work(podipc_image: str) -> None:
    with play(CHECK) as pods:
        assert pods.wait("consumer", timeout=120) == 0, pods.describe()
        assert pods.wait("producer", timeout=60) == 0, pods.describe()
        assert pods.summary("consumer")["messages"] == 1000


def test_startup_check_stops_the_pod_when_a_required_channel_cannot_work(podipc_image: str) -> None:
    unusable = {'"--require", "mq"': '"--require", "mq", "--require", "no-such-channel"'}

    with pytest.raises(PodError, match=r"init container \w+ exited with code 3"), play(CHECK, unusable):
        pass
