"""mq:// - a POSIX message queue (mq_open) in the pod's shared IPC namespace.

Address:
    mq:///NAME                the queue /NAME (1-254 characters from A-Z a-z 0-9 . _ -)
    options: wait=SECONDS (peer rendezvous, default 30; none/inf: forever), mode=0600 (queue and
             presence files; 0660 shares them with a group; "other" bits are refused),
             depth=N (messages the queue holds, default /proc/sys/fs/mqueue/msg_max),
             max_message_size=BYTES (default /proc/sys/fs/mqueue/msgsize_max),
             adopt=true (consumer: also take a queue a plain producer created first; see below)
             pattern=pair|queue|fanin (queue: a work queue, many consumers share the queue, each
             message to one; podipc.work_queue), consumers=N (work-queue producer: wait for N);
             fanin: many named producers into one consumer, podipc.queue_fanin: producers=N
             (consumer: end after N ended), name=NAME (a producer with a name is a fan-in one)

Requires:
    posix_ipc; a kernel with POSIX message queues (every Linux). Mounting the mqueue
    filesystem at /dev/mqueue is optional: it only makes queues visible (`ls /dev/mqueue`).

Semantics:
    One podipc message is one queue message: boundaries and order are kept, nothing is
    lost (a full queue makes the producer wait). There is no header, so a plain posix_ipc
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

    Creates and unlinks: the consumer creates the queue exclusively (mode `mode`, 0600 by
    default) and unlinks it when the stream ends or it closes. It never consumes from or
    unlinks a queue it cannot prove it created for this channel: one that exists already is
    refused (ChannelUnavailable naming its owner), unless it is the queue a dead podipc
    consumer of this channel left (its presence file records the queue and declares its
    inode, and both have the same owner: unlinked and created again, `recovered`), or the
    consumer was opened with adopt=true (the queue a plain producer created first: used when
    it is ours, or our group's with mode=0660, and grants nothing to other users; never
    unlinked by podipc, `adopted`). The producer opens the queue only once the consumer is
    there (its presence file, and the queue it declares; or, for a consumer that holds no
    presence, the queue itself), checked the same way, so it never sends into a queue
    another user made or could read. depth and max_message_size are applied by the consumer;
    a producer takes the queue as it finds it (its max_message_size drops to the queue's when
    that is smaller).

    Waiting and readiness: both sides use non-blocking descriptors and wait with poll() on
    the queue's descriptor (a Linux mqd is a file descriptor: readable when a message waits,
    writable when there is room) and the endpoint's waker, so close()/abort() from any
    thread or a signal handler wakes a blocked call at once, a signal handler runs during
    a wait (one that raises gets through; posix_ipc's own blocking calls would swallow
    that), and fileno() and podipc.aio use the mqd itself: no helper thread. Fan-in
    (pattern=fanin) differs: a producer facing a full queue retries after yielding the CPU,
    then waits for room in mq_timedsend slices of SEND_SLICE_SECONDS, and the consumer's
    recv() waits in mq_receive, on second, blocking descriptors (a poll() for room wakes every
    producer at each message taken); close() from another thread puts a wake-up message into
    the consumer's queue. Peer death:
    the process's peer-death monitor (podipc.presence) probes the peer's presence file
    every 0.2 s and wakes the endpoint: a consumer hands out what is still queued, then
    raises PeerGone; a producer raises PeerGone. `Producer.close()` puts the end marker,
    then waits until the queue is empty (the consumer took every message and the marker).
    An abort (or a consumer's close before the end marker) while the peer lives leaves the
    presence file unlocked, as a crash would, so the peer raises PeerGone even if it never
    saw this side alive; the survivor removes that file when it finishes.

    Threads: producers and consumers may be shared by threads (one call at a time per side,
    podipc.endpoint); fork: an inherited endpoint refuses use, its close() only closes the
    child's descriptors.

    Code: the endpoints are podipc.queue's QueueProducer and QueueConsumer (what mq:// and
    sysvmq:// share); this module says how a POSIX queue is opened, created, checked, waited
    on and removed, and keeps its own hot paths (send and recv with no timeout).
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import posix_ipc

from podipc.address import Address
from podipc.errors import ChannelUnavailable, PeerGone, PodIPCError
from podipc.options import Option, parse_count, parse_size
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
)
from podipc.queue_fanin import NOTHING, WAKE, QueueFanInConsumer, QueueFanInProducer
from podipc.stream import NAME_OPTION, PRODUCERS_OPTION
from podipc.transport import (
    AddressForm,
    Capability,
    Example,
    KernelFacility,
    MessageLimit,
    ObjectKind,
    ResourceLimit,
    Transport,
)
from podipc.waking import POLLIN, POLLOUT

MSG_MAX_PATH = "/proc/sys/fs/mqueue/msg_max"
MSGSIZE_MAX_PATH = "/proc/sys/fs/mqueue/msgsize_max"
MQUEUE_MOUNT = "/dev/mqueue"

DATA_PRIORITY = 1
END_PRIORITY = 0
FANIN_PRIORITY = 2
"""Every message of a fan-in (pattern=fanin) has this priority: one priority keeps the queue FIFO across producers."""
ROOM_SPIN_ATTEMPTS = 64
"""A fan-in producer facing a full queue first retries this many times, yielding the CPU in between."""
SEND_SLICE_SECONDS = 0.005
"""Then it waits for room in mq_timedsend this long at a time (and looks whether it is closing in between)."""
FANIN_TAG = struct.Struct(">H")
WAKE_TAG = WAKE
"""The consumer's own wake-up (slot 0): put into its queue to end a blocked receive, then skipped."""
"""A fan-in message starts with its tag (podipc.queue_fanin: slot << 4 | kind), big-endian."""

SIZE_FIX = "set fs.mqueue.msgsize_max in the pod's securityContext.sysctls (the kubelet must allow it) or use shm://"
DEPTH_FIX = "set fs.mqueue.msg_max in the pod's securityContext.sysctls (the kubelet must allow it) or lower depth="
RLIMIT_FIX = (
    "the user's RLIMIT_MSGQUEUE (ulimit -q, 819200 bytes by default) or fs.mqueue.queues_max is used up: "
    "lower depth= or max_message_size=, or remove leftover queues (ls /dev/mqueue after mounting it)"
)
MQUEUE_FIX = (
    "set fs.mqueue.msgsize_max (and msg_max) in the pod's securityContext.sysctls; the kubelet must allow "
    "them (--allowed-unsafe-sysctls='fs.mqueue.*'); or use shm://"
)
ULIMIT_FIX = (
    "raise the runtime's default ulimit msgqueue (podman --ulimit msgqueue=N, containerd/CRI-O default_ulimits), "
    "or open queues with a smaller depth"
)
OPTIONS = (
    Option("depth", parse_count, None, "messages the queue holds (default /proc/sys/fs/mqueue/msg_max)"),
    Option("max_message_size", parse_size, None, "largest message in bytes (default msgsize_max)"),
    ADOPT_OPTION,
    PATTERN_OPTION,
    CONSUMERS_OPTION,
    PRODUCERS_OPTION,
    NAME_OPTION,
)


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
    """What a received queue message is: podipc.queue's DATA, END (the end marker) or GARBAGE (skipped)."""
    return kind_of(priority, data, DATA_PRIORITY, END_PRIORITY)


def queue_name(address: Address) -> str:
    """The mq_open name of an address: '/' + its name."""
    return "/" + address.name


def _check_limits(settings: Mapping[str, Any]) -> tuple[int, int]:
    """The (depth, max_message_size) to use, refused with the fix when above the kernel limits."""
    size = limit_option(settings, "max_message_size", host_max_message_size(), MSGSIZE_MAX_PATH, SIZE_FIX)
    if size < 1:
        raise ChannelUnavailable("max_message_size must be at least 1 byte for mq://")
    return limit_option(settings, "depth", host_max_depth(), MSG_MAX_PATH, DEPTH_FIX), size


def _unavailable(what: str, exc: BaseException, name: str = "") -> PodIPCError:
    if isinstance(exc, posix_ipc.PermissionsError):
        return permission_denied(what, _owner_by_name(name) if name else None)
    if isinstance(exc, ValueError):
        return ChannelUnavailable(f"{what}: the kernel refused the queue attributes ({exc}); {SIZE_FIX}")
    if isinstance(exc, OSError):
        return ChannelUnavailable(f"{what}: {exc}; {RLIMIT_FIX}")
    return ChannelUnavailable(f"{what}: {exc}")


def _owner_by_name(name: str) -> Owner | None:
    """Who owns the queue `name`, from /dev/mqueue when it is mounted (a queue we may not open); None if unknown."""
    try:
        return Owner.of_status(os.lstat(MQUEUE_MOUNT + name))
    except OSError:
        return None


def _identity(queue: Any) -> QueueIdentity:
    status = os.fstat(queue.mqd)
    return QueueIdentity(status.st_ino, Owner.of_status(status))


def _open(name: str, *, read: bool = True, write: bool = True) -> Any:
    """Open the existing queue `name` non-blocking; None when there is none; ChannelUnavailable when refused."""
    try:
        queue = posix_ipc.MessageQueue(name, 0, read=read, write=write)
    except posix_ipc.ExistentialError:
        return None
    except (posix_ipc.Error, OSError, ValueError) as exc:
        raise _unavailable(f"cannot open the queue {name}", exc, name) from exc
    queue.block = False
    return queue


def _queue_exists(name: str) -> bool:
    try:
        posix_ipc.MessageQueue(name, 0, write=False).close()
    except posix_ipc.ExistentialError:
        return False
    except (posix_ipc.Error, OSError, ValueError):
        return True
    return True


def _unlink_if_same(name: str, ident: int) -> None:
    """Unlink the queue `name` if it is still the queue of inode `ident` (never a queue put there since)."""
    try:
        queue = posix_ipc.MessageQueue(name, 0, write=False)
    except (posix_ipc.Error, OSError, ValueError):
        return
    try:
        if os.fstat(queue.mqd).st_ino == ident:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_message_queue(name)
    finally:
        queue.close()


def _close_quietly(queue: Any) -> None:
    if queue is not None:
        with contextlib.suppress(posix_ipc.Error, OSError):
            queue.close()


MODE_SETTLING_SECONDS = 0.5
"""How long a producer refused by the consumer's new queue looks again before it reports the refusal."""


class PosixMQProducer(QueueProducer):
    """Sends each message as one priority-1 message on the POSIX queue /NAME."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_PRIORITY
    end_mark = END_PRIORITY
    _send_flag = None  # no timeout: the descriptor is non-blocking
    _full_errors = (posix_ipc.BusyError,)
    _queue_errors = (posix_ipc.Error, OSError, ValueError)

    _mqd = -1

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.name = queue_name(address)
        super().__init__(address, settings)

    def _send_waiting(self, data: bytes | bytearray | memoryview) -> bool:
        """The queue was full: wait in poll() for room (or the waker), then send."""
        send = self._send_now
        wait = self._poller.poll
        while True:
            wait()
            if self._state:
                return False  # closing, or the consumer was lost: the checked path decides
            try:
                send(data, None, DATA_PRIORITY)
                return True
            except posix_ipc.BusyError:
                pass  # another producer of the queue was faster (or a spurious wake)

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    _denied_since: float | None = None

    def _open_existing(self) -> Any:
        try:
            queue = _open(self.name, read=False)
        except ChannelUnavailable:
            # mq_open applies the creator's umask and the consumer sets the asked mode (0660) with fchmod right
            # after: a group member may meet the queue in between. A refusal counts once it outlasts that moment.
            now = time.monotonic()
            if self._denied_since is None:
                self._denied_since = now
            if now - self._denied_since < MODE_SETTLING_SECONDS:
                return None
            raise
        self._denied_since = None
        return queue

    def _identity(self, queue: Any) -> QueueIdentity:
        return _identity(queue)

    def _queue_words(self) -> str:
        return f"the queue {self.name} of {self.address.location}"

    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        source = f"the max_message_size of the queue {self.name} (set by the consumer)"
        return queue.max_message_size, source, "open the consumer with a larger max_message_size="

    def _attached(self, queue: Any) -> None:
        self._send_now = queue.send
        self._mqd = queue.mqd
        # the blocking send waits for room and the waker together: one poll object, kept
        self._poller = select.poll()
        self._poller.register(self._mqd, POLLOUT)
        self._poller.register(self._waker_fd(), POLLIN)

    def _put_now(self, message: memoryview | bytes, mark: int) -> bool:
        try:
            self._send_now(message, None, mark)
        except posix_ipc.BusyError:
            return False
        except ValueError as exc:
            raise self._too_large(memoryview(message).nbytes) from exc
        except (posix_ipc.Error, OSError) as exc:
            raise PeerGone(f"the queue of {self.address.location} failed: {exc}") from exc
        return True

    def _room_readiness(self) -> tuple[int, int, float | None]:
        return self._mqd, POLLOUT, None

    def _release_queue(self, queue: Any) -> None:
        self._send_now = None
        self._mqd = -1
        _close_quietly(queue)

    def _queue_exists(self) -> bool:
        return _queue_exists(self.name)

    def _drop_inherited(self) -> None:
        queue, self._queue = self._queue, None
        self._fast_limit = -1
        _close_quietly(queue)  # mq_close of the child's descriptor: the parent's stays open
        self._freed = True


class PosixMQConsumer(QueueConsumer):
    """Creates the POSIX queue /NAME and receives priority-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_PRIORITY
    _empty_errors = (posix_ipc.BusyError,)
    _queue_errors = (posix_ipc.Error, OSError)

    _mqd = -1

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.name = queue_name(address)
        super().__init__(address, settings)
        self._receive = self._queue.receive
        self._mqd = self._queue.mqd
        # the blocking recv() waits on the queue and the waker together: one poll object, kept
        self._poller = select.poll()
        self._poller.register(self._mqd, POLLIN)
        self._poller.register(self._waker_fd(), POLLIN)

    def _receive_more(self, mark: int, data: bytes) -> bytes | None:
        """After a receive found the queue empty (mark -1): wait in poll() for a message (or the waker), take it."""
        if mark >= 0:
            return QueueConsumer._receive_more(self, mark, data)
        receive = self._receive
        wait = self._poller.poll
        while True:
            wait()  # returns at once when a message is there
            if self._state:
                return None  # closing, or the producer was lost: the checked path decides
            try:
                data, priority = receive()
            except posix_ipc.BusyError:
                continue  # another reader of the queue was faster (or a spurious wake)
            if priority == DATA_PRIORITY:
                return data
            return QueueConsumer._receive_more(self, priority, data)

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _queue_words(self) -> str:
        return f"the queue {self.name} of {self.address.location}"

    def _create_queue(self, capacity: int, mode: int) -> Any:
        try:
            queue = posix_ipc.MessageQueue(self.name, posix_ipc.O_CREX, mode, capacity, self.max_message_size)
        except posix_ipc.ExistentialError:
            return None
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(f"cannot create the queue {self.name}", exc) from exc
        try:
            os.fchmod(queue.mqd, mode)  # mq_open applies the umask; the option says the mode
            queue.block = False
        except BaseException:
            with contextlib.suppress(posix_ipc.Error):
                queue.unlink()
            queue.close()
            raise
        return queue

    def _inspect_existing(self) -> QueueIdentity | None:
        try:
            queue = posix_ipc.MessageQueue(self.name, 0, read=True, write=False)
        except posix_ipc.ExistentialError:
            return None
        except posix_ipc.PermissionsError as exc:
            owner = _owner_by_name(self.name)
            whose = owner.text() if owner is not None else "another user's: we may not even open it"
            raise ChannelUnavailable(
                f"{self._queue_words()} already exists ({whose}); podipc neither consumes from it nor removes it: "
                "remove it (as its owner) or use another name"
            ) from exc
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(f"cannot open the queue {self.name}", exc, self.name) from exc
        try:
            return _identity(queue)
        finally:
            queue.close()

    def _remove_found(self, found: QueueIdentity) -> None:
        try:
            _unlink_if_same(self.name, found.ident)
        except posix_ipc.PermissionsError as exc:
            raise ChannelUnavailable(
                f"cannot remove the queue {self.name} a dead consumer of {self.address.location} left "
                f"({found.owner.text()}): {exc}; run `podipc clean` as its owner"
            ) from exc

    def _adopt_queue(self, found: QueueIdentity) -> Any:
        queue = _open(self.name)
        if queue is None or _identity(queue).ident != found.ident:
            _close_quietly(queue)
            raise ChannelUnavailable(f"{self._queue_words()} was replaced while podipc opened it; try again")
        self.max_message_size = int(queue.max_message_size)
        return queue

    def _identity(self, queue: Any) -> QueueIdentity:
        return _identity(queue)

    def _object_record(self) -> tuple[str, str]:
        return "posix_mq", self.name

    def _take_now(self) -> tuple[int, bytes] | None:
        try:
            data, priority = self._receive()
        except posix_ipc.BusyError:
            return None
        except (posix_ipc.Error, OSError) as exc:
            raise PeerGone(f"the queue of {self.address.location} failed: {exc}") from exc
        return priority, data

    def _classify(self, mark: int, data: bytes) -> str:
        return classify(mark, data)

    def _readiness(self) -> tuple[int, int, float | None]:
        return self._mqd, POLLIN, None

    def _destroy(self, queue: Any) -> None:
        _unlink_if_same(self.name, os.fstat(queue.mqd).st_ino)
        self._close_queue(queue)

    def _close_queue(self, queue: Any) -> None:
        self._mqd = -1  # its number may name another descriptor once closed: never watch it again
        _close_quietly(queue)

    def _drop_inherited(self) -> None:
        queue, self._queue = self._queue, None
        self._fast = False
        _close_quietly(queue)  # mq_close of the child's descriptor: never unlinked, the parent's stays open
        self._freed = True


class PosixMQFanInProducer(QueueFanInProducer, PosixMQProducer):
    """A named producer of a fan-in queue (pattern=fanin): each message priority 2, its tag in 2 bytes before it."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size -= FANIN_TAG.size

    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        limit, source, fix = super()._queue_limit(queue)
        return limit - FANIN_TAG.size, f"{source}, less the {FANIN_TAG.size}-byte fan-in tag", fix

    _waiting_queue: Any = None
    """The queue opened a second time, blocking: after spinning, a full queue is waited for in mq_timedsend."""

    def _attached(self, queue: Any) -> None:
        """Bind send() to a tagging send on the non-blocking descriptor; open the blocking one for waits."""
        super()._attached(queue)
        send, pack, data_tag = queue.send, FANIN_TAG.pack, self.data_mark
        data_prefix = self._data_prefix = pack(data_tag)

        def send_tagged(message: Any, flag: Any, message_tag: int) -> None:
            send((data_prefix if message_tag == data_tag else pack(message_tag)) + message, flag, FANIN_PRIORITY)

        self._send_now = send_tagged
        waiting = _open(self.name, read=False)
        if waiting is not None and os.fstat(waiting.mqd).st_ino == os.fstat(queue.mqd).st_ino:
            waiting.block = True
            self._waiting_queue = waiting
        else:
            _close_quietly(waiting)

    def _send_waiting(self, data: bytes | bytearray | memoryview) -> bool:
        """The queue was full: retry after yielding the CPU ROOM_SPIN_ATTEMPTS times, then wait for room in
        mq_timedsend, SEND_SLICE_SECONDS at a time, looking at the state in between.

        Producers that wait in poll() are all woken at each message taken (fanin-mq-4 measured
        0.55x of fanin-mq-1); yielding first lets the consumer take several messages between
        refills, and a sender blocked in the kernel is then handed the room alone.
        """
        send, data_tag = self._send_now, self.data_mark
        yield_cpu = os.sched_yield
        for _ in range(ROOM_SPIN_ATTEMPTS):
            yield_cpu()
            if self._state:
                return False  # closing, or the consumer was lost: the checked path decides
            try:
                send(data, None, data_tag)
                return True
            except posix_ipc.BusyError:
                pass
        waiting = self._waiting_queue
        if waiting is None:
            return False
        message = self._data_prefix + data
        send_waiting = waiting.send
        while True:
            if self._state:
                return False
            try:
                send_waiting(message, SEND_SLICE_SECONDS, FANIN_PRIORITY)
                return True
            except posix_ipc.BusyError:
                pass  # the slice passed
            except posix_ipc.SignalError:
                pass  # a signal's handler ran (one that raised got through)

    def _release_queue(self, queue: Any) -> None:
        waiting, self._waiting_queue = self._waiting_queue, None
        _close_quietly(waiting)
        super()._release_queue(queue)

    def _drop_inherited(self) -> None:
        waiting, self._waiting_queue = self._waiting_queue, None
        _close_quietly(waiting)
        super()._drop_inherited()


class PosixMQFanInConsumer(QueueFanInConsumer, PosixMQConsumer):
    """The consumer of a fan-in queue (pattern=fanin): takes priority-2 messages, each tagged with its producer."""

    _waiting_queue: Any = None
    """The queue opened a second time, blocking: recv() waits in mq_receive (see _next_tagged)."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size -= FANIN_TAG.size
        waiting = _open(self.name, write=False)
        if waiting is None or os.fstat(waiting.mqd).st_ino != os.fstat(self._queue.mqd).st_ino:
            _close_quietly(waiting)
            self.close()
            raise ChannelUnavailable(f"{self._queue_words()} was replaced while podipc opened it; try again")
        waiting.block = True
        self._waiting_queue = waiting
        self._receive_waiting = waiting.receive

    def _next_tagged(self) -> tuple[int, bytes]:
        """Wait in mq_receive: a message, a died marker or the wake-up `_interrupt` puts ends it.

        With many producers a consumer that polls the queue when it is empty pays a poll and a
        wake-up per message more often than with one; blocking in the kernel costs nothing more.
        """
        try:
            data, priority = self._receive_waiting()
        except posix_ipc.SignalError:
            return -1, b""  # a signal's handler ran (one that raised got through)
        return self._untag(priority, data)

    def _interrupt(self) -> None:
        self._put_own(WAKE_TAG, b"")  # a receive blocked on the empty queue takes it at once

    def _close_queue(self, queue: Any) -> None:
        waiting, self._waiting_queue = self._waiting_queue, None
        _close_quietly(waiting)
        super()._close_queue(queue)

    def _drop_inherited(self) -> None:
        waiting, self._waiting_queue = self._waiting_queue, None
        _close_quietly(waiting)
        super()._drop_inherited()

    def _untag(self, mark: int, body: bytes) -> tuple[int, bytes]:
        if mark != FANIN_PRIORITY or len(body) < FANIN_TAG.size:
            return NOTHING, body
        return body[0] << 8 | body[1], body[FANIN_TAG.size :]

    def _put_own(self, message_tag: int, body: bytes) -> bool:
        queue = self._queue
        if queue is None:
            return True
        try:
            queue.send(FANIN_TAG.pack(message_tag) + body, None, FANIN_PRIORITY)
        except posix_ipc.BusyError:
            return False
        except (posix_ipc.Error, OSError, ValueError):
            return True  # closed or removed: nothing left to mark
        return True


def full_queue() -> tuple[int, str]:
    """The bytes one queue with default options takes, and how that is counted."""
    depth, size = host_max_depth(), host_max_message_size()
    return depth * size, f"one full queue ({depth} x {size} bytes)"


def remove_leftover_queue(name: str) -> None:
    """Unlink a queue a killed consumer left (podipc clean)."""
    posix_ipc.unlink_message_queue(name)


def leftover_queue_owner(name: str) -> Owner | None:
    """Who owns the queue `name` (podipc clean), None when there is none; PermissionsError when we may not open it."""
    try:
        queue = posix_ipc.MessageQueue(name, 0, write=False)
    except posix_ipc.ExistentialError:
        return None
    try:
        return Owner.of_status(os.fstat(queue.mqd))
    finally:
        queue.close()


TRANSPORT = Transport(
    name="posix_mq",
    title="POSIX message queue",
    schemes={"mq": AddressForm.NAME},
    producer="podipc.transports.posix_mq:PosixMQProducer",
    consumer="podipc.transports.posix_mq:PosixMQConsumer",
    examples=(Example("mq:///name", "POSIX message queue"),),
    reliable=True,
    ordered=True,
    limit=MessageLimit(host_max_message_size, MSGSIZE_MAX_PATH, MQUEUE_FIX, "`fs.mqueue.msgsize_max` (8192 in a pod)"),
    options=OPTIONS,
    capabilities=frozenset({Capability.PRESENCE_FILES, Capability.READINESS_FD}),
    availability=availability,
    unusable_fix=f"{MQUEUE_FIX}; check fs.mqueue.queues_max and RLIMIT_MSGQUEUE against the queues in use",
    objects=(
        ObjectKind(
            "posix_mq",
            "POSIX message queue",
            "podipc.transports.posix_mq:remove_leftover_queue",
            "podipc.transports.posix_mq:leftover_queue_owner",
        ),
    ),
    channel_objects=lambda address: (("posix_mq", queue_name(address)),),
    kernel=KernelFacility("POSIX message queues", MSGSIZE_MAX_PATH, "CONFIG_POSIX_MQUEUE"),
    resource_limits=(ResourceLimit("RLIMIT_MSGQUEUE", full_queue, ULIMIT_FIX),),
    fanin_consumer="podipc.transports.posix_mq:PosixMQFanInConsumer",
    fanin_producer="podipc.transports.posix_mq:PosixMQFanInProducer",
    work_queue=True,
    rank=40,
)
