"""Gather what this container sees: namespaces, /dev/shm and volumes, IPC limits, identity.

Everything here is read from /proc, the mount table and the standard library,
so it works inside a container where `lsns`, `docker inspect` or the kubelet are out of reach.
Namespace ids are the inode numbers of /proc/self/ns/*; they are comparable between the
containers of one host, which is what makes a peer comparison possible.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from podipc.address import UNIX_PATH_MAX
from podipc.proc import read_int

NAMESPACES = ("net", "ipc", "uts", "pid", "mnt", "cgroup", "user")
DEV_SHM = "/dev/shm"
MOUNTINFO = "/proc/self/mountinfo"
PROC_STATUS = "/proc/self/status"
MQUEUE_SYSCTLS = ("msg_max", "msgsize_max", "queues_max")
MQUEUE_DIRECTORY = "/proc/sys/fs/mqueue"
SYSV_SYSCTLS = ("msgmax", "msgmnb", "msgmni", "shmmax", "shmall", "shmmni")
SYSV_DIRECTORY = "/proc/sys/kernel"
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})

# Mounts every container has; what is left in the mount table are volumes (emptyDir, hostPath, PVCs).
SYSTEM_FILESYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "devtmpfs", "mqueue", "securityfs", "debugfs",
    "tracefs", "bpf", "pstore", "fusectl", "configfs", "binfmt_misc", "autofs", "hugetlbfs", "nsfs",
    "overlay", "selinuxfs", "efivarfs",
})  # fmt: skip
SYSTEM_MOUNT_POINTS = frozenset({"/", "/dev/shm", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"})
SYSTEM_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/run/secrets", "/var/run/secrets", "/run/.containerenv")

# Capability numbers from linux/capability.h; bits above this table are shown as CAP_<n>.
CAPABILITY_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip

NAMESPACE_LINK = re.compile(r"^[a-z_]+:\[(\d+)\]$")
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One mounted filesystem as the mount table and statvfs show it; sizes in bytes."""

    path: str
    fstype: str
    source: str
    device: str
    """major:minor of the filesystem; tmpfs instances get a unique one per host, so it identifies a volume."""
    root: str
    """The directory of the filesystem mounted here (bind mounts of one volume share device and root)."""
    read_only: bool
    memory_backed: bool
    size: int | None
    free: int | None

    @property
    def identity(self) -> str:
        """What two containers compare to know they see the same volume."""
        return f"{self.device}{self.root}"


@dataclass(frozen=True)
class Identity:
    """Who this process is: ids, groups, umask and effective capabilities."""

    uid: int
    gid: int
    groups: list[int]
    umask: str
    capabilities: list[str]


@dataclass(frozen=True)
class Limits:
    """The kernel limits that decide how large a message each IPC facility carries here."""

    mqueue: dict[str, int | None]
    """fs.mqueue.* sysctls (msg_max, msgsize_max, queues_max) of this IPC namespace."""
    rlimit_msgqueue: int | None
    """RLIMIT_MSGQUEUE soft limit: bytes of POSIX queues one user may hold (None: unlimited)."""
    sysv: dict[str, int | None]
    """kernel.msg* and kernel.shm* sysctls of this IPC namespace."""
    unix_path_max: int = UNIX_PATH_MAX


@dataclass(frozen=True)
class Facts:
    """Everything doctor knows about this container, before judging channels."""

    hostname: str
    namespaces: dict[str, int | None]
    dev_shm: Mount | None
    volumes: list[Mount]
    limits: Limits
    identity: Identity
    problems: list[str] = field(default_factory=list)
    """What could not be read, and why (doctor reports rather than fails)."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the `facts` part of the documented schema)."""
        return asdict(self)


def namespace_id(kind: str, pid: str = "self") -> int | None:
    """The inode number of one namespace of a process (None when it cannot be read)."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    match = NAMESPACE_LINK.match(link)
    return int(match.group(1)) if match else None


def namespace_ids(pid: str = "self") -> dict[str, int | None]:
    """Inode numbers of every namespace of a process, by kind."""
    return {kind: namespace_id(kind, pid) for kind in NAMESPACES}


def unescape_mount_field(text: str) -> str:
    """Undo the octal escapes (space as \\040) of a mountinfo field."""
    return OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


def parse_mountinfo(text: str) -> dict[str, dict[str, str]]:
    """Mount points of a mountinfo text, the topmost mount of each: device, root, fstype, source, options."""
    mounts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 6 or len(tail) < 2:
            continue
        path = unescape_mount_field(fields[4])
        mounts[path] = {
            "device": fields[2],
            "root": unescape_mount_field(fields[3]),
            "options": fields[5],
            "fstype": tail[0],
            "source": unescape_mount_field(tail[1]),
        }
    return mounts


def is_volume(path: str, entry: dict[str, str]) -> bool:
    """True for a mount a pod spec put there (emptyDir, hostPath, PVC), not one every container has."""
    if path in SYSTEM_MOUNT_POINTS or entry["fstype"] in SYSTEM_FILESYSTEMS:
        return False
    if any(path == prefix or path.startswith(prefix + "/") for prefix in SYSTEM_MOUNT_PREFIXES):
        return False
    return os.path.isdir(path)


def describe_mount(path: str, entry: dict[str, str]) -> Mount:
    """A Mount from its mountinfo entry plus its size and free space."""
    try:
        usage = shutil.disk_usage(path)
        size: int | None = int(usage.total)
        free: int | None = int(usage.free)
    except OSError:
        size = free = None
    return Mount(
        path=path,
        fstype=entry["fstype"],
        source=entry["source"],
        device=entry["device"],
        root=entry["root"],
        read_only="ro" in entry["options"].split(","),
        memory_backed=entry["fstype"] in MEMORY_FILESYSTEMS,
        size=size,
        free=free,
    )


def read_limits() -> Limits:
    """POSIX queue, SysV and socket path limits of this IPC namespace and user."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    return Limits(
        mqueue={name: read_int(f"{MQUEUE_DIRECTORY}/{name}") for name in MQUEUE_SYSCTLS},
        rlimit_msgqueue=None if soft == resource.RLIM_INFINITY else soft,
        sysv={name: read_int(f"{SYSV_DIRECTORY}/{name}") for name in SYSV_SYSCTLS},
    )


def decode_capabilities(mask: int) -> list[str]:
    """Capability names of a CapEff bit mask, lowest bit first."""
    names = []
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            names.append(CAPABILITY_NAMES[bit] if bit < len(CAPABILITY_NAMES) else f"CAP_{bit}")
    return names


def proc_status_field(name: str) -> str | None:
    """One field of /proc/self/status (e.g. 'CapEff', 'Umask'), None when absent."""
    try:
        with open(PROC_STATUS, encoding="ascii") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        return None
    return None


def read_identity() -> Identity:
    """Effective uid/gid, supplementary groups, umask and effective capabilities of this process."""
    umask = proc_status_field("Umask")
    if umask is None:  # kernels before 4.7 lack the field; setting and restoring is the only other way
        current = os.umask(0o022)
        os.umask(current)
        umask = f"{current:04o}"
    capabilities = proc_status_field("CapEff")
    return Identity(
        uid=os.geteuid(),
        gid=os.getegid(),
        groups=sorted(os.getgroups()),
        umask=umask,
        capabilities=decode_capabilities(int(capabilities, 16)) if capabilities else [],
    )


def read_mounts(problems: list[str]) -> tuple[Mount | None, list[Mount]]:
    """The /dev/shm mount and the volume mounts of this container."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as file:
            table = parse_mountinfo(file.read())
    except OSError as exc:
        problems.append(f"cannot read {MOUNTINFO}: {exc.strerror}")
        return None, []
    dev_shm = describe_mount(DEV_SHM, table[DEV_SHM]) if DEV_SHM in table else None
    volumes = [describe_mount(path, entry) for path, entry in sorted(table.items()) if is_volume(path, entry)]
    return dev_shm, volumes


def gather_facts() -> Facts:
    """Read everything doctor reports about this container."""
    problems: list[str] = []
    namespaces = namespace_ids()
    unreadable = [kind for kind, inode in namespaces.items() if inode is None]
    if unreadable:
        problems.append(f"cannot read /proc/self/ns/{{{','.join(unreadable)}}}")
    dev_shm, volumes = read_mounts(problems)
    if dev_shm is None:
        problems.append(f"{DEV_SHM} is not a mount point here")
    return Facts(
        hostname=socket.gethostname(),
        namespaces=namespaces,
        dev_shm=dev_shm,
        volumes=volumes,
        limits=read_limits(),
        identity=read_identity(),
        problems=problems,
    )
