"""sysvmq:// - a System V message queue (msgget) in the pod's shared IPC namespace.

Address:
    sysvmq://KEY              the queue with IPC key KEY: decimal without a leading zero
                              (1..2147483647) or 0x hex (0x1..0x7fffffff)
    sysvmq://NAME             anything else (A-Z a-z 0-9 . _ -) is a name, hashed to a key
                              (podipc.address.sysv_key_from_name; docs/wire/sysvmq.md)
    options: wait=SECONDS (peer rendezvous, default 30; none/inf: forever), mode=0600 (queue and
             presence files; 0660 shares them with a group; "other" bits are refused),
             queue_bytes=BYTES (the queue's capacity, msg_qbytes; default /proc/sys/kernel/msgmnb),
             max_message_size=BYTES (default /proc/sys/kernel/msgmax),
             adopt=true (consumer: also take a queue a plain producer created first; see below)
             pattern=pair|queue|fanin (queue: a work queue, many consumers share the queue, each
             message to one; podipc.work_queue), consumers=N (work-queue producer: wait for N);
             fanin: many named producers into one consumer, podipc.queue_fanin: producers=N
             (consumer: end after N ended), name=NAME (a producer with a name is a fan-in one)

Requires:
    sysv_ipc; a kernel with SysV IPC (every Linux).

Semantics:
    One podipc message is one queue message: boundaries and order are kept, nothing is
    lost (a full queue makes the producer wait). There is no header, so a plain sysv_ipc
    script can be a peer (docs/wire/sysvmq.md): data messages have mtype 1, the end of
    stream is an empty message of mtype 2, and the consumer receives with type 0 (FIFO).
    Zero-length data messages (mtype 1) are valid data.

    Garbage: a message of any other mtype, or a non-empty mtype-2 message, is skipped
    and counted in `Consumer.skipped`. An empty mtype-3 message is a wake-up (below): skipped
    and not counted.

    Max message: `max_message_size`, by default the kernel limit /proc/sys/kernel/msgmax
    (8192 in a pod); it must also fit the queue's capacity (kernel.msgmnb, 16384 in a
    pod). A larger option raises ChannelUnavailable, a larger message MessageTooLarge;
    both say the fix: set kernel.msgmax (and kernel.msgmnb) in the pod's
    securityContext.sysctls, or use shm://. The consumer always receives into a buffer
    of msgmax bytes, so no message a sender can put in is ever too large to take out.

    Creates and removes: the consumer creates the queue exclusively (IPC_EXCL, mode `mode`,
    0600 by default) and removes it when the stream ends or it closes. It never consumes from
    or removes a queue it cannot prove it created for this channel: one that exists already
    is refused (ChannelUnavailable naming its owner), unless it is the queue a dead podipc
    consumer of this channel left (its presence file records the key and declares the msqid,
    and both have the same owner: removed and created again, `recovered`), or the consumer
    was opened with adopt=true (a plain producer created it first: used when it is ours, or
    our group's with mode=0660, and grants nothing to other users; never removed by podipc,
    `adopted`). The producer opens the queue only once the consumer is there (its presence
    file and the msqid it declares; or, for a consumer that holds no presence, the queue
    itself), checked the same way. queue_bytes is the consumer's; a producer takes the queue
    as it finds it (its max_message_size drops to the queue's capacity when that is smaller).
    The producer never removes a queue (a dead consumer's stays for the next consumer, which
    recovers it, or for `podipc clean`).

    Waiting, waking and readiness: a SysV queue has no file descriptor, so each endpoint has
    an eventfd for fileno(), podipc.wait() and podipc.aio, fed by at most one helper thread of
    that endpoint (started on the first wait for readiness, never one per message, parked
    while nobody waits):
    - the consumer's helper blocks in msgrcv with a zero-byte buffer: the kernel wakes it when
      a message arrives; a non-empty one fails that call with E2BIG and stays queued, an empty
      one (fully described by its mtype) is kept for the next attempt; either way the eventfd
      becomes readable. A recv() without a timeout blocks in msgrcv itself (no added
      latency); close()/abort() from any thread or a signal handler, and the peer-death
      monitor, wake it by putting an empty mtype-3 message into the consumer's own queue (the
      queue is empty while a receive blocks, so it always fits); recv() with a timeout waits
      on the eventfd and the waker.
    - the producer never blocks in msgsnd (a blocked msgsnd can only be woken by a signal or
      by removing the queue): it sends with IPC_NOWAIT and, when the queue is full, retries
      after yielding the CPU, then after sleeps growing from 20 us to 2 ms, watching its waker,
      so close() from any thread wakes it within 2 ms. Its helper thread, for fileno() and
      aio, looks at the queue's message count with the same growing sleeps and makes the
      eventfd readable when the consumer has taken a message.
    Signals: an interrupted msgrcv (EINTR, "Signaled while waiting") runs the Python handler
    and is retried, unless the handler raised or closed the endpoint. Peer death: the
    process's peer-death monitor (podipc.presence) probes the peer's presence file every
    0.2 s and wakes the endpoint: a consumer hands out what is still queued, then raises
    PeerGone; a producer raises PeerGone. `Producer.close()` puts the end marker in, then
    waits until the queue is empty or removed (the consumer removes it at the end marker).
    An abort (or a consumer's close before the end marker) while the peer lives leaves the
    presence file unlocked, as a crash would, so the peer raises PeerGone even if it never
    saw this side alive; the survivor removes that file when it finishes.

    Threads: producers and consumers may be shared by threads (one call at a time per side,
    podipc.endpoint), but on one consumer do not mix a blocking recv() in one thread with
    readiness waits (fileno(), podipc.wait(), aio) in another. fork: an inherited endpoint
    refuses use; its close() only closes the child's eventfd.

    Code: the endpoints are podipc.queue's QueueProducer and QueueConsumer (what mq:// and
    sysvmq:// share); this module says how a SysV queue is opened, created, checked, waited
    on (the helper threads) and removed, and keeps its own hot paths (send and recv with no
    timeout).

Why one module of ~800 lines: SysV queues have no descriptor to wait on, so this
transport brings its own helper threads (`_ArrivalWatch`, `_RoomWatch`) that feed
the readiness eventfds its producer and consumer poll; they are one mechanism with
the endpoints, and `podipc/transports/` holds one module (or package) per transport.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import sysv_ipc

from podipc.address import Address
from podipc.errors import ChannelUnavailable, PeerGone, PodIPCError, ProtocolError
from podipc.options import Option, parse_size
from podipc.ownership import Owner
from podipc.proc import read_int_or
from podipc.queue import (
    ADOPT_OPTION,
    CONSUMERS_OPTION,
    PATTERN_OPTION,
    QueueConsumer,
    QueueIdentity,
    QueueProducer,
    kind_of,
    limit_option,
    permission_denied,
    queued_messages,
)
from podipc.queue_fanin import QueueFanInConsumer, QueueFanInProducer
from podipc.stream import NAME_OPTION, PRODUCERS_OPTION
from podipc.transport import AddressForm, Capability, Example, KernelFacility, MessageLimit, ObjectKind, Transport
from podipc.waking import POLLIN, wait_for

MSGMAX_PATH = "/proc/sys/kernel/msgmax"
MSGMNB_PATH = "/proc/sys/kernel/msgmnb"
SYSVIPC_MSG_PATH = "/proc/sysvipc/msg"
"""Every queue of the IPC namespace with its owner, readable by every user (ipcs reads it too)."""
FALLBACK_MSGMAX = 8192
FALLBACK_MSGMNB = 16384

DATA_TYPE = 1
END_TYPE = 2
WAKE_TYPE = 3

ROOM_SPIN_ATTEMPTS = 64
"""A producer facing a full queue first retries this many times, yielding the CPU in between."""
ROOM_SLEEP_FIRST_SECONDS = 0.00002
ROOM_SLEEP_MAX_SECONDS = 0.002
"""Then it sleeps this long between attempts, doubling up to the maximum (its helper thread polls the same way)."""
WAKER_SLEEP_SECONDS = 0.001
"""Sleeps at least this long wait on the waker (poll), shorter ones in time.sleep: poll() counts milliseconds."""
PARK_KICK_SECONDS = 0.1
"""How long a consumer waits for its helper thread to leave msgrcv before putting another wake-up message in."""
HELPER_JOIN_SECONDS = 2.0
WAKE_DRAIN_MOST = 1024
"""Wake-ups a consumer leaving an adopted queue takes back at most (it puts one per kick or close)."""

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
OPTIONS = (
    Option("queue_bytes", parse_size, None, "queue capacity in bytes, msg_qbytes (default kernel.msgmnb)"),
    Option("max_message_size", parse_size, None, "largest message in bytes (default kernel.msgmax)"),
    ADOPT_OPTION,
    PATTERN_OPTION,
    CONSUMERS_OPTION,
    PRODUCERS_OPTION,
    NAME_OPTION,
)

WAKE = "wake"
_ONE = (1).to_bytes(8, "little")


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
    """What a received queue message is: WAKE (a wake-up), or podipc.queue's DATA, END or GARBAGE."""
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


def _owner_in_proc(msqid: int) -> Owner | None:
    """A queue's owner from /proc/sysvipc/msg (readable by everyone), for a queue whose IPC_STAT we may not do."""
    try:
        with open(SYSVIPC_MSG_PATH) as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        # key msqid perms cbytes qnum lspid lrpid uid gid cuid cgid ...
        if len(fields) >= 11 and fields[1] == str(msqid):
            return Owner(int(fields[7]), int(fields[8]), int(fields[2], 8) & 0o777, creator=int(fields[9]))
    return None


def _owner(queue: Any) -> Owner:
    """Who owns and who created an open queue (IPC_STAT, else /proc/sysvipc/msg); PermissionsError if unknown."""
    try:
        return Owner(queue.uid, queue.gid, queue.mode & 0o777, creator=queue.cuid)
    except sysv_ipc.PermissionsError:
        owner = _owner_in_proc(queue.id)
        if owner is None:
            raise
        return owner


def _identity(queue: Any, what: str) -> QueueIdentity:
    try:
        return QueueIdentity(queue.id, _owner(queue))
    except sysv_ipc.ExistentialError as exc:
        raise ChannelUnavailable(f"{what} vanished while podipc looked at it; try again") from exc
    except (sysv_ipc.Error, OSError) as exc:
        raise permission_denied(what) from exc


def _queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key, 0, 0)
    except (sysv_ipc.Error, OSError):
        return False
    return True


def _remove_quietly(queue: Any) -> None:
    with contextlib.suppress(sysv_ipc.Error, OSError):
        queue.remove()


def _send_wake(queue: Any) -> None:
    """Put an empty mtype-3 message into `queue` without waiting (wakes a receiver blocked on the empty queue)."""
    if queue is not None:
        with contextlib.suppress(sysv_ipc.Error, OSError):
            queue.send(b"", False, WAKE_TYPE)


class _Helper:
    """An endpoint's one helper thread and its eventfd, the endpoint's readiness descriptor.

    Started on the first arm(); while armed it watches the queue (the subclass says how) and
    makes the eventfd readable when the endpoint's next attempt may succeed, then parks
    itself until armed again. arm() drains the eventfd, so it is readable only for news
    since. Never a thread per message.
    """

    def __init__(self, name: str) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._name = name
        self._condition = threading.Condition()
        self._armed = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> bool:
        """True while the thread watches (or is about to)."""
        return self._armed

    def signal(self) -> None:
        """Make the eventfd readable."""
        with contextlib.suppress(OSError):
            os.write(self.fd, _ONE)

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.fd, 8)

    def _start_watching(self) -> None:
        """Arm and wake (or start) the thread; call with the condition held."""
        self._armed = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._condition.notify_all()

    def _run(self) -> None:
        condition = self._condition
        try:
            while True:
                with condition:
                    while not self._armed and not self._stopped:
                        condition.wait()
                    if self._stopped:
                        return
                self._watch()
        except BaseException:  # interpreter shutdown tearing modules down under a daemon thread
            with condition:
                self._armed = False
                condition.notify_all()
            self.signal()

    def _watch(self) -> None:
        """Watch until the next attempt may succeed (then disarm and signal), or until parked or stopped."""
        raise NotImplementedError

    def _kick(self) -> None:
        """Make a watch that waits in the kernel return (hook)."""

    def stop(self) -> None:
        """End the thread (it is joined unless this is it) and close the eventfd. Idempotent."""
        with self._condition:
            self._stopped = True
            armed = self._armed
            self._condition.notify_all()
        if armed:
            self._kick()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(HELPER_JOIN_SECONDS)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def drop_inherited(self) -> None:
        """In a forked child (where the thread does not exist): close the child's copy of the eventfd."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _ArrivalWatch(_Helper):
    """The consumer's helper: blocks in msgrcv with a zero-byte buffer, which returns when a message arrives.

    A non-empty message fails that call with E2BIG and stays in the queue; an empty one is
    taken, but says everything it carries (its mtype), so it waits in `slot` for the
    consumer's next attempt, which looks there first. The consumer parks the watch before it
    takes anything from the queue itself, so the two never race for a message.
    """

    def __init__(self, queue: Any, head: Any, name: str) -> None:
        super().__init__(name)
        self._queue = queue
        self._head = head
        self.slot: tuple[int, bytes] | None = None
        """An empty message the watch took from the head of the queue: (mtype, b'')."""

    def arm(self) -> None:
        """Watch for the next message (at once readable when one was kept in `slot`)."""
        with self._condition:
            if self._armed or self._stopped:
                return
            self._drain()
            if self.slot is not None:
                self.signal()
                return
            self._start_watching()

    def park(self) -> None:
        """Stop watching; when this returns the thread is out of msgrcv and will not take anything."""
        with self._condition:
            while self._armed:
                self._kick()
                self._condition.wait(PARK_KICK_SECONDS)

    def _kick(self) -> None:
        _send_wake(self._queue)  # the queue is empty while the watch blocks: the wake-up always fits

    def _watch(self) -> None:
        taken: tuple[int, bytes] | None = None
        try:
            data, mtype = self._head.receive()
            taken = (mtype, data)
        except sysv_ipc.Error as exc:
            if _interrupted(exc):
                return  # a signal delivered to this thread: still armed, look again
        except OSError:
            pass  # E2BIG: a non-empty message waits at the head of the queue
        with self._condition:
            if taken is not None and classify(*taken) is not WAKE:
                self.slot = taken
            self._armed = False
            self._condition.notify_all()
        self.signal()


class _RoomWatch(_Helper):
    """The producer's helper: after a send found the queue full, looks at its message count with growing sleeps,
    and makes the eventfd readable once the consumer took a message (or the queue is gone)."""

    def __init__(self, queue: Any, name: str) -> None:
        super().__init__(name)
        self._queue = queue
        self._full_at = 0

    def arm(self, full_at: int | None) -> None:
        """Watch for room after a send failed with `full_at` messages queued; None: readable at once."""
        with self._condition:
            self._drain()
            if full_at is None:
                self._armed = False
                self.signal()
                return
            self._full_at = full_at
            if not self._armed and not self._stopped:
                self._start_watching()

    def park(self) -> None:
        """Stop watching (the thread notices within its current sleep)."""
        with self._condition:
            self._armed = False

    def _watch(self) -> None:
        pause = ROOM_SLEEP_FIRST_SECONDS
        while True:
            with self._condition:
                if not self._armed or self._stopped:
                    return
                full_at = self._full_at
            try:
                count = int(self._queue.current_messages)
            except (sysv_ipc.Error, OSError):
                count = -1  # removed: the next attempt says so
            if count < full_at:
                with self._condition:
                    self._armed = False
                self.signal()
                return
            time.sleep(pause)
            pause = min(pause * 2, ROOM_SLEEP_MAX_SECONDS)


class _CountWatch(_Helper):
    """A work-queue consumer's helper (pattern=queue): looks at the queue's message count with growing sleeps and
    makes the eventfd readable once a message waits (or the queue is gone).

    Consumers sharing a queue cannot block in msgrcv to watch it: a wake-up message put in to end
    such a wait could be taken by another consumer of the queue.
    """

    def __init__(self, queue: Any, name: str) -> None:
        super().__init__(name)
        self._queue = queue

    def arm(self) -> None:
        """Watch for the next message."""
        with self._condition:
            self._drain()
            if not self._armed and not self._stopped:
                self._start_watching()

    def park(self) -> None:
        """Stop watching (the thread notices within its current sleep)."""
        with self._condition:
            self._armed = False

    def _watch(self) -> None:
        pause = ROOM_SLEEP_FIRST_SECONDS
        while True:
            with self._condition:
                if not self._armed or self._stopped:
                    return
            try:
                count = int(self._queue.current_messages)
            except (sysv_ipc.Error, OSError):
                count = 1  # removed: the next attempt says so
            if count > 0:
                with self._condition:
                    self._armed = False
                self.signal()
                return
            time.sleep(pause)
            pause = min(pause * 2, ROOM_SLEEP_MAX_SECONDS)


class SysVMQProducer(QueueProducer):
    """Sends each message as one mtype-1 message on the SysV queue KEY."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_TYPE
    end_mark = END_TYPE
    _send_flag = False  # IPC_NOWAIT: never block in msgsnd (nothing could wake it), see _send
    _full_errors = (sysv_ipc.BusyError,)
    _queue_errors = (sysv_ipc.Error, OSError, ValueError)

    _room: _RoomWatch | None = None
    _full_at: int | None = None
    """The queue's message count when the last attempt found it full; None after a message went in."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.key = address.key
        super().__init__(address, settings)

    def _send_waiting(self, data: bytes | bytearray | memoryview) -> bool:
        """The queue was full on the fast path: retry there, yielding the CPU in between, before the checked path.

        A consumer at full rate makes room within microseconds; going through the checked path for
        each such wait halved the throughput at 64 B (465k against 1.07M msg/s with a blocking msgsnd).
        """
        send = self._send_now
        mark = self.data_mark
        yield_cpu = os.sched_yield
        for _ in range(ROOM_SPIN_ATTEMPTS):
            yield_cpu()
            if self._state:
                return False  # closing, or the consumer was lost: the checked path decides
            try:
                send(data, False, mark)
                return True
            except sysv_ipc.BusyError:
                pass
        return False

    def _send_checked(self, view: memoryview, deadline: float | None) -> None:
        """Attempts with IPC_NOWAIT; on a full queue retried after yielding the CPU, then after growing sleeps."""
        try_send = self._try_send
        attempts = 0
        pause = ROOM_SLEEP_FIRST_SECONDS
        while not try_send(view):
            if not self._sending:
                self._await_readiness(deadline)  # the rendezvous: the base waits its retry time
                continue
            seconds = self._seconds_to_wait(deadline)
            if attempts < ROOM_SPIN_ATTEMPTS:
                attempts += 1
                os.sched_yield()
            elif pause < WAKER_SLEEP_SECONDS:
                time.sleep(pause if seconds is None else min(pause, seconds))
                pause *= 2
            else:
                wait_for(-1, 0, self._waker_fd(), pause if seconds is None else min(pause, seconds))
                pause = min(pause * 2, ROOM_SLEEP_MAX_SECONDS)
            if self._state:
                self._check_usable()

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _open_existing(self) -> Any:
        try:
            return sysv_ipc.MessageQueue(self.key, 0, 0, self.max_message_size)
        except sysv_ipc.ExistentialError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(f"cannot open {self._queue_words()}", exc) from exc

    def _identity(self, queue: Any) -> QueueIdentity:
        return _identity(queue, self._queue_words())

    def _queue_words(self) -> str:
        return f"the queue of {self.address.location} (key {self.key})"

    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        source = f"the capacity (msg_qbytes) of the queue of {self.address.location} (set by the consumer)"
        return queue.max_size, source, "open the consumer with a larger queue_bytes="

    def _attached(self, queue: Any) -> None:
        self._send_now = queue.send

    def _put_now(self, message: memoryview | bytes, mark: int) -> bool:
        try:
            self._send_now(message, False, mark)
        except sysv_ipc.BusyError:
            # the count after the refusal: room is when it drops below. A consumer may have emptied the queue
            # in between (count 0): then there is room now, and waiting for fewer than 0 would never end
            self._full_at = max(1, queued_messages(self._queue, self._queue_errors))
            if self._mirror is not None:
                self._room_watch().arm(self._full_at)  # fileno() is watched: say when there is room
            return False
        except ValueError as exc:
            raise self._too_large(memoryview(message).nbytes) from exc
        except (sysv_ipc.Error, OSError) as exc:
            raise self._failed(exc) from exc
        self._full_at = None
        return True

    def _failed(self, exc: BaseException) -> PodIPCError:
        """Translate a failed msgsnd."""
        location = self.address.location
        if isinstance(exc, sysv_ipc.ExistentialError) or (
            isinstance(exc, OSError) and exc.errno in (errno.EIDRM, errno.EINVAL)
        ):
            return PeerGone(f"the queue of {location} was removed: its consumer closed or died")
        if isinstance(exc, sysv_ipc.PermissionsError):
            return _unavailable(f"cannot send to {self._queue_words()}", exc)
        return PeerGone(f"the queue of {location} failed: {exc}")

    def _room_watch(self) -> _RoomWatch:
        room = self._room
        if room is None:
            room = self._room = _RoomWatch(self._queue, f"podipc-sysvmq-producer {self.address.location}")
        return room

    def _try_prepare(self) -> bool:
        if not self._try_connect():
            return False
        if self._full_at is not None and queued_messages(self._queue, self._queue_errors) >= self._full_at:
            return False
        self._full_at = None
        return True

    def _room_readiness(self) -> tuple[int, int, float | None]:
        room = self._room_watch()
        room.arm(self._full_at)
        return room.fd, POLLIN, None

    def _release_queue(self, queue: Any) -> None:
        self._send_now = None
        room, self._room = self._room, None
        if room is not None:
            room.stop()

    def _queue_exists(self) -> bool:
        return _queue_exists(self.key)

    def _drop_inherited(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.drop_inherited()
        self._queue = self._send_now = None
        self._fast_limit = -1
        self._freed = True


class SysVMQConsumer(QueueConsumer):
    """Creates the SysV queue KEY and receives mtype-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = MSGMAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_TYPE
    _empty_errors = (sysv_ipc.Error,)  # a blocking msgrcv: only EINTR (any other error comes again and is left)
    _queue_errors = (sysv_ipc.Error, OSError)

    _arrivals: _ArrivalWatch | None = None
    _counts: _CountWatch | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.key = address.key
        super().__init__(address, settings)
        # a work queue's consumers never block in msgrcv (see _CountWatch): their receive does not wait
        self._receive = functools.partial(self._queue.receive, False) if self.slot else self._queue.receive

    def _receive_shared(self, mark: int, data: bytes) -> bytes | None:
        """pattern=queue: receive without blocking, waiting between attempts as the producer waits for room
        (yielding the CPU, then sleeps growing to ROOM_SLEEP_MAX_SECONDS, watching the waker)."""
        receive = self._receive
        attempts = 0
        pause = ROOM_SLEEP_FIRST_SECONDS
        while True:
            if mark == DATA_TYPE:
                return data
            if mark >= 0 and classify(mark, data) is not WAKE:
                return QueueConsumer._receive_more(self, mark, data)
            if self._state:
                return None
            try:
                data, mark = receive()
                continue
            except sysv_ipc.BusyError:
                mark = -1
            if attempts < ROOM_SPIN_ATTEMPTS:
                attempts += 1
                os.sched_yield()
            elif pause < WAKER_SLEEP_SECONDS:
                time.sleep(pause)
                pause *= 2
            else:
                wait_for(-1, 0, self._waker_fd(), pause)
                pause = min(pause * 2, ROOM_SLEEP_MAX_SECONDS)

    def _receive_more(self, mark: int, data: bytes) -> bytes | None:
        """Go on with blocking receives after (`mark`, `data`); a wake-up is looked past once the state was checked.

        A signal's EINTR (mark -1) runs its handler (a Python call below does) and the receive goes on,
        unless the handler raised or closed this side.
        """
        if self.slot:
            return self._receive_shared(mark, data)
        receive = self._receive
        while True:
            if mark == DATA_TYPE:
                return data
            if mark >= 0 and classify(mark, data) is not WAKE:
                return QueueConsumer._receive_more(self, mark, data)
            if self._state:
                return None
            try:
                data, mark = receive()
            except (sysv_ipc.Error, OSError) as exc:
                if not _interrupted(exc):
                    raise
                mark = -1

    def _interrupt(self) -> None:
        if self.slot:
            return  # a work-queue consumer never blocks in msgrcv: the waker is enough
        arrivals = self._arrivals
        if arrivals is None or not arrivals.armed:  # armed: the waiting call polls the waker, which is enough
            _send_wake(getattr(self, "_queue", None))

    def _signal_peer_lost(self) -> None:
        super()._signal_peer_lost()
        self._interrupt()

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _queue_words(self) -> str:
        return f"the queue of {self.address.location} (key {self.key})"

    def _buffer_size(self) -> int:
        """Receive into a buffer of msgmax: no message a sender can put in is too large to take out."""
        return max(host_max_message_size(), self.max_message_size)

    def _create_queue(self, capacity: int, mode: int) -> Any:
        try:
            queue = sysv_ipc.MessageQueue(self.key, sysv_ipc.IPC_CREX, mode, self._buffer_size())
        except sysv_ipc.ExistentialError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(f"cannot create {self._queue_words()}", exc) from exc
        if capacity != queue.max_size:
            try:
                queue.max_size = capacity
            except (sysv_ipc.Error, OSError) as exc:
                _remove_quietly(queue)
                raise _unavailable(f"cannot set queue_bytes={capacity}", exc) from exc
        return queue

    def _inspect_existing(self) -> QueueIdentity | None:
        try:
            queue = sysv_ipc.MessageQueue(self.key, 0, 0)
        except sysv_ipc.ExistentialError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(f"cannot open {self._queue_words()}", exc) from exc
        return _identity(queue, self._queue_words())

    def _remove_found(self, found: QueueIdentity) -> None:
        with contextlib.suppress(sysv_ipc.ExistentialError):
            queue = sysv_ipc.MessageQueue(self.key, 0, 0)
            if queue.id == found.ident:
                try:
                    queue.remove()  # by msqid: never a queue created at the key since
                except sysv_ipc.PermissionsError as exc:
                    raise _unavailable(f"cannot remove the dead consumer's {self._queue_words()}", exc) from exc

    def _adopt_queue(self, found: QueueIdentity) -> Any:
        try:
            queue = sysv_ipc.MessageQueue(self.key, 0, 0, self._buffer_size())
        except (sysv_ipc.Error, OSError) as exc:
            raise _unavailable(f"cannot open {self._queue_words()}", exc) from exc
        if queue.id != found.ident:
            raise ChannelUnavailable(f"{self._queue_words()} was replaced while podipc opened it; try again")
        return queue

    def _identity(self, queue: Any) -> QueueIdentity:
        return _identity(queue, self._queue_words())

    def _object_record(self) -> tuple[str, str]:
        return "sysv_mq", str(self.key)

    def _arrival_watch(self) -> _ArrivalWatch:
        arrivals = self._arrivals
        if arrivals is None:
            queue = self._queue
            try:
                head = sysv_ipc.MessageQueue(self.key, 0, 0, 0)
            except (sysv_ipc.Error, OSError) as exc:
                raise self._failed(exc) from exc
            if head.id != queue.id:
                raise PeerGone(f"{self._queue_words()} was removed (another queue has its key now)")
            name = f"podipc-sysvmq-consumer {self.address.location}"
            arrivals = self._arrivals = _ArrivalWatch(queue, head, name)
        return arrivals

    def _count_watch(self) -> _CountWatch:
        counts = self._counts
        if counts is None:
            counts = self._counts = _CountWatch(self._queue, f"podipc-sysvmq-consumer {self.address.location}")
        return counts

    def _take_now(self) -> tuple[int, bytes] | None:
        counts = self._counts
        if counts is not None and counts.armed:
            counts.park()
        arrivals = self._arrivals
        if arrivals is not None:
            if arrivals.armed:
                arrivals.park()
            kept = arrivals.slot
            if kept is not None:
                arrivals.slot = None
                return kept
        try:
            data, mtype = self._receive(False)
        except sysv_ipc.BusyError:
            return None
        except (sysv_ipc.Error, OSError) as exc:
            raise self._failed(exc) from exc
        return mtype, data

    def _classify(self, mark: int, data: bytes) -> str:
        return classify(mark, data)

    def _idle(self) -> None:
        if self.slot:
            return  # _readiness arms the count watch when a wait follows
        self._arrival_watch().arm()

    def _readiness(self) -> tuple[int, int, float | None]:
        if self.slot:
            self._fast = False
            counts = self._count_watch()
            counts.arm()
            return counts.fd, POLLIN, None
        arrivals = self._arrival_watch()
        if not arrivals.armed:
            if self._token:
                self._fast = False
                arrivals.arm()
            else:
                arrivals.signal()  # another thread is inside a call: look again once it left
        return arrivals.fd, POLLIN, None

    def _failed(self, exc: BaseException) -> PodIPCError:
        location = self.address.location
        if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
            return ProtocolError(f"{location}: a message is larger than the receive buffer (kernel.msgmax changed?)")
        return PeerGone(f"the queue of {location} failed: {exc}")

    def _stop_helpers(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None:
            counts.stop()
        arrivals, self._arrivals = self._arrivals, None
        if arrivals is not None:
            arrivals.stop()

    def _destroy(self, queue: Any) -> None:
        _remove_quietly(queue)

    def _close_queue(self, queue: Any) -> None:
        """Leave an adopted queue as its producer made it: take back the wake-ups this side put in.

        A wake-up (an empty mtype-3 message: park() kicks the helper's msgrcv with one every
        PARK_KICK_SECONDS, close() from another thread sends one) may still be queued when this
        side leaves; a plain producer waiting for its queue to empty would wait forever.
        """
        with contextlib.suppress(sysv_ipc.Error, OSError):
            for _ in range(WAKE_DRAIN_MOST):
                queue.receive(False, WAKE_TYPE)  # BusyError (a sysv_ipc.Error) once none is left

    def _drop_inherited(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None:
            counts.drop_inherited()
        arrivals, self._arrivals = self._arrivals, None
        if arrivals is not None:
            arrivals.drop_inherited()
        self._queue = None
        self._fast = False
        self._freed = True


class SysVMQFanInProducer(QueueFanInProducer, SysVMQProducer):
    """A named producer of a fan-in queue (pattern=fanin): its slot and each message's kind in the mtype."""


class SysVMQFanInConsumer(QueueFanInConsumer, SysVMQConsumer):
    """The consumer of a fan-in queue (pattern=fanin): the mtype of each message tells its producer and kind."""

    def _next_tagged(self) -> tuple[int, bytes]:
        data, mtype = self._receive()  # a blocking msgrcv; a wake-up (mtype 3) or EINTR goes to the checked path
        return mtype, data

    def _untag(self, mark: int, body: bytes) -> tuple[int, bytes]:
        return mark, body

    def _put_own(self, message_tag: int, body: bytes) -> bool:
        queue = self._queue
        if queue is None:
            return True
        try:
            queue.send(body, False, message_tag)
        except sysv_ipc.BusyError:
            return False
        except (sysv_ipc.Error, OSError):
            return True  # removed: nothing left to mark
        return True


def remove_leftover_queue(key: str) -> None:
    """Remove a queue a killed consumer left, by its decimal key (podipc clean)."""
    sysv_ipc.MessageQueue(int(key), 0, 0).remove()


def leftover_queue_owner(key: str) -> Owner | None:
    """Who owns and who created the queue of decimal `key` (podipc clean), None when there is none."""
    try:
        queue = sysv_ipc.MessageQueue(int(key), 0, 0)
    except sysv_ipc.ExistentialError:
        return None
    return _owner(queue)


TRANSPORT = Transport(
    name="sysv_mq",
    title="SysV message queue",
    schemes={"sysvmq": AddressForm.SYSV_KEY},
    producer="podipc.transports.sysv_mq:SysVMQProducer",
    consumer="podipc.transports.sysv_mq:SysVMQConsumer",
    examples=(Example("sysvmq://KEY", "SysV message queue", "KEY: decimal or 0x hex, else a name hashed to one"),),
    reliable=True,
    ordered=True,
    limit=MessageLimit(host_max_message_size, MSGMAX_PATH, SYSCTL_FIX, "`kernel.msgmax` (8192)"),
    options=OPTIONS,
    capabilities=frozenset({Capability.PRESENCE_FILES, Capability.READINESS_FD}),
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
    fanin_consumer="podipc.transports.sysv_mq:SysVMQFanInConsumer",
    fanin_producer="podipc.transports.sysv_mq:SysVMQFanInProducer",
    work_queue=True,
    rank=50,
)
