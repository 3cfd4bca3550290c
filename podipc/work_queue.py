"""The work-queue pattern of mq:// and sysvmq:// (`pattern=queue`): one producer, N consumers on one kernel queue.

Each message goes to exactly one consumer: the kernel's mq_receive/msgrcv takes a message
for one caller only. What podipc adds is who may share the queue, when the stream ends for
each consumer, and who removes the queue:

- Slots: each consumer claims its own presence file, `podipc.presence.TOKEN.slotN.consumer`
  (podipc.presence.slot_path, N from 1 to MAX_CONSUMERS), with the claim of podipc.presence
  (a locked temporary file hard-linked into place: atomic, never check-then-act). Each slot's
  record names the channel, the queue (`posix_mq /NAME`, `sysv_mq KEY`), declares its
  identity (`declares queue ID`) and `declares work-queue`.
- Joining and leaving are decided under one flock per channel (`consumers_lock`, the file
  podipc.presence.TOKEN.queue-lock): the first consumer creates the queue exclusively (the
  ownership rules of every queue), a later one joins only a queue whose identity and owner a
  live slot declares; one that finds only dead slots' evidence replaces the queue
  (`recovered`); the last consumer to leave removes it, never while another live consumer
  holds a slot. A pair consumer meeting a work queue (or a work-queue consumer meeting a
  pair consumer's queue) gets ChannelUnavailable saying which pattern to open.
- The end of stream: the producer puts one end marker per live slot when it closes, and each
  consumer stops at the first marker it takes. See QueueProducer's drain for "delivered".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from podipc.errors import ChannelUnavailable
from podipc.ownership import Trust
from podipc.presence import (
    CHANNEL,
    DECLARATION,
    PRESENCE_DIRECTORY,
    PRESENCE_PREFIX,
    RECORD_LIMIT_BYTES,
    PeerState,
    PeerTracker,
    Presence,
    flock_until,
    lock_state,
    open_presence,
    remove_if_gone,
    slot_path,
)

MAX_CONSUMERS = 64
"""Slots of a work queue: at most this many consumers share one queue at once."""
WORK_QUEUE_WORD = "work-queue"
"""A work-queue consumer's presence file declares this."""
LOCK_SUFFIX = "queue-lock"
LOCK_SECONDS = 5.0
"""How long joining or leaving waits for the channel's consumers lock before it gives up."""
LOCK_RETRY_SECONDS = 0.002


@dataclass(frozen=True)
class Slot:
    """One consumer slot of a work queue as a probe found it."""

    number: int
    path: str
    state: PeerState
    owner: int
    lines: tuple[str, ...]

    def declares(self, word: str) -> bool:
        """True when the slot's record declares `word`."""
        return f"{DECLARATION} {word}" in self.lines

    def proves(self, channel: str, record: str) -> bool:
        """True when the record is a work-queue consumer's of `channel` that created or joined the queue `record`."""
        return f"{CHANNEL} {channel}" in self.lines and record in self.lines and self.declares(WORK_QUEUE_WORD)


def lock_path(token: str, directory: str = PRESENCE_DIRECTORY) -> str:
    """The file whose flock decides joining and leaving a channel's work queue."""
    return os.path.join(directory, f"{PRESENCE_PREFIX}{token}.{LOCK_SUFFIX}")


class ConsumersLock:
    """The channel's consumers lock, held: `remove()` unlinks its file (the last consumer leaving)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def remove(self) -> None:
        """Unlink the lock file while holding it; a waiter that then locks the unlinked file sees it and retries."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def consumers_lock(token: str, mode: int, trust: Trust, directory: str = PRESENCE_DIRECTORY) -> Iterator[ConsumersLock]:
    """Hold the channel's consumers lock (an exclusive flock on a file of ours, never a link) while inside.

    A queue fan-in's producers (podipc.queue_fanin) claim their slots under the same lock.

    The lock counts only on the file still at the path once locked (the last consumer leaving removes it).
    Raises ChannelUnavailable when the path holds something not trusted, or the lock stays held LOCK_SECONDS.
    """
    path = lock_path(token, directory)
    deadline = time.monotonic() + LOCK_SECONDS
    while True:
        fd = _lock_once(path, mode, trust, deadline)
        try:
            status = os.fstat(fd)
            try:
                current = os.lstat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (status.st_dev, status.st_ino):
                yield ConsumersLock(path)
                return
        finally:
            os.close(fd)


def _lock_once(path: str, mode: int, trust: Trust, deadline: float) -> int:
    """Open (or create) the lock file and flock it; the descriptor, or ChannelUnavailable past `deadline`."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        try:
            status = os.lstat(path)
        except OSError:
            status = None
        if status is not None:  # something at the path refused us: say whose it is
            trust.check_status(f"the channel's lock {path}", status)
        raise ChannelUnavailable(
            f"cannot open {path}: {exc.strerror}; podipc needs a writable {os.path.dirname(path)}"
        ) from exc
    try:
        status = os.fstat(fd)
        trust.check(f"the channel's lock {path}", status.st_uid, status.st_gid, status.st_mode & 0o777)
        if not flock_until(fd, fcntl.LOCK_EX, deadline, LOCK_RETRY_SECONDS):
            raise ChannelUnavailable(
                f"{path} stayed locked {LOCK_SECONDS:g} s: another consumer of this work queue is stuck "
                "joining or leaving"
            )
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_slot(number: int, path: str, trust: Trust) -> Slot:
    """Probe slot `number` at `path` and read its record (state, the file's owner, its lines)."""
    fd = open_presence(path, trust)
    if fd is None:
        return Slot(number, path, PeerState.ABSENT, -1, ())
    try:
        lines = tuple(os.pread(fd, RECORD_LIMIT_BYTES, 0).decode("utf-8", "replace").splitlines())
        return Slot(number, path, lock_state(fd), os.fstat(fd).st_uid, lines)
    finally:
        os.close(fd)


def slots(token: str, trust: Trust, directory: str = PRESENCE_DIRECTORY) -> list[Slot]:
    """Every slot of a channel's work queue, in order (ABSENT ones too)."""
    return [read_slot(number, slot_path(token, number, directory), trust) for number in range(1, MAX_CONSUMERS + 1)]


def slot_states(paths: list[str], trust: Trust) -> list[PeerState]:
    """The state of each slot file in `paths` (an untrusted file counts as GONE: not a consumer of ours)."""
    states = []
    for path in paths:
        try:
            states.append(read_slot(0, path, trust).state)
        except ChannelUnavailable:
            states.append(PeerState.GONE)
    return states


def live_slot_paths(token: str, trust: Trust) -> list[str]:
    """The slot files whose consumers are alive now."""
    return [slot.path for slot in slots(token, trust) if slot.state is PeerState.ALIVE]


def remove_dead_slots(found: list[Slot], trust: Trust) -> None:
    """Remove the slot files of dead consumers among `found` (never a held one: see remove_if_gone)."""
    for slot in found:
        if slot.state is PeerState.GONE:
            remove_if_gone(slot.path, trust)


class SlotsTracker(PeerTracker):
    """A work-queue producer's view of its consumers: lost once none of the slots seen alive is alive any more.

    Used by the peer-death monitor (Presence.watch) in place of the one-peer PeerTracker: a consumer that
    dies does not stop the producer while another lives.
    """

    def __init__(self, presence: Presence, token: str) -> None:
        self.presence = presence
        self.token = token
        self.seen = False

    def attach(self) -> None:
        """Take the consumers there now as ours (nothing to remember: any live slot will do)."""
        self.lost()

    def lost(self) -> bool:
        """Probe every slot: True when consumers were seen and none lives now."""
        alive = bool(live_slot_paths(self.token, self.presence.trust))
        if alive:
            self.seen = True
            self.presence.peer_seen = True
        return self.seen and not alive
