"""ShmProducer and ShmConsumer: the life of each side around the ring (see the package docstring).

Both implement the endpoint contract of podipc.endpoint. The producer claims its presence
at open and attaches on its first attempt to send (or close): when the consumer's
presence is alive and its segment is there, it maps it, checks it and becomes a
RingWriter's owner. The consumer creates the segment at open, reads it through a
RingReader, and removes what it created at the end of stream or when it is freed.

The hot paths: send() and recv() take the call gate's token inline and, unless the
endpoint's state is set, write the record themselves (RingWriter's fast case) or go
straight to RingReader.take; their blocking waits spin (`_interrupt()` raises the
waiter's alert), then poll the side's FIFO with the endpoint's waker. The non-blocking
hooks (_try_send, _try_recv, _try_close) arm the side's FIFO when they find no room or no
message, and `_readiness()` names that FIFO, so podipc.aio, podipc.wait and selectors
wait on a descriptor without a thread.

Liveness comes from the process's peer monitor (presence.watch): a lost peer, or a
segment found truncated, sets the endpoint's state and wakes it; the next call decides
(a consumer first takes what is in the ring, then raises PeerGone).

Why one module of ~730 lines: the producer and consumer are two halves of one ring
protocol (head and tail, wake-ups, loan and commit), sharing `_RingSide`; the ring
itself already lives in ring.py, layout.py and options.py beside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PodIPCError,
)
from podipc.options import Option, deadline_after, remaining
from podipc.ownership import Trust
from podipc.presence import PeerState, PeerTracker, Presence, remove_if_gone
from podipc.producing import Producer
from podipc.transports.shm.fence import WEAK_MEMORY_ORDER, full_fence
from podipc.transports.shm.layout import (
    CONSUMER_WAITING_WORD,
    PRODUCER_WAITING_WORD,
    READ_INDEX_WORD,
    WRITE_INDEX_WORD,
)
from podipc.transports.shm.options import (
    MAX_MESSAGE_FIX,
    MAX_MESSAGE_SOURCE,
    OPTIONS,
    ring_geometry,
    ring_limit_source,
)
from podipc.transports.shm.ring import RingReader, RingWriter
from podipc.transports.shm.segment import (
    FIFO_KIND,
    Segment,
    availability_for,
    check_name,
    fifo_paths,
    segment_path,
    semaphore_names,
)
from podipc.transports.shm.waiter import Waiter
from podipc.waking import POLLIN

ATTACH_RETRY_SECONDS = 0.02
"""How often a producer that waits for its consumer's ring looks again."""


class UniformBatch(list):  # type: ignore[type-arg]
    """A send_many batch of flat byte buffers all `size` bytes long, and `joined`: them back to back."""

    size: int = -1
    joined: memoryview


class _RingTracker(PeerTracker):
    """The peer monitor's view of one side: the peer lost, or the segment truncated under this side."""

    def __init__(self, presence: Presence, segment: Segment) -> None:
        self._segment = segment
        super().__init__(presence)

    def lost(self) -> bool:
        """True when the segment shrank (checked every monitor round) or the peer is lost."""
        return self._segment.truncated() or super().lost()


class _RingSide:
    """What both sides of a ring share: their options, the wait policy, where the size limit comes from."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = MAX_MESSAGE_SOURCE
    max_message_fix = MAX_MESSAGE_FIX
    max_message_size: int
    spin_seconds: float
    """Seconds to poll an empty (or full) ring before sleeping."""
    path: str
    """The segment's file."""
    _waiter: Waiter | None
    _segment: Segment | None

    def _take_options(self, address: Address, settings: Mapping[str, Any]) -> int:
        """Check the name and the geometry, keep what the side needs; the ring's capacity in bytes."""
        check_name(address)
        if settings["pattern"] == "pair" and (settings["subscribers"] is not None or settings["slow"] != "wait"):
            raise AddressError(f"{address.location}: subscribers= and slow= apply to pattern=broadcast only")
        capacity, self.max_message_size = ring_geometry(settings, address.location)
        self.spin_seconds = float(settings["spin"])
        self.path = segment_path(address.name)
        self._waiter = None
        self._segment = None
        return capacity

    def _opened(self) -> None:
        """Count the `wait` option from now, when opening (claims, the ring's creation) is done."""
        endpoint: Any = self
        endpoint.opened_at = time.monotonic()
        endpoint.wait_deadline = endpoint.opened_at + float(endpoint.settings["wait"])

    def _interrupt(self) -> None:
        """Wake this side's blocked call (the endpoint contract's hook), both sides alike."""
        waiter = self._waiter
        if waiter is not None:
            waiter.interrupt()  # a spinning wait
            waiter.wake_self()  # a selector on fileno() (a poll wakes on the waker too); the next attempt says why

    def _check_segment(self) -> None:
        """ProtocolError when the segment was truncated (the monitor may have said so)."""
        segment = self._segment
        if segment is not None:
            segment.check_size()


class ShmProducer(_RingSide, Producer):
    """Writes messages into the consumer's ring; attaches on the first send (or close)."""

    def __new__(cls, address: Address, settings: Mapping[str, Any]) -> Any:
        """A BroadcastProducer for pattern=broadcast (podipc.transports.shm.broadcast), else this pair side."""
        if cls is ShmProducer and settings.get("pattern") == "broadcast":
            from podipc.transports.shm.broadcast import BroadcastProducer

            return BroadcastProducer(address, settings)
        return super().__new__(cls)

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        try:
            self._take_options(address, self.settings)
        except BaseException:
            self._closed = self._freed = True
            raise
        mode = int(self.settings["mode"])
        self._trust = Trust.for_mode(mode)
        self._writer: RingWriter | None = None
        """Set once attached; None again once freed. Non-None with `_state` clear: the fast path may write."""
        self._stream_taken = False
        try:
            self._presence = Presence(address.token, "producer", mode, handover_wait=float(self.settings["wait"]))
        except BaseException:
            self._closed = self._freed = True
            raise
        self._opened()

    @property
    def consumer_left(self) -> bool:
        """True once the consumer closed its ring (its flag in the ring's header; False before attaching)."""
        writer = self._writer
        return writer is not None and writer.consumer_closed()

    # --- sending ------------------------------------------------------------------

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit, 0: try once now).

        Raises:
            MessageTooLarge: above the ring's max message size (learnt on attach), before anything is sent.
            Timeout: no room within `timeout` (nothing of the message was sent).
            PeerTimeout: no consumer appeared within the `wait` option (counted from open).
            PeerGone: the consumer died, closed, or its ring was replaced.
            ProtocolError: the consumer's ring breaks the layout, or was truncated.
            ChannelClosed: the producer was closed (also while this call waited), or inherited across fork().
            RuntimeError: a loan is not committed yet.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            writer = self._writer
            kind = type(data)
            if kind is bytes or kind is bytearray:
                length = len(data)
            elif kind is memoryview and data.c_contiguous:  # type: ignore[union-attr]
                length = data.nbytes  # type: ignore[union-attr]
            else:
                length = -1
            if self._state or writer is None or length < 0:
                self._send_slowly(data, timeout)
                return
            if length > self.max_message_size:
                raise self._too_large(length)
            # RingWriter's fast case, inline: one more call here would cost as much as the call gate does
            capacity = writer._capacity
            write_index = writer._write_index
            position = write_index % capacity
            size = 8 + ((length + 7) & -8)
            if position + size > capacity or write_index + size > writer._write_limit:
                writer.write_until(data, length, None if timeout is None else deadline_after(timeout))
                return
            words = writer._words
            offset = 256 + position  # HEADER_SIZE
            words[offset >> 3] = length
            writer._map[offset + 8 : offset + 8 + length] = data
            write_index += size
            if WEAK_MEMORY_ORDER:
                full_fence()
            words[8] = write_index  # WRITE_INDEX_WORD
            writer._write_index = write_index
            if words[10]:  # CONSUMER_WAITING_WORD
                writer._waiter.wake_peer()
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _send_slowly(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        if self._state:
            self._check_state()
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._send(view, deadline_after(timeout))

    def _send(self, view: memoryview, deadline: float | None) -> None:
        writer = self._writer or self._attach(deadline)
        if view.nbytes > self.max_message_size:
            raise self._too_large(view.nbytes)
        writer.write_until(view, view.nbytes, deadline)

    def _checked_view(self, data: bytes | bytearray | memoryview) -> memoryview:
        """A flat view; the size is checked once attached (the limit is the ring's)."""
        if self._writer is not None:
            return Producer._checked_view(self, data)
        view = data if type(data) is memoryview else memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")

    def _try_send(self, view: memoryview) -> bool:
        writer = self._writer or self._try_attach()
        if writer is None:
            return False
        if self._state:
            self._check_state()
        if view.nbytes > self.max_message_size:
            raise self._too_large(view.nbytes)
        waiter = self._waiter
        if waiter is not None and waiter.armed:  # a wake-up: the segment may have changed while we waited
            self._check_segment()
            waiter.disarm()
        return writer.try_write(view, view.nbytes)

    def _try_send_many(self, views: Sequence[memoryview], start: int) -> int:
        writer = self._writer or self._try_attach()
        if writer is None:
            return start
        if self._state:
            self._check_state()
        uniform, joined = (views.size, views.joined) if type(views) is UniformBatch else (-1, None)
        if start == 0:
            # the ring's limit is known only once attached: check the whole batch before its first message goes
            largest = uniform if uniform >= 0 else max((view.nbytes for view in views), default=0)
            if largest > self.max_message_size:
                raise self._too_large(largest)
        waiter = self._waiter
        if waiter is not None and waiter.armed:  # a wake-up: the segment may have changed while we waited
            self._check_segment()
            waiter.disarm()
        return writer.try_write_many(views, start, uniform, joined)

    def _batch_views(self, messages: Iterable[bytes | bytearray | memoryview]) -> Sequence[memoryview]:
        """A list of two or more messages of one size in bytes becomes a UniformBatch, joined once.

        The ring writer sends it in pack records (one header and one copy for many messages)
        when the consumer takes them. The join is also the check: the messages are flat bytes
        (len() is their size) exactly when the joined length is count * size. Anything else
        is made views one by one.
        """
        if type(messages) is list and len(messages) > 1:
            try:
                sizes = set(map(len, messages))
                joined = b"".join(messages) if len(sizes) == 1 else b""
            except (TypeError, BufferError):
                sizes = set()  # not all sized byte buffers: the checked path says why
                joined = b""
            if len(sizes) == 1:
                size = sizes.pop()
                if len(joined) == size * len(messages):
                    if size > self.max_message_size:
                        raise self._too_large(size)
                    batch = UniformBatch(messages)
                    batch.size = size
                    batch.joined = memoryview(joined)
                    return batch
        return super()._batch_views(messages)

    def _check_state(self) -> None:
        """The slow path of the state check: closed or forked, the ring truncated, the consumer lost."""
        self._check_usable()
        if self._peer_lost:
            self._check_segment()
            raise self._consumer_gone()

    def _too_large(self, size: int) -> MessageTooLarge:
        return MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)

    def _consumer_gone(self) -> PeerGone | ChannelUnavailable:
        writer = self._writer
        if writer is not None and writer.consumer_closed():
            return PeerGone(f"the consumer of {self.address.location} closed the channel")
        return self._presence.lost_error(
            PeerGone(
                f"the consumer of {self.address.location} is gone (it died or closed without reading the end of stream)"
            )
        )

    # --- zero copy ----------------------------------------------------------------

    @holds_call_gate
    def loan(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable view of `size` bytes inside the ring; fill it, then commit(). Zero-copy send.

        Waits at most `timeout` seconds for room (and for the consumer on first use). The
        view is valid until commit(). Raises what send() raises, and RuntimeError while the
        previous loan is not committed.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            writer = self._writer
            if self._state or writer is None or not 0 <= size <= self.max_message_size:
                return self._loan_slowly(size, timeout)
            return writer.loan(size, timeout)
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _loan_slowly(self, size: int, timeout: float | None) -> memoryview:
        if self._state:
            self._check_state()
        if size < 0:
            raise ValueError(f"a loan holds 0 bytes or more, not {size}")
        deadline = deadline_after(timeout)
        writer = self._writer or self._attach(deadline)
        if size > self.max_message_size:
            raise self._too_large(size)
        return writer.loan(size, remaining(deadline))

    @holds_call_gate
    def commit(self, length: int | None = None) -> None:
        """Send the loaned buffer as one message of `length` bytes (default: all it holds).

        Raises RuntimeError when nothing is loaned, ValueError for a length beyond the loan,
        ChannelClosed once closed (the loan was dropped).
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(None)
        try:
            if self._state:
                self._check_state()
            writer = self._writer
            if writer is None:
                raise RuntimeError("nothing is loaned; call loan(size) first")
            writer.commit(length)
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    # --- attaching ----------------------------------------------------------------

    def _attach(self, deadline: float | None) -> RingWriter:
        """Wait (until `deadline`, or the `wait` deadline: PeerTimeout) for the consumer's ring; the writer."""
        while True:
            writer = self._try_attach()
            if writer is not None:
                return writer
            self._await_readiness(deadline)

    def _try_attach(self) -> RingWriter | None:
        """Attach now if the consumer lives and its ring is there (checked); else None."""
        presence = self._presence
        if presence.peer_state() is not PeerState.ALIVE:
            return None
        found = Segment.try_attach(self.address, self._trust)
        if found is None:
            return None
        segment, header = found
        try:
            words = segment.mapping.words
            waiter = Waiter(
                words,
                READ_INDEX_WORD,
                PRODUCER_WAITING_WORD,
                segment.space_fifo,
                CONSUMER_WAITING_WORD,
                segment.data,
                segment.data_fifo,
                self.spin_seconds,
                self._ring_check,
                segment.check_size,
                self._waker_fd,
            )
            writer = RingWriter(segment, header, waiter, self._wait_for_index)
            presence.watch(self._signal_peer_lost, _RingTracker(presence, segment))
        except BaseException:
            presence.unwatch()
            segment.close()
            raise
        self._segment = segment
        self._waiter = waiter
        self.max_message_size = header.max_message_size
        self.max_message_source = ring_limit_source(self.address.location)
        self._peer_seen = True
        self._writer = writer
        self._readiness_changed()
        return writer

    def _wait_for_index(self, low: int, high: int, deadline: float | None) -> int:
        """The consumer's read index once outside [low, high): the wait of the blocking path (see WaitFor)."""
        wait = self._waiter.wait  # type: ignore[union-attr]
        while True:
            if deadline is None and self._peer_seen:  # the common case, without the deadline arithmetic
                value = wait(low, high, None)
            else:
                seconds = self._seconds_to_wait(deadline)
                value = wait(low, high, None if seconds is None else time.monotonic() + seconds)
            if value is not None:
                return value

    def _ring_check(self) -> PodIPCError | None:
        """For the waiter: ChannelClosed at once when closing; PeerGone if the consumer is lost or left."""
        if self._closing or self._forked:
            raise self._closed_error()
        writer = self._writer
        if self._peer_lost or (writer is not None and writer.consumer_closed()):
            self._check_segment()
            return self._consumer_gone()
        return None

    # --- the endpoint contract ----------------------------------------------------

    def _try_prepare(self) -> bool:
        return (self._writer or self._try_attach()) is not None

    def _readiness(self) -> tuple[int, int, float | None]:
        writer, waiter = self._writer, self._waiter
        if writer is None or waiter is None:
            return -1, 0, ATTACH_RETRY_SECONDS
        if self._peer_lost:
            return -1, 0, 0.0  # the next attempt says what happened (and touches nothing of a truncated ring)
        if waiter.fifo is None:  # a ring made without FIFOs (a plain consumer): look again now and then
            return -1, 0, waiter.retry_after()
        if writer.arm() is not None:
            waiter.wake_self()
        return waiter.fifo.fd, POLLIN, waiter.retry_after()

    def _try_close(self) -> bool:
        writer = self._writer or self._try_attach()
        if writer is None:
            return False
        if self._peer_lost:
            self._check_segment()
        if not writer.ended:
            if self._peer_lost or writer.consumer_closed():
                raise self._consumer_gone()
            self._presence.declare_ending()
            if not writer.try_end():
                return False
        if writer.drained():
            self._stream_taken = True
            return True
        if self._peer_lost or writer.consumer_closed():
            raise self._consumer_gone()
        return False

    def _signal_peer_lost(self) -> None:
        Producer._signal_peer_lost(self)
        self._interrupt()

    def _free(self) -> None:
        presence = self._presence
        presence.unwatch()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.drop_loan()
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        # an abort leaves our presence file GONE, so the consumer learns we left without ending the stream;
        # the consumer's file is never ours to remove (it records the ring a dead consumer left)
        presence.leave(self._stream_taken, lambda: True)

    def _drop_inherited(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.drop_loan()
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        self._freed = True


class ShmConsumer(_RingSide, Consumer):
    """Creates the ring and reads it; recv_view() hands out messages without copying."""

    def __new__(cls, address: Address, settings: Mapping[str, Any]) -> Any:
        """A BroadcastSubscriber for pattern=broadcast (podipc.transports.shm.broadcast), else this pair side."""
        if cls is ShmConsumer and settings.get("pattern") == "broadcast":
            from podipc.transports.shm.broadcast import BroadcastSubscriber

            return BroadcastSubscriber(address, settings)
        return super().__new__(cls)

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        try:
            capacity = self._take_options(address, self.settings)
        except BaseException:
            self._closed = self._freed = True
            raise
        self.mode = int(self.settings["mode"])
        self._trust = Trust.for_mode(self.mode)
        self._reader: RingReader | None = None
        """Set while the ring is there to read; None once freed."""
        self._presence: Presence | None = None
        problem = availability_for(capacity)
        if problem:
            self._closed = self._freed = True
            raise ChannelUnavailable(f"{address.location}: {problem}")
        try:
            self._open_ring(capacity)
        except BaseException:
            self._free()
            self._closed = self._freed = True
            raise
        self._opened()

    def _open_ring(self, capacity: int) -> None:
        address = self.address
        presence = self._presence = Presence(
            address.token, "consumer", self.mode, handover_wait=float(self.settings["wait"]), channel=address.location
        )
        presence.record("posix_shm", "/" + address.name)
        for semaphore_name in semaphore_names(address.name):
            presence.record("posix_sem", semaphore_name)
        for fifo_path in fifo_paths(address.token):
            presence.record(FIFO_KIND, fifo_path)
        Segment.remove_stale(address, self._trust)
        segment = self._segment = Segment.create(address, capacity, self.max_message_size, self.mode)
        waiter = self._waiter = Waiter(
            segment.mapping.words,
            WRITE_INDEX_WORD,
            CONSUMER_WAITING_WORD,
            segment.data_fifo,
            PRODUCER_WAITING_WORD,
            segment.space,
            segment.space_fifo,
            self.spin_seconds,
            self._ring_check,
            segment.check_size,
            self._waker_fd,
        )
        self._reader = RingReader(
            segment,
            capacity,
            self.max_message_size,
            waiter,
            self._wait_for_index,
            address.location,
            self._end_of_stream,
        )
        presence.watch(self._signal_peer_lost, _RingTracker(presence, segment))

    # --- receiving ----------------------------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit, 0: try once now).

        Raises:
            EndOfStream: after the last message, once the producer ended the stream.
            Timeout: no message within `timeout`.
            PeerTimeout: no producer appeared within the `wait` option (counted from open).
            PeerGone: the producer died before ending the stream (after every message it published).
            ProtocolError: the ring breaks the layout, or was truncated.
            ChannelClosed: the consumer was closed (also while this call waited), or inherited across fork().
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                return self._recv_slowly(timeout)  # type: ignore[return-value]
            reader = self._reader
            # RingReader.take's common case, inline (a data record is there, no view held): the call saved
            # is a fifth of a 64-byte receive; everything else is take()'s
            if reader._held is None:  # type: ignore[union-attr]
                words = reader._words  # type: ignore[union-attr]
                read_index = reader._read_index  # type: ignore[union-attr]
                write_index = words[8]  # WRITE_INDEX_WORD
                if write_index != read_index:
                    if WEAK_MEMORY_ORDER:
                        full_fence()
                    capacity = reader._capacity  # type: ignore[union-attr]
                    position = read_index % capacity
                    offset = 256 + position  # HEADER_SIZE
                    length = words[offset >> 3]  # a data record's header word is its length
                    if length <= reader._max_message_size:  # type: ignore[union-attr]
                        size = 8 + ((length + 7) & -8)
                        if position + size <= capacity and size <= write_index - read_index <= capacity:
                            data: bytes = reader._map[offset + 8 : offset + 8 + length]  # type: ignore[union-attr]
                            read_index += size
                            reader._read_index = read_index  # type: ignore[union-attr]
                            if WEAK_MEMORY_ORDER:
                                full_fence()
                            words[16] = read_index  # READ_INDEX_WORD
                            if words[18]:  # PRODUCER_WAITING_WORD
                                reader._waiter.wake_peer()  # type: ignore[union-attr]
                            return data
            return reader.take(timeout, False)  # type: ignore[union-attr]
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
    def recv_view(self, timeout: float | None = None) -> memoryview:
        """The next message as a read-only view into the ring, valid until the next recv/recv_view/close.

        The view is released (and its bytes handed back to the producer) by the next call;
        keep bytes(view) to hold on to a message. Raises what recv() raises.
        """
        # recv's call gate again, inline: a helper shared by the two would cost a call on both hot paths
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                return self._recv_slowly(timeout, in_place=True)  # type: ignore[return-value]
            return self._reader.take(timeout, True)  # type: ignore[union-attr]
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

    def _recv_slowly(self, timeout: float | None, in_place: bool = False) -> bytes | memoryview:
        """recv with the state set: closed, ended, a message poll() kept, the producer lost, threads queued."""
        peeked = self._take_state()
        if peeked is not None:
            return memoryview(peeked) if in_place else peeked
        reader = self._reading()
        return reader.take(timeout, in_place)

    def _recv(self, deadline: float | None) -> bytes:
        return self._reading().take(remaining(deadline), False)

    def _reading(self) -> RingReader:
        """The reader, once the slow-path checks passed (truncation when the monitor flagged something)."""
        reader = self._reader
        if reader is None:
            self._refuse()
        if self._peer_lost:
            self._check_segment()
        return reader

    def _try_recv(self) -> bytes | None:
        reader = self._reader
        if reader is None or self._peer_lost:
            reader = self._reading()
        waiter = self._waiter
        if waiter is not None and waiter.armed:  # a wake-up: the segment may have changed while we waited
            self._check_segment()
            waiter.disarm()
        message = reader.try_take()
        if message is None:
            self._note_peer()
            if self._peer_lost:
                raise self._producer_gone()
        return message

    @holds_call_gate
    def try_recv(self) -> bytes | None:
        """The next message if one is there now, else None; never waits (as Consumer.try_recv).

        This is its fast version: a data record in the ring (what the asyncio consumer takes
        most of the time); every other case is Consumer.try_recv's.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.try_recv(self)
        try:
            reader = self._reader
            if not self._state and reader is not None:
                waiter = self._waiter
                if waiter is None or not waiter.armed:
                    message = reader.try_take()
                    if message is not None:
                        return message
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
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.try_recv(self)

    def _try_recv_many(self, max_count: int) -> list[bytes]:
        reader = self._reading()
        waiter = self._waiter
        if waiter is not None and waiter.armed:
            self._check_segment()
            waiter.disarm()
        messages = reader.try_take_many(max_count)
        if not messages:
            self._note_peer()
            if self._peer_lost:
                raise self._producer_gone()
        return messages

    def _refuse(self) -> NoReturn:
        """Raise why there is nothing to read: ChannelClosed, or EndOfStream after the end."""
        self._check_open()
        raise EndOfStream(f"{self.address.location}: the producer ended the stream")

    def _wait_for_index(self, low: int, high: int, deadline: float | None) -> int:
        """The producer's write index once outside [low, high): the wait of the blocking path (see WaitFor)."""
        wait = self._waiter.wait  # type: ignore[union-attr]
        while True:
            if deadline is None and self._peer_seen:  # the common case, without the deadline arithmetic
                value = wait(low, high, None)
            else:
                self._note_peer()
                seconds = self._seconds_to_wait(deadline)
                value = wait(low, high, None if seconds is None else time.monotonic() + seconds)
            if value is not None:
                return value

    def _note_peer(self) -> None:
        """Count the producer as seen once it attached or the monitor saw it alive (the PeerTimeout rule)."""
        if self._peer_seen:
            return
        presence, reader = self._presence, self._reader
        if (reader is not None and reader.producer_attached()) or (presence is not None and presence.peer_seen):
            self._peer_seen = True
            if presence is not None:
                presence.peer_seen = True  # so the monitor counts its loss, even if it never saw it alive

    def _ring_check(self) -> PodIPCError | None:
        """For the waiter: ChannelClosed at once when closing; PeerGone once the ring is empty and the producer lost."""
        if self._closing or self._forked:
            raise self._closed_error()
        self._note_peer()
        if self._peer_lost:
            self._check_segment()
            return self._producer_gone()
        return None

    def _producer_gone(self) -> PeerGone | ChannelUnavailable:
        gone = PeerGone(
            f"the producer of {self.address.location} is gone (it died or aborted without ending the stream)"
        )
        return gone if self._presence is None else self._presence.lost_error(gone)

    # --- the endpoint contract ----------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        reader, waiter = self._reader, self._waiter
        if reader is None or waiter is None or waiter.fifo is None or self._ended_flag:
            return -1, 0, None
        if self._peer_lost:
            return -1, 0, 0.0  # the next attempt says what happened (and touches nothing of a truncated ring)
        if reader.arm() is not None:
            waiter.wake_self()
        return waiter.fifo.fd, POLLIN, waiter.retry_after()

    def _signal_peer_lost(self) -> None:
        Consumer._signal_peer_lost(self)
        self._interrupt()

    def _end_of_stream(self) -> None:
        """The end record was taken (inside a call): remove what we created and leave; the mapping goes at _free."""
        self._ended = True
        self._leave_channel()

    def _leave_channel(self) -> None:
        """Remove the segment, semaphores and FIFOs we created, a dead producer's presence file, and ours."""
        presence, self._presence = self._presence, None
        if presence is None:
            return
        presence.unwatch()
        if self._segment is not None:
            self._segment.unlink_created(self.address)
        remove_if_gone(presence.peer_path, presence.trust)  # left by a killed producer; nobody else would remove it
        presence.close()

    def _free(self) -> None:
        presence = self._presence
        if presence is not None:
            presence.unwatch()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.release()
            if not self._ended_flag and self._segment is not None and not self._segment.truncated():
                reader.leave_early()
        self._leave_channel()
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()

    def _drop_inherited(self) -> None:
        self._reader = None
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()  # above all the segment's descriptor: its lock must die with the parent
        self._freed = True
