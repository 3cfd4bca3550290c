"""The one place where a side of the ring waits for its peer and wakes it: spin, then wait on a FIFO.

A side waits for the peer to move the peer's index (the consumer for the write index,
the producer for the read index). It says how it wants to be woken in its own "waiting"
word; the peer, after storing its index, wakes it only when it sees the word set: it
clears the word, then writes one byte to the side's FIFO (WAITING_FIFO, 2) or posts the
side's named semaphore (WAITING_SEMAPHORE, 1, or any value it does not know). So the
fast path makes no system call while the other side is not waiting.

podipc always waits on the FIFO (/dev/shm/podipc.wake.TOKEN.data: the consumer's;
.space: the producer's), never in sem_wait: a descriptor can be polled together with the
endpoint's waker (close() from anywhere), by selectors and by an event loop, and a poll
interrupted by a signal runs the Python handler and lets its exception through (PEP 475),
where posix_ipc's acquire() replaces it with its own SignalError. The semaphores stay, for
plain peers that sleep on them; a plain peer that only ever posts the semaphore still
wakes podipc, within its bounded wait.

- A blocking call (`Waiter.wait`) polls the index for `spin` seconds, with a clock read
  every SPIN_CHECKS_PER_CLOCK_READ polls, busy for the first PURE_SPIN_SECONDS and
  yielding the CPU between polls after that (RingReader.take polls a burst inline before
  it calls wait(): a reply often comes within a microsecond, sooner than the call). Then
  it arms and polls the FIFO and the waker, in bounded steps.
- A side waiting elsewhere on a descriptor (podipc.aio, podipc.wait, fileno()) arms
  (`Waiter.arm`: drain the FIFO, store 2, fence, re-read the index) and polls the FIFO.

Every wait is bounded (FIRST_SLEEP_SECONDS, doubling to LONGEST_SLEEP_SECONDS): the
peer's "store index, load waiting word" has no fence (it would cost every message), so
on x86-64 both sides can miss each other's store for an instant; a wake-up lost that way
costs at most one short wait. A ring made without FIFOs (a plain consumer's) is waited
for by bounded polling alone.

Shutdown and peer loss (issue 11): the endpoint's waker (an eventfd) wakes a poll;
`interrupt()` sets `alert`, which the spin loop reads with the clock. Either way the
waiter asks its `check` callback, which raises (ChannelClosed) or says what keeps the
peer from moving (PeerGone).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable

import posix_ipc

from podipc.errors import PodIPCError
from podipc.transports.shm.fence import full_fence
from podipc.transports.shm.layout import WAITING_FIFO

SEMAPHORE_DIRECTORY = "/dev/shm"
"""Where glibc keeps the file of a named semaphore /NAME: SEMAPHORE_DIRECTORY/sem.NAME."""
SPIN_CHECKS_PER_CLOCK_READ = 32
PURE_SPIN_SECONDS = 0.000005
"""Busy-poll without yielding this long; the rest of `spin` yields the CPU between polls."""
FIRST_SLEEP_SECONDS = 0.001
"""First bounded sleep (or descriptor wait): bounds the cost of a wake-up lost to store reordering."""
LONGEST_SLEEP_SECONDS = 0.25
"""Longest sleep between checks: a wake-up a plain peer never sends costs at most this."""
FIFO_OPEN_FLAGS = os.O_RDWR
"""Both sides open a FIFO read-write: a write never fails for want of a reader (ENXIO, EPIPE), and
the sleeper's poll never sees a hang-up when a peer's write end goes away."""
_BYTE = b"\x01"
_DRAIN_BYTES = 65536


class Doorbell:
    """A named POSIX semaphore: a plain peer sleeps on it, podipc posts it when that peer's waiting word is 1."""

    def __init__(self, semaphore: posix_ipc.Semaphore) -> None:
        self._semaphore = semaphore

    @classmethod
    def create(cls, name: str, mode: int) -> Doorbell:
        """Create the semaphore `name` (it must not exist) with exactly `mode`; posix_ipc.Error when it cannot."""
        semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode, 0)
        with contextlib.suppress(OSError):  # the umask may have narrowed it
            os.chmod(semaphore_file(name), mode)
        return cls(semaphore)

    @classmethod
    def open(cls, name: str) -> Doorbell:
        """Open the existing semaphore `name` (check its file first: semaphore_file); posix_ipc.Error when it is not there."""
        return cls(posix_ipc.Semaphore(name))

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the semaphore `name` if it exists."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(name)

    def ring(self) -> None:
        """Wake the side sleeping on this doorbell (or let its next sleep return at once)."""
        # posix_ipc.Error: count at its maximum or semaphore closed; the sleeper wakes on its timeout
        with contextlib.suppress(posix_ipc.Error):
            self._semaphore.release()

    def close(self) -> None:
        """Close this process's handle (the semaphore stays until unlinked). Idempotent."""
        with contextlib.suppress(posix_ipc.Error):
            self._semaphore.close()


def semaphore_file(name: str) -> str:
    """The file glibc keeps a named semaphore `/NAME` in."""
    return os.path.join(SEMAPHORE_DIRECTORY, "sem." + name.lstrip("/"))


class WakeFifo:
    """A FIFO in /dev/shm that a side waiting on a descriptor polls, and its peer writes a byte to."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        """The FIFO, open read-write and non-blocking (-1 once closed)."""

    @classmethod
    def create(cls, path: str, mode: int) -> WakeFifo:
        """Create the FIFO `path` (it must not exist: FileExistsError) with exactly `mode` and open it."""
        os.mkfifo(path, mode)
        try:
            fd = os.open(path, FIFO_OPEN_FLAGS | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def ring(self) -> None:
        """Make the FIFO readable (one write; safe from any thread or a signal handler)."""
        fd = self.fd
        if fd >= 0:
            with contextlib.suppress(OSError):  # EAGAIN: full, so readable already
                os.write(fd, _BYTE)

    def drain(self) -> None:
        """Read what the FIFO holds, so a poll waits for the next byte."""
        with contextlib.suppress(OSError):  # BlockingIOError: empty
            os.read(self.fd, _DRAIN_BYTES)

    def close(self) -> None:
        """Close this side's descriptor. Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


Check = Callable[[], PodIPCError | None]
"""Asked between sleeps and on an alert: raise to leave at once (ChannelClosed); return the error to raise if
the peer's index does not move any more (PeerGone); None while it may."""


class Waiter:
    """Waits, for one side of a ring, until the peer moves its index; and wakes the peer when it waits."""

    def __init__(
        self,
        words: memoryview,
        watched_word: int,
        waiting_word: int,
        fifo: WakeFifo | None,
        peer_waiting_word: int,
        peer_doorbell: Doorbell,
        peer_fifo: WakeFifo | None,
        spin_seconds: float,
        check: Check,
        after_sleep: Callable[[], None],
        waker_fd: Callable[[], int],
    ) -> None:
        """Watch `words[watched_word]` (the peer's index); wait with `words[waiting_word]` set.

        `fifo`/`peer_fifo`: the FIFOs, None when the ring has none (a plain peer's ring): then
        this side waits by bounded polling and the peer is always woken through its doorbell.
        `check` is asked between sleeps and on an alert; `after_sleep` runs after every sleep
        (the segment's size check); `waker_fd()` is the endpoint's waker, polled with the FIFO.
        """
        self._words = words
        self._watched_word = watched_word
        self._waiting_word = waiting_word
        self.fifo = fifo
        """This side's FIFO (polled by descriptor waiters), or None."""
        self._peer_waiting_word = peer_waiting_word
        self._peer_doorbell = peer_doorbell
        self._peer_fifo = peer_fifo
        self._spin_seconds = spin_seconds
        self._check = check
        self._after_sleep = after_sleep
        self._waker_fd = waker_fd
        self.alert = False
        """Set by interrupt(): a blocked wait asks `check` at once."""
        self.armed = False
        """True after arm() left the waiting word set: the next attempt follows a wait (or a peer's wake-up)."""
        self._retry = FIRST_SLEEP_SECONDS

    def wait(self, low: int, high: int, deadline: float | None) -> int | None:
        """The peer's index once it is outside [low, high): spin for `spin` seconds, then sleep.

        None when the monotonic `deadline` (None: none) passes first. The consumer waits
        while the write index is in [read index, read index + 1); the producer while the
        read index is in [0, what leaves room). Raises what `check` raises or returns.
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
            if self.alert:
                self._problem(low, high)
            now = clock()
            if now >= spin_until:
                return self._sleep(low, high, deadline)
            if now >= yield_after:
                sched_yield()  # on a busy machine the peer may need this core

    def _problem(self, low: int, high: int) -> None:
        """Ask `check`; raise what it says unless the index moved meanwhile (then the caller sees that)."""
        problem = self._check()
        if problem is not None:
            value: int = self._words[self._watched_word]
            if low <= value < high:
                raise problem

    def _sleep(self, low: int, high: int, deadline: float | None) -> int | None:
        """Wait on the FIFO and the waker in bounded steps until the peer's index moves, asking `check` between.

        An error leaves the waiting word as it is (the peer then writes the FIFO once more):
        after a truncation the mapping must not be touched again.
        """
        poller = select.poll()
        poller.register(self._waker_fd(), select.POLLIN)  # before the first check: a close after it wakes the poll
        fifo = self.fifo
        if fifo is not None:
            poller.register(fifo.fd, select.POLLIN)
        words = self._words
        watched = self._watched_word
        sleep = FIRST_SLEEP_SECONDS
        try:
            while True:
                value = self.arm(low, high) if fifo is not None else words[watched]
                if value is not None and not low <= value < high:
                    return value
                self._problem(low, high)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self.disarm()
                    return None
                seconds = sleep if deadline is None else min(sleep, deadline - now)
                poller.poll(max(0, int(seconds * 1000 + 0.999)))  # a signal: its handler ran, or raised through
                self._after_sleep()
                sleep = min(sleep * 2, LONGEST_SLEEP_SECONDS)
        except BaseException:
            self.armed = False
            raise

    def arm(self, low: int, high: int) -> int | None:
        """Ask to be woken through the FIFO; the peer's index if it is outside [low, high) already, else None.

        Drains the FIFO first (unless still armed and not woken since), so a poll of
        `fifo.fd` waits for the peer's next wake-up. Without a FIFO it only looks (the
        caller then retries after retry_after()).
        """
        words = self._words
        waiting = self._waiting_word
        fifo = self.fifo
        if fifo is not None and (not self.armed or words[waiting] != WAITING_FIFO):
            if self.armed:  # the peer woke us: activity, so the next wait may be short again
                self._retry = FIRST_SLEEP_SECONDS
            fifo.drain()
            words[waiting] = WAITING_FIFO
            full_fence()
            self.armed = True
        value: int = words[self._watched_word]
        if low <= value < high:
            return None
        self.disarm()
        self._retry = FIRST_SLEEP_SECONDS
        return value

    def disarm(self) -> None:
        """Stop asking for a FIFO wake-up (an attempt after a wait); a wake-up the peer sent resets retry_after()."""
        if self.armed:
            self.armed = False
            if self._words[self._waiting_word] == WAITING_FIFO:
                self._words[self._waiting_word] = 0
            else:
                self._retry = FIRST_SLEEP_SECONDS

    def retry_after(self) -> float:
        """Seconds a descriptor waiter may wait before trying again anyway (bounded, growing while nothing comes)."""
        seconds = self._retry
        self._retry = min(seconds * 2, LONGEST_SLEEP_SECONDS)
        return seconds

    def wake_peer(self) -> None:
        """Wake the peer, which said it waits: clear its waiting word, then post or write as it asked."""
        words = self._words
        how: int = words[self._peer_waiting_word]
        words[self._peer_waiting_word] = 0
        peer_fifo = self._peer_fifo
        if how == WAITING_FIFO and peer_fifo is not None:
            peer_fifo.ring()
        else:
            self._peer_doorbell.ring()

    def wake_self(self) -> None:
        """Make this side's own FIFO readable (a descriptor waiter whose re-check found the index moved)."""
        if self.fifo is not None:
            self.fifo.ring()

    def interrupt(self) -> None:
        """Make a spinning wait ask `check` now (one store: any thread, a signal handler); a poll wakes on the waker."""
        self.alert = True
