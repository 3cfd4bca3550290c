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

    Code: the endpoints are podipc.queue's QueueProducer and QueueConsumer (what mq:// and
    sysvmq:// share); this module says how a POSIX queue is opened, created, waited on and
    removed, and keeps its own hot paths (send and recv with no timeout).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import posix_ipc

from podipc.address import Address
from podipc.channel import Option, parse_count, parse_size, remaining
from podipc.errors import ChannelUnavailable, PeerGone, PodIPCError, Timeout
from podipc.ownership import Owner
from podipc.proc import read_int_or
from podipc.queue import LIVENESS_SLICE_SECONDS, QueueConsumer, QueueProducer, kind_of, limit_option, permission_denied
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

MSG_MAX_PATH = "/proc/sys/fs/mqueue/msg_max"
MSGSIZE_MAX_PATH = "/proc/sys/fs/mqueue/msgsize_max"

DATA_PRIORITY = 1
END_PRIORITY = 0

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


def _unavailable(what: str, exc: BaseException) -> PodIPCError:
    if isinstance(exc, posix_ipc.PermissionsError):
        return permission_denied(what)
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


class PosixMQProducer(QueueProducer):
    """Sends each message as one priority-1 message on the POSIX queue /NAME."""

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", parse_count, None, "messages the queue holds (default /proc/sys/fs/mqueue/msg_max)"),
        Option("max_message_size", parse_size, None, "largest message in bytes (default msgsize_max)"),
    )
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX
    data_mark = DATA_PRIORITY
    end_mark = END_PRIORITY

    _nowait_queue: Any = None
    _send_now: Any = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.name = queue_name(address)
        super().__init__(address, settings)

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

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _open_existing(self) -> Any:
        try:
            return posix_ipc.MessageQueue(self.name, 0)
        except posix_ipc.ExistentialError:
            return None
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(f"cannot open the queue {self.name}", exc) from exc

    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        source = f"the max_message_size of the queue {self.name} (set by the consumer)"
        return queue.max_message_size, source, "open the consumer with a larger max_message_size="

    def _attached(self, queue: Any) -> None:
        self._nowait_queue = _open_nowait(self.name)
        self._send_now = self._nowait_queue.send

    def _put(self, message: memoryview | bytes, mark: int, deadline: float | None) -> None:
        """Send, waiting for room in slices of 0.25 s, probing the consumer between them."""
        send = self._queue_send
        peer = self._peer
        location = self.address.location
        while True:
            left = (
                LIVENESS_SLICE_SECONDS if deadline is None else min(LIVENESS_SLICE_SECONDS, remaining(deadline) or 0.0)
            )
            try:
                send(message, left, mark)
                return
            except posix_ipc.BusyError:
                pass
            except ValueError as exc:
                raise self._too_large(memoryview(message).nbytes) from exc
            except (posix_ipc.Error, OSError) as exc:
                raise PeerGone(f"the queue of {location} failed: {exc}") from exc
            if peer.lost():
                raise PeerGone(f"the consumer of {location} is gone (it died or closed before the end of stream)")
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"{location}: the queue stayed full (the consumer is not keeping up)")

    def _queued(self) -> int:
        return int(self._queue.current_messages)

    def _detach(self, queue: Any) -> None:
        """Close the queue's descriptors."""
        self._send_now = None
        if queue is not None:
            queue.close()
        nowait, self._nowait_queue = self._nowait_queue, None
        if nowait is not None:
            nowait.close()

    def _queue_exists(self) -> bool:
        return _queue_exists(self.name)


class PosixMQConsumer(QueueConsumer):
    """Creates the POSIX queue /NAME and receives priority-1 messages until the end marker."""

    options: ClassVar[tuple[Option, ...]] = PosixMQProducer.options
    max_message_source = MSGSIZE_MAX_PATH
    max_message_fix = SIZE_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.name = queue_name(address)
        super().__init__(address, settings)

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

    def _limits(self) -> tuple[int, int]:
        return _check_limits(self.settings)

    def _remove_stale(self) -> bool:
        try:
            posix_ipc.unlink_message_queue(self.name)
        except posix_ipc.ExistentialError:
            return False
        return True

    def _create_queue(self, capacity: int, mode: int) -> Any:
        try:
            queue = posix_ipc.MessageQueue(self.name, posix_ipc.O_CREX, mode, capacity, self.max_message_size)
        except posix_ipc.ExistentialError:
            return None
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(f"cannot create the queue {self.name}", exc) from exc
        os.fchmod(queue.mqd, mode)  # mq_open applies the umask; the option says the mode
        return queue

    def _adopt_queue(self, capacity: int, mode: int) -> Any:
        try:
            queue = posix_ipc.MessageQueue(self.name, posix_ipc.O_CREAT, mode, capacity, self.max_message_size)
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise _unavailable(f"cannot create the queue {self.name}", exc) from exc
        self.max_message_size = queue.max_message_size
        return queue

    def _object_record(self) -> tuple[str, str]:
        return "posix_mq", self.name

    def _discard(self, queue: Any) -> None:
        queue.close()

    def _receive_slowly(self, deadline: float | None, mark: int, data: bytes) -> bytes:
        """Receive in slices of 0.25 s, probing the producer between them; skip garbage; end at the marker."""
        receive = self._receive
        priority = mark
        while True:
            if priority >= 0 and self._is_data(classify(priority, data)):
                return data
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

    def _queued(self) -> int:
        return int(self._queue.current_messages)

    def _destroy(self, queue: Any) -> None:
        _unlink_quietly(self.name)
        queue.close()


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
        queue = posix_ipc.MessageQueue(name)
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
    options=PosixMQProducer.options,
    capabilities=frozenset({Capability.PRESENCE_FILES}),
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
    rank=40,
)
