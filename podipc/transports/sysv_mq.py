"""sysvmq:// - a System V message queue (msgget) in the pod's shared IPC namespace.

Address:
    sysvmq://KEY              the queue with IPC key KEY (1..2147483647, decimal or 0x hex)
    sysvmq://NAME             the key derived from NAME (podipc.address.sysv_key_from_name)
    options: wait=SECONDS (peer rendezvous, default 30), mode=0600 (queue and presence files),
             queue_bytes=BYTES (the queue's capacity, msg_qbytes; default /proc/sys/kernel/msgmnb),
             max_message_size=BYTES (default /proc/sys/kernel/msgmax)

Requires:
    sysv_ipc; a kernel with SysV IPC (every Linux).

Semantics:
    One podipc message is one queue message: boundaries and order are kept, nothing is
    lost (a full queue blocks the producer). There is no header, so a plain sysv_ipc
    script can be a peer (docs/wire/sysvmq.md): data messages have mtype 1, the end of
    stream is an empty message of mtype 2, and the consumer receives with type 0 (FIFO).
    Zero-length data messages (mtype 1) are valid data.

    Garbage: a message of any other mtype, or a non-empty mtype-2 message, is skipped
    and counted in `Consumer.skipped`. mtype 3 is reserved for the consumer's own
    wake-up messages (below); those are skipped and not counted.

    Max message: `max_message_size`, by default the kernel limit /proc/sys/kernel/msgmax
    (8192 in a pod); it must also fit the queue's capacity (kernel.msgmnb, 16384 in a
    pod). A larger option raises ChannelUnavailable, a larger message MessageTooLarge;
    both say the fix: set kernel.msgmax (and kernel.msgmnb) in the pod's
    securityContext.sysctls, or use shm://. The consumer always receives into a buffer
    of msgmax bytes, so no message a sender can put in is ever too large to take out.

    Creates and removes: the consumer creates the queue (mode `mode`, 0600 by default)
    and removes it when the stream ends or it closes. The producer opens the queue only
    once the consumer is there (its presence file, or the queue itself for a consumer
    that holds no presence). A queue left by a SIGKILLed run (a presence file whose
    holder died) is removed and recreated by the next consumer. queue_bytes is the
    consumer's; a producer takes the queue as it finds it (its max_message_size drops to
    the queue's capacity when that is smaller).

    Liveness and waiting: msgrcv/msgsnd have no timeout, so blocked calls block for real
    (no added latency) while a watchdog thread of the endpoint looks at the peer's
    presence file every 0.25 s. A blocked consumer is woken by an empty mtype-3 message
    the watchdog puts in its own (empty) queue, when the producer died, when `wait`
    passes with no producer, or when the call's timeout passes (the thread sleeps until
    exactly then: it wakes about 4 times a second, so it seldom takes the GIL). A
    producer blocked on a full queue with no timeout is woken when its consumer died: the
    watchdog removes the dead consumer's queue (the send then fails: PeerGone). A send
    with a timeout cannot be woken that way, so it polls: non-blocking attempts with
    sleeps growing from 50 us to 2 ms. `Producer.close()` puts the end marker and waits
    until the queue is empty or removed (the consumer removes it at the end marker).
    An abort (or a consumer's close before the end marker) while the peer lives leaves
    the presence file unlocked, as a crash would, so the peer raises PeerGone even if it
    never saw this side alive; the survivor removes that file when it finishes.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import sysv_ipc

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, parse_size
from podipc.errors import (
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.ownership import Trust
from podipc.presence import PeerState, PeerTracker, Presence, presence_path, probe
from podipc.proc import read_int_or

MSGMAX_PATH = "/proc/sys/kernel/msgmax"
MSGMNB_PATH = "/proc/sys/kernel/msgmnb"
FALLBACK_MSGMAX = 8192
FALLBACK_MSGMNB = 16384

DATA_TYPE = 1
END_TYPE = 2
WAKE_TYPE = 3

LIVENESS_SLICE_SECONDS = 0.25
WATCHDOG_TICK_SECONDS = 0.05
POLL_FIRST_SECONDS = 0.00005
POLL_MAX_SECONDS = 0.002
RENDEZVOUS_POLL_SECONDS = 0.02

SIZE_FIX = (
    "set kernel.msgmax (and kernel.msgmnb) in the pod's securityContext.sysctls (the kubelet must allow it) "
    "or use shm://"
)
QUEUE_FIX = "set kernel.msgmnb in the pod's securityContext.sysctls (the kubelet must allow it) or lower queue_bytes="
LIMIT_FIX = "the SysV queue limit /proc/sys/kernel/msgmni may be used up: remove leftover queues (ipcs -q, ipcrm -q ID)"

DATA, END, WAKE, GARBAGE = "data", "end", "wake", "garbage"


def host_max_message_size() -> int:
    """The largest SysV queue message here: /proc/sys/kernel/msgmax (bytes)."""
    return read_int_or(MSGMAX_PATH, FALLBACK_MSGMAX)


def host_queue_bytes() -> int:
    """The default capacity of a SysV queue here: /proc/sys/kernel/msgmnb (bytes)."""
    return read_int_or(MSGMNB_PATH, FALLBACK_MSGMNB)


def availability() -> str | None:
    """None when SysV message queues work here, else why not and the fix (creates and removes a probe queue)."""
    try:
        queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, 0o600, 1)
    except sysv_ipc.PermissionsError as exc:
        return f"creating a SysV message queue is not permitted here ({exc}); use shm:// or unix://"
    except (sysv_ipc.Error, OSError) as exc:
        return f"cannot create a SysV message queue ({exc}); {LIMIT_FIX}"
    queue.remove()
    return None


def classify(mtype: int, data: bytes) -> str:
    """What a received queue message is: DATA, END (the end marker), WAKE (the consumer's own) or GARBAGE."""
    if mtype == DATA_TYPE:
        return DATA
    if mtype == END_TYPE and not data:
        return END
    if mtype == WAKE_TYPE and not data:
        return WAKE
    return GARBAGE


def _check_limits(settings: Mapping[str, Any]) -> tuple[int, int]:
    """The (queue_bytes, max_message_size) to use, refused with the fix when above the kernel limits."""
    kernel_size = host_max_message_size()
    size = kernel_size if settings["max_message_size"] is None else int(settings["max_message_size"])
    if size > kernel_size:
        raise ChannelUnavailable(f"max_message_size={size} is above {MSGMAX_PATH} ({kernel_size}); {SIZE_FIX}")
    kernel_bytes = host_queue_bytes()
    queue_bytes = kernel_bytes if settings["queue_bytes"] is None else int(settings["queue_bytes"])
    if queue_bytes > kernel_bytes:
        raise ChannelUnavailable(f"queue_bytes={queue_bytes} is above {MSGMNB_PATH} ({kernel_bytes}); {QUEUE_FIX}")
    if size > queue_bytes:
        raise ChannelUnavailable(
            f"max_message_size={size} does not fit the queue capacity {queue_bytes} ({MSGMNB_PATH} or "
            f"queue_bytes=); {QUEUE_FIX}"
        )
    return queue_bytes, size


def _unavailable(what: str, exc: BaseException) -> PodIPCError:
    if isinstance(exc, sysv_ipc.PermissionsError):
        return ChannelUnavailable(
            f"{what}: permission denied; the peer runs as another user: share a group (runAsGroup/fsGroup) "
            "and open both sides with mode=0660"
        )
    return ChannelUnavailable(f"{what}: {exc}; {LIMIT_FIX}")


def _interrupted(exc: BaseException) -> bool:
    """True when msgrcv/msgsnd returned EINTR (a signal; sysv_ipc raises its base Error for it)."""
    return type(exc) is sysv_ipc.Error and "Signaled" in str(exc)


def _queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key)
    except (sysv_ipc.Error, OSError):
        return False
    return True


def _remove_quietly(queue: Any) -> None:
    with contextlib.suppress(sysv_ipc.ExistentialError, OSError):
        queue.remove()


class _Watchdog:
    """Looks after an endpoint's blocking call from a daemon thread: probes the peer, wakes the call when due.

    The endpoint's thread sets `blocked` around msgrcv/msgsnd (plain attribute writes: no lock on
    the hot path). The thread sleeps a liveness slice (0.25 s) at a time, or until the deadline
    a slow-path receive announces with set_deadline(): few wake-ups, so it rarely takes the GIL.
    """

    def __init__(self, queue: Any, peer: PeerTracker, role: str, wait_deadline: float) -> None:
        self.queue = queue
        self.peer = peer
        self.role = role
        self.wait_deadline = wait_deadline
        self.blocked = False
        self.wake_at: float | None = None
        self.messages_seen = False
        self.stopped = False
        self.alarm = threading.Event()
        self.sleeping_until = 0.0
        self.thread = threading.Thread(target=self.run, name=f"podipc-sysvmq-{role}-watchdog", daemon=True)
        self.thread.start()

    def set_deadline(self, deadline: float | None) -> None:
        """The blocked call's deadline (None: none); the thread re-plans its sleep if it would wake too late."""
        self.wake_at = deadline
        if deadline is not None and deadline < self.sleeping_until:
            self.alarm.set()

    def run(self) -> None:
        """Until stopped: wake the blocked call when its deadline passes or the peer is lost."""
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while not self.stopped:
            # clear and publish before reading wake_at: a deadline set after the read rings the alarm
            self.alarm.clear()
            self.sleeping_until = next_probe
            wake_at = self.wake_at
            now = time.monotonic()
            until = next_probe if wake_at is None else min(next_probe, wake_at)
            if until > now:
                self.sleeping_until = until
                self.alarm.wait(until - now)
                continue
            if not self.blocked:
                if wake_at is not None and now >= wake_at:
                    self.alarm.wait(WATCHDOG_TICK_SECONDS)  # due, but the call has not blocked yet
                else:
                    next_probe = now + LIVENESS_SLICE_SECONDS  # nothing blocked: no probe needed
                continue
            if wake_at is not None and now >= wake_at:
                self.wake()
                self.alarm.wait(WATCHDOG_TICK_SECONDS)
                continue
            next_probe = now + LIVENESS_SLICE_SECONDS
            try:
                lost = self.peer.lost()
            except PodIPCError:
                lost = True
            waited_out = self.peer.state is not PeerState.ALIVE and not self.messages_seen and now >= self.wait_deadline
            if lost or (waited_out and self.role == "consumer"):
                self.wake()

    def wake(self) -> None:
        """Make the blocked call return."""
        if self.role == "consumer":
            # the consumer is blocked, so its queue is empty and has room; if not, it is awake anyway
            with contextlib.suppress(sysv_ipc.Error, OSError):
                self.queue.send(b"", False, WAKE_TYPE)
        elif self.peer.state is PeerState.GONE:
            # the consumer died holding the queue: removing it fails the blocked msgsnd (EIDRM);
            # the next consumer would remove it as stale anyway
            _remove_quietly(self.queue)

    def stop(self) -> None:
        """End the thread now."""
        self.stopped = True
        self.alarm.set()


class SysVMQProducer(Producer):
    """Sends each message as one mtype-1 message on the SysV queue KEY."""

    options: ClassVar[tuple[Option, ...]] = (
        Option("queue_bytes", parse_size, None, "queue capacity in bytes, msg_qbytes (default kernel.msgmnb)"),
        Option("max_message_size", parse_size, None, "largest message in bytes (default kernel.msgmax)"),
    )
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX

    _fast_limit = -1
    """Largest bytes message send() hands straight to the queue; -1 until connected and after closing."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._queue: Any = None
        self._queue_send: Any = None
        self._watch: _Watchdog | None = None
        try:
            _, self.max_message_size = _check_limits(self.settings)
            self.key = address.key
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

        The common case (bytes or bytearray, no timeout, connected) goes straight to a blocking msgsnd:
        the base class's checks cost as much as the queue itself at 64 bytes.
        """
        if timeout is None and (type(data) is bytes or type(data) is bytearray) and len(data) <= self._fast_limit:
            watch = self._watch
            watch.blocked = True  # type: ignore[union-attr]
            try:
                self._queue_send(data, True, DATA_TYPE)
                return
            except (sysv_ipc.Error, OSError):
                pass  # not sent: the checked path below retries and translates
            finally:
                watch.blocked = False  # type: ignore[union-attr]
        super().send(data, timeout)

    # --- rendezvous --------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Wait for the consumer (its presence, or a queue made by a presence-less consumer) and open the queue."""
        presence = self._presence
        location = self.address.location
        queue = None
        while queue is None:
            if presence.peer_state() is not PeerState.GONE:
                try:
                    queue = sysv_ipc.MessageQueue(self.key, 0, 0, self.max_message_size)
                except sysv_ipc.ExistentialError:
                    queue = None
                except (sysv_ipc.Error, OSError) as exc:
                    raise _unavailable(f"cannot open the queue of {location}", exc) from exc
                if queue is not None:
                    break
            limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
            left = limit - time.monotonic()
            if left <= 0:
                raise PeerTimeout(
                    f"no consumer appeared on {location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            time.sleep(min(RENDEZVOUS_POLL_SECONDS, left))
        capacity = queue.max_size
        if capacity < self.max_message_size:
            self.max_message_size = capacity
            self.max_message_source = f"the capacity (msg_qbytes) of the queue of {location} (set by the consumer)"
            self.max_message_fix = "open the consumer with a larger queue_bytes="
        self._queue = queue
        self._queue_send = queue.send
        self._peer.attach()
        self._watch = _Watchdog(queue, self._peer, "producer", self.wait_deadline)
        self._watch.messages_seen = True
        self._fast_limit = self.max_message_size

    # --- sending -----------------------------------------------------------

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._queue is None:
            self._connect(deadline)
        if deadline is None:
            self._send_blocking(view, DATA_TYPE)
        else:
            self._send_polling(view, DATA_TYPE, deadline)

    def _send_blocking(self, view: memoryview, mtype: int) -> None:
        """Send, blocking while the queue is full; the watchdog fails the call if the consumer dies."""
        watch = self._watch
        assert watch is not None
        while True:
            watch.blocked = True
            try:
                self._queue_send(view, True, mtype)
                return
            except ValueError as exc:
                raise MessageTooLarge(
                    view.nbytes, self.max_message_size, self.max_message_source, self.max_message_fix
                ) from exc
            except (sysv_ipc.Error, OSError) as exc:
                if not _interrupted(exc):
                    raise self._failed(exc) from exc
            finally:
                watch.blocked = False

    def _failed(self, exc: BaseException) -> PodIPCError:
        """Translate a failed msgsnd."""
        location = self.address.location
        if isinstance(exc, sysv_ipc.ExistentialError) or (
            isinstance(exc, OSError) and exc.errno in (errno.EIDRM, errno.EINVAL)
        ):
            return PeerGone(f"the queue of {location} was removed: its consumer closed or died")
        if isinstance(exc, sysv_ipc.PermissionsError):
            return _unavailable(f"cannot send to the queue of {location}", exc)
        return PeerGone(f"the queue of {location} failed: {exc}")

    def _send_polling(self, view: memoryview | bytes, mtype: int, deadline: float) -> None:
        """Send before `deadline`: non-blocking attempts with growing sleeps, probing the consumer."""
        send = self._queue_send
        peer = self._peer
        pause = POLL_FIRST_SECONDS
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while True:
            try:
                send(view, False, mtype)
                return
            except sysv_ipc.BusyError:
                pass
            except ValueError as exc:
                raise MessageTooLarge(
                    len(view), self.max_message_size, self.max_message_source, self.max_message_fix
                ) from exc
            except (sysv_ipc.Error, OSError) as exc:
                raise self._failed(exc) from exc
            now = time.monotonic()
            if now >= deadline:
                raise Timeout(f"{self.address.location}: the queue stayed full (the consumer is not keeping up)")
            if now >= next_probe:
                next_probe = now + LIVENESS_SLICE_SECONDS
                if peer.lost():
                    raise PeerGone(f"the consumer of {self.address.location} is gone (it died or closed)")
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, POLL_MAX_SECONDS)

    # --- closing -----------------------------------------------------------

    def _close(self, deadline: float | None) -> None:
        self._fast_limit = -1
        if deadline is None:  # the base class always gives one; stay bounded regardless
            deadline = time.monotonic() + float(self.settings["wait"])
        if self._queue is None:
            self._connect(deadline)
        self._send_polling(b"", END_TYPE, deadline)
        self._wait_taken(deadline)
        self._leave(clean=True)

    def _wait_taken(self, deadline: float) -> None:
        """Wait until the consumer has taken the end marker: the queue is empty or removed."""
        queue = self._queue
        peer = self._peer
        pause = POLL_FIRST_SECONDS
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while True:
            try:
                if not queue.current_messages:
                    return
            except (sysv_ipc.Error, OSError):
                return  # removed: the consumer removes the queue when it takes the end marker
            now = time.monotonic()
            if now >= deadline:
                raise Timeout(f"{self.address.location}: the consumer did not take the end of stream in time")
            if now >= next_probe:
                next_probe = now + LIVENESS_SLICE_SECONDS
                if peer.lost() and peer.state is PeerState.GONE:
                    raise PeerGone(f"the consumer of {self.address.location} died before taking the end of stream")
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_SECONDS * 5)

    def _abort(self) -> None:
        self._leave(clean=False)

    def _leave(self, clean: bool) -> None:
        """Stop the watchdog and leave (the consumer removes the queue)."""
        self._fast_limit = -1
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        attached = self._queue is not None
        self._queue = None
        self._queue_send = None
        # A producer that never opened the queue sent nothing: it leaves as cleanly as it came.
        self._presence.leave(clean or not attached, lambda: _queue_exists(self.key))


class SysVMQConsumer(Consumer):
    """Creates the SysV queue KEY and receives mtype-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = SysVMQProducer.options
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX

    recovered: bool = False
    """True when opening found a queue left by a dead run and replaced it."""

    _fast = False
    """True while recv() may take messages straight from the queue: a data message came, no end yet."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.key = address.key
        try:
            self._queue = self._open(address.token)
        except BaseException:
            self._closed = True  # nothing to free; no unclosed warning
            raise
        self._receive = self._queue.receive
        self._taken: tuple[int, bytes] | None = None
        self._watch = _Watchdog(self._queue, self._peer, "consumer", self.wait_deadline)

    def _open(self, token: str) -> Any:
        """Check limits, create the queue, then claim the consumer's presence."""
        queue_bytes, self.max_message_size = _check_limits(self.settings)
        mode = int(self.settings["mode"])
        if probe(presence_path(token, "consumer"), Trust.for_mode(mode)) is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"another consumer is attached to {self.address.location}; a channel has one producer and one consumer"
            )
        queue = self._open_queue(token, queue_bytes, mode)
        try:
            self._presence = Presence(
                token, "consumer", mode, handover_wait=float(self.settings["wait"]), channel=self.address.location
            )
            self._presence.record("sysv_mq", str(self.key))
            self._peer = PeerTracker(self._presence)
        except BaseException:
            _remove_quietly(queue)
            raise
        return queue

    def _open_queue(self, token: str, queue_bytes: int, mode: int) -> Any:
        """Create the queue, first removing one left behind by a run whose side died."""
        trust = Trust.for_mode(mode)
        states = (probe(presence_path(token, "producer"), trust), probe(presence_path(token, "consumer"), trust))
        # receive into a buffer of msgmax: no message a sender can put in is too large to take out
        buffer_size = max(host_max_message_size(), self.max_message_size)
        what = f"cannot create the queue of {self.address.location} (key {self.key})"
        if PeerState.GONE in states:
            try:
                stale = sysv_ipc.MessageQueue(self.key)
            except sysv_ipc.ExistentialError:
                stale = None
            except (sysv_ipc.Error, OSError) as exc:
                raise _unavailable(what, exc) from exc
            if stale is not None:
                _remove_quietly(stale)
                self.recovered = True
        try:
            queue = sysv_ipc.MessageQueue(self.key, sysv_ipc.IPC_CREX, mode, buffer_size)
        except sysv_ipc.ExistentialError:
            # a presence-less producer (a plain script) made it first: use it as it is
            try:
                return sysv_ipc.MessageQueue(self.key, sysv_ipc.IPC_CREAT, mode, buffer_size)
            except (sysv_ipc.Error, OSError) as exc:
                raise _unavailable(what, exc) from exc
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(what, exc) from exc
        if queue_bytes != queue.max_size:
            try:
                queue.max_size = queue_bytes
            except (sysv_ipc.Error, OSError) as exc:
                _remove_quietly(queue)
                raise _unavailable(f"cannot set queue_bytes={queue_bytes}", exc) from exc
        return queue

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; raise EndOfStream after the last one, Timeout after `timeout` seconds.

        The common case (no timeout, a data message) is one blocking msgrcv; anything else
        takes the checked path of the base class.
        """
        if timeout is None and self._fast:
            watch = self._watch
            watch.blocked = True
            try:
                data, mtype = self._receive()
            except (sysv_ipc.Error, OSError):
                mtype = -1  # nothing was taken: the checked path waits and translates
            finally:
                watch.blocked = False
            if mtype == DATA_TYPE:
                return data  # type: ignore[no-any-return]
            if mtype >= 0:
                self._taken = (mtype, data)
        return super().recv(timeout)

    def _recv(self, deadline: float | None) -> bytes:
        taken, self._taken = self._taken, None
        mtype, data = taken if taken is not None else (-1, b"")
        watch = self._watch
        watch.set_deadline(deadline)
        try:
            data = self._recv_loop(deadline, mtype, data)
        finally:
            watch.wake_at = None
        watch.messages_seen = self._fast = True
        return data

    def _recv_loop(self, deadline: float | None, mtype: int, data: bytes) -> bytes:
        """Receive until a data message: end at the marker, skip garbage, check the producer after a wake-up.

        `mtype` and `data`: a message already taken (-1: none).
        """
        watch = self._watch
        receive = self._receive
        while True:
            if mtype >= 0:
                kind = classify(mtype, data)
                if kind is DATA:
                    return data
                if kind is END:
                    self._release(clean=True)
                    raise EndOfStream(f"{self.address.location}: the producer ended the stream")
                if kind is GARBAGE:
                    self.skipped += 1
                else:
                    self._check_producer(deadline)
            if deadline is not None:
                try:
                    data, mtype = receive(False)
                    continue
                except sysv_ipc.BusyError:
                    pass
                except (sysv_ipc.Error, OSError) as exc:
                    raise self._failed(exc) from exc
                if time.monotonic() >= deadline:
                    raise self._timed_out()
            watch.blocked = True
            try:
                data, mtype = receive()
            except (sysv_ipc.Error, OSError) as exc:
                if not _interrupted(exc):
                    raise self._failed(exc) from exc
                mtype = -1
            finally:
                watch.blocked = False

    def _failed(self, exc: BaseException) -> PodIPCError:
        location = self.address.location
        if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
            return ProtocolError(f"{location}: a message is larger than the receive buffer (kernel.msgmax changed?)")
        return PeerGone(f"the queue of {location} failed: {exc}")

    def _queued(self) -> int:
        """Messages in the queue now (0 once it is removed)."""
        try:
            return int(self._queue.current_messages)
        except (sysv_ipc.Error, OSError):
            return 0

    def _check_producer(self, deadline: float | None) -> None:
        """After a wake-up: PeerGone, PeerTimeout or Timeout when due."""
        peer = self._peer
        location = self.address.location
        if peer.lost():
            if self._queued() == 0:
                # a clean producer puts the end marker in before it leaves, so an empty queue means it died
                raise PeerGone(f"the producer of {location} is gone (it died or closed without ending the stream)")
        elif (
            peer.state is not PeerState.ALIVE
            and not self._watch.messages_seen
            and time.monotonic() >= self.wait_deadline
        ):
            raise PeerTimeout(
                f"no producer appeared on {location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise self._timed_out()

    def _timed_out(self) -> Timeout:
        """The error of a receive whose timeout passed: PeerTimeout while no producer ever appeared."""
        location = self.address.location
        if not self._peer.presence.peer_seen and not self._watch.messages_seen:
            return PeerTimeout(f"no producer appeared on {location} within the timeout")
        return Timeout(f"{location}: no message within the timeout")

    def _release(self, clean: bool) -> None:
        """Remove the queue and leave; `clean`: at the end of stream."""
        self._fast = False
        queue, self._queue = self._queue, None
        if queue is None:
            return
        self._watch.stop()
        _remove_quietly(queue)
        self._presence.leave(clean, lambda: False)

    def _close(self) -> None:
        self._release(clean=False)
