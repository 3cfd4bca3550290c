"""Fixtures of the pytest-benchmark suite: unique channel URLs for in-process round trips."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from podipc.transport import transport_for

NAMES = itertools.count()
SOCKET_KINDS = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


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
    return transport_for(scheme).fresh_url(
        scheme, unique, lambda: f"{directory}/{next(NAMES)}", lambda protocol: free_port(SOCKET_KINDS[protocol])
    )
