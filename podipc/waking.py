"""The waker of an endpoint and the one poll wait every blocking call uses.

A Waker is an eventfd: `wake()` may be called from any thread, a signal handler or an
event-loop callback (one write(2), nothing else), and makes the eventfd readable for
good: a waker is only woken when the endpoint closes, and never drained, so no waiter on
another thread or event loop can miss it. A blocked call polls its readiness descriptor together with the waker, so a
close() elsewhere ends the wait at once.

`wait_for` uses select.poll: when a signal arrives, Python runs its handler and, unless
the handler raised, retries the poll with the time left (PEP 475), so a handler that only
sets a flag never disturbs a blocked call, and one that raises gets through promptly.
"""

from __future__ import annotations

import contextlib
import os
import select

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
_WAKE = (1).to_bytes(8, "little")


class Waker:
    """An eventfd that wakes whoever polls it; safe to wake from any thread or a signal handler."""

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        """The eventfd (readable while woken; -1 once closed)."""
        return self._fd

    def wake(self) -> None:
        """Make the eventfd readable (async-signal-safe: one write)."""
        fd = self._fd
        if fd >= 0:
            with contextlib.suppress(OSError):  # the counter cannot overflow in practice; EAGAIN is harmless
                os.write(fd, _WAKE)

    def close(self) -> None:
        """Close the eventfd. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # the endpoint keeps its waker for its whole life (a closer on another thread may still wake it),
        # so the eventfd goes with the endpoint; without this every endpoint that ever waited leaked one
        self.close()


def wait_for(fd: int, events: int, waker_fd: int, seconds: float | None) -> bool:
    """Wait until `fd` has one of `events`, the waker is woken, or `seconds` pass (None: no limit).

    Returns True when `fd` (or the waker) became ready, False when the time ran out.
    `fd` may be -1 (wait on the waker and the clock only).
    """
    poller = select.poll()
    if fd >= 0:
        poller.register(fd, events)
    if waker_fd >= 0:
        poller.register(waker_fd, POLLIN)
    if seconds is None:
        return bool(poller.poll())
    # round up: a wait that ends a hair early would only loop once more
    return bool(poller.poll(max(0, int(seconds * 1000 + 0.999))))


def is_ready(fd: int, events: int) -> bool:
    """True when `fd` has one of `events` right now (never waits)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))
