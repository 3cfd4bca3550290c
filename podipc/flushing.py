"""The per-process flusher of coalescing producers: the thread that writes out what a burst left in an outbox.

A coalescing producer (podipc.stream_producer's StreamProducer, udp://'s UDPProducer) keeps
the last messages of a burst in its outbox; this thread writes them once no call is inside
the producer; a consumer of the same process calls `flush_pending` before it blocks, and so
does the interpreter at exit. What the thread expects of a producer: `OutboxOwner`
(podipc.coalescing.CoalescingProducer implements it for both).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import threading
from typing import Protocol

FLUSH_TICK_SECONDS = 0.001
"""How often the flusher thread looks again at a producer it found busy sending."""
FLUSHED, IN_USE, NO_ROOM = range(3)
"""What the flusher's attempt on a producer found: outbox written (or nothing to do), a call inside, no room."""
FLUSH_TICK_MILLISECONDS = max(1, round(FLUSH_TICK_SECONDS * 1000))
BURST_START_SECONDS = 0.5e-6
"""A small send beginning sooner than this after the previous send returned starts a burst (joins the outbox).

Less than a receive costs (a program that reads an answer between two sends never
coalesces) and more than a loop's own work between two sends (a tight loop always does).
"""
STREAM_BURST_START_SECONDS = 2e-6
"""BURST_START_SECONDS of tcp:// and unix://: the loop's own work between two sends measured 0.6-0.9 µs there.

On a loaded 2-vCPU VM, from one send's return to the next one's start of a tight loop
(podipc.stream_producer's send); with 0.5 µs a tight loop whose burst ended (a pause, a
preemption) wrote every message alone (up to 590 writes per 1000 messages of 64 B, and its
consumer read one small segment per message). Still less than a receive that waits costs.
udp:// keeps BURST_START_SECONDS: its bursts outrun a consumer that then loses datagrams.
"""
BURST_HOLD_SECONDS = 20e-6
"""A burst goes on while sends begin sooner than this after the previous one began; a later send writes out."""


class OutboxOwner(Protocol):
    """A producer with an outbox the flusher writes out: what it implements for the thread."""

    def _flush_for_flusher(self) -> int:
        """One attempt under the producer's call gate, never blocking: FLUSHED, IN_USE (a call is inside) or NO_ROOM."""

    def _flusher_fd(self) -> int:
        """The descriptor to wait on for room after NO_ROOM (-1: none, look again after a tick)."""

    def _unwatch(self) -> None:
        """Leave `UNFLUSHED` (the producer joins it again when its outbox next holds something)."""


class Flusher:
    """One thread per process that writes out the outboxes of producers whose burst of sends ended.

    A producer joins `UNFLUSHED` and wakes the thread when its outbox becomes non-empty.
    The thread writes the outbox as soon as it holds the interpreter and no call is
    inside that producer: when the sending thread blocks, sleeps or returns to an event
    loop, or after the interpreter's switch interval while that thread runs Python code
    without blocking. Finding a send inside, it looks again every FLUSH_TICK_SECONDS;
    finding no room (the consumer is not reading), it waits for room. A producer leaves
    the set once its outbox is empty. The thread never blocks on a socket.
    """

    def __init__(self) -> None:
        self._arm = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="podipc-flusher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the producers of `UNFLUSHED` now."""
        os.eventfd_write(self._arm, 1)

    def drop_inherited(self) -> None:
        """In a forked child, where the thread does not run: close the eventfd."""
        os.close(self._arm)

    def _run(self) -> None:
        found: dict[OutboxOwner, int] = {}
        while True:
            poller = select.poll()
            poller.register(self._arm, select.POLLIN)
            timeout = -1
            for producer, status in found.items():
                fd = producer._flusher_fd() if status == NO_ROOM else -1
                if fd >= 0:
                    poller.register(fd, select.POLLOUT)
                else:
                    timeout = FLUSH_TICK_MILLISECONDS
            poller.poll(timeout)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._arm)
            found.clear()
            for producer in list(UNFLUSHED):
                try:
                    status = producer._flush_for_flusher()
                except Exception:  # the thread lives on; the producer's next call meets the error
                    producer._unwatch()
                    status = FLUSHED
                if status != FLUSHED:
                    found[producer] = status


def flush_pending() -> None:
    """Write out the outboxes of this process's producers that no call is inside (never blocks)."""
    for producer in list(UNFLUSHED):
        with contextlib.suppress(Exception):
            producer._flush_for_flusher()


UNFLUSHED: set[OutboxOwner] = set()
"""The producers of this process whose outbox holds something and that the flusher looks after."""

_FLUSHER: Flusher | None = None
_FLUSHER_CREATION = threading.Lock()


def flusher() -> Flusher:
    """This process's flusher, started on first use."""
    global _FLUSHER
    current = _FLUSHER
    if current is None:
        with _FLUSHER_CREATION:
            current = _FLUSHER
            if current is None:
                current = _FLUSHER = Flusher()
    return current


def _forget_flusher_after_fork() -> None:
    global _FLUSHER
    if _FLUSHER is not None:
        _FLUSHER.drop_inherited()
    _FLUSHER = None
    UNFLUSHED.clear()


os.register_at_fork(after_in_child=_forget_flusher_after_fork)
atexit.register(flush_pending)  # a producer left open at exit: what the kernel takes now still reaches the consumer
