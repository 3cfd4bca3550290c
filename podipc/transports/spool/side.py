"""What both sides of a spool share: the options, the trusted directory, presence and the peer's loss, readiness."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from podipc.address import Address
from podipc.errors import ChannelUnavailable, PeerGone
from podipc.options import Option, parse_count, parse_seconds, parse_size
from podipc.ownership import SHARE_FIX, Trust, open_checked, owner_text, refusal_for
from podipc.presence import (
    PRESENCE_PREFIX,
    TEMPORARY_SUFFIX,
    PeerState,
    Presence,
    flock_until,
    probe,
    remove_if_gone,
)
from podipc.transports.spool.notify import POLL_FIRST_SECONDS, POLL_MAX_SECONDS, Readiness
from podipc.transports.spool.wire import (
    DEFAULT_DEPTH,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_SEGMENT_SIZE,
    DEFAULT_SYNC,
    DEFAULT_SYNC_DELAY_SECONDS,
    DIRECTORY_MARKER,
    MAX_RECORD_PAYLOAD,
    MIN_SEGMENT_SIZE,
    PRESENCE_TOKEN,
    SYNC_LEVELS,
    is_legacy_name,
)
from podipc.waking import POLLIN

PROBE_SECONDS = 0.1
"""How often a side whose peer was lost looks for a restarted one (restart_wait)."""
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECTORY_ATTEMPTS = 5
"""How often a side opening the spool makes the directory again when the side leaving it removed it meanwhile."""
DIRECTORY_LOCK_SECONDS = 5.0
"""How long a side opening the spool waits for the directory's lock (a leaving side holds it for an instant)."""
DIRECTORY_LOCK_RETRY_SECONDS = 0.002
CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
"""A file podipc creates in the spool: never one that exists, never through a link: ours by construction."""
NO_SPACE_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT


def parse_sync(value: object) -> str:
    """The sync option: always, batch or none."""
    text = str(value).strip().lower()
    if text not in SYNC_LEVELS:
        raise ValueError(f"expected one of {', '.join(SYNC_LEVELS)}")
    return text


def parse_message_size(value: object) -> int:
    """max_message_size: a size in bytes that a record's 32-bit length can carry."""
    size = parse_size(value)
    if size > MAX_RECORD_PAYLOAD:
        raise ValueError(f"at most {MAX_RECORD_PAYLOAD} bytes (a record's length is 32 bits)")
    return size


def parse_segment_size(value: object) -> int:
    """segment_size: bytes, at least MIN_SEGMENT_SIZE."""
    size = parse_size(value)
    if size < MIN_SEGMENT_SIZE:
        raise ValueError(f"at least {MIN_SEGMENT_SIZE} bytes")
    return size


SPOOL_OPTIONS = (
    Option("max_message_size", parse_message_size, DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes"),
    Option("depth", parse_count, DEFAULT_DEPTH, "messages in the spool at most before send() waits"),
    Option("max_bytes", parse_size, DEFAULT_MAX_BYTES, "bytes of records in the spool at most before send() waits"),
    Option("segment_size", parse_segment_size, DEFAULT_SEGMENT_SIZE, "bytes per segment file before the next one"),
    Option(
        "sync",
        parse_sync,
        DEFAULT_SYNC,
        "durability: always (fsync each message before send returns), batch (within sync_delay), none (the kernel's)",
    ),
    Option("sync_delay", parse_seconds, DEFAULT_SYNC_DELAY_SECONDS, "sync=batch: seconds at most from send to fsync"),
    Option("restart_wait", parse_seconds, 0.0, "seconds to wait for a restarted peer before PeerGone"),
)


def spool_error(error: OSError, path: str) -> ChannelUnavailable:
    """The podipc error for an OSError on the spool (full volume, vanished directory, permissions)."""
    if error.errno in NO_SPACE_ERRNOS:
        return ChannelUnavailable(
            f"the spool volume of {path} is full ({error.strerror}); raise the emptyDir sizeLimit "
            "or lower the depth/max_bytes options"
        )
    return ChannelUnavailable(f"the spool {path} failed: {error.strerror} ({error.filename or path})")


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


class BatchSync:
    """sync=batch: one thread per endpoint that syncs what was written at most `delay` seconds after the write.

    The endpoint bumps `written` after each write and calls kick() only when the thread is
    parked (both read under the GIL's sequential order: the thread parks only after seeing
    nothing unsynced, the endpoint looks at `parked` after counting its write). `sync()`
    runs holding `lock`, which the endpoint takes to swap or close what `sync()` uses. A
    failure is handed to `failed` (on the thread) and ends it. Both are the endpoint's methods,
    held weakly: the thread must not keep an endpoint dropped without close() alive (then
    collected, its __del__ aborts it, which stops the thread).
    """

    def __init__(self, sync: Callable[[], None], delay: float, failed: Callable[[OSError], None]) -> None:
        self.delay = delay
        self.written = 0
        self.synced = 0
        self.parked = False
        self.stopping = False
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._sync = weakref.WeakMethod(sync)
        self._failed = weakref.WeakMethod(failed)
        self._thread = threading.Thread(target=self._run, name="podipc-spool-sync", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Wake the parked thread: something was written."""
        self._wake.set()

    def _run(self) -> None:
        last = 0.0
        while not self.stopping:
            if self.written == self.synced:
                self.parked = True
                if self.written == self.synced and not self.stopping:
                    self._wake.wait()
                self._wake.clear()
                self.parked = False
                continue
            pause = last + self.delay - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            mark = self.written
            sync = self._sync()
            if sync is None:
                return
            with self.lock:
                synced = not self.stopping and self._sync_once(sync)
            # the last reference to a dropped endpoint may be this one: it is collected here, in this thread,
            # and its close takes `lock`, so it must go only after the lock was let go (it deadlocked inside)
            del sync
            if not synced:
                return
            self.synced = mark
            last = time.monotonic()

    def _sync_once(self, sync: Callable[[], None]) -> bool:
        """Sync once; False when the thread must end (the sync failed)."""
        try:
            sync()
        except OSError as exc:
            failed = self._failed()
            if failed is not None:
                failed(exc)
            del failed
            return False
        return True

    def stop(self) -> None:
        """Let the thread end without syncing again (the endpoint syncs last itself, holding `lock`)."""
        self.stopping = True
        self._wake.set()


class SpoolSide:
    """Opening a spool: the trusted directory, presence (claimed, its peer watched), the readiness descriptor.

    Mixed into SpoolProducer and SpoolConsumer (before Producer/Consumer), so the endpoint
    base's attributes (`_peer_lost`, `_state`, `settings`...) are there.
    """

    options: ClassVar[tuple[Option, ...]] = SPOOL_OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = "the file:// max_message_size option"
    max_message_fix = "raise max_message_size on both sides (file:///dir?max_message_size=128MiB)"
    path: str
    role: str
    settings: dict[str, Any]
    address: Address
    _dir_fd = -1
    _presence: Presence | None = None
    _ready: Readiness | None = None
    _lost_at: float | None = None
    _poll_pause = POLL_FIRST_SECONDS
    _created_directory = False
    _peer_evidence = False
    """The peer left proof of its work (a consumer's commits of our stream): it counts as seen."""
    _peer_lost: bool
    _state: int
    _settle: Callable[[], None]

    # --- opening -----------------------------------------------------------------------

    def _open_spool(self) -> None:
        """Open (or create) the directory, claim this role, watch the peer; ChannelUnavailable when not ours."""
        self.path = self.address.path.rstrip("/") or "/"
        self._mode = int(self.settings["mode"])
        self._trust = Trust.for_mode(self._mode)
        self._chmod_needed = bool(self._mode & current_umask())
        self._restart_wait = float(self.settings["restart_wait"])
        self._hold_a_live_directory()
        try:
            if self._created_directory:
                self._create_empty(DIRECTORY_MARKER)
            self._refuse_legacy_files()
            self._remove_stale_presence_temporaries()
            self._presence = Presence(PRESENCE_TOKEN, self.role, self._mode, directory=self.path)
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)  # our presence file is in it: no leaving side removes it now
            self._ready = Readiness(self._dir_fd, self.path, self._directory_events())
            self._watch_peer()
        except OSError as exc:
            self._close_spool()
            raise spool_error(exc, self.path) from exc
        except BaseException:
            self._close_spool()
            raise

    def _hold_a_live_directory(self) -> None:
        """Make or open the directory and hold a shared lock on it while this side moves in.

        A side that leaves removes the directory (when it made it and nothing else is in it)
        only under an exclusive lock (`_remove_directory_if_made`): without the shared one, the
        next side (a serving consumer's next session) could open it a moment before it is removed
        and then fail to create its presence file there. A directory removed before our lock is
        made again.
        """
        for _ in range(DIRECTORY_ATTEMPTS):
            self._created_directory = self._make_directory()
            self._dir_fd = self._open_directory()
            try:
                self._lock_directory_shared()
                if os.fstat(self._dir_fd).st_nlink > 0:
                    return
            except BaseException:
                os.close(self._dir_fd)
                self._dir_fd = -1
                raise
            os.close(self._dir_fd)  # removed meanwhile by the side that made it
            self._dir_fd = -1
        raise ChannelUnavailable(f"the spool directory {self.path} keeps being removed as this side opens it")

    def _lock_directory_shared(self) -> None:
        deadline = time.monotonic() + DIRECTORY_LOCK_SECONDS
        if not flock_until(self._dir_fd, fcntl.LOCK_SH, deadline, DIRECTORY_LOCK_RETRY_SECONDS):
            raise ChannelUnavailable(
                f"the spool directory {self.path} stays locked (flock) by another process: a podipc side "
                "removing it holds the lock for an instant only"
            )

    def _directory_events(self) -> int:
        """The inotify events on the directory that wake this side (hook)."""
        raise NotImplementedError

    def _make_directory(self) -> bool:
        try:
            os.mkdir(self.path, directory_mode(self._mode))
        except FileExistsError:
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

    def _open_directory(self) -> int:
        """The directory's descriptor once it is a directory we trust that no other user may write in."""
        what = f"the spool directory {self.path}"
        try:
            fd = os.open(self.path, DIRECTORY_FLAGS)
        except OSError as exc:
            refusal = refusal_for(exc, self.path, self._trust, what, (stat.S_IFDIR,))
            raise ChannelUnavailable(f"{refusal}; file:// needs a directory both containers can write") from exc
        try:
            status = os.fstat(fd)
            if stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_IWOTH:
                owner = owner_text(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))
                raise ChannelUnavailable(
                    f"{what} lets every user of the pod write in it ({owner}): anyone could forge or remove the "
                    f"stream's files; point file:// at a subdirectory podipc creates (file://{self.path}/spool), "
                    f"or remove the write bit for others; {SHARE_FIX}"
                )
            self._trust.check_status(what, status, (stat.S_IFDIR,))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse_legacy_files(self) -> None:
        legacy = sorted(name for name in os.listdir(self._dir_fd) if is_legacy_name(name))
        if legacy:
            raise ChannelUnavailable(
                f"the spool {self.path} holds files of podipc's first spool format ({legacy[0]}...): finish that "
                "stream with the podipc version that wrote it, or remove them"
            )

    def _remove_stale_presence_temporaries(self) -> None:
        """Claim temporaries of our role left by a side killed while claiming (nobody holds their lock)."""
        stale = f"{PRESENCE_PREFIX}{PRESENCE_TOKEN}.{self.role}."
        for name in os.listdir(self._dir_fd):
            if name.startswith(stale) and name.endswith(TEMPORARY_SUFFIX):
                with contextlib.suppress(ChannelUnavailable, OSError):
                    if probe(os.path.join(self.path, name), self._trust) is PeerState.GONE:
                        os.unlink(name, dir_fd=self._dir_fd)

    def _create_empty(self, name: str) -> None:
        os.close(self._create(name))

    def _create(self, name: str) -> int:
        """Create a new file of the spool (O_EXCL, never through a link) with the channel's mode; its descriptor."""
        fd = os.open(name, CREATE_FLAGS, self._mode, dir_fd=self._dir_fd)
        if self._chmod_needed:
            os.fchmod(fd, self._mode)
        return fd

    def _open_existing(self, name: str, flags: int) -> int:
        """Open a file of the spool that exists; FileNotFoundError when it does not, ChannelUnavailable when not ours."""
        fd = open_checked(name, flags, self._trust, f"the spool file {self.path}/{name}", dir_fd=self._dir_fd)
        os.set_blocking(fd, True)
        return fd

    def _remove_ours(self, name: str) -> None:
        """Unlink a spool file if it is a regular file we trust (never another user's, never a link's target)."""
        try:
            status = os.lstat(name, dir_fd=self._dir_fd)
        except OSError:
            return
        if not stat.S_ISREG(status.st_mode):
            return
        if self._trust.problem(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) is not None:
            return
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._dir_fd)

    # --- the peer ----------------------------------------------------------------------

    def _watch_peer(self) -> None:
        presence = self._presence
        assert presence is not None
        presence.watch(self._signal_peer_lost)  # held weakly by the monitor

    def _signal_peer_lost(self) -> None:
        """The peer monitor saw the peer go (its thread): flag it and wake a waiting call through the readiness fd."""
        self._peer_lost = True
        self._state = 1
        ready = self._ready
        if ready is not None:
            ready.kick()

    @property
    def _peer_seen(self) -> bool:
        """True once the peer's presence was seen alive (probed now while it never was)."""
        presence = self._presence
        if presence is None:
            return False
        if self._peer_evidence:
            return True
        if not presence.peer_seen:
            with contextlib.suppress(ChannelUnavailable, OSError):
                presence.peer_state()
        return presence.peer_seen

    @_peer_seen.setter
    def _peer_seen(self, value: bool) -> None:
        if self._presence is not None:
            self._presence.peer_seen = value

    def _peer_gone(self, peer: str) -> PeerGone | ChannelUnavailable | None:
        """With the peer lost: None while a peer is there again or restart_wait lasts, else the PeerGone to raise.

        A peer that is alive (the same, or a restarted one that took its place) is watched
        again: a spool's stream outlives its sides.
        """
        presence = self._presence
        assert presence is not None
        try:
            alive = presence.peer_state() is PeerState.ALIVE
        except ChannelUnavailable as refusal:  # the peer's path holds something not ours: our peer is gone
            presence.refusal = refusal
            alive = False
        now = time.monotonic()
        if alive:
            self._lost_at = None
            self._peer_lost = False
            self._settle()
            self._watch_peer()
            return None
        if self._lost_at is None:
            self._lost_at = now
        if now - self._lost_at < self._restart_wait:
            return None
        waited = f" and did not come back within restart_wait={self._restart_wait:g}s" if self._restart_wait else ""
        return presence.lost_error(
            PeerGone(
                f"the {peer} of {self.path} is gone (it died or closed without ending the stream){waited}; "
                "the spool keeps the stream: a restarted side resumes it"
            )
        )

    # --- readiness ---------------------------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        """The readiness epoll (inotify + kick); a retry time while polling or waiting for a restarted peer."""
        ready = self._ready
        if ready is None:
            return -1, 0, PROBE_SECONDS
        retry: float | None = None
        if not ready.watching:
            retry = self._poll_pause
            self._poll_pause = min(self._poll_pause * 2, POLL_MAX_SECONDS)
        if self._lost_at is not None:
            retry = PROBE_SECONDS if retry is None else min(retry, PROBE_SECONDS)
        return ready.fileno(), POLLIN, retry

    def _made_progress(self) -> None:
        """Something happened: a polling side looks again soon."""
        self._poll_pause = POLL_FIRST_SECONDS

    # --- leaving -----------------------------------------------------------------------

    def _leave(self, clean: bool) -> None:
        """Drop presence (clean: remove it; else abandon it while the peer lives), then the directory if ours and empty."""
        presence = self._presence
        if presence is not None:
            presence.unwatch()
            presence.leave(clean, lambda: False)
        self._remove_directory_if_made()

    def _remove_directory_if_made(self) -> None:
        if self._dir_fd < 0:
            return
        try:
            names = os.listdir(self._dir_fd)
        except OSError:
            return
        if names != [DIRECTORY_MARKER]:
            return
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a side is moving in (`_hold_a_live_directory`): it is theirs now
        try:
            if os.listdir(self._dir_fd) != [DIRECTORY_MARKER]:
                return
            with contextlib.suppress(OSError):
                os.unlink(DIRECTORY_MARKER, dir_fd=self._dir_fd)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
        except OSError:
            return
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def _remove_dead_peer_presence(self) -> None:
        presence = self._presence
        if presence is not None:
            remove_if_gone(presence.peer_path, presence.trust)

    def _close_spool(self) -> None:
        """Leave presence (removing our file, if _leave did not), then close the readiness and directory descriptors."""
        presence = self._presence
        if presence is not None:
            presence.unwatch()
            presence.close()
        self._drop_spool_copies()

    def _drop_spool_copies(self) -> None:
        """Close the readiness and directory descriptors (in a forked child: its copies, touching nothing shared)."""
        if self._ready is not None:
            self._ready.close()
            self._ready = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
