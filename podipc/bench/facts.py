"""Facts about where a bench ran: kernel, CPUs, versions, /dev/shm, queue limits, namespaces."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("podipc", "pyzmq", "posix_ipc", "sysv_ipc", "iceoryx2", "faster-fifo", "psutil", "rich", "click")
MQUEUE_LIMITS = ("msg_max", "msgsize_max", "msg_default", "msgsize_default", "queues_max")
SYSV_LIMITS = ("msgmax", "msgmnb", "msgmni")
NAMESPACES = ("ipc", "net", "pid", "mnt", "uts", "user", "cgroup")


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def library_versions() -> dict[str, str | None]:
    """Installed versions of podipc and the libraries the bench compares (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        versions["libzmq"] = None
    return versions


def cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def shm_size() -> dict[str, int] | None:
    """Total and free bytes of /dev/shm."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return {"total_bytes": stats.f_frsize * stats.f_blocks, "free_bytes": stats.f_frsize * stats.f_bavail}


def namespace_ids() -> dict[str, str | None]:
    """The ids of this process's namespaces (/proc/self/ns/*): equal ids mean a shared namespace."""
    ids: dict[str, str | None] = {}
    for name in NAMESPACES:
        try:
            ids[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            ids[name] = None
    return ids


def collect() -> dict[str, Any]:
    """Every fact about this process's host, as a JSON-ready mapping."""
    uname = os.uname()
    load = os.getloadavg()
    return {
        "hostname": socket.gethostname(),
        "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average": [round(value, 2) for value in load],
        "memory_total_bytes": _meminfo_total(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "libraries": library_versions(),
        "dev_shm": shm_size(),
        "mqueue": {name: _int(f"/proc/sys/fs/mqueue/{name}") for name in MQUEUE_LIMITS},
        "sysv_msg": {name: _int(f"/proc/sys/kernel/{name}") for name in SYSV_LIMITS},
        "namespaces": namespace_ids(),
        "pid": os.getpid(),
    }


def _meminfo_total() -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None
