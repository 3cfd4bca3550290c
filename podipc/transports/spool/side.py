"""What both sides of a spool share: the directory, backoff, the peer's liveness, and the options."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, ClassVar

from podipc.address import Address
from podipc.channel import Option, parse_bool, parse_count, parse_seconds, parse_size
from podipc.errors import (
    ChannelUnavailable,
    PeerGone,
    PeerTimeout,
)
from podipc.presence import PRESENCE_PREFIX, PeerState, Presence
from podipc.transports.spool.wire import (
    DEFAULT_DEPTH,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGE_SIZE,
    DIRECTORY_MARKER,
    FIRST_BACKOFF_SECONDS,
    MAX_BACKOFF_SECONDS,
    NO_SPACE_ERRNOS,
    PRESENCE_TOKEN,
    PROBE_SECONDS,
    SPIN_POLLS,
    WRITE_FLAGS,
    done_name,
    message_name,
)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def directory_mode(mode: int) -> int:
    """A directory mode for file mode `mode`: x wherever r (0600 -> 0700, 0660 -> 0770)."""
    return mode | ((mode & 0o444) >> 2)


def remove_quietly(name: str, dir_fd: int) -> bool:
    """Remove a spool entry (a file, or an empty directory someone put there); True if removed."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        pass
    except OSError:
        return False
    try:
        os.rmdir(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False


def entry_exists(name: str, dir_fd: int) -> bool:
    """True if the spool holds an entry `name` (symlinks are not followed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def exists_in_stream(sequence: int, dir_fd: int) -> bool:
    """True if message `sequence` is in the spool, pending or committed (checked in that order)."""
    return entry_exists(message_name(sequence), dir_fd) or entry_exists(done_name(sequence), dir_fd)


class Backoff:
    """Sleeps between polls: SPIN_POLLS without sleeping, then doubling up to MAX_BACKOFF_SECONDS."""

    __slots__ = ("polls", "sleep")

    def __init__(self) -> None:
        self.polls = 0
        self.sleep = FIRST_BACKOFF_SECONDS

    def pause(self, deadline: float | None) -> None:
        """Wait a little before the next poll (never past `deadline`)."""
        self.polls += 1
        if self.polls <= SPIN_POLLS:
            return
        delay = self.sleep
        self.sleep = min(delay * 2, MAX_BACKOFF_SECONDS)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(delay)


class PeerWatch:
    """Decides, while a side waits on its peer, whether to go on waiting or give up.

    Peer alive: wait. Seen alive before and now not: wait `restart_wait` seconds for a
    restarted peer, then PeerGone. Never seen alive: wait until the `wait` deadline,
    then PeerTimeout.
    """

    def __init__(self, presence: Presence, restart_wait: float, wait_deadline: float, what: str) -> None:
        self.presence = presence
        self.restart_wait = restart_wait
        self.wait_deadline = wait_deadline
        self.what = what
        self.lost_at: float | None = None
        self.next_probe = 0.0
        self.stale_identity = self._peer_identity() if presence.peer_state() is PeerState.GONE else None

    def _peer_identity(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.presence.peer_path)
        except OSError:
            return None
        return status.st_ino, status.st_ctime_ns

    def due(self, now: float) -> bool:
        """True when it is time to probe the peer again."""
        return now >= self.next_probe

    def verdict(self, now: float, peer_was_here: bool = False) -> PeerGone | PeerTimeout | None:
        """Probe the peer; the error to raise if waiting for it should stop, else None.

        `peer_was_here`: the caller has other proof that the peer lived after we opened
        (the consumer committed messages of ours).
        """
        self.next_probe = now + PROBE_SECONDS
        state = self.presence.peer_state()
        if state is PeerState.ALIVE:
            self.lost_at = None
            return None
        peer = "consumer" if self.presence.role == "producer" else "producer"
        if peer_was_here or (state is PeerState.GONE and self._peer_identity() != self.stale_identity):
            self.presence.peer_seen = True  # it came and left between two probes: not the stale file of a past run
        if self.presence.peer_seen:
            if self.lost_at is None:
                self.lost_at = now
            if now - self.lost_at < self.restart_wait:
                return None
            waited = f" and did not come back within restart_wait={self.restart_wait:g}s" if self.restart_wait else ""
            return PeerGone(
                f"the {peer} of {self.what} is gone (it died or closed without ending the stream){waited}; "
                "the spool keeps the stream: a restarted side resumes it"
            )
        if now < self.wait_deadline:
            return None
        dead = " (its presence file shows the last one died)" if state is PeerState.GONE else ""
        return PeerTimeout(
            f"no {peer} appeared on {self.what} within the wait timeout (start it, or allow longer with ?wait=SECONDS){dead}"
        )


def spool_error(error: OSError, path: str) -> ChannelUnavailable:
    """The podipc error for an OSError on the spool (full volume, vanished directory, permissions)."""
    if error.errno in NO_SPACE_ERRNOS:
        return ChannelUnavailable(
            f"the spool volume of {path} is full ({error.strerror}); raise the emptyDir sizeLimit "
            "or lower the depth/max_bytes options"
        )
    return ChannelUnavailable(f"the spool {path} failed: {error.strerror} ({error.filename or path})")


SPOOL_OPTIONS = (
    Option("max_message_size", parse_size, DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes"),
    Option("depth", parse_count, DEFAULT_DEPTH, "messages in the spool at most before send() waits"),
    Option("max_bytes", parse_size, DEFAULT_MAX_BYTES, "bytes of messages in the spool at most before send() waits"),
    Option("restart_wait", parse_seconds, 0.0, "seconds to wait for a restarted peer before PeerGone"),
    Option("fsync", parse_bool, False, "fsync each message file and the directory (survive a node crash)"),
)


class SpoolSide:
    """Opening a spool directory: create it if missing, hold an fd on it, claim presence; the shared options."""

    options: ClassVar[tuple[Option, ...]] = SPOOL_OPTIONS
    max_message_source = "the file:// max_message_size option"
    max_message_fix = "raise max_message_size on both sides (file:///dir?max_message_size=128MiB)"
    path: str
    role: str
    settings: dict[str, Any]
    address: Address

    def _open_spool(self) -> None:
        self.path = self.address.path.rstrip("/") or "/"
        self._mode = int(self.settings["mode"])
        self._chmod_needed = bool(self._mode & current_umask())
        self._created_directory = self._make_directory()
        try:
            self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot open the spool directory {self.path}: {exc.strerror}; when the containers run as "
                "different users, share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
            ) from exc
        try:
            if self._created_directory:
                self._write_empty(DIRECTORY_MARKER)
            self._presence = Presence(PRESENCE_TOKEN, self.role, self._mode, directory=self.path)
        except OSError as exc:
            os.close(self._dir_fd)
            raise spool_error(exc, self.path) from exc
        except BaseException:
            os.close(self._dir_fd)
            raise

    def _make_directory(self) -> bool:
        try:
            os.mkdir(self.path, directory_mode(self._mode))
        except FileExistsError:
            if not os.path.isdir(self.path):
                raise ChannelUnavailable(
                    f"{self.path} exists and is not a directory; file:// needs a directory"
                ) from None
            return False
        except FileNotFoundError as exc:
            raise ChannelUnavailable(
                f"cannot create the spool {self.path}: its parent directory does not exist; "
                "mount the shared emptyDir there (or point file:// into it)"
            ) from exc
        except OSError as exc:
            raise ChannelUnavailable(f"cannot create the spool directory {self.path}: {exc.strerror}") from exc
        os.chmod(self.path, directory_mode(self._mode))
        return True

    def _remove_stale_presence_temporaries(self) -> None:
        stale = f"{PRESENCE_PREFIX}{PRESENCE_TOKEN}.{self.role}."
        for name in os.listdir(self._dir_fd):
            if name.startswith(stale) and name.endswith(".tmp"):
                remove_quietly(name, self._dir_fd)

    def _write_empty(self, name: str) -> None:
        fd = os.open(name, WRITE_FLAGS, self._mode, dir_fd=self._dir_fd)
        try:
            if self._chmod_needed:
                os.fchmod(fd, self._mode)
        finally:
            os.close(fd)

    def _leave(self) -> None:
        """Drop presence, remove the directory if podipc made it and nothing else is left, close the fd."""
        self._presence.close()
        self._remove_directory_if_made()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _remove_directory_if_made(self) -> None:
        try:
            names = os.listdir(self._dir_fd)
        except OSError:
            return
        if names != [DIRECTORY_MARKER]:
            return
        remove_quietly(DIRECTORY_MARKER, self._dir_fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
