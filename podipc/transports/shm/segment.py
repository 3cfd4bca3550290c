"""The objects of one ring in /dev/shm: the segment, two doorbells and two wake-up FIFOs; create, trust, attach, unlink.

The consumer creates the semaphores /NAME.data and /NAME.space, the FIFOs
/dev/shm/podipc.wake.TOKEN.data and .space, then the segment /dev/shm/NAME under a
temporary name, all with `mode`; it locks the segment (an exclusive flock it holds for as
long as it lives), reserves its memory, writes the header and renames it into place, so a
producer never sees it half made. Only the consumer unlinks, and only what it created.

Trust (podipc.ownership): every object found instead of created is opened without
following a link or blocking and checked for kind and owner before use: another user's
segment, semaphore or FIFO (or one of ours that is not what it should be: a file at the
segment's path without the ring's magic) is refused with ChannelUnavailable naming the
owner, never read, written or removed. With group sharing (mode=0660) a common group's
objects are used; a dead consumer's objects owned by another member cannot be removed
(the sticky /dev/shm): the error says to run `podipc clean` as their owner.

A consumer that died leaves its objects; the next consumer (it holds the consumer's
presence, so no live consumer has them) removes them before creating its own, and a
producer attaches only to a locked segment. The segment's size is checked at attach and
whenever a side asks (`check_size`): a segment truncated under a mapping would kill the
process with SIGBUS on its next access.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import time

import posix_ipc

from podipc.address import Address
from podipc.errors import AddressError, ChannelUnavailable, PeerGone, ProtocolError
from podipc.ownership import Owner, Trust, check_path, open_checked, owner_text
from podipc.transport import DEV_SHM_FIX
from podipc.transports.shm.broadcast_layout import MAX_SLOTS
from podipc.transports.shm.layout import (
    BROADCAST_VERSION,
    FEATURE_PACKS,
    HEADER_SIZE,
    IDENTITY,
    MAGIC,
    VERSION,
    RingHeader,
    decode_header,
    encode_header,
    segment_size,
)
from podipc.transports.shm.waiter import Doorbell, WakeFifo, semaphore_file

SHM_DIRECTORY = "/dev/shm"
SHARE_FIX = "share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
SEMAPHORE_SUFFIXES = (".data", ".space")
SEMAPHORE_NAME_MAX = 251 - max(len(suffix) for suffix in SEMAPHORE_SUFFIXES)
FIFO_KIND = "wake_fifo"
"""The presence-record kind of the wake-up FIFOs (podipc clean)."""
FIFO_PREFIX = "podipc.wake."
"""The wake-up FIFOs are /dev/shm/podipc.wake.TOKEN.data and .space (TOKEN: the channel token)."""


def segment_path(name: str) -> str:
    """The file of the ring named `name`."""
    return os.path.join(SHM_DIRECTORY, name)


def semaphore_names(name: str) -> tuple[str, str]:
    """The named semaphores of a ring: (consumer wakes on data, producer wakes on space)."""
    return f"/{name}{SEMAPHORE_SUFFIXES[0]}", f"/{name}{SEMAPHORE_SUFFIXES[1]}"


def fifo_paths(token: str) -> tuple[str, str]:
    """The wake-up FIFOs of a channel: (the consumer polls it for data, the producer for space)."""
    return tuple(os.path.join(SHM_DIRECTORY, f"{FIFO_PREFIX}{token}{suffix}") for suffix in SEMAPHORE_SUFFIXES)  # type: ignore[return-value]


def broadcast_fifo_paths(token: str) -> tuple[str, ...]:
    """The per-slot FIFOs a broadcast producer may create (podipc.wake.TOKEN.data.K; its own is fifo_paths' .space)."""
    return tuple(os.path.join(SHM_DIRECTORY, f"{FIFO_PREFIX}{token}.data.{slot}") for slot in range(MAX_SLOTS))


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
    return _owner_of_file(semaphore_file(name))


def remove_leftover_fifo(path: str) -> None:
    """Unlink a wake-up FIFO a killed consumer left, by its path (podipc clean; raises if gone or not a FIFO)."""
    if not stat.S_ISFIFO(os.lstat(path).st_mode):
        raise PermissionError(errno.EPERM, f"{path} is not a FIFO")
    os.unlink(path)


def leftover_fifo_owner(path: str) -> Owner | None:
    """Who owns the wake-up FIFO at `path` (podipc clean), None when there is none; ValueError for anything else there."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISFIFO(status.st_mode) or os.path.dirname(path) != SHM_DIRECTORY:
        raise ValueError(f"{path} is not a wake-up FIFO in {SHM_DIRECTORY}")
    return Owner.of_status(status)


def _owner_of_file(path: str) -> Owner | None:
    try:
        return Owner.of_status(os.lstat(path))
    except FileNotFoundError:
        return None


def channel_objects(address: Address) -> tuple[tuple[str, str], ...]:
    """The segment, semaphores and FIFOs a pair ring's consumer or a broadcast ring's producer creates (podipc clean)."""
    return (
        ("posix_shm", "/" + address.name),
        *(("posix_sem", name) for name in semaphore_names(address.name)),
        *((FIFO_KIND, path) for path in fifo_paths(address.token)),
        *((FIFO_KIND, path) for path in broadcast_fifo_paths(address.token)),
    )


class Mapping:
    """A mapped segment file: its descriptor, the mapping, and the views the ring works through."""

    def __init__(self, fd: int, size: int) -> None:
        """Map `size` bytes (a multiple of 8) of the open file `fd` (this object owns `fd` from here on)."""
        self.fd = fd
        self.size = size
        """Bytes mapped: the file must stay at least this long."""
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Segment:
    """One ring's objects as this side holds them: the mapped segment, the two doorbells, the FIFOs."""

    def __init__(
        self,
        path: str,
        mapping: Mapping,
        data: Doorbell,
        space: Doorbell,
        data_fifo: WakeFifo | None,
        space_fifo: WakeFifo | None,
    ) -> None:
        self.path = path
        self.mapping = mapping
        self.data = data
        """The consumer's doorbell: rung when data arrives."""
        self.space = space
        """The producer's doorbell: rung when room frees up (or the consumer leaves)."""
        self.data_fifo = data_fifo
        """The FIFO a consumer waiting on a descriptor polls; None on a ring without FIFOs (a plain consumer's)."""
        self.space_fifo = space_fifo
        """The FIFO a producer waiting on a descriptor polls; None on a ring without FIFOs."""

    @classmethod
    def create(cls, address: Address, capacity: int, max_message_size: int, mode: int) -> Segment:
        """Create the doorbells and FIFOs, then the segment (locked, initialised, renamed into place).

        Raises ChannelUnavailable (with the fix) when /dev/shm cannot hold them; then leaves nothing behind.
        """
        created: list[tuple[Doorbell, str]] = []
        fifos: list[tuple[WakeFifo, str]] = []
        try:
            for doorbell_name in semaphore_names(address.name):
                try:
                    created.append((Doorbell.create(doorbell_name, mode), doorbell_name))
                except posix_ipc.Error as exc:
                    raise ChannelUnavailable(f"cannot create the semaphores of {address.location}: {exc}") from exc
            for path in fifo_paths(address.token):
                try:
                    fifos.append((WakeFifo.create(path, mode), path))
                except OSError as exc:
                    raise ChannelUnavailable(
                        f"cannot create the wake-up FIFO {path} of {address.location}: {exc.strerror}; {DEV_SHM_FIX}"
                    ) from exc
            mapping = _create_segment_file(segment_path(address.name), capacity, max_message_size, mode)
        except BaseException:
            for doorbell, doorbell_name in created:
                doorbell.close()
                Doorbell.unlink(doorbell_name)
            for fifo, path in fifos:
                fifo.close()
                _unlink_quietly(path)
            raise
        return cls(segment_path(address.name), mapping, created[0][0], created[1][0], fifos[0][0], fifos[1][0])

    @classmethod
    def try_attach(cls, address: Address, trust: Trust) -> tuple[Segment, RingHeader] | None:
        """Map the live consumer's segment, check it and open its doorbells and FIFOs; None while it is not there.

        Raises ChannelUnavailable for an object we do not trust, ProtocolError for a bad
        header or size, PeerGone when the consumer's doorbells are gone.
        """
        path = segment_path(address.name)
        fd = _open_live(path, trust)
        if fd is None:
            return None
        try:
            header, size = _read_header(fd, path)
            mapping = Mapping(fd, size)
        except BaseException:
            os.close(fd)
            raise
        doorbells: list[Doorbell] = []
        fifos: list[WakeFifo | None] = []
        try:
            for doorbell_name in semaphore_names(address.name):
                doorbells.append(_open_doorbell(doorbell_name, trust, address.location))
            fifos.extend(_open_fifo(fifo_path, trust) for fifo_path in fifo_paths(address.token))
        except BaseException:
            mapping.close()
            for doorbell in doorbells:
                doorbell.close()
            for fifo in fifos:
                if fifo is not None:
                    fifo.close()
            raise
        return cls(path, mapping, doorbells[0], doorbells[1], fifos[0], fifos[1]), header

    @staticmethod
    def remove_stale(address: Address, trust: Trust, version: int = VERSION) -> None:
        """Remove what a consumer that died left (we hold the consumer's presence, so no live one has it).

        `version`: the ring version this side makes; a live ring of the other pattern is a ProtocolError.

        Raises ChannelUnavailable, naming the owner, for anything we do not trust or cannot
        prove is a podipc ring's: nothing is read from, written to or removed then.
        """
        path = segment_path(address.name)
        what = f"the ring {path}"
        try:
            fd = open_checked(path, os.O_RDONLY, trust, what)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    _refuse_other_pattern(fd, path, version)
                    raise ChannelUnavailable(
                        f"{path} is in use by another consumer; a channel has one consumer"
                    ) from exc
                if os.pread(fd, len(MAGIC), 0) != MAGIC:
                    status = os.fstat(fd)
                    raise ChannelUnavailable(
                        f"{path} exists and is not a podipc ring ({owner_text(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))}); "
                        "podipc never removes it: remove it yourself or use another channel name"
                    )
            finally:
                os.close(fd)
            _remove_found(path, what)
        for semaphore_name in semaphore_names(address.name):
            semaphore_what = f"the semaphore {semaphore_name} ({semaphore_file(semaphore_name)})"
            if check_path(semaphore_file(semaphore_name), trust, semaphore_what) is not None:
                _remove_found(semaphore_file(semaphore_name), semaphore_what)
        for fifo_path in fifo_paths(address.token):
            fifo_what = f"the wake-up FIFO {fifo_path}"
            if check_path(fifo_path, trust, fifo_what, (stat.S_IFIFO,)) is not None:
                _remove_found(fifo_path, fifo_what)

    def check_size(self) -> None:
        """ProtocolError when the segment's file is now shorter than the mapping (something truncated it)."""
        fd = self.mapping.fd
        if fd < 0:
            return
        size = os.fstat(fd).st_size
        if size < self.mapping.size:
            raise ProtocolError(
                f"shm ring {self.path} shrank to {size} bytes while mapped with {self.mapping.size}: something "
                "truncated it (its owner, or its group with mode=0660); the stream cannot go on"
            )

    def truncated(self) -> bool:
        """True when check_size() would raise (for the peer monitor; never raises)."""
        try:
            self.check_size()
        except (ProtocolError, OSError):
            return True
        return False

    def same_file(self) -> bool:
        """True while the segment's path still names the file this side mapped (it was not removed or replaced)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.mapping.fd).st_ino
        except (FileNotFoundError, OSError):
            return False

    def unlink_created(self, address: Address) -> None:
        """Remove what the consumer created, where its path still names it: segment, semaphores, FIFOs."""
        if self.same_file():
            _unlink_quietly(self.path)
        for semaphore_name in semaphore_names(address.name):
            Doorbell.unlink(semaphore_name)
        for fifo, path in zip((self.data_fifo, self.space_fifo), fifo_paths(address.token), strict=True):
            if fifo is not None and fifo.fd >= 0 and _same_inode(path, fifo.fd):
                _unlink_quietly(path)

    def close(self) -> None:
        """Unmap and close the segment (dropping its lock), this side's doorbell handles and FIFO descriptors."""
        self.mapping.close()
        self.data.close()
        self.space.close()
        for fifo in (self.data_fifo, self.space_fifo):
            if fifo is not None:
                fifo.close()


def _read_header(fd: int, path: str) -> tuple[RingHeader, int]:
    """The checked header of the segment open as `fd`, and how many bytes of it to map."""
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE:
        raise ProtocolError(f"{path} is {size} bytes, smaller than a ring header")
    header = decode_header(os.pread(fd, HEADER_SIZE, 0), size)
    return header, segment_size(header.capacity)


def _refuse_other_pattern(fd: int, path: str, version: int) -> None:
    """ProtocolError when the live ring open as `fd` is of the other pattern than `version` (pair or broadcast)."""
    identity = os.pread(fd, IDENTITY.size, 0)
    if len(identity) < IDENTITY.size:
        return
    magic, found, *_ = IDENTITY.unpack(identity)
    if magic != MAGIC or found == version or found not in (VERSION, BROADCAST_VERSION):
        return
    patterns = {VERSION: "pair", BROADCAST_VERSION: "broadcast"}
    raise ProtocolError(
        f"{path} is a live {patterns[found]} ring (opened with pattern={patterns[found]}); "
        f"this side asked for pattern={patterns[version]}: open every side with the same pattern"
    )


def _open_doorbell(name: str, trust: Trust, location: str) -> Doorbell:
    path = semaphore_file(name)
    if check_path(path, trust, f"the semaphore {name} ({path})") is None:
        raise PeerGone(f"the consumer of {location} removed its semaphore {name}")
    try:
        return Doorbell.open(name)
    except posix_ipc.Error as exc:
        raise PeerGone(f"the consumer of {location} removed its semaphore {name} ({exc})") from exc


def _open_fifo(path: str, trust: Trust) -> WakeFifo | None:
    """The consumer's FIFO at `path`, checked; None when there is none (a ring made without FIFOs)."""
    what = f"the wake-up FIFO {path}"
    try:
        return WakeFifo(open_checked(path, os.O_RDWR, trust, what, (stat.S_IFIFO,)))
    except FileNotFoundError:
        return None


def _remove_found(path: str, what: str) -> None:
    """Unlink a dead consumer's object (checked); ChannelUnavailable when we may not (sticky /dev/shm)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        status = os.lstat(path)
        owner = owner_text(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))
        raise ChannelUnavailable(
            f"cannot remove {what}, left by a consumer that died ({owner}): {exc.strerror}; "
            "run `podipc clean` as its owner"
        ) from exc


def _same_inode(path: str, fd: int) -> bool:
    try:
        return os.lstat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _create_segment_file(path: str, capacity: int, max_message_size: int, mode: int) -> Mapping:
    """Create the segment under a temporary name next to `path`: lock, allocate, map, write the header, rename."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise ChannelUnavailable(f"cannot create {temporary}: {exc.strerror}; {DEV_SHM_FIX}") from exc
    mapping: Mapping | None = None
    try:
        os.fchmod(fd, mode)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = segment_size(capacity)
        _allocate(fd, size)
        mapping = Mapping(fd, size)
        mapping.map[:HEADER_SIZE] = encode_header(capacity, max_message_size, FEATURE_PACKS)
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


def _open_live(path: str, trust: Trust) -> int | None:
    """A checked fd of the segment if it exists and its consumer holds its lock; else None."""
    try:
        fd = open_checked(path, os.O_RDWR, trust, f"the ring {path}")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd  # locked by its live consumer
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)  # nobody holds it: a stale segment the consumer is about to replace
    return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
