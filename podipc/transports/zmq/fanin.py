"""Fan-in over zmq+ipc:// and zmq+tcp:// (`pattern=fanin`): DEALER producers into one ROUTER consumer.

The consumer API is the stream and queue fan-ins' (podipc.fanin, podipc.queue_fanin):
`recv_from()`, `last_sender`, `senders` / `summary()`, NameTaken for a name a live producer
holds, `producers=N` ending the stream after N clean ends. A PAIR socket takes one peer;
ROUTER takes many and can answer each one, so every producer's end of stream is acknowledged
to it alone and its close() still means "delivered".

Slots: a producer claims a producer slot as a queue fan-in's does
(podipc.queue_fanin.claim_producer_slot: a presence file declaring `fanin`, `name NAME` and
`claim ID`, ID random), and sets its ZMQ_ROUTING_ID to `K.ID` (K its slot). The consumer's
presence file declares `fanin`: a pair side meeting a fan-in side is ChannelUnavailable.

Wire (docs/wire/zmq.md, "Fan-in"): as a pair's, seen through ROUTER: every message arrives
after its sender's routing id. A producer's first message is the start of stream; the
consumer attaches the routing id `K.ID` only if slot K's live file declares claim ID, so no
peer can pose as another producer (nor guess an ID: the slot file is mode 0600/0660), and
takes the name from that file. Messages of a routing id not attached are skipped and counted
in `skipped`. The end of stream is answered with the ack to that routing id alone.

Death: libzmq 4.3 without the draft API does not say which peer left, so the peer-death
monitor probes every attached producer's slot file (podipc.queue_fanin.SendersTracker). A
dead producer's messages may still be on their way; it is reported died once (1) the ROUTER's
socket monitor reported the disconnect of its connection (ZMQ_SRCFD of its start of stream names
the connection; libzmq has queued all of a connection's messages before it reports its
disconnect) and (2) a receive found nothing queued: everything it sent was handed out first.

Cost: a data message is two frames at the consumer (routing id, payload), each taken with one
recv (RCVTIMEO 0, no flags), then one dict lookup and a comparison with b"podipc", inline in
recv() and recv_from(); payloads are counted and hashed per sender every SETTLE_EVERY messages.
The more-flag is asked only of a frame equal to b"podipc" and of messages from unknown routing
ids (see RECEIVING_FRAMES). Measured (pyzmq 27, libzmq 4.3.5, 64 B, messages already queued):
recv() takes ~0.6 us of CPU, where a pair's takes ~0.3 and bare pyzmq ROUTER recv()+recv() ~0.45;
end to end the producers' sends bound it (fanin-zmq+ipc-1 ~0.9x zmq+ipc in `podipc bench`).
Threads: as every consumer (one call gate); `_taken` carries what a hot path took over to the
checked path (`_try_recv`), and no hot path runs until it is handled.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from typing import Any, ClassVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import AddressError, ChannelClosed, EndOfStream, PodIPCError
from podipc.fanin import DIED, ENDED
from podipc.options import deadline_after
from podipc.ownership import Trust
from podipc.presence import Presence, remove_if_gone
from podipc.queue import FANIN_WORD
from podipc.queue_fanin import (
    MAX_PRODUCERS,
    SETTLE_EVERY,
    SendersTracker,
    SlotSender,
    SlotSenderRoster,
    claim_producer_slot,
    holder_identity,
    producer_slot_path,
)
from podipc.stream_producer import default_producer_name
from podipc.transports.zmq.endpoints import (
    CONTROL_PREFIX,
    END_OF_STREAM,
    END_OF_STREAM_ACK,
    START_OF_STREAM,
    ZMQConsumer,
    ZMQProducer,
    _translate,
)
from podipc.work_queue import consumers_lock

DYING_RECHECK_SECONDS = 0.02
"""How often a consumer re-checks a producer the monitor found dead until its disconnect is reported."""
_NOBLOCK = zmq.NOBLOCK
_RCVMORE = zmq.RCVMORE
_SRCFD = zmq.SRCFD


def routing_id(slot: int, claim: str) -> bytes:
    """The ZMQ_ROUTING_ID of the producer holding slot `slot` with `claim`: b'K.ID'."""
    return f"{slot}.{claim}".encode()


def parse_routing_id(identity: bytes) -> tuple[int, str] | None:
    """(slot, claim) of a routing id b'K.ID', or None when it is not one."""
    slot, dot, claim = identity.decode("ascii", "replace").partition(".")
    if not dot or not slot.isdigit() or not 1 <= int(slot) <= MAX_PRODUCERS or not claim.isalnum():
        return None
    return int(slot), claim


class ZMQFanInProducer(ZMQProducer):
    """A named fan-in producer: claims a producer slot and connects a DEALER whose routing id names it."""

    _socket_type: ClassVar[int] = zmq.DEALER
    _fanin: ClassVar[bool] = True
    slot: int = 0
    """Its producer slot (1..MAX_PRODUCERS)."""
    producer_name: str = ""
    """Its name at the consumer."""

    def _claim_presence(self, address: Address, settings: Mapping[str, Any], role: str) -> Presence:
        """Claim the first free producer slot under the channel's lock; NameTaken when a live producer has the name."""
        if settings.get("producers"):
            raise AddressError("producers= is the fan-in consumer's option; a producer takes name=")
        self.producer_name = str(settings.get("name") or "") or default_producer_name()
        self._claim = secrets.token_hex(8)
        mode = int(settings["mode"])
        trust = Trust.for_mode(mode)
        with consumers_lock(address.token, mode, trust) as lock:
            try:
                presence, self.slot = claim_producer_slot(
                    address.token, mode, trust, address.location, self.producer_name, self._claim
                )
            finally:
                lock.remove()  # nobody needs it between claims: leave nothing behind
        return presence

    def _open_socket(self, address: Address, settings: Mapping[str, Any], role: str) -> None:
        super()._open_socket(address, settings, role)
        try:
            self._sock.setsockopt(zmq.ROUTING_ID, routing_id(self.slot, self._claim))
        except BaseException:
            self._free_at_open()
            raise


class _Sender(SlotSender):
    """An attached producer: a slot sender with its routing id and the descriptor of its connection."""

    __slots__ = ("fd", "identity")

    def __init__(self, name: str, slot: int, claim: str, identity: bytes, fd: int) -> None:
        super().__init__(name, slot, claim)
        self.identity = identity
        self.fd = fd


class ZMQFanInConsumer(SlotSenderRoster, ZMQConsumer):
    """Binds a ROUTER socket and hands out the messages of many named DEALER producers (pattern=fanin)."""

    _socket_type: ClassVar[int] = zmq.ROUTER
    _fanin: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        if settings.get("name"):
            self._closed = self._freed = True  # nothing to free; no unclosed warning
            raise AddressError("name= names a fan-in producer; the consumer takes pattern=fanin and producers=")
        self._limit = int(settings.get("producers") or 0)
        self._senders: list[_Sender] = []
        """Every producer that attached, in order of arrival (the finished ones too)."""
        self._by_id: dict[bytes, _Sender] = {}
        """The routing id of every attached producer -> its sender: the hot path's one lookup."""
        self._by_slot: dict[int, _Sender] = {}
        self._ended_cleanly = 0
        self._last: _Sender | None = None
        self._dying: list[tuple[int, str]] = []
        """Producers the monitor found dead, not reported yet: (slot, claim); appended on the monitor thread."""
        self._disconnected: set[int] = set()
        """Descriptors of connections the ROUTER's socket monitor reported closed."""
        self._disconnects: zmq.Socket[bytes] | None = None
        self._tracker: SendersTracker | None = None
        self._taken: tuple[_Sender | None, bytes] | None = None
        """What a hot path took and left for _try_recv: (sender, its payload frame b"podipc"), or (None,
        routing id) of a producer not attached (the rest of its message is next); no hot path runs meanwhile."""
        super().__init__(address, settings)
        self._recv_frame = self._sock.recv
        self._more = self._sock.get

    def _claim_presence(self, address: Address, settings: Mapping[str, Any], role: str) -> Presence:
        """The consumer's presence file, declaring FANIN_WORD from its first moment (a producer reads it then)."""
        return Presence(
            address.token,
            role,
            settings["mode"],
            handover_wait=float(settings["wait"]),
            channel=address.location,
            declarations=(FANIN_WORD,),
        )

    def _watch_peers(self) -> None:
        presence = self._presence
        self._disconnects = self._disconnect_monitor()
        self._tracker = SendersTracker(presence, self.address.token, self._died, self._nothing)
        presence.watch(self._nothing, self._tracker)

    def _disconnect_monitor(self) -> zmq.Socket[bytes]:
        """The ROUTER's socket monitor (EVENT_DISCONNECTED), unbounded: libzmq drops events a full monitor refuses."""
        address = f"inproc://podipc-fanin-monitor-{secrets.token_hex(8)}"
        self._sock.monitor(address, zmq.EVENT_DISCONNECTED)
        monitor = self._context.socket(zmq.PAIR)
        try:
            monitor.setsockopt(zmq.RCVHWM, 0)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(address)
        except BaseException:
            monitor.close(linger=0)
            raise
        return monitor

    def _nothing(self) -> None:
        """Nothing: a fan-in consumer has no one peer to lose (the tracker reports each producer's death)."""

    def _died(self, slot: int, claim: str) -> None:
        """The monitor found producer `slot` (`claim`) dead (monitor thread): the receiver reports it (`_report_dead`)."""
        self._dying.append((slot, claim))
        self._wake()

    # --- receiving ---------------------------------------------------------

    @holds_call_gate
    def recv_from(self, timeout: float | None = None) -> tuple[str, bytes]:
        """Receive the next message and the name of the producer that sent it; `timeout` as in recv().

        Raises as recv() does (EndOfStream once `producers` producers ended their streams).
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if not self._state and self._taken is None:
                try:  # the hot path of _try_recv, inline (see recv)
                    identity = self._recv_frame()
                    sender = self._by_id.get(identity)
                    if sender is not None:
                        data = self._recv_frame()
                        if data != CONTROL_PREFIX:
                            pending = sender.pending
                            pending.append(data)
                            if len(pending) >= SETTLE_EVERY:
                                sender.settle()
                            self._last = sender
                            return sender.name, data
                        self._taken = (sender, data)
                    else:
                        self._taken = (None, identity)
                except zmq.Again:
                    pass
                except zmq.ZMQError as exc:
                    raise _translate(exc, self._what) from exc
                message = self._try_recv()
            else:
                message = self._take_state()
            if message is None:
                message = Consumer._recv(self, None if timeout is None else deadline_after(timeout))
            return self.last_sender or "", message
        except EndOfStream:
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message of any producer; `timeout` and what it raises as Consumer.recv.

        recv_from() with its hot path repeated: a call less costs 0.1 us of the ~0.5 us a message costs.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True
            return self.recv_from(timeout)[1]
        try:
            if not self._state and self._taken is None:
                identity = self._recv_frame()
                sender = self._by_id.get(identity)
                if sender is not None:
                    data = self._recv_frame()
                    if data != CONTROL_PREFIX:
                        pending = sender.pending
                        pending.append(data)
                        if len(pending) >= SETTLE_EVERY:
                            sender.settle()
                        self._last = sender
                        return data
                    self._taken = (sender, data)
                else:
                    self._taken = (None, identity)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return self.recv_from(timeout)[1]

    def _recv(self, deadline: float | None) -> bytes:
        return Consumer._recv(self, deadline)

    def _try_recv(self) -> bytes | None:
        recv_frame = self._recv_frame
        by_id = self._by_id
        try:
            taken, self._taken = self._taken, None
            while True:
                if taken is None:
                    identity = recv_frame()  # RCVTIMEO 0: never blocks
                    sender = by_id.get(identity)
                    if sender is None:
                        self._unknown(identity)
                        continue
                    data = recv_frame()  # the rest of a message is there with its first frame
                else:
                    (sender, data), taken = taken, None
                    if sender is None:  # the routing id (data) of a producer not attached: its frames are next
                        self._unknown(data)
                        continue
                if data == CONTROL_PREFIX and self._more(_RCVMORE):
                    self._control_of(sender)
                    continue
                pending = sender.pending
                pending.append(data)
                if len(pending) >= SETTLE_EVERY:
                    sender.settle()
                self._last = sender
                return data
        except zmq.Again:
            self._nothing_queued()
            return None
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc

    def _retry_hint(self) -> float | None:
        if self._dying:
            return DYING_RECHECK_SECONDS
        return super()._retry_hint()

    def _rest(self) -> list[zmq.Frame]:
        """The remaining frames of the message being received."""
        frames = []
        while self._more(_RCVMORE):
            frames.append(self._sock.recv(_NOBLOCK, copy=False))
        return frames

    def _unknown(self, identity: bytes) -> None:
        """A message from a routing id not attached: a producer's start of stream (attach it), else skipped."""
        frames = self._rest()
        if tuple(frame.bytes for frame in frames) == START_OF_STREAM and self._attach_sender(
            identity, int(frames[0].get(_SRCFD))
        ):
            return
        self.skipped += 1

    def _attach_sender(self, identity: bytes, fd: int) -> bool:
        """Attach the producer of routing id `identity` if its slot's file declares its claim; False if not.

        A producer dead already (its file left, unlocked) is attached too, and reported died after
        what it sent (a forger cannot know its claim either).
        """
        parsed = parse_routing_id(identity)
        if parsed is None:
            return False
        slot, claim = parsed
        held = holder_identity(self.address.token, self._presence.trust, slot, claim)
        if held is None:
            return False
        file_identity, name, alive = held
        if alive:
            self._take_disconnects()  # a reused descriptor's earlier disconnect is not this live connection's
            self._disconnected.discard(fd)
        previous = self._by_slot.get(slot)
        if previous is not None:
            self._finish(previous, f"PeerGone: producer {previous.name!r} died (a new producer took its slot {slot})")
        sender = _Sender(name, slot, claim, identity, fd)
        self._senders.append(sender)
        self._by_slot[slot] = sender
        self._by_id[identity] = sender
        self._peer_seen = True
        tracker = self._tracker
        assert tracker is not None
        if alive:
            tracker.watched = {**tracker.watched, slot: (file_identity, claim)}
        else:
            self._dying.append((slot, claim))
        return True

    def _control_of(self, sender: _Sender) -> None:
        """A control message of an attached producer: its end of stream (acknowledge it), else skipped."""
        frames = (CONTROL_PREFIX, *(frame.bytes for frame in self._rest()))
        if frames != END_OF_STREAM:
            self.skipped += 1
            return
        with contextlib.suppress(zmq.ZMQError):  # a producer gone already waits for nothing
            self._sock.send_multipart((sender.identity, *END_OF_STREAM_ACK), _NOBLOCK)
        self._finish(sender, None)

    def _finish(self, sender: _Sender, error: str | None) -> None:
        """A producer ended its stream (error None) or died (error: why); the others go on."""
        sender.settle()
        del self._by_slot[sender.slot]
        del self._by_id[sender.identity]
        tracker = self._tracker
        if tracker is not None and sender.slot in tracker.watched:
            tracker.watched = {key: value for key, value in tracker.watched.items() if key != sender.slot}
        if error is None:
            sender.ended = ENDED
            self._ended_cleanly += 1
        else:
            sender.ended = DIED
            sender.error = error
            remove_if_gone(producer_slot_path(self.address.token, sender.slot), self._presence.trust)

    def _take_disconnects(self) -> None:
        """Take the ROUTER socket monitor's disconnect events: the descriptors of closed connections."""
        monitor = self._disconnects
        if monitor is None:
            return
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(_NOBLOCK))
            except zmq.Again:
                return
            self._disconnected.add(int(event["value"]))

    def _nothing_queued(self) -> None:
        """Nothing queued now: report dead producers whose connection closed; the stream ends at `producers`."""
        self._take_disconnects()  # also keeps the monitor's queue short
        if self._dying:
            self._report_dead()
        if self._limit and self._ended_cleanly >= self._limit and not self._by_id and not self._dying:
            self._end_received = True
            self._free_once()
            raise EndOfStream(f"{self._what}: all {self._limit} producers ended their streams")
        self._nothing_now()

    def _report_dead(self) -> None:
        """Record as died each dying producer whose connection libzmq reported closed (all it sent was taken)."""
        self._take_disconnects()
        for slot, claim in list(self._dying):
            sender = self._by_slot.get(slot)
            if sender is None or sender.claim != claim:
                self._dying.remove((slot, claim))  # it ended (or was replaced) meanwhile
            elif sender.fd in self._disconnected:
                self._disconnected.discard(sender.fd)
                self._dying.remove((slot, claim))
                self._finish(sender, f"PeerGone: producer {sender.name!r} died (its slot {slot} was lost)")

    def _nothing_now(self) -> None:
        """A fan-in consumer loses no one peer: nothing to raise while nothing is queued."""
        self._peer_seen = self._peer_seen or bool(self._senders)

    def _free(self) -> None:
        for sender in self._senders:
            sender.settle()
        monitor, self._disconnects = self._disconnects, None
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            monitor.close(linger=0)
        super()._free()
