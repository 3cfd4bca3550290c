"""Fixtures of the pytest-benchmark suite: unique channel URLs for in-process round trips."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

NAMES = itertools.count()


def free_port(kind: int) -> int:
    """A loopback port free right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def short_directory() -> Iterator[str]:
    """A fresh directory with a short path (Unix socket paths hold at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="pbb", dir="/tmp") as directory:
        yield directory


def channel_url(scheme: str, directory: str) -> str:
    """A fresh URL of a scheme, unique in this run."""
    unique = f"podipc-benchmarks-{os.getpid()}-{next(NAMES)}"
    if scheme in ("tcp", "zmq+tcp"):
        return f"{scheme}://127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    if scheme == "udp":
        return f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    if scheme in ("unix", "zmq+ipc"):
        return f"{scheme}://{directory}/{next(NAMES)}.sock"
    if scheme == "file":
        return f"file://{directory}/spool"
    if scheme == "sysvmq":
        return f"sysvmq://{unique}"
    return f"{scheme}:///{unique}"
