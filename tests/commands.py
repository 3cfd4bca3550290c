"""The commands the tests run, found from the interpreter running the tests, never from PATH.

The suite must pass where the README says it does: a fresh machine with no activated
venv and no podipc on PATH. So every test starts podipc as `sys.executable -m podipc`,
and every tool installed with the test extras from the interpreter's own bin directory.
System commands (podman, capsh, unshare...) come from Debian's packages: they are looked
up on PATH and in the system directories, since a normal user's PATH lacks /usr/sbin.

A test that needs a tool that is missing skips naming what installs it; under CI=true
tests/conftest.py turns that skip into a failure (only tests marked `optional` may skip).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

PODIPC: list[str] = [sys.executable, "-m", "podipc"]
"""argv prefix that runs this checkout's podipc CLI with the interpreter running the tests."""

BIN_DIRECTORY = os.path.dirname(sys.executable)
SYSTEM_DIRECTORIES = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def tool(name: str) -> str:
    """The path of a console script installed beside the running interpreter (e.g. kubernetes-validate)."""
    return os.path.join(BIN_DIRECTORY, name)


def system_tool(name: str) -> str | None:
    """The path of a system command (podman, capsh, unshare...) on PATH or in the system directories; None if missing."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_DIRECTORIES]))


def needs_tool(name: str) -> str:
    """The path of a console script of the test extras; skip (a failure under CI) when it is not installed."""
    path = tool(name)
    if not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not installed beside {sys.executable}: run bash scripts/setup.sh")
    return path


def needs_system_tool(name: str, package: str) -> str:
    """The path of a system command; skip (a failure under CI) naming the Debian package when it is missing."""
    path = system_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; bash scripts/setup.sh installs it)")
    return path
