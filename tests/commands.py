"""The commands the tests run, found from the interpreter running the tests, never from PATH.

The suite must pass where the README says it does: a fresh machine with no activated
venv and no podipc on PATH. So every test starts podipc as `sys.executable -m podipc`,
and every tool installed with the test extras from the interpreter's own bin directory.
"""

from __future__ import annotations

import os
import sys

PODIPC: list[str] = [sys.executable, "-m", "podipc"]
"""argv prefix that runs this checkout's podipc CLI with the interpreter running the tests."""

BIN_DIRECTORY = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """The path of a console script installed beside the running interpreter (e.g. kubernetes-validate)."""
    return os.path.join(BIN_DIRECTORY, name)
