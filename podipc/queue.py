"""The kernel message-queue Producer and Consumer that mq:// and sysvmq:// share, on the endpoint contract.

A POSIX queue (mq_open) and a SysV queue (msgget) carry a podipc stream the same way: one
podipc message is one queue message with no header, marked as data or as the end of stream
by the queue's own tag (a POSIX priority, a SysV mtype); the consumer creates the queue
and removes it at the end; a queue cannot tell a dead peer, so both sides hold a
podipc.presence file and the process's one peer-death monitor (`Presence.watch`) wakes
an endpoint whose peer died. What does not depend on the kind of queue is here; a
transport subclass says how its queue is opened, created, removed, counted and waited on.

Both sides implement the endpoint contract of podipc.endpoint (`_Endpoint`): one
non-blocking attempt per call (`_try_send`, `_try_recv`, `_try_close`), a readiness
descriptor (`_readiness`: an mqd is one; a SysV queue gets an eventfd fed by one helper
thread per endpoint), `_free` once no call is inside, `_drop_inherited` after fork.

QueueProducer: the rendezvous, one non-blocking step at a time (the consumer's presence is
alive, or it holds none: a plain script; then its queue is opened, checked to be trusted,
and matched against the queue the consumer declared), the end of stream (put the end
marker, then wait until the queue is empty: the consumer took everything) and leaving
(clean, or abandoning the presence file on an abort, as a crash would).

QueueConsumer: opening, which decides whose queue it reads (`_open_queue`):

- created here, exclusively (O_EXCL / IPC_EXCL): ours, removed at the end;
- a queue a podipc consumer of this channel left when it died: its presence file (of our
  user, or of our group with mode=0660) names this channel, records the queue and declares
  the queue's identity (`declares queue ID`: the mqueue inode, the SysV msqid), the queue
  still has that identity and the file's owner: removed and created again (`recovered`);
- with the `adopt=true` option, a queue someone else made (a plain producer that creates the
  queue first): used if trusted (ours, or our group's with mode=0660, nothing for other
  users) and never removed by podipc (`adopted`);
- anything else is refused (ChannelUnavailable naming its owner): podipc never consumes from,
  or removes, a queue it cannot prove it created for this channel.

Then it claims the consumer's presence, records the queue for `podipc clean`, and receives
data messages until the end marker. Peer loss: the monitor calls `_signal_peer_lost`; a
consumer then hands out what is still queued, and raises PeerGone once the queue is empty
(a clean producer puts the end marker in before it leaves).

Hooks a subclass implements. Producer: `_limits`, `_open_existing`, `_identity`,
`_queue_limit`, `_attached` (binds `_send_now`), `_put_now`, `_release_queue`,
`_queue_exists`, `_room_readiness`; optionally `_send_waiting`, `_send_checked`.
Consumer: `_limits`, `_create_queue`, `_inspect_existing`, `_remove_found`,
`_adopt_queue`, `_identity`, `_object_record`, `_take_now`, `_classify`, `_destroy`,
`_close_queue`, `_readiness` (and binds `_receive`); optionally `_receive_more`, `_idle`,
`_stop_helpers`.

Hot paths (STYLE.md #8): `send()` of bytes and `recv()` without a timeout call the queue's
own send/receive under the call gate, skipping the base class's conversions, and hand
anything unusual to the checked path of podipc.producing and podipc.consuming; waiting there is the transport's
(`_send_waiting`, `_receive_more`): poll() on the mqd, a blocking msgrcv.

The work queue (`pattern=queue`, podipc.work_queue): consumers share the queue, each in its own
presence slot; joining (`_join_work_queue`) and leaving (`_leave_work_queue`) are decided under the
channel's consumers lock; the producer watches every slot (SlotsTracker), puts one end marker per live
consumer (`_put_end_markers`) and decides "delivered" from the slots' states (`_work_queue_drained`).
None of it runs in a pair's send or recv.

Fan-in (`pattern=fanin`, podipc.queue_fanin) builds on the same classes through hooks: a producer
claims a slot of its own (`_claim_presence`) and waits for its end to be acknowledged (`_end_taken`);
the consumer declares `fanin` and watches its producers' slots (`_watch_peer`).

Why one module of ~1000 lines: it is the one base both kernel-queue transports build on
(their producer and consumer, limits, ownership checks, the work queue's opening and closing);
the hot paths of both sides share its private conventions (`_send_now`, `_fast_limit`, marks),
and keeping them together is what lets mq:// and sysvmq:// stay small. What the work queue needs
beyond opening and closing (slots, the lock, the producer's tracker) lives in podipc.work_queue.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import AddressError, ChannelUnavailable, EndOfStream, MessageTooLarge, PeerGone, PeerTimeout
from podipc.options import Option, parse_bool, parse_count
from podipc.ownership import Owner, Trust, grants_others
from podipc.presence import (
    CHANNEL,
    DECLARATION,
    RECORD_LIMIT_BYTES,
    PeerState,
    PeerTracker,
    Presence,
    lock_state,
    open_presence,
    presence_path,
    probe,
    read_record,
)
from podipc.producing import Producer
from podipc.work_queue import (
    WORK_QUEUE_WORD,
    Slot,
    SlotsTracker,
    consumers_lock,
    live_slot_paths,
    remove_dead_slots,
    slot_states,
    slots,
)

RENDEZVOUS_POLL_SECONDS = 0.02
"""How often a producer looks for the consumer (its presence and queue) before its first message."""
PEER_PROBE_SECONDS = 0.02
"""How often a consumer that has not seen its producer yet probes the producer's presence file."""
DRAIN_POLL_FIRST_SECONDS = 0.0002
DRAIN_POLL_MAX_SECONDS = 0.01
"""A closing producer looks whether the consumer emptied the queue this often (doubling from the first)."""
FANIN_WORD = "fanin"
"""A fan-in consumer's presence file declares this (podipc.queue_fanin); a pair producer meeting it is refused."""
QUEUE_WORD = "queue"
"""A consumer's presence file declares `queue ID`: the identity of the queue it created."""

DATA, END, GARBAGE = "data", "end", "garbage"
"""What a received queue message is, as each transport's classify() says."""

SHARE_A_GROUP_FIX = (
    "the peer runs as another user: share a group (runAsGroup/fsGroup) and open both sides with mode=0660"
)

ADOPT_OPTION = Option(
    "adopt",
    parse_bool,
    False,
    "consumer: also take a queue that already exists (a plain producer made it), if trusted; podipc never removes it",
)
"""The opt-in for plain producers that create the queue before the consumer (both sides accept it)."""

PAIR, WORK_QUEUE, FANIN = "pair", "queue", "fanin"
PATTERNS = (PAIR, WORK_QUEUE, FANIN)


def parse_pattern(value: object) -> str:
    """The pattern option of a kernel queue: 'pair' (one consumer), 'queue' (a work queue) or 'fanin'."""
    pattern = str(value).strip().lower()
    if pattern not in PATTERNS:
        raise ValueError(f"expected one of {', '.join(PATTERNS)}")
    return pattern


PATTERN_OPTION = Option(
    "pattern",
    parse_pattern,
    PAIR,
    "pair (one consumer), queue (a work queue: many consumers share the queue, each message goes to one; "
    "podipc.work_queue) or fanin (many named producers into one consumer; podipc.queue_fanin)",
)
"""The pattern option of mq:// and sysvmq:// (both sides accept it)."""

CONSUMERS_OPTION = Option(
    "consumers",
    parse_count,
    1,
    "work-queue producer: wait until this many consumers share the queue before the first message (default 1; "
    "> 1 implies pattern=queue); the end of stream still goes to every consumer alive then",
)

_CONNECTING, _READY, _ENDING, _DONE = range(4)


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


def permission_denied(what: str, owner: Owner | None = None) -> ChannelUnavailable:
    """The error for a queue another user's mode keeps us out of, with its owner when known and the fix."""
    whose = f" ({owner.text()})" if owner is not None else ""
    return ChannelUnavailable(f"{what}{whose}: permission denied; {SHARE_A_GROUP_FIX}")


def check_queue(trust: Trust, what: str, owner: Owner) -> None:
    """Raise ChannelUnavailable unless a queue podipc did not create here is trusted and grants "other" nothing."""
    trust.check(what, owner.uid, owner.gid, owner.mode, creator=owner.creator)
    if grants_others(owner.mode):
        raise ChannelUnavailable(
            f"{what} lets every user of the pod in ({owner.text()}): any of them could read its messages or "
            "forge some; podipc never uses such a queue: remove it (as its owner) and let the consumer create it "
            "(mode=0660 shares it with a group)"
        )


@dataclass(frozen=True)
class QueueIdentity:
    """Which queue is at a channel's name or key now (the mqueue inode, the SysV msqid) and who owns it."""

    ident: int
    owner: Owner


def queued_messages(queue: Any, errors: tuple[type[BaseException], ...]) -> int:
    """Messages in `queue` now: 0 for None, or when asking fails with one of `errors` (the queue was removed)."""
    if queue is None:
        return 0
    try:
        return int(queue.current_messages)
    except errors:
        return 0


def declared_queue(lines: list[str]) -> int | None:
    """The queue identity a consumer's presence record declares (`declares queue ID`), None when it declares none."""
    prefix = f"{DECLARATION} {QUEUE_WORD} "
    for line in lines:
        if line.startswith(prefix):
            with contextlib.suppress(ValueError):
                return int(line[len(prefix) :])
    return None


class QueueProducer(Producer):
    """Sends a stream as queue messages: finds the consumer's queue, ends the stream, waits until it is taken."""

    waits_forever: ClassVar[bool] = True
    data_mark: ClassVar[int]
    """The tag (priority, mtype) of a data message."""
    end_mark: ClassVar[int]
    """The tag of the end-of-stream message (empty)."""

    _queue: Any = None
    _phase = _CONNECTING
    _fast_limit = -1
    """Largest message send() may hand straight to the queue (the hot path below); -1 while it may not."""
    _send_now: Any = None
    """The queue's own send, bound once connected: `_send_now(data, _send_flag, data_mark)` never waits."""
    _send_flag: ClassVar[Any] = None
    _fast_flag: Any = None
    _fast_mark = -1
    """Instance copies of `_send_flag` and `data_mark` for the hot path, set once connected."""
    _full_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    """What `_send_now` raises on a full queue."""
    _queue_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    """Everything the queue's library raises (and ValueError): the hot path leaves those to the checked path."""
    _retry_at = 0.0
    _drain_pause = DRAIN_POLL_FIRST_SECONDS
    _consumer_state = PeerState.ABSENT
    _work_queue = False
    """pattern=queue: many consumers share the queue (podipc.work_queue)."""
    _marked: list[str] | None = None
    """pattern=queue: the slot files of the consumers alive when the end markers went in."""
    _markers_left = 0
    _consumers_wanted = 1

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        try:
            _, self.max_message_size = self._limits()
            mode = int(self.settings["mode"])
            self._trust = Trust.for_mode(mode)
            self._presence = self._claim_presence(mode)
            self._consumers_wanted = int(self.settings.get("consumers") or 1)
            self._work_queue = self.settings.get("pattern") == WORK_QUEUE or self._consumers_wanted > 1
            self._peer = (
                SlotsTracker(self._presence, address.token) if self._work_queue else PeerTracker(self._presence)
            )
        except BaseException:
            self._closed = self._freed = True  # nothing to free; no unclosed warning
            presence = getattr(self, "_presence", None)
            if presence is not None:
                presence.close()
            raise

    def _claim_presence(self, mode: int) -> Presence:
        """Claim this producer's presence file (a fan-in producer claims a slot of its own instead)."""
        return Presence(self.address.token, "producer", mode, handover_wait=float(self.settings["wait"]))

    # --- hooks -------------------------------------------------------------

    @abstractmethod
    def _limits(self) -> tuple[int, int]:
        """(queue capacity, max_message_size) from the settings, refused with the fix above the kernel's limits."""

    @abstractmethod
    def _open_existing(self) -> Any:
        """The channel's queue opened for sending (non-blocking), or None while there is none.

        Raises ChannelUnavailable (owner and fix) when it may not be opened.
        """

    @abstractmethod
    def _identity(self, queue: Any) -> QueueIdentity:
        """The identity and owner of an open queue."""

    @abstractmethod
    def _queue_limit(self, queue: Any) -> tuple[int, str, str]:
        """The largest message `queue` takes, where that limit comes from and how to raise it."""

    @abstractmethod
    def _attached(self, queue: Any) -> None:
        """Called once `queue` is this producer's and the consumer attached: prepare the hot path."""

    @abstractmethod
    def _put_now(self, message: memoryview | bytes, mark: int) -> bool:
        """Put one message tagged `mark` without waiting: False when the queue has no room (nothing was put).

        Raises MessageTooLarge (`_too_large`) or PeerGone (the queue failed or was removed).
        """

    def _queued(self) -> int:
        """Messages in the queue now; 0 once it is removed."""
        return queued_messages(self._queue, self._queue_errors)

    @abstractmethod
    def _release_queue(self, queue: Any) -> None:
        """Let go of `queue` (None if never opened) and of what the hot path and readiness hold."""

    @abstractmethod
    def _queue_exists(self) -> bool:
        """True while the channel's queue exists (a dead consumer's queue keeps its presence file as evidence)."""

    @abstractmethod
    def _room_readiness(self) -> tuple[int, int, float | None]:
        """What to wait on for room in the connected queue: (fd, poll events, None)."""

    def _send_waiting(self, data: bytes | bytearray | memoryview) -> bool:
        """After `_send_now` found the queue full: wait for room and send (hook); False leaves it to the checked
        path (nothing sent). May raise `_queue_errors` (nothing sent)."""
        return False

    def _too_large(self, size: int) -> MessageTooLarge:
        """The error for a message of `size` bytes that the queue refused as too large."""
        return MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)

    # --- the hot path ---------------------------------------------------------

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit, 0: try once now).

        Raises as Producer.send does. The common case (bytes or bytearray, no timeout, connected) is one call of
        the queue's own send under the call gate, without the base class's conversions (they cost
        a third of a 64-byte send); a full queue waits as the transport says; anything else takes
        the checked path.
        """
        if timeout is None and (type(data) is bytes or type(data) is bytearray) and len(data) <= self._fast_limit:
            token = self._token
            try:
                token.pop()
            except IndexError:
                pass  # another thread's call is inside: the checked path waits its turn
            else:
                try:
                    if not self._state:
                        try:
                            self._send_now(data, self._fast_flag, self._fast_mark)
                            return
                        except self._full_errors:
                            if self._send_waiting(data):
                                return
                except self._queue_errors:
                    pass  # nothing was sent: the checked path translates
                finally:
                    token.append(None)
                    if self._state:
                        self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        Producer.send(self, data, timeout)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if deadline is None and self._fast_limit >= 0 and not self._state:
            try:
                self._send_now(view, self._send_flag, self.data_mark)
                return
            except self._full_errors:
                try:
                    if self._send_waiting(view):
                        return
                except self._queue_errors:
                    pass  # nothing was sent: the checked path translates
            except self._queue_errors:
                pass  # nothing was sent: the checked path translates
        self._send_checked(view, deadline)

    def _send_checked(self, view: memoryview, deadline: float | None) -> None:
        """Send through the attempts of the endpoint contract, waiting on readiness until `deadline` (hook)."""
        Producer._send(self, view, deadline)

    # --- rendezvous --------------------------------------------------------

    def _try_connect(self) -> bool:
        """One step of the rendezvous; True once the consumer's queue is open, trusted and this producer's."""
        if self._queue is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + RENDEZVOUS_POLL_SECONDS
        state, declared = self._consumers_now()
        self._consumer_state = state
        if state is PeerState.GONE:
            return False  # a dead consumer's queue is stale: wait for a new consumer to replace it
        if self._work_queue and state is not PeerState.ALIVE:
            return False  # a work queue's consumers always hold presence files
        queue = self._open_existing()
        if queue is None:
            return False
        try:
            identity = self._identity(queue)
            check_queue(self._trust, self._queue_words(), identity.owner)
            if state is PeerState.ALIVE and declared is not None and declared != identity.ident:
                self._release_queue(queue)  # not the live consumer's queue (yet): look again
                return False
        except BaseException:
            self._release_queue(queue)
            raise
        self._connect_to(queue)
        return True

    def _consumers_now(self) -> tuple[PeerState, int | None]:
        """The consumer side's state and the queue identity it declares (pattern=queue: any live slot's)."""
        presence = self._presence
        if not self._work_queue:
            state = presence.peer_state()
            if state is PeerState.ABSENT and live_slot_paths(self.address.token, presence.trust):
                raise ChannelUnavailable(
                    f"the consumers of {self.address.location} share its queue as a work queue (pattern=queue): "
                    "open this producer with pattern=queue too"
                )
            if state is not PeerState.ALIVE:
                return state, None
            record = read_record(presence.peer_path, presence.trust)
            if f"{DECLARATION} {FANIN_WORD}" in record:
                raise ChannelUnavailable(
                    f"the consumer of {self.address.location} gathers many producers (pattern=fanin): give this "
                    "producer a name= (or pattern=fanin; podipc produce --name NAME)"
                )
            return state, declared_queue(record)
        pair = presence.peer_state()
        if pair is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"the consumer of {self.address.location} is a pair consumer (pattern=pair): this producer has "
                "pattern=queue; open both sides with the same pattern"
            )
        live = [slot for slot in slots(self.address.token, presence.trust) if slot.state is PeerState.ALIVE]
        if len(live) < self._consumers_wanted:
            return PeerState.ABSENT, None  # the rendezvous waits for `consumers` of them
        presence.peer_seen = True
        return PeerState.ALIVE, declared_queue(list(live[0].lines))

    def _queue_words(self) -> str:
        """How errors name the channel's queue."""
        return f"the queue of {self.address.location}"

    def _connect_to(self, queue: Any) -> None:
        capacity, source, fix = self._queue_limit(queue)
        if capacity < self.max_message_size:
            self.max_message_size = capacity
            self.max_message_source = source
            self.max_message_fix = fix
        self._queue = queue
        self._peer_seen = True
        self._peer.attach()
        self._attached(queue)
        self._phase = _READY
        # send() reads these per call: an instance attribute loads in a third of a class attribute's time
        self._fast_flag, self._fast_mark = self._send_flag, self.data_mark
        self._fast_limit = self.max_message_size
        self._presence.watch(self._signal_peer_lost, self._peer)
        self._readiness_changed()

    def _peer_timeout(self) -> PeerTimeout:
        location = self.address.location
        if self._consumer_state is PeerState.GONE:
            return PeerTimeout(
                f"the consumer of {location} died and no consumer replaced it within the wait timeout "
                f"(wait={self.settings['wait']:g}s); its queue waits for the next consumer (or podipc clean)"
            )
        return PeerTimeout(
            f"no consumer appeared on {location} within the wait timeout (wait={self.settings['wait']:g}s); "
            "start it, or allow longer with ?wait=SECONDS"
        )

    # --- the endpoint contract ----------------------------------------------

    @property
    def _sending(self) -> bool:
        """True once connected and until the end marker is put: a failed attempt means the queue is full."""
        return self._phase == _READY

    def _try_prepare(self) -> bool:
        return self._try_connect()

    def _try_send(self, view: memoryview) -> bool:
        if self._phase != _READY:
            if self._phase != _CONNECTING:
                raise self._closed_error()
            if not self._try_connect():
                return False
        if self._peer_lost:
            raise self._consumer_gone()
        return self._put_now(view, self.data_mark)

    def _consumer_gone(self) -> PeerGone | ChannelUnavailable:
        return self._presence.lost_error(
            PeerGone(f"the consumer of {self.address.location} is gone (it died or closed before the end of stream)")
        )

    def _readiness(self) -> tuple[int, int, float | None]:
        phase = self._phase
        if phase == _READY:
            return self._room_readiness()
        if phase == _CONNECTING:
            return -1, 0, max(0.0, self._retry_at - time.monotonic())
        return -1, 0, self._drain_pause

    def _try_close(self) -> bool:
        if self._phase == _CONNECTING and not self._try_connect():
            return False
        if self._phase == _READY:
            if self._peer_lost:
                raise self._consumer_gone()
            self._presence.declare_ending()
            if not self._put_end_markers():
                return False
            self._phase = _ENDING
            self._fast_limit = -1
            self._readiness_changed()
        if self._phase == _ENDING:
            if not self._end_taken():
                self._drain_pause = min(self._drain_pause * 2, DRAIN_POLL_MAX_SECONDS)
                return False
            self._phase = _DONE
        return True

    def _end_taken(self) -> bool:
        """True once the end of stream was taken: the queue is empty (pattern=queue: `_work_queue_drained`; a
        fan-in producer waits for the consumer's acknowledgement instead, podipc.queue_fanin).

        Raises PeerGone when the consumer left with messages still queued.
        """
        if self._work_queue:
            return self._work_queue_drained()
        if self._queued():
            if self._peer_lost and self._queued():
                raise PeerGone(f"the consumer of {self.address.location} left before taking the end of stream")
            return False
        return True

    def _put_end_markers(self) -> bool:
        """Put the end marker (pattern=queue: one per consumer alive now); False when the queue is full."""
        if not self._work_queue:
            return self._put_now(b"", self.end_mark)
        if self._marked is None:
            self._marked = live_slot_paths(self.address.token, self._presence.trust)
            if not self._marked:
                raise self._consumer_gone()
            self._markers_left = len(self._marked)
        while self._markers_left:
            if not self._put_now(b"", self.end_mark):
                return False
            self._markers_left -= 1
        return True

    def _work_queue_drained(self) -> bool:
        """pattern=queue: True once every consumer alive at the end took its marker (or the rest died after
        one did); False while they work; PeerGone when none is left and messages are still queued.

        A consumer that left cleanly took its end marker, which the queue hands out after every data
        message (mq: priority 0 after 1; sysvmq: FIFO, the markers go in last): every message was taken,
        and what is still queued can only be the markers of consumers that died since.
        """
        assert self._marked is not None
        states = slot_states(self._marked, self._presence.trust)
        queued = self._queued()
        alive = PeerState.ALIVE in states
        if PeerState.ABSENT in states:
            return not (queued and alive)
        if alive:
            return not queued
        if not queued and self._queue_exists():
            return True  # every message and marker was taken; the consumers died or aborted since
        raise PeerGone(
            f"every consumer of {self.address.location} is gone with {queued} message(s) still queued "
            "(they died or closed before the end of stream)"
        )

    def _free(self) -> None:
        """Let go of the queue (the consumer removes it) and leave the channel: cleanly after the end of stream."""
        self._presence.unwatch()
        self._fast_limit = -1
        queue, self._queue = self._queue, None
        clean = self._phase == _DONE or queue is None  # a producer that never opened the queue sent nothing
        self._phase = _DONE if clean else _ENDING
        self._release_queue(queue)
        self._presence.leave(clean, self._queue_exists)
        if self._work_queue and not self._queue_exists():
            found = slots(self.address.token, self._presence.trust)
            if not any(slot.state is PeerState.ALIVE for slot in found):
                remove_dead_slots(found, self._presence.trust)  # the queue is gone: nothing left to prove


class QueueConsumer(Consumer):
    """Creates the channel's queue, receives data messages until the end marker, then removes the queue."""

    waits_forever: ClassVar[bool] = True
    recovered: bool = False
    """True when opening found the queue a dead consumer of this channel left, and replaced it."""
    adopted: bool = False
    """True when opening took a queue that already existed (adopt=true): podipc never removes it."""
    slot: int = 0
    """pattern=queue: this consumer's slot (1..podipc.work_queue.MAX_CONSUMERS); 0 for a pair consumer."""

    _fast = False
    """True while recv() may take messages straight from the queue: data flows, nothing else is pending."""
    _taken: tuple[int, bytes] | None = None
    """A message the fast path took that is not data, for the next attempt."""
    data_mark: ClassVar[int]
    """The tag (priority, mtype) of a data message."""
    _receive: Any = None
    """The queue's own receive, bound at open: `_receive()` -> (body, tag); raises `_empty_errors` when it
    finds nothing (a non-blocking mq), or returns when a message comes (a blocking msgrcv)."""
    _empty_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    _queue_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    """Everything the queue's library raises: the hot path leaves those to the checked path."""
    _end_seen = False
    _next_peer_probe = 0.0
    _presence: Presence | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._fast_mark = self.data_mark  # read per call by recv(): see QueueProducer._connect_to
        try:
            self._queue = self._open(address.token)
        except BaseException:
            self._closed = self._freed = True  # nothing to free; no unclosed warning
            raise

    # --- hooks -------------------------------------------------------------

    @abstractmethod
    def _limits(self) -> tuple[int, int]:
        """(queue capacity, max_message_size) from the settings, refused with the fix above the kernel's limits."""

    @abstractmethod
    def _create_queue(self, capacity: int, mode: int) -> Any:
        """Create the queue exclusively with `capacity` and `mode`, non-blocking; None when it already exists."""

    @abstractmethod
    def _inspect_existing(self) -> QueueIdentity | None:
        """The identity and owner of the queue at the channel's name or key now; None when there is none.

        Raises ChannelUnavailable (with its owner when known) when it cannot even be looked at.
        """

    @abstractmethod
    def _remove_found(self, found: QueueIdentity) -> None:
        """Remove the queue `found` (a dead consumer's), only if it is still the one at the name or key."""

    @abstractmethod
    def _adopt_queue(self, found: QueueIdentity) -> Any:
        """Open the existing queue `found` for receiving (non-blocking); ChannelUnavailable if it changed meanwhile."""

    @abstractmethod
    def _identity(self, queue: Any) -> QueueIdentity:
        """The identity and owner of an open queue."""

    @abstractmethod
    def _object_record(self) -> tuple[str, str]:
        """The queue as presence.record() notes it for `podipc clean`: (kind, name)."""

    @abstractmethod
    def _take_now(self) -> tuple[int, bytes] | None:
        """Take the next queue message without waiting: (tag, body), or None when there is none now."""

    @abstractmethod
    def _classify(self, mark: int, data: bytes) -> str:
        """DATA, END, GARBAGE, or a transport's own kind (skipped, not counted)."""

    def _queued(self) -> int:
        """Messages in the queue now; 0 once it is removed."""
        return queued_messages(self._queue, self._queue_errors)

    @abstractmethod
    def _destroy(self, queue: Any) -> None:
        """Remove `queue` (ours) if it is still the one at the name or key, and let go of it."""

    @abstractmethod
    def _close_queue(self, queue: Any) -> None:
        """Let go of `queue` without removing it (an adopted queue)."""

    def _receive_more(self, mark: int, data: bytes) -> bytes | None:
        """Go on after `_receive()` gave (`data`, `mark`) that was not data (mark -1: it gave nothing, or was
        interrupted): wait and receive until a data message, which it returns (hook).

        None leaves the rest to the checked path: closing, peer lost (`_state`), or a message that is not
        data, kept in `_taken` with `_fast` cleared. May raise `_queue_errors` (nothing taken).
        """
        if mark >= 0:
            self._taken = (mark, data)
            self._fast = False
        return None

    def _idle(self) -> None:
        """Called when an attempt found nothing: prepare readiness for the wait that may follow (hook)."""

    def _stop_helpers(self) -> None:
        """Stop what watches the queue for this side (hook), before the queue is removed or closed."""

    # --- opening -----------------------------------------------------------

    def _open(self, token: str) -> Any:
        """Check limits, take a queue (see the module docstring), then claim the consumer's presence."""
        capacity, self.max_message_size = self._limits()
        mode = int(self.settings["mode"])
        trust = Trust.for_mode(mode)
        if self.settings.get("pattern") == WORK_QUEUE:
            with consumers_lock(token, mode, trust) as lock:
                try:
                    return self._join_work_queue(token, capacity, mode, trust)
                except BaseException:
                    if not live_slot_paths(token, trust):
                        lock.remove()  # refused, and nobody else shares the queue: leave nothing behind
                    raise
        path = presence_path(token, "consumer")
        state = probe(path, trust)
        if state is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"another consumer is attached to {self.address.location}; a channel has one producer and one consumer "
                "(for many consumers sharing the queue, open every one with pattern=queue)"
            )
        left = self._left_by_dead_consumer(path, trust) if state is PeerState.GONE else None
        queue = self._open_queue(capacity, mode, trust, left)
        presence = None
        try:
            presence = Presence(
                token, "consumer", mode, handover_wait=float(self.settings["wait"]), channel=self.address.location
            )
            if not self.adopted:
                presence.record(*self._object_record())
                presence.declare(f"{QUEUE_WORD} {self._identity(queue).ident}")
            self._presence = presence
            self._watch_peer(presence)
        except BaseException:
            if presence is not None:
                presence.close()
            self._let_go(queue)
            raise
        return queue

    def _watch_peer(self, presence: Presence) -> None:
        """Have the peer-death monitor watch the producer (a fan-in consumer watches its producers' slots)."""
        self._peer = PeerTracker(presence)
        presence.watch(self._signal_peer_lost, self._peer)

    # --- the work queue (pattern=queue; podipc.work_queue) -------------------------

    def _join_work_queue(self, token: str, capacity: int, mode: int, trust: Trust) -> Any:
        """Create the work queue, or join the one live consumers of this channel declare, then claim a slot.

        Called under the channel's consumers lock, so creating, joining and removing never interleave.
        """
        if self.settings["adopt"]:
            raise AddressError("adopt=true and pattern=queue do not go together: a work queue is podipc's own")
        pair_path = presence_path(token, "consumer")
        pair_state = probe(pair_path, trust)
        if pair_state is PeerState.ALIVE:
            raise ChannelUnavailable(
                f"a pair consumer (pattern=pair) is attached to {self.address.location}: its queue has one "
                "consumer; open every consumer with pattern=queue to share it"
            )
        found_slots = slots(token, trust)
        live = [slot for slot in found_slots if slot.state is PeerState.ALIVE]
        dead = [slot for slot in found_slots if slot.state is PeerState.GONE]
        left = self._left_by_dead_consumer(pair_path, trust) if pair_state is PeerState.GONE else None
        queue = self._create_queue(capacity, mode)
        if queue is None:
            queue = self._shared_or_replaced(live, dead, left, capacity, mode)
        try:
            self._claim_slot(token, mode, found_slots, queue)
        except BaseException:
            if self._presence is None and not live:
                self._let_go(queue)  # ours alone: created or replaced here
            elif not self.adopted:
                self._stop_helpers()
                self._close_queue(queue)
            raise
        return queue

    def _shared_or_replaced(
        self, live: list[Slot], dead: list[Slot], left: tuple[int, int] | None, capacity: int, mode: int
    ) -> Any:
        """The existing queue: joined when a live slot declares it, replaced when only dead consumers' records
        prove it podipc's for this channel; else ChannelUnavailable."""
        found = self._inspect_existing()
        if found is None:
            queue = self._create_queue(capacity, mode)
            if queue is not None:
                return queue
            raise ChannelUnavailable(f"{self._queue_words()} keeps appearing and vanishing; is a consumer leaving?")
        record = " ".join(self._object_record())
        location = self.address.location

        def proves(slot: Slot) -> bool:
            return slot.proves(location, record) and (declared_queue(list(slot.lines)), slot.owner) == (
                found.ident,
                found.owner.uid,
            )

        if any(proves(slot) for slot in live):
            queue = self._adopt_queue(found)
            self.adopted = False  # shared: the last consumer to leave removes it
            return queue
        if any(proves(slot) for slot in dead) or (left is not None and (found.ident, found.owner.uid) == left):
            self._remove_found(found)
            queue = self._create_queue(capacity, mode)
            if queue is None:
                raise ChannelUnavailable(
                    f"{self._queue_words()} was created again while podipc replaced a dead consumer's queue"
                )
            self.recovered = True
            return queue
        raise ChannelUnavailable(
            f"{self._queue_words()} already exists ({found.owner.text()}) and no live work-queue consumer "
            f"(pattern=queue) of this channel declares it: podipc neither joins nor removes it (a pair consumer's "
            f"queue, or not podipc's): remove it (as its owner), use another name, or open with pattern=pair"
        )

    def _claim_slot(self, token: str, mode: int, found: list[Slot], queue: Any) -> None:
        """Claim the first slot not held by a live consumer (a dead one's is taken over), record the queue, watch."""
        free = [slot.number for slot in found if slot.state is not PeerState.ALIVE]
        if not free:
            raise ChannelUnavailable(
                f"{self.address.location} has {len(found)} live work-queue consumers already, the most it takes"
            )
        presence = Presence(
            token,
            "consumer",
            int(self.settings["mode"]),
            handover_wait=float(self.settings["wait"]),
            channel=self.address.location,
            slot=free[0],
        )
        try:
            presence.record(*self._object_record())
            presence.declare(f"{QUEUE_WORD} {self._identity(queue).ident}")
            presence.declare(WORK_QUEUE_WORD)
            self._peer = PeerTracker(presence)
            presence.watch(self._signal_peer_lost, self._peer)
        except BaseException:
            presence.close()
            raise
        self._presence = presence
        self.slot = free[0]

    def _leave_work_queue(self, queue: Any | None, presence: Presence) -> None:
        """Leave the slot; the last live consumer removes the queue (under the lock: never while one joins)."""
        token = self.address.token
        with consumers_lock(token, int(self.settings["mode"]), presence.trust) as lock:
            found = [slot for slot in slots(token, presence.trust) if slot.path != presence.path]
            others = [slot for slot in found if slot.state is PeerState.ALIVE]
            presence.leave(self._end_seen, lambda: False)
            if not others:
                lock.remove()
                if self._end_seen:  # the dead consumers' records: evidence of nothing once the queue goes
                    remove_dead_slots(found, presence.trust)
            if queue is None:
                return
            self._stop_helpers()
            if others:
                self._close_queue(queue)
            else:
                self._destroy(queue)

    def _left_by_dead_consumer(self, path: str, trust: Trust) -> tuple[int, int] | None:
        """(queue identity, owner uid) that a dead consumer of this channel recorded, None when nothing proves one."""
        fd = open_presence(path, trust)
        if fd is None:
            return None
        try:
            if lock_state(fd) is not PeerState.GONE:
                return None
            owner = os.fstat(fd).st_uid
            lines = os.pread(fd, RECORD_LIMIT_BYTES, 0).decode("utf-8", "replace").splitlines()
        finally:
            os.close(fd)
        kind, name = self._object_record()
        if f"{CHANNEL} {self.address.location}" not in lines or f"{kind} {name}" not in lines:
            return None
        ident = declared_queue(lines)
        return None if ident is None else (ident, owner)

    def _open_queue(self, capacity: int, mode: int, trust: Trust, left: tuple[int, int] | None) -> Any:
        """Create the queue; or replace a dead consumer's; or adopt one (adopt=true); else refuse."""
        queue = self._create_queue(capacity, mode)
        if queue is not None:
            return queue
        found = self._inspect_existing()
        if found is None:  # it went away meanwhile
            queue = self._create_queue(capacity, mode)
            if queue is not None:
                return queue
            found = self._inspect_existing()
            if found is None:
                raise ChannelUnavailable(
                    f"{self._queue_words()} keeps appearing and vanishing; is another consumer starting?"
                )
        if any(
            slot.state is not PeerState.ABSENT and slot.declares(WORK_QUEUE_WORD)
            for slot in slots(self.address.token, trust)
        ):
            raise ChannelUnavailable(
                f"{self._queue_words()} is a work queue (pattern=queue) that other consumers share: open this "
                "consumer with pattern=queue too"
            )
        if left is not None and (found.ident, found.owner.uid) == left:
            self._remove_found(found)
            queue = self._create_queue(capacity, mode)
            if queue is None:
                raise ChannelUnavailable(
                    f"{self._queue_words()} was created again while podipc replaced a dead consumer's queue; "
                    "is another consumer starting?"
                )
            self.recovered = True
            return queue
        if self.settings["adopt"]:
            check_queue(trust, self._queue_words(), found.owner)
            queue = self._adopt_queue(found)
            self.adopted = True
            return queue
        raise ChannelUnavailable(
            f"{self._queue_words()} already exists ({found.owner.text()}) and podipc cannot tell that it made it "
            f"for this channel, so it neither consumes from it nor removes it: remove it (as its owner; `podipc "
            f"clean` removes what a dead podipc consumer left), use another name, or, to consume a queue a plain "
            f"producer created, add adopt=true"
        )

    def _queue_words(self) -> str:
        """How errors name the channel's queue."""
        return f"the queue of {self.address.location}"

    def _let_go(self, queue: Any) -> None:
        """Remove a queue this side created, or close an adopted one."""
        self._stop_helpers()
        if self.adopted:
            self._close_queue(queue)
        else:
            self._destroy(queue)

    # --- receiving ---------------------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit, 0: try once now).

        Raises as Consumer.recv does. The common case (no timeout, data flowing) is one call of the
        queue's own receive under the call gate, without the base class's layers; waiting is the
        transport's (`_receive_more`); anything else takes the checked path.
        """
        if timeout is None and self._fast:
            token = self._token
            try:
                token.pop()
            except IndexError:
                pass  # another thread's call is inside: the checked path waits its turn
            else:
                try:
                    if not self._state:
                        try:
                            data, mark = self._receive()
                        except self._empty_errors:
                            data, mark = b"", -1
                        if mark == self._fast_mark:
                            return data  # type: ignore[no-any-return]
                        message = self._receive_more(mark, data)
                        if message is not None:
                            return message
                except self._queue_errors:
                    pass  # nothing was taken: the checked path translates
                finally:
                    token.append(None)
                    if self._state:
                        self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.recv(self, timeout)

    def _recv(self, deadline: float | None) -> bytes:
        if deadline is None and self._fast and not self._state:
            try:
                message = self._receive_more(-1, b"")
            except self._queue_errors:
                message = None  # nothing was taken: the checked path translates
            if message is not None:
                return message
        return Consumer._recv(self, deadline)

    def _try_recv(self) -> bytes | None:
        taken, self._taken = self._taken, None
        classify = self._classify
        while True:
            if taken is None:
                taken = self._take_now()
                if taken is None:
                    self._nothing_now()
                    return None
            mark, data = taken
            taken = None
            kind = classify(mark, data)
            if kind is DATA:
                self._peer_seen = True
                self._fast = True
                return data
            if kind is END:
                self._end_seen = True
                self._free_once()
                raise EndOfStream(f"{self.address.location}: the producer ended the stream")
            if kind is GARBAGE:
                self.skipped += 1

    def _nothing_now(self) -> None:
        """The queue is empty now: PeerGone once the producer is lost; note a producer that appeared."""
        if self._peer_lost:
            # a clean producer puts the end marker in before it leaves, so an empty queue means it died
            gone = PeerGone(
                f"the producer of {self.address.location} is gone (it died or closed without ending the stream)"
            )
            raise gone if self._presence is None else self._presence.lost_error(gone)
        if not self._peer_seen:
            self._look_for_producer()
        self._fast = False
        self._idle()

    def _look_for_producer(self) -> None:
        """Set `_peer_seen` once the producer's presence is alive (probed at most every PEER_PROBE_SECONDS)."""
        presence = self._presence
        assert presence is not None
        now = time.monotonic()
        if presence.peer_seen or (now >= self._next_peer_probe and presence.peer_state() is PeerState.ALIVE):
            self._peer_seen = True
        self._next_peer_probe = now + PEER_PROBE_SECONDS

    # --- closing -----------------------------------------------------------

    def _free(self) -> None:
        """Remove the queue (unless adopted) and leave: cleanly after the end of stream."""
        self._fast = False
        presence = self._presence
        if presence is not None:
            presence.unwatch()
        queue, self._queue = self._queue, None
        if self.slot and presence is not None:
            self._leave_work_queue(queue, presence)
            return
        if queue is not None:
            self._let_go(queue)
        if presence is not None:
            presence.leave(self._end_seen, lambda: False)
