"""The one place where a side of the ring waits for its peer and wakes it: spin, then sleep on a doorbell.

A side waits for the peer to move the peer's index (the consumer for the write index,
the producer for the read index). It polls that word for `spin` seconds, with a clock
read every SPIN_CHECKS_PER_CLOCK_READ polls, busy for the first PURE_SPIN_SECONDS and
yielding the CPU between polls after that. (RingReader.take polls a burst inline before
it calls wait(): a reply often comes within a microsecond, sooner than the call.) Then it
stores 1 in its own "waiting" word, fences, re-reads the index, and sleeps on its
doorbell. The peer, after storing its index, rings the doorbell only when it sees that
word set (and clears it), so the fast path makes no system call.

Sleeps are bounded (FIRST_SLEEP_SECONDS, doubling to LONGEST_SLEEP_SECONDS), so a
wake-up lost to the race between the two sides' stores costs at most a short sleep, a
peer that never rings (a plain polling script) still works, and the peer's liveness
is checked between sleeps: an idle consumer wakes 4 times a second.

A doorbell is a named POSIX semaphore (/NAME.data: the consumer sleeps on it;
/NAME.space: the producer does), created by the consumer with the segment.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import posix_ipc

from podipc.errors import PeerGone, PeerTimeout, Timeout
from podipc.transports.shm.fence import full_fence

SEMAPHORE_DIRECTORY = "/dev/shm"
"""Where glibc keeps the file of a named semaphore /NAME: SEMAPHORE_DIRECTORY/sem.NAME."""
SPIN_CHECKS_PER_CLOCK_READ = 32
PURE_SPIN_SECONDS = 0.000005
"""Busy-poll without yielding this long; the rest of `spin` yields the CPU between polls."""
FIRST_SLEEP_SECONDS = 0.001
"""First bounded sleep on a doorbell: bounds the cost of a wake-up lost to store reordering."""
LONGEST_SLEEP_SECONDS = 0.25
"""Longest sleep between liveness checks, so PeerGone comes well within 2 s."""


class Doorbell:
    """A named POSIX semaphore: one side sleeps on it, the other rings it."""

    def __init__(self, semaphore: posix_ipc.Semaphore) -> None:
        self._semaphore = semaphore

    @classmethod
    def create(cls, name: str, mode: int) -> Doorbell:
        """Create the semaphore `name` (it must not exist) with exactly `mode`; posix_ipc.Error when it cannot."""
        semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 0)
        with contextlib.suppress(OSError):  # the umask may have narrowed it
            os.chmod(os.path.join(SEMAPHORE_DIRECTORY, "sem." + name[1:]), mode)
        return cls(semaphore)

    @classmethod
    def open(cls, name: str) -> Doorbell:
        """Open the existing semaphore `name`; posix_ipc.Error when it is not there."""
        return cls(posix_ipc.Semaphore(name))

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the semaphore `name` if it exists."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(name)

    def ring(self) -> None:
        """Wake the side sleeping on this doorbell (or let its next sleep return at once)."""
        # posix_ipc.Error: count at its maximum or semaphore gone; the sleeper wakes on its timeout
        with contextlib.suppress(posix_ipc.Error):
            self._semaphore.release()

    def sleep(self, seconds: float) -> None:
        """Sleep until rung or `seconds` have passed."""
        try:
            self._semaphore.acquire(seconds)
        except posix_ipc.BusyError:
            pass
        except posix_ipc.Error:  # gone with the peer; the liveness check says so
            time.sleep(seconds)

    def close(self) -> None:
        """Close this process's handle (the semaphore stays until unlinked). Idempotent."""
        with contextlib.suppress(posix_ipc.Error):
            self._semaphore.close()


PeerCheck = Callable[[], PeerGone | PeerTimeout | None]
"""What keeps the peer from moving: the error to raise (PeerGone, PeerTimeout), or None while it may still."""


class Waiter:
    """Waits, for one side of a ring, until the peer moves its index; and wakes the peer when it sleeps."""

    def __init__(
        self,
        words: memoryview,
        watched_word: int,
        waiting_word: int,
        doorbell: Doorbell,
        peer_waiting_word: int,
        peer_doorbell: Doorbell,
        spin_seconds: float,
        check_peer: PeerCheck,
        timeout_message: str,
    ) -> None:
        """Watch `words[watched_word]` (the peer's index); sleep on `doorbell` with `words[waiting_word]` set.

        `check_peer` is asked between sleeps; `timeout_message` is what Timeout says.
        """
        self._words = words
        self._watched_word = watched_word
        self._waiting_word = waiting_word
        self._doorbell = doorbell
        self._peer_waiting_word = peer_waiting_word
        self._peer_doorbell = peer_doorbell
        self._spin_seconds = spin_seconds
        self._check_peer = check_peer
        self._timeout_message = timeout_message

    def wait(self, low: int, high: int, deadline: float | None) -> int:
        """The peer's index once it is outside [low, high): spin for `spin` seconds, then sleep.

        The consumer waits while the write index is in [read index, read index + 1), that is
        until it moves (a value below is garbage the decoder reports); the producer while the
        read index is in [0, what leaves room). Raises Timeout at the monotonic `deadline`
        (None: none), or what `check_peer` returns unless the index moved meanwhile.
        """
        words = self._words
        watched = self._watched_word
        clock = time.monotonic  # the clock of deadlines
        began = clock()
        yield_after = began + min(self._spin_seconds, PURE_SPIN_SECONDS)
        spin_until = began + self._spin_seconds
        if deadline is not None and deadline < spin_until:
            spin_until = deadline
        checks = range(SPIN_CHECKS_PER_CLOCK_READ)
        sched_yield = os.sched_yield
        while True:
            for _ in checks:
                value: int = words[watched]
                if not low <= value < high:
                    return value
            now = clock()
            if now >= spin_until:
                return self._sleep(low, high, deadline)
            if now >= yield_after:
                sched_yield()  # on a busy machine the peer may need this core

    def wake_peer(self) -> None:
        """Wake the peer, which said it sleeps: clear its waiting word and ring its doorbell."""
        self._words[self._peer_waiting_word] = 0
        self._peer_doorbell.ring()

    def _sleep(self, low: int, high: int, deadline: float | None) -> int:
        """Sleep on the doorbell in bounded steps until the peer's index moves, checking the peer between."""
        words = self._words
        watched = self._watched_word
        waiting = self._waiting_word
        sleep = FIRST_SLEEP_SECONDS
        try:
            while True:
                words[waiting] = 1
                full_fence()
                value: int = words[watched]
                if not low <= value < high:
                    return value
                problem = self._check_peer()
                if problem is not None:
                    value = words[watched]
                    if not low <= value < high:  # it moved before it went
                        return value
                    raise problem
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Timeout(self._timeout_message)
                self._doorbell.sleep(sleep if deadline is None else min(sleep, deadline - now))
                sleep = min(sleep * 2, LONGEST_SLEEP_SECONDS)
        finally:
            words[waiting] = 0
