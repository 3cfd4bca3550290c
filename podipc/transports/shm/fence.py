"""Memory ordering between the two processes of a ring: when this CPU needs a fence, and the fence.

The producer writes the payload, then stores the write index; the consumer loads the
write index, then reads the payload, then stores the read index. The indices are
aligned 8-byte words stored and loaded with one instruction (a memoryview cast to
"Q" copies with a fixed-size memcpy, which compilers emit as one move). On x86-64
(TSO) stores are seen in program order and loads are not reordered with older loads
or younger stores, and CPython cannot reorder its own C calls on shared memory, so
that order is all the data path needs: WEAK_MEMORY_ORDER is False and the ring
makes no fence there. On weakly ordered CPUs (aarch64) the ring puts a full fence
between payload and index on both sides.

Every CPU needs a full fence where a side announces that it sleeps (stores its
"waiting" word) and then re-reads the peer's index: that is a store followed by a
load, which even x86-64 may reorder (podipc.transports.shm.waiter does it).

The fence is a release then an acquire of a lock the calling thread holds: glibc's
sem_post (Lock.release) is a store-release, its sem_wait fast path (Lock.acquire) a
locked read-modify-write with acquire semantics; a locked instruction is a full
barrier on x86-64, and ARMv8 orders a release before a later acquire. Each thread
has its own lock, so threads fencing at the same moment never release each other's.
"""

from __future__ import annotations

import platform
import threading

WEAK_MEMORY_ORDER = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86")
"""True where stores may be seen out of program order, so the data path needs fences."""


class _HeldLock(threading.local):
    """A lock per thread, held by it between fences."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()


_held = _HeldLock()


def full_fence() -> None:
    """Order every memory access before this call before every access after it (release, then acquire)."""
    lock = _held.lock
    lock.release()
    lock.acquire()
