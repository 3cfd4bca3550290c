"""The objects of one ring in /dev/shm: the segment file and its two doorbells; create, replace stale, attach, unlink.

The consumer creates the semaphores /NAME.data and /NAME.space, then the segment
/dev/shm/NAME under a temporary name, all with `mode`; it locks the segment
(an exclusive flock it holds for as long as it lives), reserves its memory, writes the
header and renames it into place, so a producer never sees it half made. A segment
whose lock is free was left by a consumer that died: the next consumer removes it and
the semaphores before creating its own, and a producer attaches only to a locked one.
Only the consumer unlinks, and only the segment it created (the same inode).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import time

import posix_ipc

from podipc.address import Address
from podipc.errors import AddressError, ChannelUnavailable, PeerGone, PeerTimeout, ProtocolError
from podipc.ownership import Owner
from podipc.presence import PROBE_INTERVAL_SECONDS
from podipc.transport import DEV_SHM_FIX
from podipc.transports.shm.layout import HEADER_SIZE, RingHeader, decode_header, encode_header, segment_size
from podipc.transports.shm.waiter import Doorbell

SHM_DIRECTORY = "/dev/shm"
SHARE_FIX = "share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
SEMAPHORE_SUFFIXES = (".data", ".space")
SEMAPHORE_NAME_MAX = 251 - max(len(suffix) for suffix in SEMAPHORE_SUFFIXES)


def segment_path(name: str) -> str:
    """The file of the ring named `name`."""
    return os.path.join(SHM_DIRECTORY, name)


def semaphore_names(name: str) -> tuple[str, str]:
    """The named semaphores of a ring: (consumer wakes on data, producer wakes on space)."""
    return f"/{name}{SEMAPHORE_SUFFIXES[0]}", f"/{name}{SEMAPHORE_SUFFIXES[1]}"


def check_name(address: Address) -> None:
    """AddressError when the name is too long for the ring's semaphores."""
    if len(address.name) > SEMAPHORE_NAME_MAX:
        raise AddressError(f"{address.location}: shm names hold at most {SEMAPHORE_NAME_MAX} characters")


def free_bytes(directory: str | None = None) -> int:
    """Bytes an unprivileged process may still allocate in `directory` (default: /dev/shm)."""
    stats = os.statvfs(SHM_DIRECTORY if directory is None else directory)
    return stats.f_bavail * stats.f_frsize


def availability_for(capacity: int, ring: str = "the ring") -> str | None:
    """None when /dev/shm can take a ring of `capacity` bytes, else why not and the fix."""
    if not os.path.isdir(SHM_DIRECTORY):
        return f"there is no {SHM_DIRECTORY} in this container; {DEV_SHM_FIX}"
    if not os.access(SHM_DIRECTORY, os.W_OK | os.X_OK):
        return f"{SHM_DIRECTORY} is not writable here; {DEV_SHM_FIX}"
    try:
        free = free_bytes()
    except OSError as exc:
        return f"cannot stat {SHM_DIRECTORY}: {exc.strerror}; {DEV_SHM_FIX}"
    needed = segment_size(capacity)
    if free < needed:
        return f"{SHM_DIRECTORY} has {free} bytes free, {ring} needs {needed}; use a smaller capacity= or {DEV_SHM_FIX}"
    return None


def remove_leftover_segment(name: str) -> None:
    """Unlink a ring segment a killed consumer left, by its shm_open name (podipc clean; raises if gone)."""
    posix_ipc.unlink_shared_memory(name)


def remove_leftover_semaphore(name: str) -> None:
    """Unlink a wake-up semaphore a killed consumer left (podipc clean; raises if gone)."""
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


def channel_objects(address: Address) -> tuple[tuple[str, str], ...]:
    """The segment and the two semaphores a ring's consumer creates (podipc clean)."""
    return (("posix_shm", "/" + address.name), *(("posix_sem", name) for name in semaphore_names(address.name)))


class Mapping:
    """A mapped segment file: its descriptor, the mapping, and the views the ring works through."""

    def __init__(self, fd: int, size: int) -> None:
        """Map `size` bytes of the open file `fd` (this object owns `fd` from here on)."""
        self.fd = fd
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        """The mapping; slicing it copies (bytes), slice-assigning writes."""
        self.buffer = memoryview(self.map)
        """A writable view of the whole segment (loans are slices of it)."""
        self.readonly = self.buffer.toreadonly()
        """A read-only view of the whole segment (recv_view hands out slices of it)."""
        self.words = self.buffer.cast("Q")
        """The segment as native 8-byte words: index and flag words load and store whole."""

    def close(self) -> None:
        """Release the views, unmap and close the file (which drops a lock held on it)."""
        for view in (self.words, self.readonly, self.buffer):
            # BufferError: a caller still holds a slice; the map goes with the last one
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)


class Segment:
    """One ring's objects as this side holds them: the mapped segment and the two doorbells."""

    def __init__(self, path: str, mapping: Mapping, data: Doorbell, space: Doorbell) -> None:
        self.path = path
        self.mapping = mapping
        self.data = data
        """The consumer's doorbell: rung when data arrives."""
        self.space = space
        """The producer's doorbell: rung when room frees up (or the consumer leaves)."""

    @classmethod
    def create(cls, name: str, capacity: int, max_message_size: int, mode: int, location: str) -> Segment:
        """Create the doorbells, then the segment (locked, initialised, renamed into place).

        Raises ChannelUnavailable (with the fix) when /dev/shm cannot hold them; then leaves nothing behind.
        """
        created: list[tuple[Doorbell, str]] = []
        try:
            for doorbell_name in semaphore_names(name):
                try:
                    created.append((Doorbell.create(doorbell_name, mode), doorbell_name))
                except posix_ipc.Error as exc:
                    raise ChannelUnavailable(f"cannot create the semaphores of {location}: {exc}") from exc
            path = segment_path(name)
            mapping = _create_segment_file(path, capacity, max_message_size, mode)
        except BaseException:
            for doorbell, doorbell_name in created:
                doorbell.close()
                Doorbell.unlink(doorbell_name)
            raise
        return cls(path, mapping, created[0][0], created[1][0])

    @classmethod
    def attach(cls, name: str, location: str, deadline: float) -> tuple[Segment, RingHeader]:
        """Wait (until the monotonic `deadline`) for the live consumer's segment, map it, check it, open its doorbells.

        Raises PeerTimeout when it does not appear, ProtocolError for a bad header,
        PeerGone when its doorbells are gone.
        """
        path = segment_path(name)
        while True:
            fd = _open_live(path)
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise PeerTimeout(f"the consumer of {location} is there but its ring {path} did not appear in time")
            time.sleep(PROBE_INTERVAL_SECONDS)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ProtocolError(f"{path} is {size} bytes, smaller than a ring header")
            mapping = Mapping(fd, size)
        except BaseException:
            os.close(fd)
            raise
        doorbells: list[Doorbell] = []
        try:
            header = decode_header(mapping.readonly)
            try:
                doorbells.extend(Doorbell.open(doorbell_name) for doorbell_name in semaphore_names(name))
            except posix_ipc.Error as exc:
                raise PeerGone(f"the consumer of {location} removed its semaphores ({exc})") from exc
        except BaseException:
            mapping.close()
            for doorbell in doorbells:
                doorbell.close()
            raise
        return cls(path, mapping, doorbells[0], doorbells[1]), header

    @staticmethod
    def remove_stale(name: str) -> None:
        """Remove a segment and semaphores left by a consumer that died (nobody holds the segment's lock).

        Raises ChannelUnavailable when a live consumer holds it, or it cannot be opened.
        """
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise ChannelUnavailable(f"cannot open {path}: {exc.strerror}; {SHARE_FIX}") from exc
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ChannelUnavailable(f"{path} is in use by another consumer; a channel has one consumer") from exc
            finally:
                os.close(fd)
            _unlink_quietly(path)
        Segment.unlink_semaphores(name)

    @staticmethod
    def unlink_semaphores(name: str) -> None:
        """Remove the ring's semaphores if they exist."""
        for semaphore_name in semaphore_names(name):
            Doorbell.unlink(semaphore_name)

    def same_file(self) -> bool:
        """True while the segment's path still names the file this side mapped (it was not removed or replaced)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.mapping.fd).st_ino
        except FileNotFoundError:
            return False

    def unlink(self) -> None:
        """Remove the segment's file if it is still the one mapped here (the consumer's part)."""
        if self.same_file():
            _unlink_quietly(self.path)

    def close(self) -> None:
        """Unmap and close the segment (dropping its lock) and this side's doorbell handles."""
        self.mapping.close()
        self.data.close()
        self.space.close()


def _create_segment_file(path: str, capacity: int, max_message_size: int, mode: int) -> Mapping:
    """Create the segment under a temporary name next to `path`: lock, allocate, map, write the header, rename."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise ChannelUnavailable(f"cannot create {temporary}: {exc.strerror}; {DEV_SHM_FIX}") from exc
    mapping: Mapping | None = None
    try:
        os.fchmod(fd, mode)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = segment_size(capacity)
        _allocate(fd, size)
        mapping = Mapping(fd, size)
        mapping.map[:HEADER_SIZE] = encode_header(capacity, max_message_size)
        os.rename(temporary, path)
    except BaseException:
        if mapping is None:
            os.close(fd)
        else:
            mapping.close()
        _unlink_quietly(temporary)
        raise
    return mapping


def _allocate(fd: int, size: int) -> None:
    """Reserve the segment's memory now, so a full /dev/shm fails here and not with SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise ChannelUnavailable(
                f"{SHM_DIRECTORY} cannot hold a {size}-byte ring ({free_bytes()} bytes free); "
                f"use a smaller capacity= or {DEV_SHM_FIX}"
            ) from exc
        os.ftruncate(fd, size)  # a filesystem without fallocate


def _open_live(path: str) -> int | None:
    """An fd of the segment if it exists and its consumer holds its lock; else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChannelUnavailable(f"cannot open {path}: {exc.strerror}; {SHARE_FIX}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd  # locked by its live consumer
    os.close(fd)  # nobody holds it: a stale segment the consumer is about to replace
    return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
