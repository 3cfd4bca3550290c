"""SIGTERM in real pods, as a kubelet stops them: every channel's pod stops promptly and cleanly (issue 11).

Each k8s/channels/*.yaml pod is played with an endless stream (the producer's count made huge),
paced at 1000 messages a second or flat out (the producer then mostly waits in send for room;
udp://, which has no flow control, stays paced), and stopped mid-stream:

- `podman pod stop`: SIGTERM to every container at once, SIGKILL after the grace period, as a
  kubelet deleting the pod. Both containers must exit in under 3 s of the SIGTERM (podman's
  FinishedAt: the moment the process ended, as a grace period counts it; podman's own cleanup
  afterwards is not the pod's and, on a loaded machine, takes seconds more), the producer with
  143 (stopped by SIGTERM), and the consumer's summary must agree with the producer's:
  everything sent was delivered, then the end of stream (the consumer exits 143 having drained
  to it, or 0 when the end of stream came before its own SIGTERM).
- SIGTERM to the producer and consumer containers only (`podman stop` of both, as a kubelet
  restarting them), so that the pod, its IPC namespace and /dev/shm live on: then nothing of the
  channel is left in the pod's /dev/shm, POSIX queues or SysV queues (looked at from a third
  container of the pod, which must see a marker file put there first).
"""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

import pytest

from .pods import K8S_DIR, PlayedPods, play, podman

CHANNEL_MANIFESTS = sorted(path.name for path in (K8S_DIR / "channels").glob("*.yaml") if path.stem != "kustomization")
ENDLESS = {"PODIPC_COUNT": "1000000000", "PODIPC_RATE": "1000"}
"""A stream that lasts until the pod is stopped (1000 messages a second)."""
FLAT_OUT = {"PODIPC_COUNT": "1000000000", "PODIPC_RATE": "0"}
"""A stream as fast as the channel takes it: the producer is mostly blocked in send when the SIGTERM comes."""
PACES = [pytest.param(ENDLESS, id="paced"), pytest.param(FLAT_OUT, id="flat-out")]
STREAMING_SECONDS = 3.0
STOP_SECONDS = 3.0
"""Issue 11: after `podman pod stop` (SIGTERM), a running pair has exited within this."""
GRACE_SECONDS = 10
SIGTERM_EXIT = 143
MARKER = "podipc-e2e-marker"


def running(pods: PlayedPods, *containers: str, timeout: float = 60) -> None:
    """Wait until every container runs, then let the stream flow for a while."""
    deadline = time.monotonic() + timeout
    while not all(pods.state(name).get("Status") == "running" for name in containers):
        assert time.monotonic() < deadline, pods.describe()
        time.sleep(0.2)
    time.sleep(STREAMING_SECONDS)
    for name in containers:
        assert pods.state(name).get("Status") == "running", f"{name} ended before the stop:\n{pods.describe()}"


def finished_at(pods: PlayedPods, container: str) -> float:
    """When a container's main process exited (podman's FinishedAt), as a time.time() value."""
    stamp = pods.state(container)["FinishedAt"]  # e.g. 2026-12-01T03:40:01.123456789Z or ...+00:00
    match = re.fullmatch(r"(\S+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, f"unexpected FinishedAt {stamp!r}"
    whole, fraction, zone = match.groups()
    moment = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + float(f"0.{fraction or 0}")


def assert_stopped_cleanly_and_agree(pods: PlayedPods, manifest: str) -> None:
    codes = {name: pods.wait(name, 30) for name in ("producer", "consumer")}
    # The consumer exits 0 when the producer's end of stream came before its own SIGTERM (the stream ended),
    # else 143 having drained up to that end of stream: either way it has every message sent.
    assert codes["producer"] == SIGTERM_EXIT and codes["consumer"] in (0, SIGTERM_EXIT), f"{codes}\n{pods.describe()}"
    produced, consumed = pods.summary("producer"), pods.summary("consumer")
    assert produced["stopped_by"] == "SIGTERM", produced
    assert "error" not in produced and "error" not in consumed, (produced, consumed)
    if codes["consumer"] == SIGTERM_EXIT:
        assert consumed["stopped_by"] == "SIGTERM" and consumed["end_of_stream"] is True, consumed
    assert produced["messages"] > 0
    if manifest == "udp.yaml" and consumed.get("lost"):  # udp may drop (documented): what was lost is counted
        assert consumed["messages"] + consumed["lost"] == produced["messages"], (produced, consumed)
        return
    for key in ("messages", "bytes", "sha256"):
        assert consumed[key] == produced[key], (produced, consumed)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pace", PACES)
@pytest.mark.parametrize("manifest", CHANNEL_MANIFESTS)
def test_pod_stop_ends_the_stream_within_3_seconds_and_both_summaries_agree(
    podipc_image: str, manifest: str, pace: dict[str, str]
) -> None:
    env = {"producer": {**pace, "PODIPC_RATE": pace["PODIPC_RATE"] if manifest != "udp.yaml" else "1000"}}
    with play(K8S_DIR / "channels" / manifest, env=env) as pods:
        running(pods, "producer", "consumer")

        signalled = time.time()
        podman("pod", "stop", "--time", str(GRACE_SECONDS), pods.pods[next(iter(pods.pods))])
        returned = time.time() - signalled

        took = {name: finished_at(pods, name) - signalled for name in ("producer", "consumer")}
        assert max(took.values()) < STOP_SECONDS, f"exited {took} s after the SIGTERM\n{pods.describe()}"
        assert returned < GRACE_SECONDS, f"podman pod stop took {returned:.2f} s: it waited for the SIGKILL"
        assert_stopped_cleanly_and_agree(pods, manifest)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("manifest", CHANNEL_MANIFESTS)
def test_sigterm_leaves_nothing_in_the_pods_dev_shm_or_queues(podipc_image: str, manifest: str) -> None:
    with play(K8S_DIR / "channels" / manifest, env={"producer": ENDLESS}) as pods:
        running(pods, "producer", "consumer")
        witness = keep_the_pod_alive(pods)
        made = pods.exec("consumer", "sh", "-c", f": > /dev/shm/{MARKER}")
        assert made.returncode == 0, made.stderr

        signalled = time.time()
        podman("stop", "--time", str(GRACE_SECONDS), pods.name("producer"), pods.name("consumer"))

        took = {name: finished_at(pods, name) - signalled for name in ("producer", "consumer")}
        assert max(took.values()) < STOP_SECONDS, f"exited {took} s after the SIGTERM\n{pods.describe()}"
        assert_stopped_cleanly_and_agree(pods, manifest)
        left = what_the_pod_holds(witness)
        assert left == {"/dev/shm": [MARKER], "/dev/mqueue": [], "sysv queues": [], "clean": "nothing to clean"}, left


INSPECT = f"""
ls -A /dev/shm; echo "--"; ls -A /dev/mqueue; echo "--"; ipcs -q | grep '^0x' || true; echo "--"
rm /dev/shm/{MARKER}; podipc clean --dry-run
"""


def keep_the_pod_alive(pods: PlayedPods) -> str:
    """Start one more container in the pod and return its name.

    `podman kube play` gives pods the exit policy "stop": when the last container exits, the
    infra container stops and the pod's IPC namespace and /dev/shm go with it. A kubelet keeps a
    pod whose containers restart; this container keeps Podman's alive the same way.
    """
    pod = pods.pods[next(iter(pods.pods))]
    name = f"{pod}-witness"
    podman("run", "--detach", "--pod", pod, "--name", name, "--entrypoint", "sleep", pods_image(pods), "600")
    return name


def what_the_pod_holds(witness: str) -> dict[str, Any]:
    """What a container of the pod sees in its /dev/shm, POSIX and SysV queues, and what clean would remove."""
    result = podman("exec", witness, "sh", "-c", INSPECT)
    shm, mqueue, sysv, clean = result.stdout.split("--\n")
    return {
        "/dev/shm": shm.split(),
        "/dev/mqueue": mqueue.split(),
        "sysv queues": sysv.strip().splitlines(),
        "clean": clean.strip(),
    }


def pods_image(pods: PlayedPods) -> str:
    inspected = podman("inspect", "--type", "container", "--format", "{{.ImageName}}", pods.name("consumer"))
    return inspected.stdout.strip()
