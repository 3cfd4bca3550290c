"""The other processes of a bench cell: each runs a snippet of Python, says it is ready, takes its orders on stdin
and reports on stdout (the fan-in cells' producers, the pattern peer cells' producers and consumers)."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from typing import IO

HELPER_READY = "ready"
"""The line a helper writes once it has opened its end."""
HELPER_START_SECONDS = 30.0
"""How long a helper may take to start (import podipc, open its end) before the cell fails."""
HELPER_EXIT_SECONDS = 10.0


class HelperProcess:
    """Another process of a cell, running `code` with `arguments` (its sys.argv[1:]), driven over its stdin and stdout."""

    def __init__(self, name: str, code: str, *arguments: str, exit_seconds: float = HELPER_EXIT_SECONDS) -> None:
        self.name = name
        self.exit_seconds = exit_seconds
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.orders: IO[str] = self.process.stdin
        self.reports: IO[str] = self.process.stdout

    def wait_ready(self) -> None:
        """Return once it has opened its end; RuntimeError when it did not within HELPER_START_SECONDS."""
        line = self._line(HELPER_START_SECONDS)
        if line != HELPER_READY:
            raise RuntimeError(f"helper process {self.name} did not start (said {line!r}; see its stderr)")

    def order(self, line: str) -> None:
        """Send it one line of orders."""
        self.orders.write(line + "\n")
        self.orders.flush()

    def report(self) -> list[str]:
        """The fields of its last line once it has ended; RuntimeError when it failed."""
        line = self._line(self.exit_seconds)
        self.finish()
        if not line or self.process.returncode != 0:
            raise RuntimeError(
                f"helper process {self.name} exited with {self.process.returncode} without a report (see its stderr)"
            )
        return line.split()

    def _line(self, seconds: float) -> str:
        readable, _, _ = select.select([self.reports], [], [], seconds)
        return self.reports.readline().strip() if readable else ""

    def kill(self) -> None:
        """Kill it at once (a failed cell does not wait for its stream) and free its pipes."""
        self.process.kill()
        self.finish()

    def finish(self) -> None:
        """Close its orders (it leaves without its part if it had none) and wait for it; kill it after a while."""
        if not self.orders.closed:
            with contextlib.suppress(BrokenPipeError):
                self.orders.close()
        try:
            self.process.wait(self.exit_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reports.close()


def kill_all(helpers: list[HelperProcess]) -> None:
    """Kill every helper (after a failure)."""
    for helper in helpers:
        with contextlib.suppress(Exception):
            helper.kill()
