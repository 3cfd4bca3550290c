"""Judge every channel on this container: usable or not, largest message here, and the fix.

The channel modules say what they know (`availability()`, `host_max_message_size()`);
doctor adds what only the pod as a whole shows (a missing or tiny /dev/shm, no shared
volume, a socket path too long) and turns each problem into the change to make in the
pod's manifest.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType

from podipc.address import NETWORK_SCHEMES, PATH_SCHEMES, SCHEMES, UNIX_PATH_MAX, parse_address
from podipc.channel import DEPENDENCY_OF_MODULE, REGISTRY
from podipc.doctor.facts import Facts, Mount
from podipc.errors import AddressError, ChannelUnavailable

SHM_FIX = "mount an emptyDir with medium: Memory at /dev/shm and a sizeLimit (e.g. 256Mi) in every container"
VOLUME_FIX = "mount one emptyDir volume in both containers and put the path on it"
MQUEUE_FIX = (
    "set fs.mqueue.msgsize_max (and msg_max) in the pod's securityContext.sysctls; the kubelet must allow "
    "them (--allowed-unsafe-sysctls='fs.mqueue.*'); or use shm://"
)
SYSV_FIX = (
    "set kernel.msgmax and kernel.msgmnb in the pod's securityContext.sysctls; the kubelet must allow them "
    "(--allowed-unsafe-sysctls='kernel.msg*'); or use shm://"
)
RLIMIT_FIX = (
    "raise the runtime's default ulimit msgqueue (podman --ulimit msgqueue=N, containerd/CRI-O default_ulimits), "
    "or open queues with a smaller depth"
)
PRESENCE_SCHEMES = frozenset({"mq", "sysvmq", "shm", "zmq+tcp", "zmq+ipc"})
"""Channels that need presence files in /dev/shm to tell a dead peer (podipc.presence)."""
VOLUME_SCHEMES = frozenset({"file", "zmq+ipc", "unix"})

LIMIT_SOURCES = {
    "mq": ("/proc/sys/fs/mqueue/msgsize_max", MQUEUE_FIX),
    "sysvmq": ("/proc/sys/kernel/msgmax", SYSV_FIX),
    "shm": (
        "half the default ring (capacity option)",
        f"raise the capacity option (or max_message_size) on both sides; the ring lives in /dev/shm: {SHM_FIX}",
    ),
    "udp": ("one UDP datagram", "use tcp:// for larger messages"),
}
UNUSABLE_FIXES = {
    "shm": f"{SHM_FIX}; or open both sides with a smaller capacity= that fits /dev/shm",
    "mq": f"{MQUEUE_FIX}; check fs.mqueue.queues_max and RLIMIT_MSGQUEUE against the queues in use",
    "sysvmq": f"{SYSV_FIX}; check kernel.msgmni against the queues in use",
}
"""The fix when a channel module reports a problem doctor has no more specific fix for."""
DEFAULT_LIMIT = ("the channel's max_message_size option", "raise the max_message_size option on both sides")


@dataclass(frozen=True)
class ChannelVerdict:
    """What one channel can do in this container."""

    scheme: str
    usable: bool
    max_message_size: int | None
    """Largest message in bytes it carries here with default options (None: unknown or unusable)."""
    limit_source: str
    reason: str
    """Why not usable, as the channel module or doctor found it ('' when usable)."""
    fix: str
    """The change that makes it usable ('' when usable)."""
    raise_limit: str
    """How to carry larger messages than max_message_size."""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UrlCheck:
    """One configured channel URL (--url or PODIPC_URL) checked against this container."""

    url: str
    ok: bool
    problems: list[str]


def load_channel_module(scheme: str) -> tuple[ModuleType | None, str, str]:
    """Import a scheme's module: (module, '', '') or (None, why not, fix); never raises."""
    module_name = REGISTRY[scheme][0]
    try:
        return importlib.import_module(module_name), "", ""
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.split(".")[0] in DEPENDENCY_OF_MODULE:
            package = DEPENDENCY_OF_MODULE[missing.split(".")[0]]
            return None, f"the Python package {package!r} is missing", f"pip install {package}"
        if missing == module_name or module_name.startswith(missing + "."):
            return None, f"{module_name} is not in this build of podipc", "install a podipc release that has it"
        return None, f"{module_name} needs {missing!r}, which is missing", f"pip install {missing}"
    except Exception as exc:  # a broken channel module must not break the doctor
        return None, f"{module_name} failed to import: {type(exc).__name__}: {exc}", "report it as a podipc bug"


def channel_claims(scheme: str) -> tuple[str | None, int | None, str]:
    """What the channel module says: (problem or None, its max message here, fix); never raises."""
    module, problem, fix = load_channel_module(scheme)
    if module is None:
        return problem, None, fix
    try:
        reason = module.availability()
        limit = int(module.host_max_message_size())
    except ChannelUnavailable as exc:
        return str(exc), None, ""
    except Exception as exc:  # same: report, do not crash
        return f"{scheme}:// availability check failed: {type(exc).__name__}: {exc}", None, "report it as a podipc bug"
    return (None if reason is None else str(reason)), limit, ""


def pod_problems(scheme: str, facts: Facts) -> tuple[str, str]:
    """A problem the pod's shape causes for a channel, and its fix ('', '' when none)."""
    dev_shm = facts.dev_shm
    if scheme in PRESENCE_SCHEMES or scheme == "shm":
        if dev_shm is None:
            return "/dev/shm is missing (needed for shared memory and presence files)", SHM_FIX
        if dev_shm.read_only or not os.access(dev_shm.path, os.W_OK):
            return "/dev/shm is not writable", f"make /dev/shm writable: {SHM_FIX}"
    limits = facts.limits
    if scheme == "mq" and limits.mqueue["msgsize_max"] is None:
        return "no POSIX message queues here (/proc/sys/fs/mqueue is missing)", "use a kernel with CONFIG_POSIX_MQUEUE"
    if scheme == "mq" and limits.rlimit_msgqueue is not None:
        depth, size = limits.mqueue["msg_max"] or 1, limits.mqueue["msgsize_max"] or 0
        if limits.rlimit_msgqueue < depth * size:
            return (
                f"RLIMIT_MSGQUEUE {limits.rlimit_msgqueue} bytes < one full queue ({depth} x {size} bytes)",
                RLIMIT_FIX,
            )
    if scheme == "sysvmq" and limits.sysv["msgmax"] is None:
        return "no SysV message queues here (/proc/sys/kernel/msgmax is missing)", "use a kernel with CONFIG_SYSVIPC"
    return "", ""


def channel_notes(scheme: str, facts: Facts, limit: int | None) -> list[str]:
    """Advice for a usable channel: slow or small /dev/shm, no shared volume for path channels."""
    notes = []
    dev_shm = facts.dev_shm
    if scheme == "shm" and dev_shm is not None:
        if not dev_shm.memory_backed:
            notes.append(f"/dev/shm is {dev_shm.fstype}, not memory: {SHM_FIX}")
        if limit is not None and dev_shm.free is not None and dev_shm.free < limit:
            notes.append(f"/dev/shm has {dev_shm.free} bytes free, less than one {limit}-byte message: {SHM_FIX}")
    if scheme in VOLUME_SCHEMES and not any(not mount.read_only for mount in facts.volumes):
        alternative = (
            " (or unix://@name: abstract sockets are shared with the pod's network)" if scheme == "unix" else ""
        )
        notes.append(f"no writable volume here for a path both containers see: {VOLUME_FIX}{alternative}")
    return notes


def judge_channel(scheme: str, facts: Facts) -> ChannelVerdict:
    """Usable or not, largest message here and the fix, for one scheme."""
    reason, limit, fix = channel_claims(scheme)
    source, raise_limit = LIMIT_SOURCES.get(scheme, DEFAULT_LIMIT)
    pod_reason, pod_fix = pod_problems(scheme, facts)
    if reason is None and pod_reason:
        reason, fix = pod_reason, pod_fix
    elif reason is not None and pod_fix and not fix:
        fix = pod_fix
    if reason is not None and not fix:
        fix = UNUSABLE_FIXES.get(scheme, "as the reason says (the channel names its fix)")
    usable = reason is None
    if scheme == "shm" and usable and limit is not None and facts.dev_shm is not None and facts.dev_shm.size:
        limit = min(limit, facts.dev_shm.size)
    return ChannelVerdict(
        scheme=scheme,
        usable=usable,
        max_message_size=limit if usable else None,
        limit_source=source,
        reason=reason or "",
        fix="" if usable else fix,
        raise_limit=raise_limit,
        notes=channel_notes(scheme, facts, limit) if usable else [],
    )


def judge_channels(facts: Facts) -> list[ChannelVerdict]:
    """A verdict for every scheme podipc knows, in the registry's order."""
    return [judge_channel(scheme, facts) for scheme in SCHEMES]


def volume_of(path: str, volumes: list[Mount]) -> Mount | None:
    """The volume a path lies on (the longest matching mount point), or None for the container's own disk."""
    best = None
    for mount in volumes:
        if (path == mount.path or path.startswith(mount.path.rstrip("/") + "/")) and (
            best is None or len(mount.path) > len(best.path)
        ):
            best = mount
    return best


def check_url(url: str, facts: Facts, verdicts: list[ChannelVerdict]) -> UrlCheck:
    """Check one configured URL: it parses, its channel works here, its path fits and is shared."""
    try:
        address = parse_address(url)
    except AddressError as exc:
        problems = [str(exc)]
        if ("unix://" in url or "zmq+ipc://" in url) and "shorter" not in str(exc):
            problems.append(f"use a shorter socket path (at most {UNIX_PATH_MAX} bytes)")
        return UrlCheck(url, False, problems)
    problems = []
    verdict = next(verdict for verdict in verdicts if verdict.scheme == address.scheme)
    if not verdict.usable:
        problems.append(f"{address.scheme}:// is not usable here: {verdict.reason}; fix: {verdict.fix}")
    if address.scheme in PATH_SCHEMES and address.path:
        problems.extend(path_problems(address.scheme, address.path, facts))
    if address.scheme in NETWORK_SCHEMES and address.host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(f"{address.host} is not loopback: the pod's containers share 127.0.0.1")
    return UrlCheck(url, not problems, problems)


def path_problems(scheme: str, path: str, facts: Facts) -> list[str]:
    """Why a socket or spool path will not work between two containers ([] when it will)."""
    problems = []
    directory = path if scheme == "file" else os.path.dirname(path)
    if scheme != "file" and len(path.encode()) > UNIX_PATH_MAX:
        problems.append(f"{path} is {len(path.encode())} bytes > {UNIX_PATH_MAX}: use a shorter socket path")
    volume = volume_of(directory, facts.volumes)
    if volume is None and not directory.startswith("/dev/shm"):
        problems.append(f"{directory} is on this container's own filesystem, which the other cannot see: {VOLUME_FIX}")
    elif volume is not None and volume.read_only:
        problems.append(f"{volume.path} is mounted read-only")
    probe = directory
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if probe and not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{probe} is not writable by uid {facts.identity.uid}: set fsGroup or runAsUser")
    return problems


def unmet_requirements(verdicts: list[ChannelVerdict], required: list[str], urls: list[UrlCheck]) -> list[str]:
    """One line per required scheme that cannot work here (also via a failed URL of that scheme)."""
    failures = []
    by_scheme = {verdict.scheme: verdict for verdict in verdicts}
    for scheme in required:
        verdict = by_scheme.get(scheme)
        if verdict is None:
            failures.append(f"{scheme}: not a podipc scheme (known: {', '.join(SCHEMES)})")
        elif not verdict.usable:
            failures.append(f"{scheme}: {verdict.reason}; fix: {verdict.fix}")
        for check in urls:
            if not check.ok and check.url.split("://", 1)[0].lower() == scheme:
                failures.append(f"{check.url}: {'; '.join(check.problems)}")
    return failures
