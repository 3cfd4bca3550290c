"""Know whether the other side of a channel is there, across containers, without a pid.

Containers of a pod do not share a pid namespace, so a peer's pid means nothing to
us. They do share /dev/shm (and any emptyDir). Each side holds an exclusive
`flock` on a small file named after the channel and its role; the kernel drops the
lock when the holder dies, even on SIGKILL. The other side probes the lock with a
non-blocking attempt:

    file missing                 -> ABSENT   (never came, or left cleanly)
    file present, lock held      -> ALIVE
    file present, lock free      -> GONE     (its holder died without cleaning up)

flock locks belong to the open file description, so two sides in one process
exclude each other too.

Claiming a role is atomic, so at most one process holds it however many start at once:
a temporary file is created (O_EXCL|O_NOFOLLOW), locked, written, then hard-linked into
place (`link` fails if anything is there: never check-then-rename). When the link finds
a file, it is probed: ALIVE refuses the claim; GONE (a dead holder's) is taken over by
locking it, checking it is still the file at the path, unlinking it and linking again.
The file is never seen unlocked while its owner lives. Nor is a dead holder's file ever seen
alive: whoever takes it over (or removes it) first appends `declares gone` under a shared lock,
which only a dead holder's file grants, and only then locks it exclusively; a probe that finds
a file locked and buried reports GONE.

Every presence file is opened without following a link and without blocking
(O_NOFOLLOW|O_NONBLOCK), must be a regular file, and must be trusted
(podipc.ownership: ours, or a common group's when the channel's mode shares one): a
FIFO, symlink, directory or another user's file at a presence path is a one-line
ChannelUnavailable naming its owner, never a hang or a traceback.

A process that forks keeps nothing of its presences in the child: their descriptors are
closed there (os.register_at_fork), so a parent's death is seen while its child lives,
and a child's close() never removes the parent's file.

One peer-death monitor per process (`Presence.watch`): a daemon thread, started when the
first presence is watched and ended when none is, probes each watched peer every
WATCH_INTERVAL_SECONDS and calls the watcher's callback once when the peer is lost.

File: {directory}/podipc.presence.{token}.{role} (mode as the channel's `mode`).
Its first line is the holder's pid and hostname, for humans, and an id drawn at the claim
(which tells two holders apart when a file system reuses inode numbers); the lock is the signal.
The second, `channel LOCATION`, names the channel (its URL without the query), so that
`podipc clean` can derive which objects belong to it. Each further line names an IPC
object the holder created (`record`): `KIND NAME`, where KIND is a kind a transport
declares (podipc.transport.object_kinds()); or states a property for the peer: `declares WORD`.
A producer whose end of stream is going out declares ENDING: a consumer that opens in that moment
(the next session of a serving consumer) does not take it for its producer.

Why one module of ~730 lines: it is THE ownership and liveness layer (STYLE.md):
claiming a presence, probing a peer's, fork handling and the peer-death monitor all
turn on the same lock-file protocol, and every transport imports just this one home.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import secrets
import socket
import threading
import time
import types
import weakref
from collections.abc import Callable

from podipc.errors import ChannelUnavailable, PeerGone, PeerTimeout
from podipc.options import remaining
from podipc.ownership import Trust, open_checked, owner_text

PRESENCE_DIRECTORY = "/dev/shm"
PRESENCE_PREFIX = "podipc.presence."
TEMPORARY_SUFFIX = ".tmp"
ROLES = ("producer", "consumer")
SUBSCRIBER_ROLE = "subscriber"
"""A broadcast subscriber claims the role `subscriber.K` (slot K of the ring); its peer is the producer."""
PROBE_INTERVAL_SECONDS = 0.02
DECLARATION = "declares"
ENDING = "ending"
"""A producer declares this (`declare_ending`) as its end of stream goes out: from then on it only waits for
that end to be taken, then leaves. A consumer that never saw it before takes it for absent, not for its
producer: a consumer opened in that moment (the next session of podipc.serving) must not see it leave as
its producer dying."""
CHANNEL = "channel"
DEFAULT_MODE = 0o600
RECORD_LIMIT_BYTES = 64 * 1024
"""At most this much of a presence file is read (a record is a few lines)."""
CLAIM_SECONDS = 5.0
"""How long a claim keeps trying while other claimers take turns at a dead holder's file."""
CLAIM_RETRY_SECONDS = 0.005
ALIVE_CONFIRM_SECONDS = 0.1
"""A lock on the file at a role's path counts as a live holder once it stays this long on the same file
(a peer's probe or a claimer taking over a dead holder's file holds one only for an instant)."""
WATCH_INTERVAL_SECONDS = 0.2
"""How often the peer-death monitor probes each watched peer (a loss is seen within about this)."""
MONITOR_THREAD_NAME = "podipc-peer-watch"
IDENTITY_BYTES = 256
"""The first line of a presence file is read up to this many bytes to tell holders apart."""


TOMBSTONE = "gone"
"""Declared in a dead holder's file by whoever takes it over or removes it, before locking it (see lock_state)."""
_ENDING_LINE = f"{DECLARATION} {ENDING}".encode()
_TOMBSTONE_LINE = f"{DECLARATION} {TOMBSTONE}".encode()


class PeerState(enum.Enum):
    """What a probe of the peer's presence file found."""

    ABSENT = "absent"
    ALIVE = "alive"
    GONE = "gone"


def subscriber_role(slot: int) -> str:
    """The role of broadcast subscriber slot `slot`."""
    return f"{SUBSCRIBER_ROLE}.{slot}"


def peer_role(role: str) -> str:
    """The role whose presence a side of `role` watches: producer <-> consumer, a subscriber's is the producer.

    Raises ValueError for anything else.
    """
    if role in ROLES:
        return ROLES[1 - ROLES.index(role)]
    prefix, _, slot = role.partition(".")
    if prefix == SUBSCRIBER_ROLE and slot.isdigit():
        return ROLES[0]
    raise ValueError(f"role must be one of {ROLES} or {SUBSCRIBER_ROLE}.N, not {role!r}")


def presence_path(token: str, role: str, directory: str = PRESENCE_DIRECTORY) -> str:
    """The presence file of one role of one channel."""
    return os.path.join(directory, f"{PRESENCE_PREFIX}{token}.{role}")


SLOT_WORD = "slot"


def slot_token(token: str, slot: int) -> str:
    """The token of slot `slot` of a channel's consumers (a work queue's, podipc.queue): TOKEN.slotN."""
    return f"{token}.{SLOT_WORD}{slot}"


def base_token(token: str) -> str:
    """The channel's token of a presence file's token: TOKEN for TOKEN.slotN (a work-queue slot), else itself."""
    stem, _, last = token.rpartition(".")
    if stem and last.startswith(SLOT_WORD) and last[len(SLOT_WORD) :].isdigit():
        return stem
    return token


def slot_path(token: str, slot: int, directory: str = PRESENCE_DIRECTORY, role: str = "consumer") -> str:
    """The presence file of slot `slot` of a role: podipc.presence.TOKEN.slotN.ROLE (a work queue's consumers,
    a queue fan-in's producers)."""
    return presence_path(slot_token(token, slot), role, directory)


def open_presence(path: str, trust: Trust | None = None) -> int | None:
    """Open a presence file read-only, never following a link or blocking; None when there is none.

    Raises ChannelUnavailable (owner and fix) for anything but a regular file we trust: `trust`
    (default: this user's files only; a Presence passes its own, which shares a group with mode=0660).
    """
    try:
        return open_checked(path, os.O_RDONLY, trust or Trust.for_mode(DEFAULT_MODE), f"the presence file {path}")
    except FileNotFoundError:
        return None


def lock_state(fd: int) -> PeerState:
    """ALIVE when the open presence file is locked by its holder, else GONE (takes a shared lock: close to drop it).

    A dead holder's file that a claimer or remover locks for an instant (`_lock_dead_file`) is buried first,
    so it is GONE however long that lock is held.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return PeerState.GONE if is_buried(fd) else PeerState.ALIVE
    return PeerState.GONE


def flock_until(fd: int, operation: int, deadline: float, retry_seconds: float) -> bool:
    """Take `operation` (LOCK_SH or LOCK_EX) on `fd`, trying again every `retry_seconds`; False once `deadline` passed."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(retry_seconds)


def is_buried(fd: int) -> bool:
    """True when the open presence file carries the TOMBSTONE line: its holder is known dead."""
    try:
        return _TOMBSTONE_LINE in os.pread(fd, RECORD_LIMIT_BYTES, 0).splitlines()
    except OSError:
        return False


def _lock_dead_file(fd: int, path: str) -> bool:
    """Take the exclusive lock of a presence file whose holder is gone, burying it first; False if it lives or is contended.

    Only a shared lock proves the holder gone (its exclusive one is dropped only at death or
    leaving, never taken again); the file gets its TOMBSTONE line while that shared lock is
    held, before the exclusive one, so a peer probing meanwhile sees GONE, never our lock as
    a live holder (it once took a restarting consumer's takeover for its new peer, then lost it).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    _bury(fd, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # another claimer or remover holds it shared too: look again
    return True


def _bury(fd: int, path: str) -> None:
    """Append the TOMBSTONE line to the dead holder's file open as `fd` (once; skipped if we may not write it)."""
    if is_buried(fd):
        return
    try:
        writer = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # not writable for us (another group member's 0640 file): lock without the mark, as before
    try:
        if _identity_of(writer) == _identity_of(fd):
            os.write(writer, _TOMBSTONE_LINE + b"\n")
    except OSError:
        pass
    finally:
        os.close(writer)


Identity = tuple[int, int, bytes]
"""What tells one holder's presence file from another's: device, inode and its first line (with a claim id)."""


def probe(path: str, trust: Trust | None = None) -> PeerState:
    """Probe a presence file: ABSENT, ALIVE (locked) or GONE (left behind by a dead holder).

    Raises ChannelUnavailable for a link, FIFO, directory or a file we do not trust (see open_presence).
    """
    fd = open_presence(path, trust)
    if fd is None:
        return PeerState.ABSENT
    try:
        return lock_state(fd)
    finally:
        os.close(fd)


def probe_for_a_new_stream(path: str, trust: Trust | None = None) -> tuple[PeerState, Identity | None]:
    """probe_identity for a side that has no peer yet: a live holder that declares ENDING (it finishes an
    earlier stream, then leaves) is ABSENT. State and declaration come from one open of the file, so a
    holder that leaves, or is replaced, between the two is never mistaken for another."""
    fd = open_presence(path, trust)
    if fd is None:
        return PeerState.ABSENT, None
    try:
        status = os.fstat(fd)
        record = os.pread(fd, RECORD_LIMIT_BYTES, 0)
        state = lock_state(fd)
        if state is PeerState.ALIVE and _ENDING_LINE in record.splitlines():
            return PeerState.ABSENT, None
        return state, (status.st_dev, status.st_ino, record[:IDENTITY_BYTES].partition(b"\n")[0])
    finally:
        os.close(fd)


def probe_identity(path: str, trust: Trust | None = None) -> tuple[PeerState, Identity | None]:
    """Probe a presence file and tell which holder's it is (None when ABSENT); raises as probe() does.

    Inode numbers alone do not tell a new holder from a dead one on file systems that reuse
    them at once; the first line carries an id drawn at each claim.
    """
    fd = open_presence(path, trust)
    if fd is None:
        return PeerState.ABSENT, None
    try:
        status = os.fstat(fd)
        first_line = os.pread(fd, IDENTITY_BYTES, 0).partition(b"\n")[0]
        return lock_state(fd), (status.st_dev, status.st_ino, first_line)
    finally:
        os.close(fd)


class Presence:
    """This side's presence on a channel: a locked file the peer can probe. Close to leave."""

    def __init__(
        self,
        token: str,
        role: str,
        mode: int = DEFAULT_MODE,
        directory: str = PRESENCE_DIRECTORY,
        handover_wait: float = 0.0,
        channel: str | None = None,
        slot: int | None = None,
        declarations: tuple[str, ...] = (),
    ) -> None:
        """Claim this role's presence file, atomically: at most one holder per role, however many start at once.

        mode: permissions of the file; with group bits (0660) a common group's files are trusted too.
        handover_wait: for channels whose streams do not survive a restart. A producer whose
        predecessor died while the consumer is still attached waits up to this many seconds
        for that consumer to notice (it sees the dead predecessor's file GONE) and leave, so a
        restarted producer never splices a new stream onto the dead one; a consumer removes a
        dead producer's file, since a new consumer starts a new stream. 0 (file://, which
        resumes streams instead): claim at once.
        channel: the channel's location (URL without query), written for `podipc clean`, which
        removes only objects it can derive from it.
        slot: a work queue's consumer (podipc.queue, pattern=queue) claims slot N of the role
        (`slot_path`): one holder per slot, many consumers per channel; its peer is the producer.
        A queue fan-in's producer (podipc.queue_fanin) claims a producer slot the same way; its peer is the consumer.
        declarations: words declared (as `declare` does) in the file before it appears at its path:
        a peer that sees the file alive sees them too.

        Raises ChannelUnavailable: the role is held, or its path holds something not ours.
        PeerTimeout: the handover did not happen within handover_wait.
        """
        self.role = role
        self.path = presence_path(token, role, directory) if slot is None else slot_path(token, slot, directory, role)
        self.peer_path = presence_path(token, peer_role(role), directory)
        self.trust = Trust.for_mode(mode)
        """Whose presence files this side accepts (its own; with group bits in mode, a common group's)."""
        self.peer_seen = False
        self.refusal: ChannelUnavailable | None = None
        """Set by the peer monitor when it found the peer's path holding something not trusted (another user's
        file): the reason the peer counts as lost, which a transport raises instead of PeerGone (see `lost_error`)."""
        self.opened_in = os.getpid()
        self._ending_declared = False
        self._fd = -1
        self._watch: _Watch | None = None
        if handover_wait > 0 and role == "producer":
            self._wait_for_handover(handover_wait)
        elif handover_wait > 0:
            remove_if_gone(self.peer_path, self.trust)  # a dead producer's file: a new consumer starts a new stream
        self._fd = self._claim(mode, _header(channel, declarations))
        _live_presences.add(self)

    @property
    def inherited(self) -> bool:
        """True in a process forked after this presence was claimed: it holds nothing there."""
        return self.opened_in != os.getpid()

    def _wait_for_handover(self, seconds: float) -> None:
        """Wait while our dead predecessor's peer is still attached (same peer file, still locked)."""
        if probe(self.path, self.trust) is not PeerState.GONE:
            return
        state, attached = probe_identity(self.peer_path, self.trust)
        deadline = time.monotonic() + seconds
        while state is PeerState.ALIVE and probe_identity(self.peer_path, self.trust) == (state, attached):
            if time.monotonic() >= deadline:
                peer = peer_role(self.role)
                raise PeerTimeout(
                    f"the {peer} of a {self.role} that died ({self.path}) is still attached after {seconds:g} s; "
                    f"a new stream starts once it has left (it ends with PeerGone)"
                )
            time.sleep(PROBE_INTERVAL_SECONDS)

    def _claim(self, mode: int, header: bytes) -> int:
        """Create, lock and write a temporary file, then link it into place (see the module docstring)."""
        temporary = f"{self.path}.{os.getpid()}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temporary, flags, mode)
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot create {temporary}: {exc.strerror}; podipc needs a writable "
                f"{os.path.dirname(self.path)} shared by the pod's containers"
            ) from exc
        _held_descriptors.add(fd)
        try:
            os.fchmod(fd, mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, header)
            self._link_into_place(temporary)
        except BaseException:
            _release(fd)
            raise
        finally:
            _unlink_quietly(temporary)
        return fd

    def _link_into_place(self, temporary: str) -> None:
        deadline = time.monotonic() + CLAIM_SECONDS
        while True:
            try:
                os.link(temporary, self.path, follow_symlinks=False)
                return
            except FileExistsError:
                pass
            except OSError as exc:
                raise ChannelUnavailable(
                    f"cannot claim {self.path}: {exc.strerror}; podipc needs a directory shared by the pod's "
                    "containers that supports hard links (a tmpfs or an emptyDir)"
                ) from exc
            self._take_over_if_gone()
            if time.monotonic() >= deadline:
                raise ChannelUnavailable(
                    f"could not claim {self.path} within {CLAIM_SECONDS:g} s: other {self.role}s of this channel "
                    "keep claiming it (a channel has one producer and one consumer)"
                )

    def _take_over_if_gone(self) -> None:
        """Deal with the file found at our path so that the next link may succeed: unlink it if its holder died.

        Returns at once (to link again) when the path is free or another claimer has it for an
        instant. Raises ChannelUnavailable when a live holder has it, or it is not a trusted
        presence file of ours to remove.
        """
        fd = open_presence(self.path, self.trust)
        if fd is None:
            return
        try:
            if not self._lock_for_takeover(fd) or _identity_of(fd) != file_identity(self.path):
                return  # contended, or replaced meanwhile: look again
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                status = os.fstat(fd)
                owner = owner_text(status.st_uid, status.st_gid, status.st_mode & 0o777)
                raise ChannelUnavailable(
                    f"cannot take over {self.path}, left by a dead {self.role} ({owner}): {exc.strerror}; "
                    "run `podipc clean` as its owner"
                ) from exc
        finally:
            os.close(fd)

    def _lock_for_takeover(self, fd: int) -> bool:
        """Take the dead holder's file's lock. False: someone else has it for an instant; raises if a holder lives."""
        identity = _identity_of(fd)
        locked_since = time.monotonic()
        while lock_state(fd) is PeerState.ALIVE:
            if file_identity(self.path) != identity:
                return False
            if time.monotonic() - locked_since >= ALIVE_CONFIRM_SECONDS:
                raise ChannelUnavailable(
                    f"another {self.role} is attached to this channel ({self.path} is locked); "
                    "a channel has one producer and one consumer"
                )
            time.sleep(CLAIM_RETRY_SECONDS)
        if not _lock_dead_file(fd, self.path):
            time.sleep(CLAIM_RETRY_SECONDS)  # a peer probing, or another claimer taking over
            return False
        return True

    def record(self, kind: str, name: str) -> None:
        """Note an IPC object this side created, for `podipc clean` should this side die.

        kind: a kind some transport declares (podipc.transport.object_kinds()); name: the
        queue/semaphore/segment name, the SysV key (decimal), or an absolute file path.
        `podipc clean` removes it only if it belongs to the channel named at the claim (`channel`).
        """
        from podipc.transport import object_kinds

        kinds = object_kinds()
        if kind not in kinds:
            raise ValueError(f"kind must be one of {tuple(kinds)}, not {kind!r}")
        if self._fd >= 0:
            os.write(self._fd, f"{kind} {name}\n".encode())

    def declare(self, word: str) -> None:
        """State a property of this side for the peer to read with declares(), e.g. 'start-of-stream'."""
        if self._fd >= 0:
            os.write(self._fd, f"{DECLARATION} {word}\n".encode())

    def _probe_peer(self) -> PeerState:
        return probe(self.peer_path, self.trust)

    def peer_state(self) -> PeerState:
        """Probe the peer now; remembers whether it was ever seen alive.

        Raises ChannelUnavailable when the peer's path holds something not trusted (see probe).
        """
        if self.peer_seen:
            return self._probe_peer()
        state = probe_for_a_new_stream(self.peer_path, self.trust)[0]
        if state is PeerState.ALIVE:
            self.peer_seen = True
        return state

    def declare_ending(self) -> None:
        """Declare ENDING (a producer, as its end of stream goes out); once only."""
        if not self._ending_declared:
            self._ending_declared = True
            self.declare(ENDING)

    def peer_declares(self, word: str) -> bool:
        """True when the peer's presence file (alive or left behind, and trusted) declares `word`."""
        return declares(self.peer_path, word, self.trust)

    def peer_lost(self) -> bool:
        """True when the peer was seen alive before and is no longer."""
        return self.peer_seen and self.peer_state() is not PeerState.ALIVE

    def wait_for_peer(self, deadline: float | None, wait_deadline: float, what: str) -> None:
        """Block until the peer is ALIVE; PeerTimeout after the wait deadline, Timeout-free otherwise.

        `deadline` is the caller's own (None: none); when it comes first, PeerTimeout is raised too,
        since the peer has still not appeared.
        """
        while True:
            if self.peer_state() is PeerState.ALIVE:
                return
            limit = wait_deadline if deadline is None else min(deadline, wait_deadline)
            left = remaining(limit)
            if left is not None and left <= 0:
                peer = peer_role(self.role)
                raise PeerTimeout(
                    f"no {peer} appeared on {what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            time.sleep(min(PROBE_INTERVAL_SECONDS, left if left is not None else PROBE_INTERVAL_SECONDS))

    def check_peer(self, what: str) -> None:
        """Raise PeerGone if the peer was seen alive and no longer is."""
        if self.peer_lost():
            peer = peer_role(self.role)
            raise PeerGone(f"the {peer} of {what} is gone (it died or closed without ending the stream)")

    def lost_error(self, gone: PeerGone) -> PeerGone | ChannelUnavailable:
        """What to raise for a lost peer: `gone`, or the refusal when the monitor found the peer's path untrusted.

        Another user's presence file appearing at the peer's path is a co-tenant that may not share the channel
        (issue 10): saying so, with the fix, beats a PeerGone that hides why.
        """
        return self.refusal or gone

    def watch(self, on_lost: Callable[[], None], tracker: PeerTracker | None = None) -> None:
        """Have the process's peer-death monitor call `on_lost()` once when the peer is lost.

        Lost: the peer was there (seen alive, or came and died between two probes) and is not
        any more: it died, left without this side knowing why (the transport decides whether a
        clean end explains it), or was replaced by another holder, or its path now holds
        something we do not trust. Seen within about WATCH_INTERVAL_SECONDS.

        `on_lost` runs on the monitor thread: it must be quick and never block (set the
        endpoint's state, wake its waker); an exception it raises is dropped. `tracker`: the
        PeerTracker whose notion of "our peer" to use (default: a new one, taking the peer
        there now, or the first to come, as ours). Watching again replaces the callback. A bound method
        is held weakly: an endpoint dropped without close() is collected (and aborted) as usual, ending its watch.
        No thread runs, and nothing is probed, while no presence of the process is watched.
        Raises ChannelUnavailable when the peer's path holds something not trusted.
        """
        if self._fd < 0:
            return
        self.unwatch()
        self._watch = _MONITOR.add(tracker or PeerTracker(self), on_lost)

    def unwatch(self) -> None:
        """Stop watching the peer; once this returns, `on_lost` is not running and will not be called. Idempotent.

        (Called from `on_lost` itself, it returns at once.)
        """
        watch, self._watch = self._watch, None
        if watch is not None:
            _MONITOR.remove(watch)

    def close(self) -> None:
        """Leave: stop watching, remove the file, then drop the lock. Idempotent.

        In a forked child it does nothing: the file and lock are the parent's.
        """
        self.unwatch()
        if self._fd < 0:
            return
        if _identity_of(self._fd) == file_identity(self.path):
            _unlink_quietly(self.path)
        _release(self._fd)
        self._fd = -1

    def leave(self, clean: bool, peer_file_is_evidence: Callable[[], bool]) -> None:
        """Leave a channel: clean (remove our file), or, on an abort while the peer lives,
        abandon it (unlocked, GONE), so the peer learns we came and went even if it never saw
        us alive. Afterwards a peer's GONE file is removed unless it is still evidence of a
        stale object (`peer_file_is_evidence()`, e.g. the dead consumer's queue still exists).
        """
        try:
            peer = self._probe_peer()
        except ChannelUnavailable:  # the peer's file is not one we trust: we cannot tell, so leave cleanly
            peer = PeerState.ABSENT
        if clean or peer is not PeerState.ALIVE:
            self.close()
        else:
            self.abandon()
        if peer is PeerState.GONE and not peer_file_is_evidence():
            remove_if_gone(self.peer_path, self.trust)

    def abandon(self) -> None:
        """Leave as a crash would: drop the lock but keep the file, so the peer sees GONE. Idempotent.

        For an abort: a peer that never probed us while we lived still learns that we came
        and went (a clean close() looks ABSENT, like never having come). The peer removes
        the file with remove_if_gone() when it finishes.
        """
        self.unwatch()
        if self._fd < 0:
            return
        _release(self._fd)
        self._fd = -1

    def _forget_after_fork(self) -> None:
        """In a forked child: hold nothing of the parent's (its descriptor is closed by the fork hook)."""
        self._fd = -1
        self._watch = None


def _header(channel: str | None, declarations: tuple[str, ...] = ()) -> bytes:
    header = f"{os.getpid()} {socket.gethostname()} {secrets.token_hex(8)}\n"
    if channel is not None and "\n" not in channel:
        header += f"{CHANNEL} {channel}\n"
    header += "".join(f"{DECLARATION} {word}\n" for word in declarations)
    return header.encode()


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` itself (a link is not followed), or None when nothing is there."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _identity_of(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


class PeerTracker:
    """The other side's liveness as this side sees it, through its presence file.

    Presence.peer_lost() needs the peer to have been seen alive, but a fast peer can come,
    send and die between two probes. A GONE file that is not the stale one found at open
    (another holder's: see probe_identity) is a peer that came and died, seen or not; an
    ALIVE file of another holder than the one first seen is a new peer that replaced ours.
    A peer never seen before that declares ENDING finishes an earlier stream: absent for us.
    """

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self.alive: Identity | None = None
        self.state = PeerState.ABSENT
        state, identity = probe_identity(presence.peer_path, presence.trust)
        self.stale = identity if state is PeerState.GONE else None
        self.lost()

    def attach(self) -> None:
        """Take the peer there now as ours: the one this side exchanges with from here on."""
        self.alive = None
        self.lost()

    def lost(self) -> bool:
        """Probe now: True when the peer was there and no longer is (died, left without ending, replaced).

        Raises ChannelUnavailable when the peer's path holds something not trusted.
        """
        presence = self.presence
        if self.alive is None and not presence.peer_seen:
            state, identity = probe_for_a_new_stream(presence.peer_path, presence.trust)
        else:
            state, identity = probe_identity(presence.peer_path, presence.trust)
        self.state = state
        if state is PeerState.ALIVE:
            self.presence.peer_seen = True
            if self.alive is None:
                self.alive = identity
            return identity != self.alive
        if self.presence.peer_seen:
            return True
        return state is PeerState.GONE and identity != self.stale


def read_record(path: str, trust: Trust | None = None) -> list[str]:
    """The lines of a presence file (alive or left behind); [] when there is none or it cannot be trusted."""
    try:
        fd = open_presence(path, trust)
    except ChannelUnavailable:
        return []
    if fd is None:
        return []
    try:
        return os.read(fd, RECORD_LIMIT_BYTES).decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    finally:
        os.close(fd)


def declares(path: str, word: str, trust: Trust | None = None) -> bool:
    """True when the presence file at `path` (alive or left behind, and trusted: see open_presence) declares `word`."""
    return f"{DECLARATION} {word}" in read_record(path, trust)


def remove_if_gone(path: str, trust: Trust | None = None) -> bool:
    """Remove a presence file whose holder is gone (died or abandoned it); never a held one. True if removed.

    Never removes what is not a trusted presence file (see open_presence), nor a file a new
    holder linked in meanwhile.
    """
    try:
        fd = open_presence(path, trust)
    except ChannelUnavailable:
        return False
    if fd is None:
        return False
    try:
        if not _lock_dead_file(fd, path) or _identity_of(fd) != file_identity(path):
            return False
        os.unlink(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- fork: a child holds nothing of its parent's presences ---------------------

_held_descriptors: set[int] = set()
"""Every presence descriptor this process holds (claimed, or being claimed)."""
_live_presences: weakref.WeakSet[Presence] = weakref.WeakSet()


def _release(fd: int) -> None:
    _held_descriptors.discard(fd)
    os.close(fd)


def _forget_after_fork() -> None:
    """In a forked child: close the parent's presence descriptors, so only the parent keeps its locks."""
    for presence in list(_live_presences):
        presence._forget_after_fork()
    for fd in list(_held_descriptors):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_descriptors.clear()
    _MONITOR.forget_after_fork()


# --- the peer-death monitor ----------------------------------------------------


class _Watch:
    """One watched peer: its tracker and the callback due once on its loss.

    A bound method is held weakly: the monitor must not keep an endpoint that was dropped without close() alive
    (it would never be collected, so its __del__ never aborted it, and its watch and the thread ran forever).
    """

    __slots__ = ("active", "callback", "tracker")

    def __init__(self, tracker: PeerTracker, on_lost: Callable[[], None]) -> None:
        self.tracker = tracker
        self.callback: Callable[[], Callable[[], None] | None] = (
            weakref.WeakMethod(on_lost) if isinstance(on_lost, types.MethodType) else lambda: on_lost
        )
        """The callback, or None once its object was collected."""
        self.active = True

    def lost(self) -> bool:
        try:
            return self.tracker.lost()
        except ChannelUnavailable as refusal:  # the peer's path now holds something not ours: our peer is gone
            self.tracker.presence.refusal = refusal
            return True
        except Exception:  # vanished oddly: our peer is gone
            return True

    @staticmethod
    def fire(on_lost: Callable[[], None]) -> None:
        with contextlib.suppress(Exception):  # one endpoint's failing callback must not stop the others' watch
            on_lost()


class _PeerMonitor:
    """The one thread per process that probes the peers of watched presences."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.RLock()
        """Guards _watches and _thread. Re-entrant: whatever allocates under it may run a garbage collection, which
        may finalize an endpoint nobody closed, whose presence then leaves (remove) on this same thread."""
        self._dispatch = threading.Lock()
        """Held while a watch is probed and its callback runs, so unwatch() can wait for it."""
        self._watches: list[_Watch] = []
        self._thread: threading.Thread | None = None

    def add(self, tracker: PeerTracker, on_lost: Callable[[], None]) -> _Watch:
        watch = _Watch(tracker, on_lost)
        with self._lock:
            self._watches.append(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=MONITOR_THREAD_NAME, daemon=True)
                self._thread.start()
        return watch

    def remove(self, watch: _Watch) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._watches.remove(watch)
            monitor = self._thread
        if threading.current_thread() is monitor:
            watch.active = False  # from a callback: the dispatch lock is ours already
            return
        with self._dispatch:
            watch.active = False

    def running(self) -> bool:
        """True while the monitor thread runs (some presence is watched, or was until an instant ago)."""
        with self._lock:
            return self._thread is not None

    def _run(self) -> None:
        try:
            while self._sweep():
                time.sleep(WATCH_INTERVAL_SECONDS)
        except BaseException:  # interpreter shutdown tearing modules down under a daemon thread
            return

    def _sweep(self) -> bool:
        """Probe every watched peer once; False (and the thread ends) when nothing is watched."""
        with self._lock:
            watches = list(self._watches)
            if not watches:
                self._thread = None
                return False
        for watch in watches:
            self._probe(watch)
        return True

    def _probe(self, watch: _Watch) -> None:
        """Probe one watch; call back once on a loss; drop it once lost or once its callback's object is gone.

        Its own function, so the callback (and the endpoint it belongs to) is not held between sweeps.
        """
        with self._dispatch:
            if not watch.active:
                return
            if watch.lost():
                on_lost = watch.callback()
            elif watch.callback() is not None:
                return  # the common case: the endpoint was held only for that instant, never during the probe
            else:
                on_lost = None  # its endpoint was collected: drop the watch
            watch.active = False
            with self._lock, contextlib.suppress(ValueError):
                self._watches.remove(watch)
            if on_lost is not None:
                watch.fire(on_lost)

    def forget_after_fork(self) -> None:
        """In a forked child: no thread, nothing watched, fresh locks (the parent's may have been held)."""
        self._reset()


_MONITOR = _PeerMonitor()


def monitor_running() -> bool:
    """True while this process's peer-death monitor thread runs (for tests and diagnostics)."""
    return _MONITOR.running()


os.register_at_fork(after_in_child=_forget_after_fork)
