"""What the stress suites share: the message count, the memory bound, cycling sizes and peak RSS of any process.

COUNT comes from PODIPC_STRESS_COUNT (20,000 by default, so CI stays fast); the full run sets
it to 1,000,000 (see test_stress.py's docstring for the command).
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .harness import peak_rss

COUNT = int(os.environ.get("PODIPC_STRESS_COUNT", "20000"))
"""Messages per test (per pattern and channel)."""
PEAK_MEMORY_LIMIT_KIB = 512 * 1024
"""The most resident memory any one process of a stress test may reach, in KiB."""
REPORT_POLL_SECONDS = 0.5
SIZE_CYCLE = 256
SIZE_STEP = 37


class CyclingSizes:
    """`count` sizes cycling through smallest..255 bytes, without holding a list of them."""

    def __init__(self, count: int, smallest: int = 0) -> None:
        self.count = count
        self.smallest = smallest

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.smallest + (index * SIZE_STEP) % (SIZE_CYCLE - self.smallest)

    def __iter__(self) -> Iterator[int]:
        return (self[index] for index in range(self.count))


def report_peak_rss(peaks: Any, target: Callable[..., object], *args: object) -> None:
    """Run target(*args) in this process, then put (pid, peak RSS in KiB, seconds it ran) on `peaks`, even if it raised.

    Wraps the process functions of the pattern tests, which report what they saw but not their memory.
    """
    started = time.monotonic()
    try:
        target(*args)
    finally:
        peaks.put((os.getpid(), peak_rss(), time.monotonic() - started))


def gather_reports(results: Any, processes: Sequence[Any], count: int, timeout: float) -> list[Any]:
    """`count` reports from `results`, failing at once when one of `processes` exits with an error.

    A process that raised dies without its report: waiting the whole `timeout` for it would
    turn every failure into a hang.
    """
    deadline = time.monotonic() + timeout
    reports: list[Any] = []
    while len(reports) < count:
        try:
            reports.append(results.get(timeout=REPORT_POLL_SECONDS))
            continue
        except queue.Empty:
            pass
        failed = [process for process in processes if process.exitcode not in (None, 0)]
        assert not failed, f"{', '.join(f'{p.name} exited {p.exitcode}' for p in failed)} (its traceback is above)"
        assert time.monotonic() < deadline, f"{len(reports)} of {count} reports within {timeout:g} s"
    return reports


def peak_rss_of(pid: int) -> int:
    """The peak resident memory (VmHWM) of a running process, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise LookupError(f"/proc/{pid}/status has no VmHWM line")


def mib(kib: int) -> str:
    """KiB as whole MiB, for the figure lines."""
    return f"{kib / 1024:.0f} MiB"
