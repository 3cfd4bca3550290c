"""CPU time of chosen threads of this process, for tests that prove a wait burns no CPU.

RUSAGE_SELF counts every thread of the pytest process, so a thread another test left
behind would be charged to the endpoint under test; these count only the threads named.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable


def cpu_seconds(threads: Iterable[threading.Thread]) -> float:
    """CPU seconds (user + system) the given threads used so far; a thread that is not running counts 0."""
    total = 0.0
    for thread in threads:
        ident = thread.ident
        if ident is None or not thread.is_alive():
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:  # it ended meanwhile
            continue
    return total


def started_since(before: Iterable[threading.Thread]) -> list[threading.Thread]:
    """The threads running now that were not in `before` (a threading.enumerate() taken earlier)."""
    earlier = set(before)
    return [thread for thread in threading.enumerate() if thread not in earlier]


def named(name: str) -> list[threading.Thread]:
    """The running threads called `name` (podipc names its library threads, e.g. podipc-flusher)."""
    return [thread for thread in threading.enumerate() if thread.name == name]
