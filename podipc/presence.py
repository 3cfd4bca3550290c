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
exclude each other too. The file is locked before it is renamed into place, so
it is never seen unlocked while its owner lives.

File: {directory}/podipc.presence.{token}.{role} (mode as the channel's `mode`).
Its first line is the holder's pid and hostname, for humans; the lock is the signal.
Each further line names an IPC object the holder created (`record`), so that
`podipc clean` can remove what a SIGKILLed side left behind: `KIND NAME`, where KIND
is a kind a transport declares (podipc.transport.object_kinds()); or states a property for the peer: `declares WORD`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
import time
from collections.abc import Callable

from podipc.channel import remaining
from podipc.errors import ChannelUnavailable, PeerGone, PeerTimeout

PRESENCE_DIRECTORY = "/dev/shm"
PRESENCE_PREFIX = "podipc.presence."
ROLES = ("producer", "consumer")
PROBE_INTERVAL_SECONDS = 0.02
DECLARATION = "declares"


class PeerState(enum.Enum):
    """What a probe of the peer's presence file found."""

    ABSENT = "absent"
    ALIVE = "alive"
    GONE = "gone"


def presence_path(token: str, role: str, directory: str = PRESENCE_DIRECTORY) -> str:
    """The presence file of one role of one channel."""
    return os.path.join(directory, f"{PRESENCE_PREFIX}{token}.{role}")


def probe(path: str) -> PeerState:
    """Probe a presence file: ABSENT, ALIVE (locked) or GONE (left behind by a dead holder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return PeerState.ABSENT
    except PermissionError as exc:
        raise ChannelUnavailable(
            f"cannot read {path}: {exc.strerror}; the peer runs as another user: share a group "
            "(runAsGroup/fsGroup) and open both sides with mode=0660"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return PeerState.ALIVE
    finally:
        os.close(fd)
    return PeerState.GONE


class Presence:
    """This side's presence on a channel: a locked file the peer can probe. Close to leave."""

    def __init__(
        self,
        token: str,
        role: str,
        mode: int = 0o600,
        directory: str = PRESENCE_DIRECTORY,
        handover_wait: float = 0.0,
    ) -> None:
        """Claim this role's presence file.

        handover_wait: for channels whose streams do not survive a restart. A producer whose
        predecessor died while the consumer is still attached waits up to this many seconds
        for that consumer to notice (it sees the dead predecessor's file GONE) and leave, so a
        restarted producer never splices a new stream onto the dead one; a consumer removes a
        dead producer's file, since a new consumer starts a new stream. 0 (file://, which
        resumes streams instead): claim at once.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.role = role
        self.path = presence_path(token, role, directory)
        self.peer_path = presence_path(token, ROLES[1 - ROLES.index(role)], directory)
        self.peer_seen = False
        if handover_wait > 0 and role == "producer":
            self._wait_for_handover(handover_wait)
        elif handover_wait > 0:
            remove_if_gone(self.peer_path)  # a dead producer's file: a new consumer starts a new stream
        self._fd = self._claim(mode)

    def _wait_for_handover(self, seconds: float) -> None:
        """Wait while our dead predecessor's peer is still attached (same peer file, still locked)."""
        if probe(self.path) is not PeerState.GONE or probe(self.peer_path) is not PeerState.ALIVE:
            return
        attached = file_identity(self.peer_path)
        deadline = time.monotonic() + seconds
        while probe(self.peer_path) is PeerState.ALIVE and file_identity(self.peer_path) == attached:
            if time.monotonic() >= deadline:
                peer = ROLES[1 - ROLES.index(self.role)]
                raise PeerTimeout(
                    f"the {peer} of a {self.role} that died ({self.path}) is still attached after {seconds:g} s; "
                    f"a new stream starts once it has left (it ends with PeerGone)"
                )
            time.sleep(PROBE_INTERVAL_SECONDS)

    def _claim(self, mode: int) -> int:
        if probe(self.path) is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"another {self.role} is attached to this channel ({self.path} is locked); "
                "a channel has one producer and one consumer"
            )
        temporary = f"{self.path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise ChannelUnavailable(
                f"cannot create {temporary}: {exc.strerror}; podipc needs a writable "
                f"{os.path.dirname(self.path)} shared by the pod's containers"
            ) from exc
        try:
            os.fchmod(fd, mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.rename(temporary, self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temporary)
            raise
        return fd

    def record(self, kind: str, name: str) -> None:
        """Note an IPC object this side created, for `podipc clean` should this side die.

        kind: a kind some transport declares (podipc.transport.object_kinds()); name: the
        queue/semaphore/segment name, the SysV key (decimal), or an absolute file path.
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

    def peer_state(self) -> PeerState:
        """Probe the peer now; remembers whether it was ever seen alive."""
        state = probe(self.peer_path)
        if state is PeerState.ALIVE:
            self.peer_seen = True
        return state

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
                peer = ROLES[1 - ROLES.index(self.role)]
                raise PeerTimeout(
                    f"no {peer} appeared on {what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            time.sleep(min(PROBE_INTERVAL_SECONDS, left if left is not None else PROBE_INTERVAL_SECONDS))

    def check_peer(self, what: str) -> None:
        """Raise PeerGone if the peer was seen alive and no longer is."""
        if self.peer_lost():
            peer = ROLES[1 - ROLES.index(self.role)]
            raise PeerGone(f"the {peer} of {what} is gone (it died or closed without ending the stream)")

    def close(self) -> None:
        """Leave: remove the file, then drop the lock. Idempotent."""
        if self._fd < 0:
            return
        _unlink_quietly(self.path)
        os.close(self._fd)
        self._fd = -1

    def leave(self, clean: bool, peer_file_is_evidence: Callable[[], bool]) -> None:
        """Leave a channel: clean (remove our file), or, on an abort while the peer lives,
        abandon it (unlocked, GONE), so the peer learns we came and went even if it never saw
        us alive. Afterwards a peer's GONE file is removed unless it is still evidence of a
        stale object (`peer_file_is_evidence()`, e.g. the dead consumer's queue still exists).
        """
        try:
            peer = probe(self.peer_path)
        except ChannelUnavailable:  # the peer's file is another user's: we cannot tell, so leave cleanly
            peer = PeerState.ABSENT
        if clean or peer is not PeerState.ALIVE:
            self.close()
        else:
            self.abandon()
        if peer is PeerState.GONE and not peer_file_is_evidence():
            remove_if_gone(self.peer_path)

    def abandon(self) -> None:
        """Leave as a crash would: drop the lock but keep the file, so the peer sees GONE. Idempotent.

        For an abort: a peer that never probed us while we lived still learns that we came
        and went (a clean close() looks ABSENT, like never having come). The peer removes
        the file with remove_if_gone() when it finishes.
        """
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, or None when it is not there."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class PeerTracker:
    """The other side's liveness as this side sees it, through its presence file.

    Presence.peer_lost() needs the peer to have been seen alive, but a fast peer can come,
    send and die between two probes. A GONE file that is not the stale one found at open
    (a different inode) is a peer that came and died, seen or not; an ALIVE file with
    another inode than the one first seen is a new peer that replaced ours.
    """

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self.alive: tuple[int, int] | None = None
        self.state = PeerState.ABSENT
        self.stale = file_identity(presence.peer_path) if probe(presence.peer_path) is PeerState.GONE else None
        self.lost()

    def attach(self) -> None:
        """Take the peer there now as ours: the one this side exchanges with from here on."""
        self.alive = None
        self.lost()

    def lost(self) -> bool:
        """Probe now: True when the peer was there and no longer is (died, left without ending, replaced)."""
        state = self.state = self.presence.peer_state()
        if state is PeerState.ALIVE:
            identity = file_identity(self.presence.peer_path)
            if self.alive is None:
                self.alive = identity
            return identity != self.alive
        if self.presence.peer_seen:
            return True
        return state is PeerState.GONE and file_identity(self.presence.peer_path) != self.stale


def declares(path: str, word: str) -> bool:
    """True when the presence file at `path` (alive or left behind) declares `word`."""
    try:
        with open(path, encoding="utf-8", errors="replace") as record:
            return f"{DECLARATION} {word}" in record.read().splitlines()
    except OSError:
        return False


def remove_if_gone(path: str) -> bool:
    """Remove a presence file whose holder is gone (died or abandoned it); never a held one. True if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # still the file we locked (no new holder renamed its own over it)?
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
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
