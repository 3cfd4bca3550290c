"""Judge every channel on this container: usable or not, largest message here, and the fix.

The transports' descriptors (podipc.transport) say what each channel needs, where its
limit comes from and how to fix each way it can be unusable; doctor adds what only the
pod as a whole shows (a missing or tiny /dev/shm, no shared volume, a socket path too
long) and turns each problem into the change to make in the pod's manifest.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

from podipc.address import UNIX_PATH_MAX, parse_address
from podipc.doctor.facts import MQUEUE_DIRECTORY, SYSV_DIRECTORY, Facts, Limits, Mount
from podipc.errors import AddressError, ChannelUnavailable
from podipc.proc import read_int
from podipc.transport import DEV_SHM_FIX, AddressForm, Capability, Transport, find_transport, schemes, transport_for

VOLUME_FIX = "mount one emptyDir volume in both containers and put the path on it"
BUG_FIX = "report it as a podipc bug"


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


def channel_claims(transport: Transport) -> tuple[str | None, int | None, str]:
    """What the transport says about itself here: (problem or None, its max message here, fix); never raises."""
    requirement = transport.missing_requirement()
    if requirement is not None:
        return requirement.reason(), None, requirement.install_hint()
    try:
        reason = transport.availability()
        limit = int(transport.limit.host_default())
    except ChannelUnavailable as exc:
        return str(exc), None, ""
    except Exception as exc:  # a broken transport must not break the doctor: report it
        return f"{transport.name} availability check failed: {type(exc).__name__}: {exc}", None, BUG_FIX
    return (None if reason is None else str(reason)), limit, ""


def sysctl_value(limits: Limits, path: str) -> int | None:
    """A /proc/sys value as the facts recorded it (read now when the facts do not hold it); None when missing."""
    directory, name = os.path.split(path)
    recorded = {MQUEUE_DIRECTORY: limits.mqueue, SYSV_DIRECTORY: limits.sysv}.get(directory)
    if recorded is not None and name in recorded:
        return recorded[name]
    return read_int(path)


def rlimit_value(limits: Limits, name: str) -> int | None:
    """A resource limit's soft value as the facts recorded it (read now when they do not); None: unlimited."""
    if name == "RLIMIT_MSGQUEUE":
        return limits.rlimit_msgqueue
    allowed, _ = resource.getrlimit(getattr(resource, name))
    return None if allowed == resource.RLIM_INFINITY else allowed


def pod_problems(transport: Transport, facts: Facts) -> tuple[str, str]:
    """A problem the pod's shape causes for a transport, and its fix ('', '' when none)."""
    dev_shm = facts.dev_shm
    if transport.needs_dev_shm:
        if dev_shm is None:
            return "/dev/shm is missing (needed for shared memory and presence files)", DEV_SHM_FIX
        if dev_shm.read_only or not os.access(dev_shm.path, os.W_OK):
            return "/dev/shm is not writable", f"make /dev/shm writable: {DEV_SHM_FIX}"
    kernel = transport.kernel
    if kernel is not None and sysctl_value(facts.limits, kernel.sysctl) is None:
        return kernel.reason(), kernel.fix()
    for limit in transport.resource_limits:
        problem = limit.problem(rlimit_value(facts.limits, limit.resource))
        if problem is not None:
            return problem, limit.fix
    return "", ""


def channel_notes(transport: Transport, scheme: str, facts: Facts, limit: int | None) -> list[str]:
    """Advice for a usable channel: slow or small /dev/shm, no shared volume for path channels."""
    notes = []
    dev_shm = facts.dev_shm
    if transport.has(Capability.DATA_IN_DEV_SHM) and dev_shm is not None:
        if not dev_shm.memory_backed:
            notes.append(f"/dev/shm is {dev_shm.fstype}, not memory: {DEV_SHM_FIX}")
        if limit is not None and dev_shm.free is not None and dev_shm.free < limit:
            notes.append(f"/dev/shm has {dev_shm.free} bytes free, less than one {limit}-byte message: {DEV_SHM_FIX}")
    form = transport.schemes[scheme]
    if form.names_path and not any(not mount.read_only for mount in facts.volumes):
        alternative = (
            f" (or {scheme}://@name: abstract sockets are shared with the pod's network)"
            if form is AddressForm.SOCKET_PATH_OR_ABSTRACT
            else ""
        )
        notes.append(f"no writable volume here for a path both containers see: {VOLUME_FIX}{alternative}")
    return notes


def judge_channel(scheme: str, facts: Facts) -> ChannelVerdict:
    """Usable or not, largest message here and the fix, for one scheme."""
    transport = transport_for(scheme)
    reason, limit, fix = channel_claims(transport)
    pod_reason, pod_fix = pod_problems(transport, facts)
    if reason is None and pod_reason:
        reason, fix = pod_reason, pod_fix
    elif reason is not None and pod_fix and not fix:
        fix = pod_fix
    if reason is not None and not fix:
        fix = transport.unusable_fix
    usable = reason is None
    if transport.has(Capability.DATA_IN_DEV_SHM) and usable and limit is not None and facts.dev_shm is not None:
        limit = min(limit, facts.dev_shm.size or limit)
    return ChannelVerdict(
        scheme=scheme,
        usable=usable,
        max_message_size=limit if usable else None,
        limit_source=transport.limit.source,
        reason=reason or "",
        fix="" if usable else fix,
        raise_limit=transport.limit.fix,
        notes=channel_notes(transport, scheme, facts, limit) if usable else [],
    )


def judge_channels(facts: Facts) -> list[ChannelVerdict]:
    """A verdict for every scheme podipc knows, in the transports' listing order."""
    return [judge_channel(scheme, facts) for scheme in schemes()]


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
        if _names_socket_file(url) and "shorter" not in str(exc):
            problems.append(f"use a shorter socket path (at most {UNIX_PATH_MAX} bytes)")
        return UrlCheck(url, False, problems)
    problems = []
    verdict = next(verdict for verdict in verdicts if verdict.scheme == address.scheme)
    if not verdict.usable:
        problems.append(f"{address.scheme}:// is not usable here: {verdict.reason}; fix: {verdict.fix}")
    form = _form_of(address.scheme)
    if form is not None and form.names_path and address.path:
        problems.extend(path_problems(form, address.path, facts))
    if form is AddressForm.HOST_PORT and address.host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(f"{address.host} is not loopback: the pod's containers share 127.0.0.1")
    return UrlCheck(url, not problems, problems)


def _form_of(scheme: str) -> AddressForm | None:
    transport = find_transport(scheme)
    return None if transport is None else transport.schemes[scheme]


def _names_socket_file(url: str) -> bool:
    form = _form_of(url.split("://", 1)[0].lower()) if "://" in url else None
    return form is not None and form.names_socket_file


def path_problems(form: AddressForm, path: str, facts: Facts) -> list[str]:
    """Why a socket or spool path will not work between two containers ([] when it will)."""
    problems = []
    directory = os.path.dirname(path) if form.names_socket_file else path
    if form.names_socket_file and len(path.encode()) > UNIX_PATH_MAX:
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
            failures.append(f"{scheme}: not a podipc scheme (known: {', '.join(schemes())})")
        elif not verdict.usable:
            failures.append(f"{scheme}: {verdict.reason}; fix: {verdict.fix}")
        for check in urls:
            if not check.ok and check.url.split("://", 1)[0].lower() == scheme:
                failures.append(f"{check.url}: {'; '.join(check.problems)}")
    return failures
