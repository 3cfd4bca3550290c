"""shm:// - a single-producer single-consumer ring of variable-size messages in /dev/shm.

Address
    shm:///NAME   the ring is the file /dev/shm/NAME (what shm_open("/NAME") names)

    Query options (or keyword arguments):
      capacity=8MiB         ring bytes (consumer; the producer adopts the ring's); the pod's
                            /dev/shm is 64 MiB by default and shared by every container
      max_message_size=...  largest message in bytes; default capacity // 2; at most capacity - 8
      spin=0.0005           seconds to poll an empty (or full) ring before sleeping on a semaphore
                            (the first 5 us spin, the rest yields the CPU between polls)
      wait=30, mode=0600    common options (see podipc.channel)

Requires
    A writable /dev/shm shared by both containers (a pod's containers share it through
    the IPC namespace), large enough for the ring; the Python package posix_ipc (named
    semaphores for the wake-ups).

Semantics
    Boundaries and order kept, reliable, no copies on the way but the producer's write
    into the ring (recv_view() hands out the ring itself; loan()/commit() writes in place).
    Max message: the max_message_size option (default capacity // 2), fixed by the
    consumer when it creates the ring; the producer takes the ring's value on attach.
    The consumer creates the segment /dev/shm/NAME and the semaphores /NAME.data and
    /NAME.space (files sem.NAME.* in /dev/shm), all with `mode`, and unlinks them at the
    end of stream or when it closes. A segment left by a killed consumer (its lock is
    free) is replaced on open. Both sides hold a podipc.presence file, so a peer killed
    with SIGKILL is noticed (PeerGone) within a quarter of a second while blocked.
    A killed producer's presence file is removed by the consumer when it leaves. A
    consumer that leaves early makes the producer fail with PeerGone once the ring is
    full, or at close (the end of stream is never taken).
    Layout and plain-script peers: docs/wire/shm.md; the layout itself: podipc.shm_ring.

Zero copy
    ShmConsumer.recv_view(timeout) returns a read-only memoryview into the ring; the
    next recv/recv_view/close releases it (later use raises ValueError) and hands the
    bytes back to the producer. ShmProducer.loan(size, timeout) returns a writable view
    of `size` bytes in the ring; commit(length=None) sends it as one message.

Wake-ups
    A waiting side polls for `spin` seconds, then sets its "waiting" word and sleeps on
    its named semaphore; the other side posts only when it sees that word, so the fast
    path makes no system call. Sleeps are bounded (1 ms, doubling to 0.25 s) so a
    wake-up lost to store reordering costs at most 1 ms, and the peer's liveness is
    checked between sleeps. An idle consumer wakes 4 times a second.

Memory ordering
    The producer writes the payload, then stores the write index; the consumer loads
    the write index, then reads the payload, then stores the read index. The indices are
    aligned 8-byte words stored and loaded with one instruction (a memoryview cast to
    "Q" copies with a fixed-size memcpy, which compilers emit as one move). On x86-64
    (TSO) stores are seen in program order and loads are not reordered with older loads
    or younger stores, and CPython cannot reorder its own C calls on shared memory, so
    that order is all that is needed. On weakly ordered CPUs (aarch64) the channel puts
    a full fence between the payload and the index on both sides: a release then an
    acquire of a held threading.Lock (glibc sem_post is a release, sem_trywait an
    acquire, and a release followed by an acquire is ordered on ARMv8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import posix_ipc

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, deadline_after, parse_seconds, parse_size
from podipc.errors import (
    AddressError,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    Timeout,
)
from podipc.ownership import Owner, Trust
from podipc.presence import PROBE_INTERVAL_SECONDS, PeerState, Presence, remove_if_gone
from podipc.shm_ring import (
    CONSUMER_CLOSED,
    CONSUMER_FLAGS_WORD,
    CONSUMER_WAITING_WORD,
    HEADER_SIZE,
    KIND_END,
    KIND_WRAP,
    PRODUCER_ATTACHED,
    PRODUCER_ENDED,
    PRODUCER_FLAGS_WORD,
    PRODUCER_WAITING_WORD,
    READ_INDEX_WORD,
    RECORD_HEADER_SIZE,
    WRITE_INDEX_WORD,
    check_geometry,
    decode_header,
    decode_record,
    encode_header,
    record_size,
    segment_size,
)

SHM_DIRECTORY = "/dev/shm"
DEFAULT_CAPACITY = 8 * 1024 * 1024
DEFAULT_SPIN_SECONDS = 0.0005
SPIN_CHECKS_PER_CLOCK_READ = 32
INLINE_SPIN = range(64)
"""Polls of the write index inside recv before the spin-then-sleep wait (no call, no clock read)."""
PURE_SPIN_SECONDS = 0.000005
"""Busy-poll without yielding this long; the rest of `spin` yields the CPU between polls."""
FIRST_SLEEP_SECONDS = 0.001
"""First bounded sleep on a semaphore: bounds the cost of a wake-up lost to store reordering."""
LONGEST_SLEEP_SECONDS = 0.25
"""Longest sleep between liveness checks, so PeerGone comes well within 2 s."""
SEMAPHORE_SUFFIXES = (".data", ".space")
SEMAPHORE_NAME_MAX = 251 - max(len(suffix) for suffix in SEMAPHORE_SUFFIXES)
WEAK_MEMORY_ORDER = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86")
SHM_FIX = "mount an emptyDir with medium: Memory at /dev/shm with a sizeLimit (e.g. 256Mi) in every container"

if sys.byteorder != "little":  # pragma: no cover - the ring is little-endian and the hot path uses native words
    raise ImportError("shm:// needs a little-endian CPU")

OPTIONS = (
    Option(
        "capacity", parse_size, DEFAULT_CAPACITY, "ring size in bytes (set by the consumer, which creates the ring)"
    ),
    Option(
        "max_message_size", parse_size, None, "largest message in bytes (default capacity // 2, at most capacity - 8)"
    ),
    Option("spin", parse_seconds, DEFAULT_SPIN_SECONDS, "seconds to busy-poll before sleeping on a semaphore"),
)

_fence_lock = threading.Lock()
_fence_lock.acquire()


def full_fence() -> None:
    """Order every memory access before this call before every access after it (release, then acquire)."""
    _fence_lock.release()
    _fence_lock.acquire()


def segment_path(name: str) -> str:
    """The file of the ring named `name`."""
    return os.path.join(SHM_DIRECTORY, name)


def semaphore_names(name: str) -> tuple[str, str]:
    """The named semaphores of a ring: (consumer wakes on data, producer wakes on space)."""
    return f"/{name}.data", f"/{name}.space"


def free_bytes(directory: str = SHM_DIRECTORY) -> int:
    """Bytes an unprivileged process may still allocate in `directory`."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def default_max_message_size(capacity: int) -> int:
    """The max message size of a ring of `capacity` bytes when none is given: half of it."""
    return capacity // 2 // 8 * 8


def availability() -> str | None:
    """None when shm:// works here, else why not and the fix."""
    if not os.path.isdir(SHM_DIRECTORY):
        return f"there is no {SHM_DIRECTORY} in this container; {SHM_FIX}"
    if not os.access(SHM_DIRECTORY, os.W_OK | os.X_OK):
        return f"{SHM_DIRECTORY} is not writable here; {SHM_FIX}"
    try:
        free = free_bytes()
    except OSError as exc:
        return f"cannot stat {SHM_DIRECTORY}: {exc.strerror}; {SHM_FIX}"
    needed = segment_size(DEFAULT_CAPACITY)
    if free < needed:
        return (
            f"{SHM_DIRECTORY} has {free} bytes free, a default ring needs {needed}; "
            f"use a smaller capacity= or {SHM_FIX}"
        )
    return None


def host_max_message_size() -> int:
    """The default max message size here: half the default ring."""
    return default_max_message_size(DEFAULT_CAPACITY)


def ring_geometry(settings: Mapping[str, Any], url: str) -> tuple[int, int]:
    """Capacity and max message size from the options, checked; AddressError when unusable."""
    capacity = int(settings["capacity"])
    given = settings["max_message_size"]
    max_message_size = default_max_message_size(capacity) if given is None else int(given)
    try:
        check_geometry(capacity, max_message_size)
    except ValueError as exc:
        raise AddressError(f"{url}: {exc}") from exc
    return capacity, max_message_size


def check_name(address: Address) -> None:
    """AddressError when the name is too long for the ring's semaphores."""
    if len(address.name) > SEMAPHORE_NAME_MAX:
        raise AddressError(f"{address.location}: shm names hold at most {SEMAPHORE_NAME_MAX} characters")


class _Ring:
    """A mapped segment: the file, its mapping, and the views the hot paths use."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = memoryview(self.map)
        self.readonly = self.buffer.toreadonly()
        self.words = self.buffer.cast("Q")

    def close(self) -> None:
        """Release the views, unmap and close the file (which drops a lock held on it)."""
        for view in (self.words, self.readonly, self.buffer):
            # BufferError: a caller still holds a slice; the map goes with the last one
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)


def _close_semaphore(semaphore: posix_ipc.Semaphore | None) -> None:
    if semaphore is not None:
        with contextlib.suppress(posix_ipc.Error):
            semaphore.close()


def _unlink_semaphore(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(name)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_dead_presence(path: str, trust: Trust) -> None:
    """Remove a presence file whose holder died; never a held one (nor one a new holder linked in)."""
    remove_if_gone(path, trust)


def _post(semaphore: posix_ipc.Semaphore) -> None:
    # posix_ipc.Error: count at its maximum or semaphore gone; the sleeper wakes on its timeout
    with contextlib.suppress(posix_ipc.Error):
        semaphore.release()


def _sleep_on(semaphore: posix_ipc.Semaphore, seconds: float) -> None:
    try:
        semaphore.acquire(seconds)
    except posix_ipc.BusyError:
        pass
    except posix_ipc.Error:  # gone with the peer; the liveness check says so
        time.sleep(seconds)


class ShmProducer(Producer):
    """Writes messages into the consumer's ring; attaches on the first send (or close)."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        check_name(address)
        _, self.max_message_size = ring_geometry(self.settings, address.location)
        self.max_message_source = "shm max_message_size (default capacity // 2)"
        self.max_message_fix = f"raise capacity= and max_message_size= on both sides; {SHM_FIX} if it is too small"
        self.spin_seconds = float(self.settings["spin"])
        self.path = segment_path(address.name)
        self._ring: _Ring | None = None
        self._data_semaphore: posix_ipc.Semaphore | None = None
        self._space_semaphore: posix_ipc.Semaphore | None = None
        self._capacity = 0
        self._write_index = 0
        self._cached_read_index = 0
        self._loan: memoryview | None = None
        self._loan_size = 0
        self._presence = Presence(
            address.token, "producer", int(self.settings["mode"]), handover_wait=float(self.settings["wait"])
        )

    # --- the hot path ---------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit)."""
        ring = self._ring
        kind = type(data)
        if kind is bytes or kind is bytearray:
            length = len(data)
        elif kind is memoryview and data.c_contiguous:  # type: ignore[union-attr]
            length = data.nbytes  # type: ignore[union-attr]
        else:
            length = -1
        if length < 0 or ring is None or self._closed or self._loan is not None:
            Producer.send(self, data, timeout)
            return
        if length > self.max_message_size:
            raise MessageTooLarge(length, self.max_message_size, self.max_message_source, self.max_message_fix)
        capacity = self._capacity
        write_index = self._write_index
        position = write_index % capacity
        size = 8 + ((length + 7) & -8)
        if position + size > capacity or write_index + size - self._cached_read_index > capacity:
            self._send_slow(data, length, None if timeout is None else deadline_after(timeout))
            return
        words = ring.words
        offset = HEADER_SIZE + position
        words[offset >> 3] = length
        ring.map[offset + 8 : offset + 8 + length] = data
        write_index += size
        if WEAK_MEMORY_ORDER:
            full_fence()
        words[8] = write_index  # WRITE_INDEX_WORD
        self._write_index = write_index
        if words[10]:  # CONSUMER_WAITING_WORD
            self._wake_consumer(words)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._loan is not None:
            raise RuntimeError("commit() the loaned buffer before sending")
        self._send_slow(view, view.nbytes, deadline)

    def _send_slow(self, data: bytes | bytearray | memoryview, length: int, deadline: float | None) -> None:
        offset = self._reserve(record_size(length), deadline)
        ring = self._ring
        assert ring is not None
        ring.words[offset >> 3] = length
        ring.map[offset + RECORD_HEADER_SIZE : offset + RECORD_HEADER_SIZE + length] = data
        self._publish(record_size(length))

    def _publish(self, size: int) -> None:
        ring = self._ring
        assert ring is not None
        self._write_index += size
        if WEAK_MEMORY_ORDER:
            full_fence()
        ring.words[WRITE_INDEX_WORD] = self._write_index
        if ring.words[CONSUMER_WAITING_WORD]:
            self._wake_consumer(ring.words)

    def _wake_consumer(self, words: memoryview) -> None:
        words[CONSUMER_WAITING_WORD] = 0
        assert self._data_semaphore is not None
        _post(self._data_semaphore)

    # --- zero-copy send ---------------------------------------------------

    def loan(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable view of `size` bytes inside the ring; fill it, then commit(). Zero-copy send.

        Waits at most `timeout` seconds for room. The view is valid until commit().
        """
        ring = self._ring
        if ring is not None and self._loan is None and not self._closed and 0 <= size <= self.max_message_size:
            capacity = self._capacity
            write_index = self._write_index
            position = write_index % capacity
            record = 8 + ((size + 7) & -8)
            if position + record <= capacity and write_index + record - self._cached_read_index <= capacity:
                start = HEADER_SIZE + position + 8
                loan = self._loan = ring.buffer[start : start + size]
                self._loan_size = size
                return loan
        self._check_open()
        if self._loan is not None:
            raise RuntimeError("commit() the previous loan first")
        if size > self.max_message_size:
            raise MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)
        offset = self._reserve(record_size(size), deadline_after(timeout))
        if size > self.max_message_size:  # the ring's limit, learnt on attach
            raise MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)
        ring = self._ring
        assert ring is not None
        start = offset + RECORD_HEADER_SIZE
        self._loan = ring.buffer[start : start + size]
        self._loan_size = size
        return self._loan

    def commit(self, length: int | None = None) -> None:
        """Send the loaned buffer as one message of `length` bytes (default: all it holds)."""
        loan = self._loan
        if loan is None:
            raise RuntimeError("nothing is loaned; call loan(size) first")
        length = self._loan_size if length is None else length
        if not 0 <= length <= self._loan_size:
            raise ValueError(f"commit length {length} outside 0..{self._loan_size}")
        ring = self._ring
        assert ring is not None
        self._loan = None
        loan.release()
        position = self._write_index % self._capacity
        ring.words[(HEADER_SIZE + position) >> 3] = length
        self._publish(record_size(length))

    # --- room, attach, close -------------------------------------------

    def _reserve(self, size: int, deadline: float | None) -> int:
        """Wait for `size` contiguous bytes (writing a wrap record when needed); their segment offset."""
        if self._ring is None:
            self._attach(deadline)
            if size - RECORD_HEADER_SIZE > self.max_message_size:
                raise MessageTooLarge(
                    size - RECORD_HEADER_SIZE, self.max_message_size, self.max_message_source, self.max_message_fix
                )
        ring = self._ring
        assert ring is not None
        capacity = self._capacity
        position = self._write_index % capacity
        if position + size > capacity:
            self._wait_for_room(capacity - position, deadline)
            ring.words[(HEADER_SIZE + position) >> 3] = KIND_WRAP << 32
            self._publish(capacity - position)
            position = 0
        self._wait_for_room(size, deadline)
        return HEADER_SIZE + position

    def _room(self) -> int:
        ring = self._ring
        assert ring is not None
        self._cached_read_index = ring.words[READ_INDEX_WORD]
        return self._capacity - (self._write_index - self._cached_read_index)

    def _wait_for_room(self, size: int, deadline: float | None) -> None:
        if self._room() >= size:
            return
        clock = time.monotonic  # the clock of deadlines
        began = clock()
        yield_after, spin_until = began + min(self.spin_seconds, PURE_SPIN_SECONDS), began + self.spin_seconds
        if deadline is not None and deadline < spin_until:
            spin_until = deadline
        while (now := clock()) < spin_until:
            if self._room() >= size:
                return
            if now >= yield_after:
                os.sched_yield()
        ring = self._ring
        assert ring is not None and self._space_semaphore is not None
        words = ring.words
        sleep = FIRST_SLEEP_SECONDS
        try:
            while True:
                words[PRODUCER_WAITING_WORD] = 1
                full_fence()
                if self._room() >= size:
                    return
                self._check_consumer(lambda: self._room() >= size)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Timeout(
                        f"{self.address.location}: no room in the ring within the timeout (the consumer is slow)"
                    )
                seconds = sleep if deadline is None else min(sleep, deadline - now)
                _sleep_on(self._space_semaphore, seconds)
                sleep = min(sleep * 2, LONGEST_SLEEP_SECONDS)
        finally:
            words[PRODUCER_WAITING_WORD] = 0

    def _check_consumer(self, arrived: Any) -> None:
        """PeerGone when the consumer closed, died or replaced the segment (unless `arrived()` now)."""
        ring = self._ring
        assert ring is not None
        closed = ring.words[CONSUMER_FLAGS_WORD] & CONSUMER_CLOSED
        if not closed and self._presence.peer_state() is PeerState.ALIVE and self._same_segment():
            return
        if arrived():
            return
        why = "closed the channel" if closed else "is gone (it died or closed without reading the end of stream)"
        raise PeerGone(f"the consumer of {self.address.location} {why}")

    def _same_segment(self) -> bool:
        ring = self._ring
        assert ring is not None
        try:
            return os.stat(self.path).st_ino == os.fstat(ring.fd).st_ino
        except FileNotFoundError:
            return False

    def _attach(self, deadline: float | None) -> None:
        """Wait for the consumer and its segment, map it and check its header."""
        what = self.address.location
        self._presence.wait_for_peer(deadline, self.wait_deadline, what)
        while True:
            fd = self._open_live_segment()
            if fd is not None:
                break
            limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
            if time.monotonic() >= limit:
                raise PeerTimeout(f"the consumer of {what} is there but its ring {self.path} did not appear in time")
            time.sleep(PROBE_INTERVAL_SECONDS)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ProtocolError(f"{self.path} is {size} bytes, smaller than a ring header")
            ring = _Ring(fd, size)
        except BaseException:
            os.close(fd)
            raise
        try:
            header = decode_header(ring.readonly)
            data_name, space_name = semaphore_names(self.address.name)
            try:
                self._data_semaphore = posix_ipc.Semaphore(data_name)
                self._space_semaphore = posix_ipc.Semaphore(space_name)
            except posix_ipc.Error as exc:
                raise PeerGone(f"the consumer of {what} removed its semaphores ({exc})") from exc
        except BaseException:
            ring.close()
            self._close_semaphores()
            raise
        self._ring = ring
        self._capacity = header.capacity
        self.max_message_size = header.max_message_size
        self._write_index = header.write_index
        self._cached_read_index = header.read_index
        ring.words[PRODUCER_FLAGS_WORD] = header.producer_flags | PRODUCER_ATTACHED

    def _open_live_segment(self) -> int | None:
        """An fd of the segment if it exists and its consumer holds its lock; else None."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot open {self.path}: {exc.strerror}; share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd  # locked by its live consumer
        os.close(fd)  # nobody holds it: a stale segment the consumer is about to replace
        return None

    def _close(self, deadline: float | None) -> None:
        if self._loan is not None:
            self._loan.release()
            self._loan = None
        offset = self._reserve(RECORD_HEADER_SIZE, deadline)
        ring = self._ring
        assert ring is not None
        ring.words[offset >> 3] = KIND_END << 32
        ring.words[PRODUCER_FLAGS_WORD] |= PRODUCER_ENDED
        self._publish(RECORD_HEADER_SIZE)
        try:
            self._wait_for_room(self._capacity, deadline)
        except Timeout as exc:
            raise Timeout(f"{self.address.location}: the consumer did not take the end of stream in time") from exc
        self._abort()

    def _close_semaphores(self) -> None:
        _close_semaphore(self._data_semaphore)
        _close_semaphore(self._space_semaphore)
        self._data_semaphore = self._space_semaphore = None

    def _abort(self) -> None:
        if self._loan is not None:
            self._loan.release()
            self._loan = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._close_semaphores()
        self._presence.close()


class ShmConsumer(Consumer):
    """Creates the ring and reads it; recv_view() hands out messages without copying."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        check_name(address)
        self._capacity, self.max_message_size = ring_geometry(self.settings, address.location)
        self.max_message_source = "shm max_message_size (default capacity // 2)"
        self.max_message_fix = f"raise capacity= and max_message_size= on both sides; {SHM_FIX} if it is too small"
        self.spin_seconds = float(self.settings["spin"])
        self.mode = int(self.settings["mode"])
        self.path = segment_path(address.name)
        self._semaphore_names = semaphore_names(address.name)
        self._read_index = 0
        self._held: memoryview | None = None
        self._held_next = 0
        self._fast = False
        self._ring: _Ring | None = None
        self._data_semaphore: posix_ipc.Semaphore | None = None
        self._space_semaphore: posix_ipc.Semaphore | None = None
        self._presence: Presence | None = None
        problem = availability_for(self._capacity)
        if problem:
            self._closed = True
            raise ChannelUnavailable(f"{address.location}: {problem}")
        try:
            self._presence = Presence(
                address.token,
                "consumer",
                self.mode,
                handover_wait=float(self.settings["wait"]),
                channel=address.location,
            )
            self._presence.record("posix_shm", "/" + address.name)
            for semaphore_name in self._semaphore_names:
                self._presence.record("posix_sem", semaphore_name)
            self._remove_stale()
            self._create()
        except BaseException:
            self._teardown()
            self._closed = True
            raise
        self._fast = True

    # --- creation -------------------------------------------------------

    def _remove_stale(self) -> None:
        """Remove a segment and semaphores left by a consumer that died (nobody holds the segment's lock)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot open {self.path}: {exc.strerror}; share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
            ) from exc
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ChannelUnavailable(
                    f"{self.path} is in use by another consumer; a channel has one consumer"
                ) from exc
            finally:
                os.close(fd)
            _unlink_quietly(self.path)
        for name in self._semaphore_names:
            _unlink_semaphore(name)

    def _create(self) -> None:
        """Create semaphores, then the segment under a temporary name, locked, and rename it into place."""
        data_name, space_name = self._semaphore_names
        try:
            self._data_semaphore = posix_ipc.Semaphore(data_name, posix_ipc.O_CREX, self.mode, 0)
            self._space_semaphore = posix_ipc.Semaphore(space_name, posix_ipc.O_CREX, self.mode, 0)
        except posix_ipc.Error as exc:
            raise ChannelUnavailable(f"cannot create the semaphores of {self.address.location}: {exc}") from exc
        for name in self._semaphore_names:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(SHM_DIRECTORY, "sem." + name[1:]), self.mode)
        size = segment_size(self._capacity)
        temporary = os.path.join(SHM_DIRECTORY, f".{self.address.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        except OSError as exc:
            raise ChannelUnavailable(f"cannot create {temporary}: {exc.strerror}; {SHM_FIX}") from exc
        try:
            os.fchmod(fd, self.mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._allocate(fd, size)
            self._ring = _Ring(fd, size)
            self._ring.map[:HEADER_SIZE] = encode_header(self._capacity, self.max_message_size)
            os.rename(temporary, self.path)
        except BaseException:
            if self._ring is None:
                os.close(fd)
            _unlink_quietly(temporary)
            raise

    def _allocate(self, fd: int, size: int) -> None:
        """Reserve the segment's memory now, so a full /dev/shm fails here and not with SIGBUS later."""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise ChannelUnavailable(
                    f"{SHM_DIRECTORY} cannot hold a {size}-byte ring ({free_bytes()} bytes free); "
                    f"use a smaller capacity= or {SHM_FIX}"
                ) from exc
            os.ftruncate(fd, size)  # a filesystem without fallocate

    # --- the hot path ---------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; raise EndOfStream after the last one, Timeout after `timeout` seconds."""
        if self._fast:
            if self._held is not None:
                self._release_held()
            ring = self._ring
            assert ring is not None
            words = ring.words
            read_index = self._read_index
            write_index = words[8]  # WRITE_INDEX_WORD
            if write_index == read_index:
                for _ in INLINE_SPIN:  # a reply often comes within a microsecond or two
                    write_index = words[8]
                    if write_index != read_index:
                        break
                else:
                    write_index = self._wait_for_data(None if timeout is None else deadline_after(timeout))
            if WEAK_MEMORY_ORDER:
                full_fence()
            capacity = self._capacity
            position = read_index % capacity
            length = words[(HEADER_SIZE + position) >> 3]
            if length <= self.max_message_size:
                size = 8 + ((length + 7) & -8)
                if position + size <= capacity and size <= write_index - read_index <= capacity:
                    start = HEADER_SIZE + position + 8
                    data = ring.map[start : start + length]
                    read_index += size
                    if WEAK_MEMORY_ORDER:
                        full_fence()
                    words[16] = read_index  # READ_INDEX_WORD
                    self._read_index = read_index
                    if words[18]:  # PRODUCER_WAITING_WORD
                        self._wake_producer(words)
                    return data
        return Consumer.recv(self, timeout)

    def recv_view(self, timeout: float | None = None) -> memoryview:
        """The next message as a read-only view into the ring, valid until the next recv/recv_view/close.

        The view is released (and its bytes handed back to the producer) by the next call;
        keep bytes(view) to hold on to a message.
        """
        if self._fast:
            ring = self._ring
            assert ring is not None
            words = ring.words
            held = self._held
            if held is None:
                read_index = self._read_index
            else:
                self._held = None
                try:  # noqa: SIM105 - a with-statement costs more on this path
                    held.release()
                except BufferError:  # the caller made views of it; they stay usable but may change
                    pass
                read_index = self._held_next
                self._held_next = 0
                if WEAK_MEMORY_ORDER:
                    full_fence()
                words[16] = read_index  # READ_INDEX_WORD
                self._read_index = read_index
                if words[18]:  # PRODUCER_WAITING_WORD
                    self._wake_producer(words)
            write_index = words[8]  # WRITE_INDEX_WORD
            if write_index == read_index:
                for _ in INLINE_SPIN:  # a reply often comes within a microsecond or two
                    write_index = words[8]
                    if write_index != read_index:
                        break
                else:
                    write_index = self._wait_for_data(None if timeout is None else deadline_after(timeout))
            if WEAK_MEMORY_ORDER:
                full_fence()
            capacity = self._capacity
            position = read_index % capacity
            length = words[(HEADER_SIZE + position) >> 3]
            if length <= self.max_message_size:
                size = 8 + ((length + 7) & -8)
                if position + size <= capacity and size <= write_index - read_index <= capacity:
                    start = HEADER_SIZE + position + 8
                    view = ring.readonly[start : start + length]
                    self._held = view
                    self._held_next = read_index + size
                    return view
        if self._closed:
            self._check_open()
        if self._ended:
            raise EndOfStream(f"{self.address.location}: the producer ended the stream")
        try:
            start, length = self._take(deadline_after(timeout))
        except EndOfStream:
            self._ended = True
            raise
        ring = self._ring
        assert ring is not None
        view = ring.readonly[start : start + length]
        self._held = view
        return view

    def _recv(self, deadline: float | None) -> bytes:
        start, length = self._take(deadline)
        ring = self._ring
        assert ring is not None
        data = ring.map[start : start + length]
        self._release_held()
        return data

    def _take(self, deadline: float | None) -> tuple[int, int]:
        """Find the next data record: (segment offset, length); it is released by the next _release_held()."""
        self._release_held()
        ring = self._ring
        assert ring is not None
        while True:
            write_index = ring.words[WRITE_INDEX_WORD]
            if write_index == self._read_index:
                write_index = self._wait_for_data(deadline)
            if WEAK_MEMORY_ORDER:
                full_fence()
            record = decode_record(ring.readonly, self._capacity, self.max_message_size, self._read_index, write_index)
            if record.kind == KIND_WRAP:
                self._advance(record.next_read_index)
                continue
            if record.kind == KIND_END:
                self._advance(record.next_read_index)
                self._ended = True
                self._teardown()
                raise EndOfStream(f"{self.address.location}: the producer ended the stream")
            self._held_next = record.next_read_index
            return record.payload_offset, record.length

    def _release_held(self) -> None:
        if self._held is not None:
            # BufferError: the caller made views of it; they stay usable but may change
            with contextlib.suppress(BufferError):
                self._held.release()
            self._held = None
        if self._held_next:
            self._advance(self._held_next)
            self._held_next = 0

    def _advance(self, read_index: int) -> None:
        ring = self._ring
        assert ring is not None
        if WEAK_MEMORY_ORDER:
            full_fence()
        ring.words[READ_INDEX_WORD] = read_index
        self._read_index = read_index
        if ring.words[PRODUCER_WAITING_WORD]:
            self._wake_producer(ring.words)

    def _wake_producer(self, words: memoryview) -> None:
        words[PRODUCER_WAITING_WORD] = 0
        assert self._space_semaphore is not None
        _post(self._space_semaphore)

    def _wait_for_data(self, deadline: float | None) -> int:
        """Spin, then sleep on the data semaphore until the write index moves; the new write index."""
        ring = self._ring
        assert ring is not None
        words = ring.words
        read_index = self._read_index
        clock = time.monotonic  # the clock of deadlines
        began = clock()
        yield_after, spin_until = began + min(self.spin_seconds, PURE_SPIN_SECONDS), began + self.spin_seconds
        if deadline is not None and deadline < spin_until:
            spin_until = deadline
        checks = range(SPIN_CHECKS_PER_CLOCK_READ)
        sched_yield = os.sched_yield
        while True:
            for _ in checks:
                write_index: int = words[8]  # WRITE_INDEX_WORD
                if write_index != read_index:
                    return write_index
            now = clock()
            if now >= spin_until:
                break
            if now >= yield_after:
                sched_yield()  # on a busy machine the producer may need this core
        return self._sleep_for_data(deadline)

    def _sleep_for_data(self, deadline: float | None) -> int:
        ring = self._ring
        assert ring is not None and self._data_semaphore is not None
        words = ring.words
        read_index = self._read_index
        sleep = FIRST_SLEEP_SECONDS
        try:
            while True:
                words[CONSUMER_WAITING_WORD] = 1
                full_fence()
                write_index: int = words[WRITE_INDEX_WORD]
                if write_index != read_index:
                    return write_index
                self._check_producer()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Timeout(f"{self.address.location}: no message within the timeout")
                seconds = sleep if deadline is None else min(sleep, deadline - now)
                _sleep_on(self._data_semaphore, seconds)
                sleep = min(sleep * 2, LONGEST_SLEEP_SECONDS)
        finally:
            words[CONSUMER_WAITING_WORD] = 0

    def _check_producer(self) -> None:
        """PeerGone when the producer attached (or was seen) and is gone; PeerTimeout when it never came."""
        presence = self._presence
        assert presence is not None
        if presence.peer_state() is PeerState.ALIVE:
            return
        ring = self._ring
        assert ring is not None
        attached = ring.words[PRODUCER_FLAGS_WORD] & PRODUCER_ATTACHED or presence.peer_seen
        if ring.words[WRITE_INDEX_WORD] != self._read_index:
            return  # it left a message (or the end of stream) before it went
        if attached:
            raise PeerGone(
                f"the producer of {self.address.location} is gone (it died or aborted without ending the stream)"
            )
        if time.monotonic() >= self.wait_deadline:
            raise PeerTimeout(
                f"no producer appeared on {self.address.location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )

    # --- closing --------------------------------------------------------

    def _close(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Tell a live producer we left, unmap, unlink segment and semaphores, leave. Idempotent.

        Only a consumer that claimed the channel (its presence) unlinks anything.
        """
        self._fast = False
        unlink = self._presence is not None
        ring = self._ring
        if ring is not None:
            if self._held is not None:
                with contextlib.suppress(BufferError):
                    self._held.release()
                self._held = None
            if not self._ended:
                ring.words[CONSUMER_FLAGS_WORD] |= CONSUMER_CLOSED
                if self._space_semaphore is not None:
                    _post(self._space_semaphore)
            if unlink:
                self._unlink_segment(ring)
            ring.close()
            self._ring = None
        _close_semaphore(self._data_semaphore)
        _close_semaphore(self._space_semaphore)
        self._data_semaphore = self._space_semaphore = None
        if unlink:
            for name in self._semaphore_names:
                _unlink_semaphore(name)
        if self._presence is not None:
            _remove_dead_presence(
                self._presence.peer_path, self._presence.trust
            )  # left by a killed producer; nobody else would
            self._presence.close()
            self._presence = None

    def _unlink_segment(self, ring: _Ring) -> None:
        try:
            if os.stat(self.path).st_ino == os.fstat(ring.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def availability_for(capacity: int) -> str | None:
    """None when /dev/shm can take a ring of `capacity` bytes, else why not and the fix."""
    if not os.path.isdir(SHM_DIRECTORY) or not os.access(SHM_DIRECTORY, os.W_OK | os.X_OK):
        return availability()
    needed = segment_size(capacity)
    free = free_bytes()
    if free < needed:
        return f"{SHM_DIRECTORY} has {free} bytes free, the ring needs {needed}; use a smaller capacity= or {SHM_FIX}"
    return None


# --- the transport's descriptor (podipc.transport); one block, to move into the shm package (issue 9) ---

from podipc.transport import (  # noqa: E402 - appended as one block while this module is restructured
    DEV_SHM_FIX,
    AddressForm,
    Capability,
    Example,
    MessageLimit,
    ObjectKind,
    Transport,
)


def remove_leftover_segment(name: str) -> None:
    """Unlink a ring segment a killed consumer left, by its shm_open name (podipc clean)."""
    posix_ipc.unlink_shared_memory(name)


def remove_leftover_semaphore(name: str) -> None:
    """Unlink a wake-up semaphore a killed consumer left (podipc clean)."""
    posix_ipc.unlink_semaphore(name)


def leftover_segment_owner(name: str) -> Owner | None:
    """Who owns the ring segment of shm_open name `name` (podipc clean), None when there is none."""
    return _owner_of_file(segment_path(name.lstrip("/")))


def leftover_semaphore_owner(name: str) -> Owner | None:
    """Who owns the named semaphore `name` (podipc clean; Linux keeps it as /dev/shm/sem.NAME), None when none."""
    return _owner_of_file(os.path.join(SHM_DIRECTORY, "sem." + name.lstrip("/")))


def _owner_of_file(path: str) -> Owner | None:
    try:
        return Owner.of_status(os.lstat(path))
    except FileNotFoundError:
        return None


def _channel_objects(address: Address) -> tuple[tuple[str, str], ...]:
    """The segment and the two semaphores a ring's consumer creates (podipc clean)."""
    return (("posix_shm", "/" + address.name), *(("posix_sem", name) for name in semaphore_names(address.name)))


TRANSPORT = Transport(
    name="shm",
    title="shared-memory ring",
    schemes={"shm": AddressForm.NAME},
    producer="podipc.transports.shm:ShmProducer",
    consumer="podipc.transports.shm:ShmConsumer",
    examples=(Example("shm:///name", "shared-memory ring in /dev/shm"),),
    reliable=True,
    ordered=True,
    limit=MessageLimit(
        host_max_message_size,
        "half the default ring (capacity option)",
        f"raise the capacity option (or max_message_size) on both sides; the ring lives in /dev/shm: {DEV_SHM_FIX}",
        "half the ring's capacity",
    ),
    options=OPTIONS,
    capabilities=frozenset(
        {Capability.ZERO_COPY_RECEIVE, Capability.ZERO_COPY_SEND, Capability.PRESENCE_FILES, Capability.DATA_IN_DEV_SHM}
    ),
    availability=availability,
    unusable_fix=f"{DEV_SHM_FIX}; or open both sides with a smaller capacity= that fits /dev/shm",
    objects=(
        ObjectKind(
            "posix_shm",
            "POSIX shared-memory segment",
            "podipc.transports.shm:remove_leftover_segment",
            "podipc.transports.shm:leftover_segment_owner",
        ),
        ObjectKind(
            "posix_sem",
            "POSIX named semaphore",
            "podipc.transports.shm:remove_leftover_semaphore",
            "podipc.transports.shm:leftover_semaphore_owner",
        ),
    ),
    channel_objects=_channel_objects,
    rank=60,
)
