"""file:// — messages as files in a spool directory on a shared emptyDir.

Address
    file:///ABSOLUTE/DIRECTORY[?option=value&...]

    The directory is the channel: both containers mount the same emptyDir (at any
    mount path; nothing in the spool depends on the path). Query options:

    max_message_size  largest message in bytes (default 64 MiB); a consumer skips and
                      counts (Consumer.skipped) message files larger than its own limit
    depth             messages in the spool at most before send() waits (default 1024)
    max_bytes         bytes of messages in the spool at most before send() waits
                      (default 256 MiB; one message larger than this is still written
                      into an empty spool)
    restart_wait      seconds a side waits for a restarted peer before PeerGone (default 0)
    fsync             fsync every message file and the directory (default off)
    wait, mode        as on every channel (mode applies to files; the directory, when
                      podipc creates it, gets mode plus the matching x bits)

Requires
    Nothing but a directory both sides can write (an emptyDir, medium Memory or disk).

Semantics
    Boundaries: one message = one file, so boundaries and order are kept; a zero-length
    file is a zero-length message. Every message file is written under a temporary name
    and renamed into place, so a consumer never sees half a message.

    Wire format (docs/wire/file.md): ``podipc.msg.<20-digit sequence>`` holds message
    number <sequence> (0-based) and nothing else; ``podipc.end.<N>`` (empty) ends a
    stream of N messages; ``podipc.done.<sequence>`` is the last committed message (the
    consumer renames a message file to it, then unlinks the previous one);
    ``podipc.part.*`` are temporaries; ``podipc.presence.spool.*`` are the liveness
    files of podipc.presence.

    Reliability: the stream belongs to the spool, not to a process. A restarted producer
    finds the next sequence number in the spool (``resumed_at`` = messages already in
    the stream) and removes half-written temporaries; a restarted consumer continues
    after its last committed message. A message is committed (renamed to done) inside
    recv() before it is returned: a consumer killed between recv() calls loses and
    repeats nothing (exactly once); killed inside recv() after the commit, it loses
    that one message (at most once). With fsync off (the default) the spool survives
    container restarts, not a node crash — like the emptyDir itself.

    Garbage: a message file larger than max_message_size, not a regular file, a symlink,
    or with a malformed ``podipc.msg.*``/``done``/``end`` name is skipped, removed and
    counted in Consumer.skipped; other names are never touched; a gap before the end marker raises ProtocolError. Sizes are taken
    from fstat and checked before a byte is read.

    Liveness: podipc.presence files in the spool directory itself (no /dev/shm needed).
    A side that saw its peer alive raises PeerGone within a second of its death when it
    has to wait for it (empty or full spool, or the end of stream not yet taken), unless
    restart_wait allows a restarted peer to take over. Messages already in the spool are
    still delivered after the producer died.

    Max message: 64 MiB by default, this channel's own option (no kernel limit applies).

    Who creates and who removes: either side creates the directory when missing (and
    removes it again at a clean end); the producer creates message files and the end
    marker; the consumer commits and removes them, and at the end of stream removes
    every spool file (the directory stays if it existed before). Files of an unfinished
    stream stay in the spool: that is what lets a restarted side resume it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import time
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, parse_bool, parse_count, parse_seconds, parse_size
from podipc.errors import (
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.presence import PRESENCE_PREFIX, PeerState, Presence, probe

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024**2
DEFAULT_DEPTH = 1024
DEFAULT_MAX_BYTES = 256 * 1024**2

SPOOL_PREFIX = "podipc."
MESSAGE_PREFIX = "podipc.msg."
DONE_PREFIX = "podipc.done."
END_PREFIX = "podipc.end."
PART_PREFIX = "podipc.part."
DIRECTORY_MARKER = "podipc.directory"
PRESENCE_TOKEN = "spool"
SEQUENCE_DIGITS = 20
MAX_SEQUENCE = 10**SEQUENCE_DIGITS - 1

SPIN_POLLS = 16
"""Polls without sleeping before the backoff starts (a message usually follows soon)."""
FIRST_BACKOFF_SECONDS = 50e-6
MAX_BACKOFF_SECONDS = 0.005
"""Longest sleep between polls of an idle spool: bounds latency and idle CPU."""
PROBE_SECONDS = 0.1
"""How often a waiting side probes its peer's presence (PeerGone comes within this)."""
RESUME_ATTEMPTS = 1000
TRUNCATE_THRESHOLD = 1024**2
"""A committed message at least this large is truncated, so the done file holds no memory."""

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNREADABLE_ERRNOS = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV})
"""open() errors that mean the entry is no message (a symlink, a socket, not readable): skipped."""


# --- names -----------------------------------------------------------------


class SpoolName(NamedTuple):
    """What a file name in the spool directory means."""

    kind: str
    """message, done, end, part, presence, marker, or malformed (a msg/done/end name without a valid sequence)."""
    sequence: int
    """The sequence number for message, done and end; -1 otherwise."""


def message_name(sequence: int) -> str:
    """File name of message `sequence`."""
    return f"{MESSAGE_PREFIX}{sequence:020d}"


def done_name(sequence: int) -> str:
    """File name of message `sequence` once committed by the consumer."""
    return f"{DONE_PREFIX}{sequence:020d}"


def end_name(count: int) -> str:
    """File name of the end marker of a stream of `count` messages."""
    return f"{END_PREFIX}{count:020d}"


def part_name(sequence: int) -> str:
    """Temporary file name the producer writes message `sequence` under."""
    return f"{PART_PREFIX}{sequence:020d}"


SEQUENCED_KINDS = {MESSAGE_PREFIX: "message", DONE_PREFIX: "done", END_PREFIX: "end"}


def parse_spool_name(name: str) -> SpoolName | None:
    """Classify a directory entry; None for names that are not the spool's.

    The spool's names: ``podipc.msg.*``, ``podipc.done.*``, ``podipc.end.*`` (malformed
    unless followed by exactly 20 ASCII digits), ``podipc.part.*``, ``podipc.presence.*``
    and ``podipc.directory``.
    """
    if not name.startswith(SPOOL_PREFIX):
        return None
    for prefix, kind in SEQUENCED_KINDS.items():
        if name.startswith(prefix):
            digits = name[len(prefix) :]
            if len(digits) == SEQUENCE_DIGITS and digits.isascii() and digits.isdigit():
                return SpoolName(kind, int(digits))
            return SpoolName("malformed", -1)
    if name.startswith(PART_PREFIX):
        return SpoolName("part", -1)
    if name.startswith(PRESENCE_PREFIX):
        return SpoolName("presence", -1)
    if name == DIRECTORY_MARKER:
        return SpoolName("marker", -1)
    return None  # another podipc object sharing the directory (a socket, say): not the spool's


def read_message_file(fd: int, max_message_size: int) -> tuple[bytes | None, int]:
    """The content of an open message file (None when it is not a valid message) and its size.

    Invalid: not a regular file, larger than `max_message_size` (checked with fstat before
    a byte is read), or shorter than fstat said (changed while read).
    """
    status = os.fstat(fd)
    size = status.st_size
    if not stat.S_ISREG(status.st_mode) or size > max_message_size:
        return None, size
    if size == 0:
        return b"", 0
    data = os.read(fd, size)
    if len(data) == size:
        return data, size
    chunks = [data]
    received = len(data)
    while received < size:
        chunk = os.read(fd, size - received)
        if not chunk:
            return None, size
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks), size


# --- helpers shared by both sides ------------------------------------------


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


class _SpoolSide:
    """Opening a spool directory: create it if missing, hold an fd on it, claim presence."""

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


# --- producer ----------------------------------------------------------------


SPOOL_OPTIONS = (
    Option("max_message_size", parse_size, DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes"),
    Option("depth", parse_count, DEFAULT_DEPTH, "messages in the spool at most before send() waits"),
    Option("max_bytes", parse_size, DEFAULT_MAX_BYTES, "bytes of messages in the spool at most before send() waits"),
    Option("restart_wait", parse_seconds, 0.0, "seconds to wait for a restarted peer before PeerGone"),
    Option("fsync", parse_bool, False, "fsync each message file and the directory (survive a node crash)"),
)


class SpoolProducer(_SpoolSide, Producer):
    """Writes each message as a file, atomically, in sequence; resumes a stream left in the spool."""

    options: ClassVar[tuple[Option, ...]] = SPOOL_OPTIONS
    max_message_source = "the file:// max_message_size option"
    max_message_fix = "raise max_message_size on both sides (file:///dir?max_message_size=128MiB)"
    role = "producer"

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._dir_fd = -1
        self.max_message_size = int(self.settings["max_message_size"])
        self._depth = int(self.settings["depth"])
        self._max_bytes = int(self.settings["max_bytes"])
        self._fsync = bool(self.settings["fsync"])
        try:
            self._open_spool()
        except BaseException:
            self._closed = True
            raise
        try:
            self._remove_stale_temporaries()
            self._next_sequence, self._stream_ended = self._find_resume_point()
            self.resumed_at = self._next_sequence
            self._pending: collections.deque[tuple[int, int]] = collections.deque(self._pending_messages())
            self._pending_bytes = sum(size for _, size in self._pending)
            self._consumer_was_here = False
        except OSError as exc:
            self._closed = True
            self._leave()
            raise ChannelUnavailable(f"cannot open the spool {self.path}: {exc.strerror}") from exc
        except BaseException:
            self._closed = True
            self._leave()
            raise
        self._watch = PeerWatch(self._presence, float(self.settings["restart_wait"]), self.wait_deadline, self.path)

    def _remove_stale_temporaries(self) -> None:
        self._remove_stale_presence_temporaries()
        for name in os.listdir(self._dir_fd):
            if name.startswith(PART_PREFIX):
                remove_quietly(name, self._dir_fd)

    def _find_resume_point(self) -> tuple[int, bool]:
        """The next sequence number, read from the spool, and whether the stream already ended.

        The consumer may be committing while we look; message P-1 (the last one written)
        always exists as msg or done until message P is written, and nothing above it, so
        a candidate X from a listing is right when X is absent and X-1 is present.
        """
        empty_listings = 0
        for _ in range(RESUME_ATTEMPTS):
            highest = -1
            for name in os.listdir(self._dir_fd):
                parsed = parse_spool_name(name)
                if parsed is None:
                    continue
                if parsed.kind == "end":
                    return parsed.sequence, True
                if parsed.kind in ("message", "done"):
                    highest = max(highest, parsed.sequence)
            if highest < 0:
                empty_listings += 1
                if empty_listings == 2:
                    return 0, False
                continue
            candidate = highest + 1
            if not exists_in_stream(candidate, self._dir_fd) and exists_in_stream(highest, self._dir_fd):
                return candidate, False
            empty_listings = 0
        raise ChannelUnavailable(f"the spool {self.path} kept changing while the producer looked for its end")

    def _pending_messages(self) -> list[tuple[int, int]]:
        pending = []
        for name in os.listdir(self._dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None or parsed.kind != "message" or parsed.sequence >= self._next_sequence:
                continue
            try:
                size = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            pending.append((parsed.sequence, size))
        pending.sort()
        return pending

    def _send(self, view: memoryview, deadline: float | None) -> None:
        try:
            self._send_message(view, deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _send_message(self, view: memoryview, deadline: float | None) -> None:
        if self._stream_ended:
            raise ChannelClosed(
                f"the stream in {self.path} already ended after {self._next_sequence} messages "
                "(its end marker is in the spool); close() to wait until the consumer takes it"
            )
        size = view.nbytes
        if len(self._pending) >= self._depth or self._pending_bytes + size > self._max_bytes:
            self._wait_for_room(size, deadline)
        sequence = self._next_sequence
        if sequence > MAX_SEQUENCE:
            raise ProtocolError(f"the spool {self.path} ran out of sequence numbers ({MAX_SEQUENCE})")
        self._write_message(sequence, view)
        self._next_sequence = sequence + 1
        self._pending.append((sequence, size))
        self._pending_bytes += size

    def _write_message(self, sequence: int, view: memoryview) -> None:
        dir_fd = self._dir_fd
        temporary = part_name(sequence)
        try:
            fd = os.open(temporary, WRITE_FLAGS, self._mode, dir_fd=dir_fd)
            try:
                if self._chmod_needed:
                    os.fchmod(fd, self._mode)
                written = os.write(fd, view) if view.nbytes else 0
                while written < view.nbytes:
                    written += os.write(fd, view[written:])
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, message_name(sequence), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            remove_quietly(temporary, dir_fd)
            raise spool_error(exc, self.path) from exc
        if self._fsync:
            os.fsync(dir_fd)

    def _release_consumed(self) -> None:
        pending, dir_fd = self._pending, self._dir_fd
        while pending and not entry_exists(message_name(pending[0][0]), dir_fd):
            self._pending_bytes -= pending.popleft()[1]
            self._consumer_was_here = True

    def _has_room(self, size: int) -> bool:
        if not self._pending:
            return True
        return len(self._pending) < self._depth and self._pending_bytes + size <= self._max_bytes

    def _wait_for_room(self, size: int, deadline: float | None) -> None:
        backoff = Backoff()
        while True:
            self._release_consumed()
            if self._has_room(size):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(
                    f"the spool {self.path} stayed full ({len(self._pending)} messages, {self._pending_bytes} bytes; "
                    f"depth={self._depth}, max_bytes={self._max_bytes}) until the send timeout"
                )
            if self._watch.due(now):
                error = self._watch.verdict(now, self._consumer_was_here)
                if error is not None:
                    self._release_consumed()
                    if self._has_room(size):  # the peer made room just before it left
                        return
                    raise error
            backoff.pause(deadline)

    def _close(self, deadline: float | None) -> None:
        try:
            self._end_stream(deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _end_stream(self, deadline: float | None) -> None:
        count = self._next_sequence
        marker = end_name(count)
        if not self._stream_ended:
            try:
                self._write_empty(marker)
                if self._fsync:
                    os.fsync(self._dir_fd)
            except OSError as exc:
                raise spool_error(exc, self.path) from exc
            self._stream_ended = True
        self._wait_until_taken(marker, deadline)
        self._leave()

    def _wait_until_taken(self, marker: str, deadline: float | None) -> None:
        backoff = Backoff()
        dir_fd = self._dir_fd
        while entry_exists(marker, dir_fd):
            now = time.monotonic()
            if self._watch.due(now):
                self._release_consumed()
                error = self._watch.verdict(now, self._consumer_was_here)
                if error is not None:
                    if not entry_exists(marker, dir_fd):  # taken just before the consumer left
                        return
                    raise error
            if deadline is not None and now >= deadline:
                if not self._presence.peer_seen:
                    raise PeerTimeout(f"no consumer took the end of stream of {self.path} within the close timeout")
                raise Timeout(f"the consumer of {self.path} did not take the end of stream within the close timeout")
            backoff.pause(deadline)

    def _abort(self) -> None:
        if self._dir_fd >= 0:
            self._leave()


# --- consumer ----------------------------------------------------------------


class SpoolConsumer(_SpoolSide, Consumer):
    """Reads message files in sequence, commits each before returning it, cleans the spool at the end."""

    options: ClassVar[tuple[Option, ...]] = SPOOL_OPTIONS
    max_message_source = "the file:// max_message_size option"
    max_message_fix = "raise max_message_size on both sides (file:///dir?max_message_size=128MiB)"
    role = "consumer"

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._dir_fd = -1
        self.max_message_size = int(self.settings["max_message_size"])
        self._fsync = bool(self.settings["fsync"])
        self._done: int | None = None
        try:
            self._open_spool()
        except BaseException:
            self._closed = True
            raise
        try:
            self._remove_stale_presence_temporaries()
            self._next_sequence = self._find_resume_point()
        except OSError as exc:
            self._closed = True
            self._leave()
            raise ChannelUnavailable(f"cannot open the spool {self.path}: {exc.strerror}") from exc
        except BaseException:
            self._closed = True
            self._leave()
            raise
        self.resumed_at = self._next_sequence
        self._watch = PeerWatch(self._presence, float(self.settings["restart_wait"]), self.wait_deadline, self.path)

    def _find_resume_point(self) -> int:
        """The first uncommitted sequence number; removes extra done files and garbage names."""
        dir_fd = self._dir_fd
        done, messages, ends = [], [], []
        for name in os.listdir(dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None:
                continue
            if parsed.kind == "done":
                done.append(parsed.sequence)
            elif parsed.kind == "message":
                messages.append(parsed.sequence)
            elif parsed.kind == "end":
                ends.append(parsed.sequence)
            elif parsed.kind == "malformed":
                self._remove_garbage(name)
        if done:
            done.sort()
            for older in done[:-1]:
                remove_quietly(done_name(older), dir_fd)
            self._done = done[-1]
            start = done[-1] + 1
        elif messages:
            start = min(messages)
            while start > 0 and entry_exists(message_name(start - 1), dir_fd):
                start -= 1
        elif ends:
            start = min(ends)
        else:
            start = 0
        for sequence in messages:
            if sequence < start:
                self._remove_garbage(message_name(sequence))
        return start

    def _remove_garbage(self, name: str) -> None:
        if remove_quietly(name, self._dir_fd):
            self.skipped += 1

    def _recv(self, deadline: float | None) -> bytes:
        try:
            return self._receive(deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _receive(self, deadline: float | None) -> bytes:
        dir_fd = self._dir_fd
        while True:
            sequence = self._next_sequence
            try:
                fd = os.open(message_name(sequence), READ_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                self._wait_for_message(sequence, deadline)
                continue
            except OSError as exc:
                if exc.errno not in UNREADABLE_ERRNOS:
                    raise
                self._commit(sequence, 0)
                self.skipped += 1
                continue
            try:
                data, size = read_message_file(fd, self.max_message_size)
            finally:
                os.close(fd)
            self._commit(sequence, size)
            if data is None:
                self.skipped += 1
                continue
            return data

    def _commit(self, sequence: int, size: int) -> None:
        dir_fd = self._dir_fd
        committed = done_name(sequence)
        try:
            os.rename(message_name(sequence), committed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise ProtocolError(
                f"message {sequence} vanished from {self.path} while being read ({exc.strerror}); "
                "is a second consumer using this spool?"
            ) from exc
        if self._done is not None:
            remove_quietly(done_name(self._done), dir_fd)
        self._done = sequence
        self._next_sequence = sequence + 1
        if size >= TRUNCATE_THRESHOLD:
            with contextlib.suppress(OSError):
                os.truncate(os.path.join(self.path, committed), 0)
        if self._fsync:
            os.fsync(dir_fd)

    def _wait_for_message(self, sequence: int, deadline: float | None) -> None:
        """Return once message `sequence` is in the spool; raise EndOfStream, Timeout, PeerGone..."""
        dir_fd = self._dir_fd
        wanted, marker = message_name(sequence), end_name(sequence)
        backoff = Backoff()
        watch = self._watch
        while True:
            if entry_exists(wanted, dir_fd):
                return
            if entry_exists(marker, dir_fd):
                if entry_exists(wanted, dir_fd):
                    return
                self._finish(sequence)
                raise EndOfStream(f"{self.address.location}: the producer ended the stream")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(f"no message arrived in {self.path} within the receive timeout")
            if watch.due(now):
                error = watch.verdict(now)
                if error is not None:
                    if entry_exists(wanted, dir_fd) or entry_exists(marker, dir_fd):
                        continue
                    self._check_for_gap(sequence)
                    raise error
            backoff.pause(deadline)

    def _check_for_gap(self, sequence: int) -> None:
        """Raise ProtocolError if the spool holds later messages or an end marker past a missing one."""
        later = []
        for name in os.listdir(self._dir_fd):
            parsed = parse_spool_name(name)
            if parsed is not None and parsed.kind in ("message", "end") and parsed.sequence > sequence:
                later.append(parsed)
        if later:
            first = min(later, key=lambda parsed: parsed.sequence)
            raise ProtocolError(
                f"message {sequence} is missing from {self.path}, yet the spool holds "
                f"{'an end marker' if first.kind == 'end' else 'message'} {first.sequence}: "
                "the stream has a gap (files removed by hand, or a foreign writer)"
            )

    def _finish(self, count: int) -> None:
        """The end of stream: remove every spool file, the end marker (the producer's ack) last, then our presence."""
        dir_fd = self._dir_fd
        if self._done is not None:
            remove_quietly(done_name(self._done), dir_fd)
            self._done = None
        producer_alive = self._presence.peer_state() is PeerState.ALIVE
        for name in os.listdir(dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None:
                continue
            stale_end = parsed.kind == "end" and parsed.sequence != count
            stale_part = parsed.kind == "part" and not producer_alive
            if (
                parsed.kind == "presence"
                and name.endswith(".tmp")
                and probe(os.path.join(self.path, name), self._presence.trust) is PeerState.GONE
            ):
                remove_quietly(name, dir_fd)  # a claim cut short by a kill: nobody holds its lock
            if parsed.kind in ("message", "malformed"):
                self._remove_garbage(name)
            elif parsed.kind == "done" or stale_part or stale_end:
                remove_quietly(name, dir_fd)
        remove_quietly(end_name(count), dir_fd)
        if not producer_alive:
            self._remove_dead_producer_presence()
        self._leave()

    def _remove_dead_producer_presence(self) -> None:
        if self._presence.peer_state() is PeerState.GONE:
            remove_quietly(os.path.basename(self._presence.peer_path), self._dir_fd)

    def _close(self) -> None:
        if self._dir_fd >= 0:
            self._leave()


def availability() -> str | None:
    """file:// works wherever a directory can be written: always usable."""
    return None


def host_max_message_size() -> int:
    """The default max_message_size (64 MiB); file:// has no kernel limit."""
    return DEFAULT_MAX_MESSAGE_SIZE
