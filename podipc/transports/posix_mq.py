"""mq:// - a POSIX message queue (mq_open) in the pod's shared IPC namespace.

Address:
    mq:///NAME                the queue /NAME (1-254 characters from A-Z a-z 0-9 . _ -)
    options: wait=SECONDS (peer rendezvous, default 30), mode=0600 (queue and presence files),
             depth=N (messages the queue holds, default /proc/sys/fs/mqueue/msg_max),
             max_message_size=BYTES (default /proc/sys/fs/mqueue/msgsize_max)

Requires:
    posix_ipc; a kernel with POSIX message queues (every Linux). Mounting the mqueue
    filesystem at /dev/mqueue is optional: it only makes queues visible (`ls /dev/mqueue`).

Semantics:
    One podipc message is one queue message: boundaries and order are kept, nothing is
    lost (a full queue blocks the producer). There is no header, so a plain posix_ipc
    script can be a peer (docs/wire/mq.md): data messages have priority 1, the end of
    stream is an empty message of priority 0, which the kernel delivers after every
    priority-1 message. Zero-length data messages (priority 1) are valid data.

    Garbage: a message of any other priority, or a non-empty priority-0 message, is
    skipped and counted in `Consumer.skipped`; it never ends the stream or raises.

    Max message: `max_message_size`, by default the kernel limit
    /proc/sys/fs/mqueue/msgsize_max (8192 in a pod). A larger option raises
    ChannelUnavailable, a larger message MessageTooLarge; both say the fix: set
    fs.mqueue.msgsize_max in the pod's securityContext.sysctls, or use shm://.
    `depth` is capped by /proc/sys/fs/mqueue/msg_max (10 in a pod); the queue's memory
    (depth x max_message_size) counts against RLIMIT_MSGQUEUE (819200 bytes per user).

    Creates and unlinks: the consumer creates the queue (mode `mode`, 0600 by default)
    and unlinks it when the stream ends or it closes. The producer opens the queue only
    once the consumer is there (its presence file, or the queue itself for a consumer
    that holds no presence), so it never creates a queue nobody will remove. A queue
    left by a SIGKILLed run (a presence file whose holder died) is unlinked and
    recreated by the next consumer. depth and max_message_size are applied by the
    consumer; a producer takes the queue as it finds it (its max_message_size drops to
    the queue's when that is smaller).

    Liveness: a queue cannot tell a dead peer, so both sides hold a
    podipc.presence.Presence file in /dev/shm and blocked calls wait in slices of 0.25 s,
    probing it between slices: a killed peer raises PeerGone within about 0.3 s.
    `Producer.close()` puts the end marker and waits until the queue is empty, that
    is until the consumer has taken every message and the marker.
    An abort (or a consumer's close before the end marker) while the peer lives leaves
    the presence file unlocked, as a crash would, so the peer raises PeerGone even if it
    never saw this side alive; the survivor removes that file when it finishes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import posix_ipc

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, parse_count, parse_size, remaining
from podipc.errors import (
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    Timeout,
)
from podipc.ownership import Trust
from podipc.presence import PeerState, PeerTracker, Presence, presence_path, probe
from podipc.proc import read_int_or

MSG_MAX_PATH = "/proc/sys/fs/mqueue/msg_max"
MSGSIZE_MAX_PATH = "/proc/sys/fs/mqueue/msgsize_max"

DATA_PRIORITY = 1
END_PRIORITY = 0
LIVENESS_SLICE_SECONDS = 0.25
DRAIN_POLL_FIRST_SECONDS = 0.0002
DRAIN_POLL_MAX_SECONDS = 0.01
RENDEZVOUS_POLL_SECONDS = 0.02

SIZE_FIX = "set fs.mqueue.msgsize_max in the pod's securityContext.sysctls (the kubelet must allow it) or use shm://"
DEPTH_FIX = "set fs.mqueue.msg_max in the pod's securityContext.sysctls (the kubelet must allow it) or lower depth="
RLIMIT_FIX = (
    "the user's RLIMIT_MSGQUEUE (ulimit -q, 819200 bytes by default) or fs.mqueue.queues_max is used up: "
    "lower depth= or max_message_size=, or remove leftover queues (ls /dev/mqueue after mounting it)"
)

DATA, END, GARBAGE = "data", "end", "garbage"


def host_max_message_size() -> int:
    """The largest POSIX queue message here: /proc/sys/fs/mqueue/msgsize_max (bytes)."""
    return read_int_or(MSGSIZE_MAX_PATH, int(posix_ipc.QUEUE_MESSAGE_SIZE_MAX_DEFAULT))


def host_max_depth() -> int:
    """The longest POSIX queue here: /proc/sys/fs/mqueue/msg_max (messages)."""
    return read_int_or(MSG_MAX_PATH, int(posix_ipc.QUEUE_MESSAGES_MAX_DEFAULT))


def availability() -> str | None:
    """None when POSIX message queues work here, else why not and the fix (creates and unlinks a probe queue)."""
    if not posix_ipc.MESSAGE_QUEUES_SUPPORTED:
        return "this platform has no POSIX message queues; use shm:// or unix://"
    name = f"/podipc-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        queue = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, 0o600, 1, 1)
    except posix_ipc.PermissionsError as exc:
        return f"creating a POSIX message queue is not permitted here ({exc}); use shm:// or unix://"
    except OSError as exc:
        return f"cannot create a POSIX message queue ({exc}): {RLIMIT_FIX}"
    except (posix_ipc.Error, ValueError) as exc:
        return f"POSIX message queues do not work here ({exc}); use shm:// or unix://"
    queue.unlink()
    queue.close()
    return None


def classify(priority: int, data: bytes) -> str:
    """What a received queue message is: DATA, END (the end marker) or GARBAGE (skipped)."""
    if priority == DATA_PRIORITY:
        return DATA
    if priority == END_PRIORITY and not data:
        return END
    return GARBAGE


def queue_name(address: Address) -> str:
    """The mq_open name of an address: '/' + its name."""
    return "/" + address.name


def _check_limits(settings: Mapping[str, Any]) -> tuple[int, int]:
    """The (depth, max_message_size) to use, refused with the fix when above the kernel limits."""
    kernel_size = host_max_message_size()
    size = kernel_size if settings["max_message_size"] is None else int(settings["max_message_size"])
    if size > kernel_size:
        raise ChannelUnavailable(f"max_message_size={size} is above {MSGSIZE_MAX_PATH} ({kernel_size}); {SIZE_FIX}")
    if size < 1:
        raise ChannelUnavailable("max_message_size must be at least 1 byte for mq://")
    kernel_depth = host_max_depth()
    depth = kernel_depth if settings["depth"] is None else int(settings["depth"])
    if depth > kernel_depth:
        raise ChannelUnavailable(f"depth={depth} is above {MSG_MAX_PATH} ({kernel_depth}); {DEPTH_FIX}")
    return depth, size


def _unavailable(what: str, exc: BaseException) -> PodIPCError:
    if isinstance(exc, posix_ipc.PermissionsError):
        return ChannelUnavailable(
            f"{what}: permission denied; the peer runs as another user: share a group (runAsGroup/fsGroup) "
            "and open both sides with mode=0660"
        )
    if isinstance(exc, ValueError):
        return ChannelUnavailable(f"{what}: the kernel refused the queue attributes ({exc}); {SIZE_FIX}")
    if isinstance(exc, OSError):
        return ChannelUnavailable(f"{what}: {exc}; {RLIMIT_FIX}")
    return ChannelUnavailable(f"{what}: {exc}")


def _open_nowait(name: str) -> Any:
    """A second, non-blocking descriptor of an existing queue, for the hot paths."""
    try:
        queue = posix_ipc.MessageQueue(name, 0)
    except (posix_ipc.Error, OSError, ValueError) as exc:
        raise _unavailable(f"cannot open the queue {name}", exc) from exc
    queue.block = False
    return queue


def _queue_exists(name: str) -> bool:
    try:
        posix_ipc.MessageQueue(name, 0).close()
    except (posix_ipc.Error, OSError):
        return False
    return True


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_message_queue(name)


class PosixMQProducer(Producer):
    """Sends each message as one priority-1 message on the POSIX queue /NAME."""

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", parse_count, None, "messages the queue holds (default /proc/sys/fs/mqueue/msg_max)"),
        Option("max_message_size", parse_size, None, "largest message in bytes (default msgsize_max)"),
    )
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX

    _fast_limit = -1
    """Largest bytes message send() hands straight to the queue; -1 until connected and after closing."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._queue: Any = None
        self._queue_send: Any = None
        self._nowait_queue: Any = None
        self._send_now: Any = None
        try:
            self._depth, self.max_message_size = _check_limits(self.settings)
            self.name = queue_name(address)
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

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit).

        The common case (bytes or bytearray, no timeout, connected, room in the queue) is one
        mq_send on a second, non-blocking descriptor: no checks of the base class, no timeout to
        convert; a full queue falls back to the checked path, which waits in timed slices.
        """
        if timeout is None and (type(data) is bytes or type(data) is bytearray) and len(data) <= self._fast_limit:
            try:
                self._send_now(data, None, DATA_PRIORITY)
                return
            except (posix_ipc.Error, OSError, ValueError):
                pass  # the checked path below retries and translates
        super().send(data, timeout)

    # --- rendezvous --------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Wait for the consumer (its presence, or a queue made by a presence-less consumer) and open the queue."""
        presence = self._presence
        location = self.address.location
        while True:
            if presence.peer_state() is not PeerState.GONE:
                try:
                    queue = posix_ipc.MessageQueue(self.name, 0)
                    break
                except posix_ipc.ExistentialError:
                    pass
                except (posix_ipc.Error, OSError, ValueError) as exc:
                    raise _unavailable(f"cannot open the queue {self.name}", exc) from exc
            limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
            left = limit - time.monotonic()
            if left <= 0:
                raise PeerTimeout(
                    f"no consumer appeared on {location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            time.sleep(min(RENDEZVOUS_POLL_SECONDS, left))
        self._queue = queue
        self._queue_send = queue.send
        self._nowait_queue = _open_nowait(self.name)
        self._send_now = self._nowait_queue.send
        self._peer.attach()
        if queue.max_message_size < self.max_message_size:
            self.max_message_size = queue.max_message_size
            self.max_message_source = f"the max_message_size of the queue {self.name} (set by the consumer)"
            self.max_message_fix = "open the consumer with a larger max_message_size="
        self._fast_limit = self.max_message_size

    # --- sending -----------------------------------------------------------

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._queue is None:
            self._connect(deadline)
        self._send_waiting(view, DATA_PRIORITY, deadline)

    def _send_waiting(self, view: memoryview | bytes, priority: int, deadline: float | None) -> None:
        """Send, waiting for room in slices of 0.25 s, probing the consumer between them."""
        send = self._queue_send
        peer = self._peer
        location = self.address.location
        while True:
            left = (
                LIVENESS_SLICE_SECONDS if deadline is None else min(LIVENESS_SLICE_SECONDS, remaining(deadline) or 0.0)
            )
            try:
                send(view, left, priority)
                return
            except posix_ipc.BusyError:
                pass
            except ValueError as exc:
                size = memoryview(view).nbytes
                raise MessageTooLarge(
                    size, self.max_message_size, self.max_message_source, self.max_message_fix
                ) from exc
            except (posix_ipc.Error, OSError) as exc:
                raise PeerGone(f"the queue of {location} failed: {exc}") from exc
            if peer.lost():
                raise PeerGone(f"the consumer of {location} is gone (it died or closed before the end of stream)")
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"{location}: the queue stayed full (the consumer is not keeping up)")

    # --- closing -----------------------------------------------------------

    def _close(self, deadline: float | None) -> None:
        self._fast_limit = -1
        if self._queue is None:
            self._connect(deadline)
        self._send_waiting(b"", END_PRIORITY, deadline)
        self._wait_drained(deadline)
        self._leave(clean=True)

    def _wait_drained(self, deadline: float | None) -> None:
        """Wait until the consumer has taken every message, the end marker last."""
        queue = self._queue
        peer = self._peer
        pause = DRAIN_POLL_FIRST_SECONDS
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while queue.current_messages:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(f"{self.address.location}: the consumer did not take the end of stream in time")
            if now >= next_probe:
                next_probe = now + LIVENESS_SLICE_SECONDS
                if peer.lost() and queue.current_messages:
                    raise PeerGone(f"the consumer of {self.address.location} left before taking the end of stream")
            time.sleep(pause)
            pause = min(pause * 2, DRAIN_POLL_MAX_SECONDS)

    def _abort(self) -> None:
        self._leave(clean=False)

    def _leave(self, clean: bool) -> None:
        """Close the queue's descriptors (the consumer unlinks it) and leave."""
        self._fast_limit = -1
        queue, self._queue = self._queue, None
        self._queue_send = self._send_now = None
        if queue is not None:
            queue.close()
        nowait, self._nowait_queue = self._nowait_queue, None
        if nowait is not None:
            nowait.close()
        # A producer that never opened the queue sent nothing: it leaves as cleanly as it came.
        self._presence.leave(clean or queue is None, lambda: _queue_exists(self.name))


class PosixMQConsumer(Consumer):
    """Creates the POSIX queue /NAME and receives priority-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = PosixMQProducer.options
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX

    recovered: bool = False
    """True when opening found a queue left by a dead run and replaced it."""

    _fast = False
    """True while recv() may take messages straight from the queue: a data message came, no end yet."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.name = queue_name(address)
        self._taken: tuple[int, bytes] | None = None
        try:
            self._queue = self._open(address.token)
        except BaseException:
            self._closed = True  # nothing to free; no unclosed warning
            raise
        self._receive = self._queue.receive
        self._messages_seen = False

    def _open(self, token: str) -> Any:
        """Check limits, create the queue, then claim the consumer's presence."""
        depth, self.max_message_size = _check_limits(self.settings)
        mode = int(self.settings["mode"])
        if probe(presence_path(token, "consumer"), Trust.for_mode(mode)) is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"another consumer is attached to {self.address.location}; a channel has one producer and one consumer"
            )
        queue = self._open_queue(token, depth, mode)
        try:
            self._presence = Presence(
                token, "consumer", mode, handover_wait=float(self.settings["wait"]), channel=self.address.location
            )
            self._presence.record("posix_mq", self.name)
            self._peer = PeerTracker(self._presence)
        except BaseException:
            queue.close()
            raise
        return queue

    def _open_queue(self, token: str, depth: int, mode: int) -> Any:
        """Create the queue, first unlinking one left behind by a run whose side died."""
        trust = Trust.for_mode(mode)
        producer_state = probe(presence_path(token, "producer"), trust)
        consumer_state = probe(presence_path(token, "consumer"), trust)
        if PeerState.GONE in (producer_state, consumer_state):
            try:
                posix_ipc.unlink_message_queue(self.name)
                self.recovered = True
            except posix_ipc.ExistentialError:
                pass
        what = f"cannot create the queue {self.name}"
        try:
            queue = posix_ipc.MessageQueue(self.name, posix_ipc.O_CREX, mode, depth, self.max_message_size)
        except posix_ipc.ExistentialError:
            # a presence-less producer (a plain script) made it first: use it as it is
            try:
                queue = posix_ipc.MessageQueue(self.name, posix_ipc.O_CREAT, mode, depth, self.max_message_size)
            except (posix_ipc.Error, OSError, ValueError) as exc:
                raise _unavailable(what, exc) from exc
            self.max_message_size = queue.max_message_size
            return queue
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(what, exc) from exc
        os.fchmod(queue.mqd, mode)  # mq_open applies the umask; the option says the mode
        return queue

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; raise EndOfStream after the last one, Timeout after `timeout` seconds.

        The common case (no timeout, a data message within the slice) is one
        mq_timedreceive; anything else takes the checked path of the base class. (Trying a
        non-blocking receive first was measured slower on round trips: the two processes
        often share a core, so even the work before blocking delays the reply.)
        """
        if timeout is None and self._fast:
            try:
                data, priority = self._receive(LIVENESS_SLICE_SECONDS)
            except (posix_ipc.Error, OSError):
                return super().recv(None)  # nothing was taken: the checked path waits and translates
            if priority == DATA_PRIORITY:
                return data  # type: ignore[no-any-return]
            self._taken = (priority, data)
        return super().recv(timeout)

    def _recv(self, deadline: float | None) -> bytes:
        taken, self._taken = self._taken, None
        data = self._recv_waiting(deadline, *taken) if taken is not None else self._recv_waiting(deadline)
        self._messages_seen = self._fast = True
        return data

    def _recv_waiting(self, deadline: float | None, priority: int = -1, data: bytes = b"") -> bytes:
        """Receive in slices of 0.25 s, probing the producer between them; skip garbage; end at the marker.

        `priority` and `data`: a message already taken that was not data (-1: none).
        """
        receive = self._receive
        while True:
            if priority >= 0:
                kind = classify(priority, data)
                if kind is DATA:
                    return data
                if kind is END:
                    self._release(clean=True)
                    raise EndOfStream(f"{self.address.location}: the producer ended the stream")
                self.skipped += 1
            left = (
                LIVENESS_SLICE_SECONDS if deadline is None else min(LIVENESS_SLICE_SECONDS, remaining(deadline) or 0.0)
            )
            try:
                data, priority = receive(left)
            except posix_ipc.BusyError:
                priority = -1
                self._check_producer(deadline)
            except (posix_ipc.Error, OSError) as exc:
                raise PeerGone(f"the queue of {self.address.location} failed: {exc}") from exc

    def _check_producer(self, deadline: float | None) -> None:
        """After an empty slice: PeerGone, PeerTimeout or Timeout when due."""
        peer = self._peer
        location = self.address.location
        if peer.lost():
            if self._queue.current_messages == 0:
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

    def _release(self, clean: bool) -> None:
        """Unlink and close the queue and leave; `clean`: at the end of stream."""
        self._fast = False
        queue, self._queue = self._queue, None
        if queue is None:
            return
        _unlink_quietly(self.name)
        queue.close()
        self._presence.leave(clean, lambda: False)

    def _close(self) -> None:
        self._release(clean=False)
