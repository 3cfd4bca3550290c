"""The readiness descriptor of a spool endpoint: inotify on the spool directory, plus a kick.

A spool has no kernel object to wait on, so a side watches the directory with inotify
(libc through ctypes; standard library only). inotify reports changes to an inode made by
any process of the machine's kernel, so it works across the containers of a pod that mount
the same emptyDir. Events on a watch merge while unread, so a busy writer costs a reader
one wakeup, not one per write (the writer pays about 0.7 us per write for the event).

`Readiness.fileno()` is an epoll descriptor holding the inotify descriptor and an eventfd
(the kick): readable when the directory changed or the endpoint kicked itself (the peer was
lost, the spool has room again). A side drains it only inside an attempt that found nothing
to do, and then looks again, so no change is missed (spurious wakes are fine).

Where inotify is unavailable (no libc symbol, `fs.inotify.max_user_instances` reached, a
file system that reports nothing), `watching` is False and the side polls at a backoff
instead (`POLL_FIRST_SECONDS` up to `POLL_MAX_SECONDS`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
CONSUMER_DIRECTORY_EVENTS = IN_MOVED_TO | IN_CLOSE_WRITE
"""A consumer wakes when a segment appears (renamed into place with its header, or written whole and closed)..."""
CONSUMER_SEGMENT_EVENTS = IN_MODIFY
"""...and when the segment it reads grows (a watch on that file: writes elsewhere in the directory, such as a
presence claim, do not wake it)."""
PRODUCER_DIRECTORY_EVENTS = IN_CREATE | IN_DELETE
"""A producer wakes when the consumer's position file appears or a segment goes (the end-of-stream ack)..."""
PRODUCER_POSITION_EVENTS = IN_MODIFY
"""...and when the consumer rings (rewrites the ring counter of its position file)."""
POLL_FIRST_SECONDS = 0.001
POLL_MAX_SECONDS = 0.05
"""Without inotify, an idle side looks again at most this long after the last look."""
DRAIN_BYTES = 64 * 1024
_KICK = (1).to_bytes(8, "little")


class _Libc:
    """inotify_init1 and inotify_add_watch from the C library, loaded on first use."""

    def __init__(self) -> None:
        self.init1: ctypes._NamedFuncPointer | None = None
        self.add_watch: ctypes._NamedFuncPointer | None = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.init1 = libc.inotify_init1
            self.add_watch = libc.inotify_add_watch
        except (OSError, AttributeError):
            return
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int


_LIBC: _Libc | None = None


def _libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def inotify_init() -> int:
    """A new non-blocking, close-on-exec inotify descriptor; raises OSError when there is none to be had."""
    libc = _libc()
    if libc.init1 is None:
        raise OSError(errno.ENOSYS, "inotify is not available from the C library")
    fd = int(libc.init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def add_watch(inotify_fd: int, path: str, mask: int) -> int:
    """Watch `path` for the events in `mask`; the watch descriptor. Raises OSError."""
    libc = _libc()
    assert libc.add_watch is not None
    watch = int(libc.add_watch(inotify_fd, os.fsencode(path), mask))
    if watch < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return watch


def through_descriptor(fd: int) -> str:
    """A path (/proc/self/fd/N) that reaches the very file or directory open as `fd`, wherever it is now."""
    return f"/proc/self/fd/{fd}"


class Readiness:
    """An epoll descriptor that becomes readable when the spool directory changes or the endpoint is kicked."""

    def __init__(self, dir_fd: int, fallback_path: str, events: int) -> None:
        self._epoll = select.epoll()
        self._kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._kick_fd, select.EPOLLIN)
        self._inotify_fd = -1
        self._watched: set[int] = set()
        self.problem = ""
        """Why there is no inotify watch ('' when watching)."""
        try:
            self._inotify_fd = inotify_init()
            self._add(through_descriptor(dir_fd), fallback_path, events | IN_ONLYDIR)
            self._epoll.register(self._inotify_fd, select.EPOLLIN)
        except OSError as exc:
            self.problem = f"inotify: {exc.strerror or exc}"
            if self._inotify_fd >= 0:
                os.close(self._inotify_fd)
                self._inotify_fd = -1

    @property
    def watching(self) -> bool:
        """True when changes to the directory make the descriptor readable (else: poll at a backoff)."""
        return self._inotify_fd >= 0

    def _add(self, path: str, fallback_path: str, mask: int) -> int:
        try:
            watch = add_watch(self._inotify_fd, path, mask & ~IN_DONT_FOLLOW)
        except FileNotFoundError:  # no /proc: the path itself
            watch = add_watch(self._inotify_fd, fallback_path, mask)
        self._watched.add(watch)
        return watch

    def watch_file(self, fd: int, fallback_path: str, events: int) -> bool:
        """Also watch the file open as `fd` (the very file: its watch ends when it is removed); False if it cannot be."""
        if self._inotify_fd < 0:
            return False
        try:
            self._add(through_descriptor(fd), fallback_path, events | IN_DONT_FOLLOW)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        """The epoll descriptor (stable for the endpoint's life)."""
        return self._epoll.fileno()

    def kick(self) -> None:
        """Make the descriptor readable (any thread, or the peer monitor's callback: one write)."""
        fd = self._kick_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, _KICK)

    def drain(self) -> None:
        """Forget what happened so far; call before looking at the spool again."""
        with contextlib.suppress(OSError):
            os.read(self._kick_fd, 8)
        if self._inotify_fd >= 0:
            with contextlib.suppress(OSError):
                while len(os.read(self._inotify_fd, DRAIN_BYTES)) == DRAIN_BYTES:
                    pass

    def close(self) -> None:
        """Close every descriptor. Idempotent."""
        if self._kick_fd < 0:
            return
        self._epoll.close()
        os.close(self._kick_fd)
        self._kick_fd = -1
        if self._inotify_fd >= 0:
            os.close(self._inotify_fd)
            self._inotify_fd = -1
