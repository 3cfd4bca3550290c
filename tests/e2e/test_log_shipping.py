"""Log shipping in real pods: an app writes its log lines through `podipc produce --stdin` to a shipper sidecar.

k8s/logging/log-shipping.yaml (a classic sidecar) and log-shipping-native.yaml (a native
sidecar, Kubernetes >= 1.29). Every line of a 10,000-line app log must arrive, in order, on the
shipper's stdout, and each pod must stop the way docs/pods.md ("Log shipping") says.

Podman 4.3 does not know native sidecars (the last test proves what it does instead);
tests.e2e.pods.play() runs them as a kubelet does and stop_sidecars() stops them as a kubelet
does once the app has exited.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from .pods import K8S_DIR, PlayedPods, adapt_for_podman, load_manifest, play, podman

CLASSIC = K8S_DIR / "logging" / "log-shipping.yaml"
NATIVE = K8S_DIR / "logging" / "log-shipping-native.yaml"
APP_LOG_LINES = 10_000
EXIT_TIMEOUT_SECONDS = 120
STOP_SECONDS = 2.0
SIGTERM_EXIT = 143


def app_log(lines: int = APP_LOG_LINES) -> list[str]:
    """The lines the manifests' app writes, in order."""
    return [f'{{"seq": {seq}, "level": "info", "msg": "request {seq} handled"}}' for seq in range(1, lines + 1)]


def shipped_lines(pods: PlayedPods) -> list[str]:
    """The app's log lines as the shipper wrote them to its stdout, in order (its summaries are JSON with 'role')."""
    return [line for line in pods.logs("shipper").splitlines() if line.startswith('{"seq"')]


def assert_whole_log(pods: PlayedPods, summary: dict[str, Any]) -> None:
    expected = app_log()
    shipped = shipped_lines(pods)
    assert len(shipped) == len(expected), f"{len(shipped)} of {len(expected)} lines shipped\n{pods.describe()[-3000:]}"
    assert shipped == expected, "lines lost, reordered or changed"
    digest = hashlib.sha256("".join(expected).encode()).hexdigest()
    assert summary["messages"] == APP_LOG_LINES and summary["sha256"] == digest, summary
    produced = pods.summary("app")
    assert produced["role"] == "producer" and produced["sha256"] == digest, produced


@pytest.mark.timeout(240)
def test_classic_sidecar_ships_every_line_of_the_app_log_in_order_and_the_pod_completes(podipc_image: str) -> None:
    with play(CLASSIC) as pods:
        codes = {name: pods.wait(name, EXIT_TIMEOUT_SECONDS) for name in ("app", "shipper")}
        assert codes == {"app": 0, "shipper": 0}, f"{codes}\n{pods.describe()[-3000:]}"
        summary = pods.summary("shipper")
        assert summary["role"] == "consumer" and "stopped_by" not in summary
        assert_whole_log(pods, summary)


@pytest.mark.timeout(240)
def test_native_sidecar_ships_every_line_and_stops_on_the_kubelets_sigterm_after_the_app(podipc_image: str) -> None:
    with play(NATIVE) as pods:
        assert pods.sidecars == {"podipc-log-shipping-native": ["shipper"]}
        assert pods.wait("app", EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        session = wait_for_summary(pods, "shipper", lambda line: line.get("session") == 1)
        assert pods.state("shipper")["Status"] == "running", "a serving sidecar outlives the app"

        taken = pods.stop_sidecars()  # what the kubelet does once every app container has exited

        assert taken["podipc-log-shipping-native/shipper"] < STOP_SECONDS, taken
        assert pods.wait("shipper", 10) == SIGTERM_EXIT
        total = pods.summary("shipper")
        assert total["sessions"] == 1 and total["stopped_by"] == "SIGTERM", total
        assert_whole_log(pods, session)


def wait_for_summary(pods: PlayedPods, container: str, wanted: Any, timeout: float = 60) -> dict[str, Any]:
    """The first JSON line of a container's log that `wanted(line)` accepts, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        for line in pods.summaries(container):
            if wanted(line):
                return line
        if time.monotonic() >= deadline:
            raise AssertionError(f"no such summary line after {timeout} s:\n{pods.logs(container)[-3000:]}")
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_podman_runs_a_native_sidecar_as_an_ordinary_init_container_and_never_starts_the_app(
    podipc_image: str,
) -> None:
    """What Podman 4.3 does with the native manifest as it is, which is why play() emulates the kubelet."""
    suffix = uuid.uuid4().hex[:6]
    pods, facts = adapt_for_podman(load_manifest(NATIVE), suffix, native_sidecars="as-is")
    assert pods[0]["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    name = facts["pods"]["podipc-log-shipping-native"]
    with tempfile.TemporaryDirectory(prefix="podipc-play-") as workdir:
        manifest = Path(workdir) / NATIVE.name
        manifest.write_text(yaml.safe_dump_all(pods, sort_keys=False))
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                podman("kube", "play", str(manifest), timeout=15)  # it waits for the "init container" to exit
            shipper, app = (state_of(f"{name}-{short}") for short in ("shipper", "app"))
            assert shipper["Status"] == "running", shipper
            assert app["Status"] in ("created", "configured") and app["StartedAt"].startswith("0001"), app
        finally:
            podman("pod", "rm", "--force", "--time", "0", name, check=False)
            for volume in facts["volumes"]:
                podman("volume", "rm", "--force", volume, check=False)


def state_of(container: str) -> dict[str, Any]:
    result = podman("inspect", "--type", "container", "--format", "{{json .State}}", container)
    state: dict[str, Any] = json.loads(result.stdout)
    return state
