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

    Code: the endpoints are podipc.queue's QueueProducer and QueueConsumer (what mq:// and
    sysvmq:// share); this module says how a SysV queue is opened, created, waited on (the
    watchdog) and removed, and keeps its own hot paths (send and recv with no timeout).
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
from podipc.channel import Option, parse_size
from podipc.errors import ChannelUnavailable, PeerGone, PodIPCError, ProtocolError, Timeout
from podipc.ownership import Owner
from podipc.presence import PeerState, PeerTracker
from podipc.proc import read_int_or
from podipc.queue import LIVENESS_SLICE_SECONDS, QueueConsumer, QueueProducer, kind_of, limit_option, permission_denied
from podipc.transport import AddressForm, Capability, Example, KernelFacility, MessageLimit, ObjectKind, Transport

MSGMAX_PATH = "/proc/sys/kernel/msgmax"
MSGMNB_PATH = "/proc/sys/kernel/msgmnb"
FALLBACK_MSGMAX = 8192
FALLBACK_MSGMNB = 16384

DATA_TYPE = 1
END_TYPE = 2
WAKE_TYPE = 3

WATCHDOG_TICK_SECONDS = 0.05
POLL_FIRST_SECONDS = 0.00005
POLL_MAX_SECONDS = 0.002

SIZE_FIX = (
    "set kernel.msgmax (and kernel.msgmnb) in the pod's securityContext.sysctls (the kubelet must allow it) "
    "or use shm://"
)
QUEUE_FIX = "set kernel.msgmnb in the pod's securityContext.sysctls (the kubelet must allow it) or lower queue_bytes="
LIMIT_FIX = "the SysV queue limit /proc/sys/kernel/msgmni may be used up: remove leftover queues (ipcs -q, ipcrm -q ID)"
SYSCTL_FIX = (
    "set kernel.msgmax and kernel.msgmnb in the pod's securityContext.sysctls; the kubelet must allow them "
    "(--allowed-unsafe-sysctls='kernel.msg*'); or use shm://"
)

WAKE = "wake"


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
    """What a received queue message is: WAKE (the consumer's own), or podipc.queue's DATA, END or GARBAGE."""
    if mtype == WAKE_TYPE and not data:
        return WAKE
    return kind_of(mtype, data, DATA_TYPE, END_TYPE)


def _check_limits(settings: Mapping[str, Any]) -> tuple[int, int]:
    """The (queue_bytes, max_message_size) to use, refused with the fix when above the kernel limits."""
    size = limit_option(settings, "max_message_size", host_max_message_size(), MSGMAX_PATH, SIZE_FIX)
    queue_bytes = limit_option(settings, "queue_bytes", host_queue_bytes(), MSGMNB_PATH, QUEUE_FIX)
    if size > queue_bytes:
        raise ChannelUnavailable(
            f"max_message_size={size} does not fit the queue capacity {queue_bytes} ({MSGMNB_PATH} or "
            f"queue_bytes=); {QUEUE_FIX}"
        )
    return queue_bytes, size


def _unavailable(what: str, exc: BaseException) -> PodIPCError:
    if isinstance(exc, sysv_ipc.PermissionsError):
        return permission_denied(what)
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


def _messages_in(queue: Any) -> int:
    """Messages in the queue now (0 once it is removed)."""
    try:
        return int(queue.current_messages)
    except (sysv_ipc.Error, OSError):
        return 0


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


class SysVMQProducer(QueueProducer):
    """Sends each message as one mtype-1 message on the SysV queue KEY."""

    options: ClassVar[tuple[Option, ...]] = (
        Option("queue_bytes", parse_size, None, "queue capacity in bytes, msg_qbytes (default kernel.msgmnb)"),
        Option("max_message_size", parse_size, None, "largest message in bytes (default kernel.msgmax)"),
    )
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_TYPE
    end_mark = END_TYPE
    drain_poll_first_seconds = POLL_FIRST_SECONDS

    _watch: _Watchdog | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.key = address.key
        super().__init__(address, settings)

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

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _open_existing(self) -> Any:
        try:
            return sysv_ipc.MessageQueue(self.key, 0, 0, self.max_message_size)
        except sysv_ipc.ExistentialError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(f"cannot open the queue of {self.address.location}", exc) from exc

    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        source = f"the capacity (msg_qbytes) of the queue of {self.address.location} (set by the consumer)"
        return queue.max_size, source, "open the consumer with a larger queue_bytes="

    def _attached(self, queue: Any) -> None:
        self._watch = _Watchdog(queue, self._peer, "producer", self.wait_deadline)
        self._watch.messages_seen = True

    def _put(self, message: memoryview | bytes, mark: int, deadline: float | None) -> None:
        if deadline is None:
            self._send_blocking(message, mark)
        else:
            self._send_polling(message, mark, deadline)

    def _send_blocking(self, message: memoryview | bytes, mtype: int) -> None:
        """Send, blocking while the queue is full; the watchdog fails the call if the consumer dies."""
        watch = self._watch
        assert watch is not None
        while True:
            watch.blocked = True
            try:
                self._queue_send(message, True, mtype)
                return
            except ValueError as exc:
                raise self._too_large(len(message)) from exc
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

    def _send_polling(self, message: memoryview | bytes, mtype: int, deadline: float) -> None:
        """Send before `deadline`: non-blocking attempts with growing sleeps, probing the consumer."""
        send = self._queue_send
        peer = self._peer
        pause = POLL_FIRST_SECONDS
        next_probe = time.monotonic() + LIVENESS_SLICE_SECONDS
        while True:
            try:
                send(message, False, mtype)
                return
            except sysv_ipc.BusyError:
                pass
            except ValueError as exc:
                raise self._too_large(len(message)) from exc
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

    def _queued(self) -> int:
        return _messages_in(self._queue)

    def _detach(self, queue: Any) -> None:
        """Stop the watchdog."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _queue_exists(self) -> bool:
        return _queue_exists(self.key)


class SysVMQConsumer(QueueConsumer):
    """Creates the SysV queue KEY and receives mtype-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = SysVMQProducer.options
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.key = address.key
        super().__init__(address, settings)
        self._watch = _Watchdog(self._queue, self._peer, "consumer", self.wait_deadline)

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

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _remove_stale(self) -> bool:
        try:
            stale = sysv_ipc.MessageQueue(self.key)
        except sysv_ipc.ExistentialError:
            return False
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(self._cannot_create(), exc) from exc
        _remove_quietly(stale)
        return True

    def _cannot_create(self) -> str:
        return f"cannot create the queue of {self.address.location} (key {self.key})"

    def _buffer_size(self) -> int:
        """Receive into a buffer of msgmax: no message a sender can put in is too large to take out."""
        return max(host_max_message_size(), self.max_message_size)

    def _create_queue(self, capacity: int, mode: int) -> Any:
        try:
            queue = sysv_ipc.MessageQueue(self.key, sysv_ipc.IPC_CREX, mode, self._buffer_size())
        except sysv_ipc.ExistentialError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(self._cannot_create(), exc) from exc
        if capacity != queue.max_size:
            try:
                queue.max_size = capacity
            except (sysv_ipc.Error, OSError) as exc:
                _remove_quietly(queue)
                raise _unavailable(f"cannot set queue_bytes={capacity}", exc) from exc
        return queue

    def _adopt_queue(self, capacity: int, mode: int) -> Any:
        try:
            return sysv_ipc.MessageQueue(self.key, sysv_ipc.IPC_CREAT, mode, self._buffer_size())
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(self._cannot_create(), exc) from exc

    def _object_record(self) -> tuple[str, str]:
        return "sysv_mq", str(self.key)

    def _discard(self, queue: Any) -> None:
        _remove_quietly(queue)

    def _receive_slowly(self, deadline: float | None, mark: int, data: bytes) -> bytes:
        watch = self._watch
        watch.set_deadline(deadline)
        try:
            data = self._receive_until_data(deadline, mark, data)
        finally:
            watch.wake_at = None
        watch.messages_seen = True
        return data

    def _receive_until_data(self, deadline: float | None, mtype: int, data: bytes) -> bytes:
        """Receive until a data message: end at the marker, skip garbage, check the producer after a wake-up."""
        watch = self._watch
        receive = self._receive
        while True:
            if mtype >= 0:
                kind = classify(mtype, data)
                if self._is_data(kind):
                    return data
                if kind is WAKE:
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
        return _messages_in(self._queue)

    def _destroy(self, queue: Any) -> None:
        self._watch.stop()
        _remove_quietly(queue)


def remove_leftover_queue(key: str) -> None:
    """Remove a queue a killed consumer left, by its decimal key (podipc clean)."""
    sysv_ipc.MessageQueue(int(key)).remove()


def leftover_queue_owner(key: str) -> Owner | None:
    """Who owns and who created the queue of decimal `key` (podipc clean), None when there is none."""
    try:
        queue = sysv_ipc.MessageQueue(int(key))
    except sysv_ipc.ExistentialError:
        return None
    return Owner(queue.uid, queue.gid, queue.mode & 0o777, creator=queue.cuid)


TRANSPORT = Transport(
    name="sysv_mq",
    title="SysV message queue",
    schemes={"sysvmq": AddressForm.SYSV_KEY},
    producer="podipc.transports.sysv_mq:SysVMQProducer",
    consumer="podipc.transports.sysv_mq:SysVMQConsumer",
    examples=(Example("sysvmq://KEY", "SysV message queue", "KEY: a number, or a name hashed to one"),),
    reliable=True,
    ordered=True,
    limit=MessageLimit(host_max_message_size, MSGMAX_PATH, SYSCTL_FIX, "`kernel.msgmax` (8192)"),
    options=SysVMQProducer.options,
    capabilities=frozenset({Capability.PRESENCE_FILES}),
    availability=availability,
    unusable_fix=f"{SYSCTL_FIX}; check kernel.msgmni against the queues in use",
    objects=(
        ObjectKind(
            "sysv_mq",
            "SysV message queue",
            "podipc.transports.sysv_mq:remove_leftover_queue",
            "podipc.transports.sysv_mq:leftover_queue_owner",
        ),
    ),
    channel_objects=lambda address: (("sysv_mq", str(address.key)),),
    kernel=KernelFacility("SysV message queues", MSGMAX_PATH, "CONFIG_SYSVIPC"),
    rank=50,
)
