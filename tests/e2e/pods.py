"""Play Kubernetes manifests as real pods with `podman kube play`, for the e2e tests.

The interface other tests use (keep it stable)::

    from tests.e2e.pods import play

    with play("k8s/channels/tcp.yaml") as pods:           # the pod is ALWAYS removed afterwards
        assert pods.wait("consumer", timeout=60) == 0      # exit code of a container
        assert pods.wait("producer", timeout=60) == 0
        produced = pods.summary("producer")                # the last JSON line of its log, as a dict
        text = pods.logs("consumer")                       # stdout and stderr, interleaved

    play(manifest_path, replacements=None, *, env=None, start_delay=None, image=IMAGE)

- `replacements`: {old: new} exact substrings replaced in the manifest text before it is
  parsed (each `old` must occur, else ValueError: a stale replacement is a test bug).
- `env`: {container: {NAME: value}} environment overrides; a container is named as in the
  manifest ("consumer"), or "pod/container" when several pods share container names, or
  "*" for every container (init containers included).
- `start_delay`: {container: seconds} starts that container's podipc that much later
  (the command becomes `sh -c 'sleep S; exec podipc ARGS'`), to test start orders.
- `image`: the image every container runs (default localhost/podipc:dev, or $PODIPC_E2E_IMAGE).
- `native_sidecars`: "emulate" (default) plays a native sidecar (an initContainer with
  `restartPolicy: Always`) as a kubelet runs it, see below; "as-is" leaves it to Podman.

Also on the yielded PlayedPods: `name(c)` (podman's container name), `state(c)` (podman's
State dict), `exec(c, *cmd)` (in a running container), `describe()` (every container's state
and log, for failure messages), `pods` / `containers` (manifest name -> podman name / names).
For native sidecars: `sidecars` (manifest pod name -> their names) and `stop_sidecars()`
(what a kubelet does once the app containers have exited: SIGTERM, then SIGKILL after the
pod's grace period). For restartPolicy OnFailure pods: `kill(c)` (SIGKILL its main process from the host, a crash the
policy answers), `restarts(c)`, `summaries(c)` (every run's JSON line), `wait_final(c)`.
`wait` raises PodError (an AssertionError carrying the log) on timeout; `podman(*args)` runs
one podman command (PodError when it fails, e.g. `kube play` of a failing init container).

By hand: `python -m tests.e2e.pods MANIFEST...` plays each manifest, prints every container's
exit code and log, and removes the pods (exit status 1 when a container failed).

What `play` adapts so that Podman 4.3 (Debian 12) runs the manifests as a kubelet would;
the manifests themselves stay as a cluster wants them:

- Pod names get a unique suffix, so several tests (or helpers) can play the same manifest at
  once; emptyDir volumes get unique names too (Podman turns an emptyDir into a *named*
  volume, shared by name across pods) and are removed with the pod.
- An emptyDir with `medium: Memory` mounted at /dev/shm is dropped: Podman backs emptyDirs
  with disk, owned by root (not writable by runAsUser 10001), while the pod's own /dev/shm
  (a 64 MB tmpfs shared by all its containers, mode 1777) is what the cluster's memory
  emptyDir stands for.
- Pod `securityContext.sysctls` (fs.mqueue.*) are ignored by Podman before 4.5; they are
  applied instead through a private containers.conf (`default_sysctls`, CONTAINERS_CONF).
- A `Job` becomes the Pod of its template (Podman 4.3 plays Pods and Deployments only).
- A native sidecar (an initContainer with `restartPolicy: Always`, Kubernetes >= 1.29) is
  unknown to Podman 4.3: it ignores the field, runs the sidecar as an ordinary init container
  and starts the app containers only once it has exited, so `kube play` of a pod whose
  sidecar serves never returns. `play()` moves such a sidecar to the front of `containers`
  (the kubelet starts it first and keeps it running beside the app), and `stop_sidecars()`
  stops it as the kubelet does once the app containers are done. What Podman does with the
  manifest as it is: docs/pods.md ("Native sidecars and Podman"), proved by
  tests/e2e/test_log_shipping.py.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.commands import system_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
IMAGE = os.environ.get("PODIPC_E2E_IMAGE", "localhost/podipc:dev")
"""The image the e2e tests build and play (PODIPC_E2E_IMAGE: a private tag, when several trees share podman)."""
DEFAULT_IMAGE_IN_MANIFESTS = "localhost/podipc:dev"
SYSTEM_CONTAINERS_CONF = Path("/etc/containers/containers.conf")
PODMAN_COMMAND_TIMEOUT = 120
INSPECT_RACE_TRIES = 5
"""How often state() asks podman again when it raced a container's exit (podman's own race, not the test's)."""


# Pods and volumes played by this process and not yet removed; swept at exit in case a test
# process was interrupted between `kube play` and the removal in play()'s finally clause.
_UNREMOVED: dict[str, dict[str, Any]] = {}


class PodError(AssertionError):
    """A played pod did not do what a test waited for; the message carries its logs."""


def podman_available() -> bool:
    """Whether the podman command is installed here."""
    return system_tool("podman") is not None


def podman(
    *args: str, timeout: float = PODMAN_COMMAND_TIMEOUT, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one podman command and return its result (stdout and stderr as text)."""
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        check=False,
    )
    if check and result.returncode != 0:
        raise PodError(f"podman {shlex.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}")
    return result


class PlayedPods:
    """The pods of one played manifest: wait for containers, read their logs and summaries."""

    def __init__(
        self,
        manifest: Path,
        pods: dict[str, str],
        containers: dict[str, list[str]],
        volumes: list[str],
        sidecars: dict[str, list[str]] | None = None,
        grace: dict[str, float] | None = None,
    ) -> None:
        self.manifest = manifest
        #: manifest pod name -> the name the pod runs under (with its unique suffix)
        self.pods = pods
        #: manifest pod name -> its containers' names
        self.containers = containers
        self.volumes = volumes
        #: manifest pod name -> its native sidecars' names (played as containers, see play())
        self.sidecars = sidecars or {}
        #: manifest pod name -> terminationGracePeriodSeconds
        self.grace = grace or {}

    def name(self, container: str) -> str:
        """The podman name of a container: 'consumer' or 'pod/consumer' (manifest names)."""
        if "/" in container:
            pod, _, short = container.partition("/")
            if pod not in self.pods or short not in self.containers[pod]:
                raise KeyError(f"no container {container!r} in {self.manifest}; known: {self._known()}")
            return f"{self.pods[pod]}-{short}"
        owners = [pod for pod, names in self.containers.items() if container in names]
        if len(owners) != 1:
            why = "several pods have" if owners else "no pod has"
            raise KeyError(f"{why} a container {container!r} in {self.manifest}; use one of {self._known()}")
        return f"{self.pods[owners[0]]}-{container}"

    def _known(self) -> list[str]:
        return [f"{pod}/{name}" for pod, names in self.containers.items() for name in names]

    def state(self, container: str) -> dict[str, Any]:
        """Podman's State of a container (Status, ExitCode, StartedAt, FinishedAt...).

        Podman 4.3 reads the container's /proc/PID/cgroup while inspecting it, and fails
        ("read /proc/N/cgroup: no such process") when the process exits in that instant: the
        container's state is then changing, so it is asked again (the exit is what we wait for).
        """
        command = ("inspect", "--type", "container", "--format", "{{json .State}}", self.name(container))
        for _ in range(INSPECT_RACE_TRIES - 1):
            result = podman(*command, check=False)
            if result.returncode == 0 or "no such process" not in result.stderr:
                break
            time.sleep(0.1)
        else:
            result = podman(*command)
        if result.returncode != 0:
            result = podman(*command)  # raises PodError with podman's message
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    def wait(self, container: str, timeout: float = 120) -> int:
        """Wait until a container has exited and return its exit code; PodError with its logs after timeout."""
        name = self.name(container)
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(container)
            if state.get("Status") in ("exited", "stopped") and state.get("FinishedAt", "").startswith(("1", "2")):
                return int(state.get("ExitCode", -1))
            if time.monotonic() >= deadline:
                raise PodError(
                    f"{name} still {state.get('Status')} after {timeout} s; its log:\n{self.logs(container)}"
                )
            time.sleep(0.2)

    def logs(self, container: str) -> str:
        """Everything a container printed, stdout and stderr interleaved."""
        result = subprocess.run(
            ["podman", "logs", self.name(container)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=PODMAN_COMMAND_TIMEOUT,
            check=False,
        )
        return "\n".join(line for line in result.stdout.splitlines() if not _is_podman_noise(line))

    def summary(self, container: str) -> dict[str, Any]:
        """podipc's summary line in a container's log: the last JSON object with a "role" (else the last JSON object).

        A consumer writing JSON log lines to stdout prints its summary on stderr; the log interleaves the
        two streams in no promised order, so an app's log record may come after the summary.
        """
        # conmon may still be writing a container's last lines when `podman wait` has seen it exit:
        # read the log again until the summary is in it (or SUMMARY_WAIT_SECONDS passed)
        deadline = time.monotonic() + SUMMARY_WAIT_SECONDS
        while True:
            objects = self.summaries(container)
            for value in reversed(objects):
                if "role" in value:
                    return value
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if objects:
            return objects[-1]
        raise PodError(f"no JSON summary line in the log of {self.name(container)}:\n{self.logs(container)}")

    def exec(self, container: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside a running container (`podman exec`)."""
        return podman("exec", self.name(container), *command, timeout=timeout, check=False)

    def kill(self, container: str, signal_number: int = signal.SIGKILL) -> int:
        """Kill a running container's main process from the host (a crash, as the OOM killer would); its pid.

        The pod's restartPolicy answers this as a kubelet does. `podman kill` would not do:
        Podman records it as a stop by the user and never restarts the container.
        """
        pid = int(self.state(container).get("Pid") or 0)
        if pid <= 0:
            raise PodError(f"{self.name(container)} is not running; its log:\n{self.logs(container)}")
        os.kill(pid, signal_number)
        return pid

    def stop_sidecars(self) -> dict[str, float]:
        """Stop every native sidecar as a kubelet does once the app containers exited; container -> seconds taken.

        SIGTERM, then SIGKILL after the pod's terminationGracePeriodSeconds (`podman stop --time`).
        """
        taken = {}
        for pod, names in self.sidecars.items():
            for short in reversed(names):  # the kubelet stops sidecars in the reverse of their start order
                qualified = f"{pod}/{short}"
                started = time.monotonic()
                podman("stop", "--time", str(int(self.grace.get(pod, 30))), self.name(qualified))
                taken[qualified] = time.monotonic() - started
        return taken

    def restarts(self, container: str) -> int:
        """How many times the pod's restartPolicy restarted a container."""
        result = podman("inspect", "--type", "container", "--format", "{{json .RestartCount}}", self.name(container))
        return int(json.loads(result.stdout))

    def summaries(self, container: str) -> list[dict[str, Any]]:
        """Every JSON object line of a container's log, oldest first: one per run that printed one."""
        found = []
        for line in self.logs(container).splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    found.append(value)
        return found

    def wait_final(self, container: str, timeout: float = 120, settle: float = 3.0) -> int:
        """Like wait(), for a restartPolicy OnFailure pod: the exit code the container stays exited with.

        Exit code 0 is final at once; a failure counts when no restart followed within
        `settle` seconds (Podman restarts at once; a kubelet backs off, use a longer settle).
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.wait(container, max(0.0, deadline - time.monotonic()))
            if code == 0:
                return 0
            run = (self.restarts(container), self.state(container).get("StartedAt"))
            time.sleep(settle)
            state = self.state(container)
            if (
                state.get("Status") in ("exited", "stopped")
                and (self.restarts(container), state.get("StartedAt")) == run
            ):
                return int(state.get("ExitCode", -1))
            if time.monotonic() >= deadline:
                raise PodError(f"{self.name(container)} still restarting after {timeout} s:\n{self.logs(container)}")

    def describe(self) -> str:
        """Every container's state and log, for a failure message."""
        parts = []
        for pod, names in self.containers.items():
            for short in names:
                qualified = f"{pod}/{short}"
                try:
                    state = self.state(qualified)
                    status = f"{state.get('Status')} exit {state.get('ExitCode')}"
                except PodError as error:
                    status = str(error)
                parts.append(f"--- {qualified} ({status})\n{self.logs(qualified)}")
        return "\n".join(parts)


SUMMARY_WAIT_SECONDS = 10.0
"""How long summary() reads a container's log again for its summary line after the container exited."""


def _is_podman_noise(line: str) -> bool:
    # Podman on a machine without syslog prints this on every command; it is not the container's.
    return line.startswith("failed to connect to syslog")


# --- adapting a manifest for podman kube play ---------------------------------------------


def load_manifest(path: str | os.PathLike[str], replacements: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The YAML documents of a manifest, after the text replacements."""
    text = Path(path).read_text()
    for old, new in (replacements or {}).items():
        if old not in text:
            raise ValueError(f"replacement {old!r} does not occur in {path}")
        text = text.replace(old, new)
    return [document for document in yaml.safe_load_all(text) if document]


def pod_of(document: dict[str, Any]) -> dict[str, Any] | None:
    """A Pod for a Pod document or a Job's template; None for other kinds."""
    kind = document.get("kind")
    if kind == "Pod":
        return copy.deepcopy(document)
    if kind == "Job":
        template = copy.deepcopy(document["spec"]["template"])
        metadata = template.setdefault("metadata", {})
        metadata["name"] = document["metadata"]["name"]
        metadata.setdefault("labels", {}).update(document["metadata"].get("labels", {}))
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
    return None


def _container_matches(pattern: str, pod: str, container: str) -> bool:
    return pattern in ("*", container, f"{pod}/{container}")


def _apply_env(container: dict[str, Any], overrides: Mapping[str, str]) -> None:
    env = container.setdefault("env", [])
    for name, value in overrides.items():
        env[:] = [item for item in env if item.get("name") != name]
        env.append({"name": name, "value": str(value)})


def _apply_start_delay(container: dict[str, Any], seconds: float) -> None:
    command = container.get("command") or ["podipc"]
    arguments = [*command, *container.get("args", [])]
    script = f'sleep {float(seconds)}; exec "$@"'
    container["command"] = ["sh", "-c", script, "podipc-delayed"]
    container["args"] = arguments


def _without_memory_shm(spec: dict[str, Any]) -> None:
    memory_volumes = {
        volume["name"] for volume in spec.get("volumes", []) if volume.get("emptyDir", {}).get("medium") == "Memory"
    }
    dropped = set()
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        mounts = container.get("volumeMounts", [])
        for mount in mounts:
            if mount["name"] in memory_volumes and mount["mountPath"].rstrip("/") == "/dev/shm":
                dropped.add(mount["name"])
        container["volumeMounts"] = [
            mount
            for mount in mounts
            if not (mount["name"] in memory_volumes and mount["mountPath"].rstrip("/") == "/dev/shm")
        ]
        if not container["volumeMounts"]:
            del container["volumeMounts"]
    still_used = {
        mount["name"]
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]
        for mount in container.get("volumeMounts", [])
    }
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in dropped - still_used]
    if not spec["volumes"]:
        del spec["volumes"]


def _rename_empty_dirs(spec: dict[str, Any], suffix: str) -> list[str]:
    renamed = {}
    for volume in spec.get("volumes", []):
        if "emptyDir" in volume:
            renamed[volume["name"]] = f"{volume['name']}-{suffix}"
            volume["name"] = renamed[volume["name"]]
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
    return list(renamed.values())


def _emulate_native_sidecars(spec: dict[str, Any]) -> list[str]:
    """Move initContainers with restartPolicy Always to the front of containers; their names."""
    native = [container for container in spec.get("initContainers", []) if container.get("restartPolicy") == "Always"]
    if not native:
        return []
    spec["initContainers"] = [container for container in spec["initContainers"] if container not in native]
    if not spec["initContainers"]:
        del spec["initContainers"]
    for container in native:
        del container["restartPolicy"]
    spec["containers"] = [*native, *spec["containers"]]
    return [container["name"] for container in native]


def adapt_for_podman(
    documents: list[dict[str, Any]],
    suffix: str,
    *,
    image: str = IMAGE,
    env: Mapping[str, Mapping[str, str]] | None = None,
    start_delay: Mapping[str, float] | None = None,
    native_sidecars: str = "emulate",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pods Podman 4.3 plays like a kubelet, and what play() needs to know about them.

    Returns (pods, facts) where facts has 'pods' {manifest name: podman name},
    'containers' {manifest pod name: [container names]}, 'volumes' [podman volume names],
    'sysctls' {name: value} of every pod, 'sidecars' {manifest pod name: [native sidecars
    played as containers]} and 'grace' {manifest pod name: terminationGracePeriodSeconds}.
    """
    if native_sidecars not in ("emulate", "as-is"):
        raise ValueError(f"native_sidecars is 'emulate' or 'as-is', not {native_sidecars!r}")
    pods: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"pods": {}, "containers": {}, "volumes": [], "sysctls": {}, "sidecars": {}, "grace": {}}
    for document in documents:
        pod = pod_of(document)
        if pod is None:
            continue
        original = pod["metadata"]["name"]
        pod["metadata"]["name"] = f"{original}-{suffix}"
        spec = pod["spec"]
        for sysctl in spec.get("securityContext", {}).get("sysctls", []):
            facts["sysctls"][sysctl["name"]] = str(sysctl["value"])
        _without_memory_shm(spec)
        if native_sidecars == "emulate" and (sidecars := _emulate_native_sidecars(spec)):
            facts["sidecars"][original] = sidecars
        facts["grace"][original] = float(spec.get("terminationGracePeriodSeconds", 30))
        facts["volumes"] += _rename_empty_dirs(spec, suffix)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            if container.get("image") == DEFAULT_IMAGE_IN_MANIFESTS:
                container["image"] = image
            for pattern, overrides in (env or {}).items():
                if _container_matches(pattern, original, container["name"]):
                    _apply_env(container, overrides)
            for pattern, seconds in (start_delay or {}).items():
                if _container_matches(pattern, original, container["name"]):
                    _apply_start_delay(container, seconds)
        facts["pods"][original] = pod["metadata"]["name"]
        facts["containers"][original] = [container["name"] for container in spec["containers"]]
        pods.append(pod)
    if not pods:
        raise ValueError("the manifest holds no Pod or Job")
    return pods, facts


def containers_conf_with_sysctls(sysctls: Mapping[str, str]) -> str:
    """The system's containers.conf plus `default_sysctls` (how Podman < 4.5 gets pod sysctls)."""
    system = SYSTEM_CONTAINERS_CONF.read_text() if SYSTEM_CONTAINERS_CONF.exists() else ""
    line = "default_sysctls = [" + ", ".join(json.dumps(f"{k}={v}") for k, v in sysctls.items()) + "]"
    lines = [existing for existing in system.splitlines() if not existing.strip().startswith("default_sysctls")]
    if "[containers]" in (stripped := [existing.strip() for existing in lines]):
        at = stripped.index("[containers]") + 1
        lines[at:at] = [line]
    else:
        lines = ["[containers]", line, *lines]
    return "\n".join(lines) + "\n"


def _remove(facts: dict[str, Any], env: Mapping[str, str] | None) -> None:
    for name in facts["pods"].values():
        podman("pod", "rm", "--force", "--time", "0", name, check=False, env=env)
    for volume in facts["volumes"]:
        podman("volume", "rm", "--force", volume, check=False, env=env)


@atexit.register
def _remove_unremoved() -> None:
    for key, facts in list(_UNREMOVED.items()):
        _remove(facts, None)
        _UNREMOVED.pop(key, None)


@contextmanager
def play(
    manifest_path: str | os.PathLike[str],
    replacements: Mapping[str, str] | None = None,
    *,
    env: Mapping[str, Mapping[str, str]] | None = None,
    start_delay: Mapping[str, float] | None = None,
    image: str = IMAGE,
    native_sidecars: str = "emulate",
) -> Iterator[PlayedPods]:
    """Play a manifest's pods with `podman kube play`; always remove them (and their volumes) afterwards."""
    manifest = Path(manifest_path)
    if not manifest.is_absolute():
        manifest = REPO_ROOT / manifest
    suffix = uuid.uuid4().hex[:6]
    pods, facts = adapt_for_podman(
        load_manifest(manifest, replacements),
        suffix,
        image=image,
        env=env,
        start_delay=start_delay,
        native_sidecars=native_sidecars,
    )
    with tempfile.TemporaryDirectory(prefix="podipc-play-") as workdir:
        played = Path(workdir) / manifest.name
        played.write_text(yaml.safe_dump_all(pods, sort_keys=False))
        podman_env: dict[str, str] | None = None
        if facts["sysctls"]:
            conf = Path(workdir) / "containers.conf"
            conf.write_text(containers_conf_with_sysctls(facts["sysctls"]))
            podman_env = {"CONTAINERS_CONF": str(conf)}
        _UNREMOVED[suffix] = facts
        try:
            podman("kube", "play", str(played), env=podman_env)
            yield PlayedPods(
                manifest, facts["pods"], facts["containers"], facts["volumes"], facts["sidecars"], facts["grace"]
            )
        finally:
            _remove(facts, podman_env)
            _UNREMOVED.pop(suffix, None)


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.e2e.pods MANIFEST...`: play each manifest, print every container's exit code and log."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.e2e.pods", description=main.__doc__)
    parser.add_argument("manifests", nargs="+", help="manifest files (Pods, or a Job)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each container")
    args = parser.parse_args(argv)
    failed = 0
    for manifest in args.manifests:
        with play(manifest) as pods:
            for pod, names in pods.containers.items():
                for short in names:
                    code = pods.wait(f"{pod}/{short}", args.timeout)
                    failed += code != 0
                    print(f"=== {manifest}: {pod}/{short} exited {code}\n{pods.logs(f'{pod}/{short}')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
