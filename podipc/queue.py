"""The kernel message-queue Producer and Consumer that mq:// and sysvmq:// share.

A POSIX queue (mq_open) and a SysV queue (msgget) carry a podipc stream the same way: one
podipc message is one queue message with no header, marked as data or as the end of stream
by the queue's own tag (a POSIX priority, a SysV mtype); the consumer creates the queue
and removes it at the end; a queue cannot tell a dead peer, so both sides hold a
podipc.presence file and probe the other's. What does not depend on the kind of queue is
here; a transport subclass says how its queue is opened, created, removed and counted,
and how a call waits on it (mq:// in timed slices, sysvmq:// blocking for real with a
watchdog thread that wakes it).

QueueProducer: the rendezvous (wait for the consumer's presence, or its queue when it
holds none; open the queue; adopt a smaller limit the consumer set), the end of stream
(put the end marker, wait until the queue is empty or removed while probing the consumer)
and leaving (clean, or abandoning the presence file on an abort, as a crash would).

QueueConsumer: opening (check the limits, refuse a second consumer, replace a queue a dead
run left, create the queue or take the one a presence-less producer made, claim the
presence and record the queue for `podipc clean`), the bookkeeping of the slow receive
path, the verdict after a wait that brought nothing (PeerGone, PeerTimeout or Timeout) and
releasing the queue.

Hot paths: a transport's `send()` and `recv()` with no timeout bypass this module and the
Producer/Consumer checks (STYLE.md #8) and fall back to them for anything unusual; the
base only keeps `_fast_limit` (producer) and `_fast` (consumer) right around them.

Hooks a subclass implements. Producer: `_limits`, `_open_existing`, `_queue_limit`,
`_attached`, `_put`, `_queued`, `_detach`, `_queue_exists`. Consumer: `_limits`,
`_remove_stale`, `_create_queue`, `_adopt_queue`, `_object_record`, `_discard`,
`_receive_slowly`, `_queued`, `_destroy`.

Seams for the issues ahead (named here, not built):
- Trusted queues (issue 10): a consumer takes a queue in exactly three ways, all chosen in
  `QueueConsumer._open_queue`: `_create_queue` (made here, exclusively), `_adopt_queue`
  (one that already existed: today a presence-less producer's, taken as it is) and
  `_remove_stale` (deleting one a dead run left). The owner and mode checks at open (fstat
  of the mqd; IPC_STAT uid/mode of a SysV queue) and the rule "never consume or delete a
  queue podipc cannot prove it created for this channel" belong in those hooks and that
  one choice; the producer's single way in is `_open_existing`, and `_discard` is where a
  failed open decides whether the queue was its to remove.
- Shutdown from any thread, signals, timeout=0 (issue 11): every wait is in a transport
  loop (`_put`, `_receive_slowly`, the fast paths) or here (`_connect`, `_wait_taken`), and
  each loop already comes back to a liveness verdict between waits (`_check_producer`, the
  consumer probe in `_put`). close() from another thread needs a `closing` flag checked at
  those verdicts plus one wake-up per transport: mq:// waits at most a liveness slice
  (0.25 s), sysvmq:// has its watchdog put a wake-up message for a blocked consumer and
  still needs a way to wake a producer blocked in msgsnd. EINTR is classified in one place
  per transport (sysv_mq._interrupted, which retries; on mq:// posix_ipc.SignalError falls
  into the PeerGone branch of `_put`/`_receive_slowly` today) and is to be retried there.
  timeout=0 is already one non-blocking try on both queues once connected (a zero slice on
  mq://, IPC_NOWAIT on sysvmq://).
- Readiness (issue 12): a Linux mqd is a file descriptor (readable when a message waits,
  writable when there is room), so mq:// endpoints can expose it as fileno() through a
  hook here; a SysV queue has none, so sysvmq:// would signal readiness from its existing
  watchdog thread (one per endpoint, never one per message) through an eventfd or pipe.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from podipc.address import Address
from podipc.channel import Consumer, Producer
from podipc.errors import ChannelUnavailable, EndOfStream, MessageTooLarge, PeerGone, PeerTimeout, Timeout
from podipc.ownership import Trust
from podipc.presence import PeerState, PeerTracker, Presence, presence_path, probe

LIVENESS_SLICE_SECONDS = 0.25
"""How long a waiting side goes without probing its peer's presence file."""
RENDEZVOUS_POLL_SECONDS = 0.02
"""How often a producer looks for the consumer's queue before its first message."""
DRAIN_POLL_MAX_SECONDS = 0.01
"""The longest sleep of a closing producer waiting for the consumer to empty the queue."""

DATA, END, GARBAGE = "data", "end", "garbage"
"""What a received queue message is, as each transport's classify() says."""

SHARE_A_GROUP_FIX = (
    "the peer runs as another user: share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
)


def kind_of(mark: int, data: bytes, data_mark: int, end_mark: int) -> str:
    """What a received queue message tagged `mark` is: DATA, END (empty, tagged end_mark) or GARBAGE."""
    if mark == data_mark:
        return DATA
    if mark == end_mark and not data:
        return END
    return GARBAGE


def limit_option(settings: Mapping[str, Any], option: str, kernel_limit: int, source: str, fix: str) -> int:
    """The value of a size or count option (`kernel_limit` when not given), refused with the fix above that limit."""
    value = kernel_limit if settings[option] is None else int(settings[option])
    if value > kernel_limit:
        raise ChannelUnavailable(f"{option}={value} is above {source} ({kernel_limit}); {fix}")
    return value


def permission_denied(what: str) -> ChannelUnavailable:
    """The error for a queue another user's mode keeps us out of, with the fix."""
    return ChannelUnavailable(f"{what}: permission denied; {SHARE_A_GROUP_FIX}")


class QueueProducer(Producer):
    """Sends a stream as queue messages: finds the consumer's queue, ends the stream, waits until it is taken."""

    data_mark: ClassVar[int]
    """The tag (priority, mtype) of a data message."""
    end_mark: ClassVar[int]
    """The tag of the end-of-stream message (empty)."""
    drain_poll_first_seconds: ClassVar[float] = 0.0002
    """The first sleep of a closing producer waiting for the queue to empty (doubling up to the maximum)."""

    _fast_limit = -1
    """Largest bytes message send() hands straight to the queue; -1 until connected and after closing."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._queue: Any = None
        self._queue_send: Any = None
        try:
            _, self.max_message_size = self._limits()
            self._presence = Presence(
                address.token, "producer", int(self.settings["mode"]), handover_wait=float(self.settings["wait"])
            )
            self._peer = PeerTracker(self._presence)
        except BaseException:
            self._closed = True  # no unclosed warning
            presence = getattr(self, "_presence", None)
            if presence is not None:
                presence.close()
            raise

    # --- hooks -------------------------------------------------------------

    @abstractmethod
    def _limits(self) -> tuple[int, int]:
        """(queue capacity, max_message_size) from the settings, refused with the fix above the kernel's limits."""

    @abstractmethod
    def _open_existing(self) -> Any:
        """The consumer's queue opened for sending, or None while there is none; ChannelUnavailable if refused."""

    @abstractmethod
    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        """The largest message `queue` takes, where that limit comes from and how to raise it."""

    @abstractmethod
    def _attached(self, queue: Any) -> None:
        """Called once `queue` is this producer's and the consumer attached: prepare the hot path."""

    @abstractmethod
    def _put(self, message: memoryview | bytes, mark: int, deadline: float | None) -> None:
        """Put one message tagged `mark`, waiting for room until `deadline` (None: none) while the consumer lives."""

    @abstractmethod
    def _queued(self) -> int:
        """Messages in the queue now; 0 once it is removed."""

    @abstractmethod
    def _detach(self, queue: Any) -> None:
        """Let go of `queue` (None if never opened) and of what the hot path holds; the consumer removes the queue."""

    @abstractmethod
    def _queue_exists(self) -> bool:
        """True while the channel's queue exists (a dead consumer's queue keeps its presence file as evidence)."""

    def _too_large(self, size: int) -> MessageTooLarge:
        """The error for a message of `size` bytes that the queue refused as too large."""
        return MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)

    # --- rendezvous --------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Wait for the consumer (its presence, or a queue made by a presence-less consumer) and open the queue."""
        presence = self._presence
        location = self.address.location
        while True:
            if presence.peer_state() is not PeerState.GONE:
                queue = self._open_existing()
                if queue is not None:
                    break
            limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
            left = limit - time.monotonic()
            if left <= 0:
                raise PeerTimeout(
                    f"no consumer appeared on {location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            time.sleep(min(RENDEZVOUS_POLL_SECONDS, left))
        capacity, source, fix = self._queue_limit(queue)
        if capacity < self.max_message_size:
            self.max_message_size = capacity
            self.max_message_source = source
            self.max_message_fix = fix
        self._queue = queue
        self._queue_send = queue.send
        self._peer.attach()
        self._attached(queue)
        self._fast_limit = self.max_message_size

    # --- sending -----------------------------------------------------------

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._queue is None:
            self._connect(deadline)
        self._put(view, self.data_mark, deadline)

    # --- closing -----------------------------------------------------------

    def _close(self, deadline: float | None) -> None:
        self._fast_limit = -1
        if deadline is None:  # the base class always gives one; stay bounded regardless
            deadline = time.monotonic() + float(self.settings["wait"])
        if self._queue is None:
            self._connect(deadline)
        self._put(b"", self.end_mark, deadline)
        self._wait_taken(deadline)
        self._leave(clean=True)

    def _wait_taken(self, deadline: float) -> None:
        """Wait until the consumer has taken every message, the end marker last: the queue is empty or removed."""
        peer = self._peer
        pause = self.drain_poll_first_seconds
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while self._queued():
            now = time.monotonic()
            if now >= deadline:
                raise Timeout(f"{self.address.location}: the consumer did not take the end of stream in time")
            if now >= next_probe:
                next_probe = now + LIVENESS_SLICE_SECONDS
                if peer.lost() and self._queued():
                    raise PeerGone(f"the consumer of {self.address.location} left before taking the end of stream")
            time.sleep(pause)
            pause = min(pause * 2, DRAIN_POLL_MAX_SECONDS)

    def _abort(self) -> None:
        self._leave(clean=False)

    def _leave(self, clean: bool) -> None:
        """Let go of the queue (the consumer removes it) and leave the channel."""
        self._fast_limit = -1
        queue, self._queue = self._queue, None
        self._queue_send = None
        self._detach(queue)
        # A producer that never opened the queue sent nothing: it leaves as cleanly as it came.
        self._presence.leave(clean or queue is None, self._queue_exists)


class QueueConsumer(Consumer):
    """Creates the channel's queue, receives data messages until the end marker, then removes the queue."""

    recovered: bool = False
    """True when opening found a queue left by a dead run and replaced it."""

    _fast = False
    """True while recv() may take messages straight from the queue: a data message came, no end yet."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._taken: tuple[int, bytes] | None = None
        self._messages_seen = False
        try:
            self._queue = self._open(address.token)
        except BaseException:
            self._closed = True  # nothing to free; no unclosed warning
            raise
        self._receive = self._queue.receive

    # --- hooks -------------------------------------------------------------

    @abstractmethod
    def _limits(self) -> tuple[int, int]:
        """(queue capacity, max_message_size) from the settings, refused with the fix above the kernel's limits."""

    @abstractmethod
    def _remove_stale(self) -> bool:
        """Remove the queue a run whose side died left behind; True if there was one."""

    @abstractmethod
    def _create_queue(self, capacity: int, mode: int) -> Any:
        """Create the queue exclusively with `capacity` and `mode`; None when it already exists."""

    @abstractmethod
    def _adopt_queue(self, capacity: int, mode: int) -> Any:
        """Open the queue that already exists (a presence-less producer made it), creating it if it went away."""

    @abstractmethod
    def _object_record(self) -> tuple[str, str]:
        """The queue as presence.record() notes it for `podipc clean`: (kind, name)."""

    @abstractmethod
    def _discard(self, queue: Any) -> None:
        """Let go of `queue` when claiming the presence failed after it was opened."""

    @abstractmethod
    def _receive_slowly(self, deadline: float | None, mark: int, data: bytes) -> bytes:
        """Receive until a data message, waiting until `deadline` while the producer lives.

        `mark` and `data`: a message the fast path already took that was not data (mark -1: none).
        Each message taken goes through `_is_data()`; a wait that brings nothing ends in `_check_producer()`.
        """

    @abstractmethod
    def _queued(self) -> int:
        """Messages in the queue now; 0 once it is removed."""

    @abstractmethod
    def _destroy(self, queue: Any) -> None:
        """Remove `queue` and let go of it (and of anything that watches it)."""

    # --- opening -----------------------------------------------------------

    def _open(self, token: str) -> Any:
        """Check limits, create the queue, then claim the consumer's presence."""
        capacity, self.max_message_size = self._limits()
        mode = int(self.settings["mode"])
        if probe(presence_path(token, "consumer"), Trust.for_mode(mode)) is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"another consumer is attached to {self.address.location}; a channel has one producer and one consumer"
            )
        queue = self._open_queue(token, capacity, mode)
        try:
            self._presence = Presence(
                token, "consumer", mode, handover_wait=float(self.settings["wait"]), channel=self.address.location
            )
            self._presence.record(*self._object_record())
            self._peer = PeerTracker(self._presence)
        except BaseException:
            self._discard(queue)
            raise
        return queue

    def _open_queue(self, token: str, capacity: int, mode: int) -> Any:
        """Create the queue, first removing one left behind by a run whose side died."""
        trust = Trust.for_mode(mode)
        states = (probe(presence_path(token, "producer"), trust), probe(presence_path(token, "consumer"), trust))
        if PeerState.GONE in states and self._remove_stale():
            self.recovered = True
        queue = self._create_queue(capacity, mode)
        if queue is None:
            # a presence-less producer (a plain script) made it first: use it as it is
            queue = self._adopt_queue(capacity, mode)
        return queue

    # --- receiving ---------------------------------------------------------

    def _recv(self, deadline: float | None) -> bytes:
        taken, self._taken = self._taken, None
        mark, data = taken if taken is not None else (-1, b"")
        data = self._receive_slowly(deadline, mark, data)
        self._messages_seen = self._fast = True
        return data

    def _is_data(self, kind: str) -> bool:
        """Account for a message the slow path took: True for data; EndOfStream at the end marker; counts garbage."""
        if kind is DATA:
            return True
        if kind is END:
            self._release(clean=True)
            raise EndOfStream(f"{self.address.location}: the producer ended the stream")
        if kind is GARBAGE:
            self.skipped += 1
        return False

    def _check_producer(self, deadline: float | None) -> None:
        """After a wait that brought nothing: PeerGone, PeerTimeout or Timeout when due."""
        peer = self._peer
        location = self.address.location
        if peer.lost():
            if self._queued() == 0:
                # a clean producer puts the end marker in before it leaves, so an empty queue means it died
                raise PeerGone(f"the producer of {location} is gone (it died or closed without ending the stream)")
        elif peer.state is not PeerState.ALIVE and not self._messages_seen and time.monotonic() >= self.wait_deadline:
            raise PeerTimeout(
                f"no producer appeared on {location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise self._timed_out()

    def _timed_out(self) -> Timeout:
        """The error of a receive whose timeout passed: PeerTimeout while no producer ever appeared."""
        location = self.address.location
        if not self._peer.presence.peer_seen and not self._messages_seen:
            return PeerTimeout(f"no producer appeared on {location} within the timeout")
        return Timeout(f"{location}: no message within the timeout")

    # --- closing -----------------------------------------------------------

    def _release(self, clean: bool) -> None:
        """Remove the queue and leave; `clean`: at the end of stream."""
        self._fast = False
        queue, self._queue = self._queue, None
        if queue is None:
            return
        self._destroy(queue)
        self._presence.leave(clean, lambda: False)

    def _close(self) -> None:
        self._release(clean=False)
