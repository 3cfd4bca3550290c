"""ShmProducer and ShmConsumer: the life of each side around the ring (see the package docstring).

The producer claims its presence at open and attaches on its first send (or close): it
waits for the consumer, maps its segment and becomes a RingWriter's owner. The consumer
creates the segment at open, reads it through a RingReader, and removes everything at
the end of stream or when it closes. Checks that need the peer's liveness (presence
files, the closed flag, the segment's identity) live here and are handed to the waiter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, deadline_after, remaining
from podipc.errors import ChannelUnavailable, EndOfStream, MessageTooLarge, PeerGone, PeerTimeout, Timeout
from podipc.presence import PeerState, Presence, remove_if_gone
from podipc.transports.shm.options import MAX_MESSAGE_FIX, MAX_MESSAGE_SOURCE, OPTIONS, ring_geometry
from podipc.transports.shm.ring import RingReader, RingWriter
from podipc.transports.shm.segment import Segment, availability_for, check_name, segment_path, semaphore_names


class _RingSide:
    """What both sides of a ring share: their options and where the size limit comes from."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = MAX_MESSAGE_SOURCE
    max_message_fix = MAX_MESSAGE_FIX
    max_message_size: int
    spin_seconds: float
    """Seconds to poll an empty (or full) ring before sleeping."""
    path: str
    """The segment's file."""

    def _take_options(self, address: Address, settings: Mapping[str, Any]) -> int:
        """Check the name and the geometry, keep what the side needs; the ring's capacity in bytes."""
        check_name(address)
        capacity, self.max_message_size = ring_geometry(settings, address.location)
        self.spin_seconds = float(settings["spin"])
        self.path = segment_path(address.name)
        return capacity


class ShmProducer(_RingSide, Producer):
    """Writes messages into the consumer's ring; attaches on the first send (or close)."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._take_options(address, self.settings)
        self._segment: Segment | None = None
        self._writer: RingWriter | None = None
        """Set once attached; None again once closed."""
        self._presence = Presence(
            address.token, "producer", int(self.settings["mode"]), handover_wait=float(self.settings["wait"])
        )

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit).

        Raises MessageTooLarge, Timeout, PeerGone, PeerTimeout (no consumer within `wait`),
        ChannelClosed, and RuntimeError while a loan is not committed.
        """
        writer = self._writer
        kind = type(data)
        if kind is bytes or kind is bytearray:
            length = len(data)
        elif kind is memoryview and data.c_contiguous:  # type: ignore[union-attr]
            length = data.nbytes  # type: ignore[union-attr]
        else:
            length = -1
        if length < 0 or writer is None:  # another buffer type, not attached yet, or closed
            Producer.send(self, data, timeout)
            return
        if length > self.max_message_size:
            raise self._too_large(length)
        writer.write(data, length, timeout)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        writer = self._writer or self._attach(deadline)
        if view.nbytes > self.max_message_size:  # the ring's limit, learnt on attach
            raise self._too_large(view.nbytes)
        writer.write_until(view, view.nbytes, deadline)

    def loan(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable view of `size` bytes inside the ring; fill it, then commit(). Zero-copy send.

        Waits at most `timeout` seconds for room (and for the consumer on first use). The
        view is valid until commit(). Raises what send() raises, and RuntimeError while the
        previous loan is not committed.
        """
        writer = self._writer
        if writer is None or not 0 <= size <= self.max_message_size:
            return self._loan_slow(size, timeout)
        return writer.loan(size, timeout)

    def _loan_slow(self, size: int, timeout: float | None) -> memoryview:
        self._check_open()
        if size < 0:
            raise ValueError(f"a loan holds 0 bytes or more, not {size}")
        if size > self.max_message_size:
            raise self._too_large(size)
        deadline = deadline_after(timeout)
        writer = self._writer or self._attach(deadline)
        if size > self.max_message_size:  # the ring's limit, learnt on attach
            raise self._too_large(size)
        return writer.loan(size, remaining(deadline))

    def commit(self, length: int | None = None) -> None:
        """Send the loaned buffer as one message of `length` bytes (default: all it holds).

        Raises RuntimeError when nothing is loaned, ValueError for a length beyond the loan.
        """
        writer = self._writer
        if writer is None:
            raise RuntimeError("nothing is loaned; call loan(size) first")
        writer.commit(length)

    def _too_large(self, size: int) -> MessageTooLarge:
        return MessageTooLarge(size, self.max_message_size, self.max_message_source, self.max_message_fix)

    def _attach(self, deadline: float | None) -> RingWriter:
        """Wait for the consumer and its segment, map it, check its header; the writer from now on."""
        location = self.address.location
        self._presence.wait_for_peer(deadline, self.wait_deadline, location)
        limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
        segment, header = Segment.attach(self.address.name, location, limit)
        self._segment = segment
        self.max_message_size = header.max_message_size
        self._writer = RingWriter(segment, header, self.spin_seconds, self._consumer_problem, location)
        return self._writer

    def _consumer_problem(self) -> PeerGone | None:
        """PeerGone when the consumer closed, died or replaced the segment; None while it is there."""
        writer, segment = self._writer, self._segment
        assert writer is not None and segment is not None
        closed = writer.consumer_closed()
        if not closed and self._presence.peer_state() is PeerState.ALIVE and segment.same_file():
            return None
        why = "closed the channel" if closed else "is gone (it died or closed without reading the end of stream)"
        return PeerGone(f"the consumer of {self.address.location} {why}")

    def _close(self, deadline: float | None) -> None:
        writer = self._writer or self._attach(deadline)
        writer.end(deadline)
        try:
            writer.drain(deadline)
        except Timeout as exc:
            raise Timeout(f"{self.address.location}: the consumer did not take the end of stream in time") from exc
        self._abort()

    def _abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.drop_loan()
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
        self._presence.close()


class ShmConsumer(_RingSide, Consumer):
    """Creates the ring and reads it; recv_view() hands out messages without copying."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        capacity = self._take_options(address, self.settings)
        self.mode = int(self.settings["mode"])
        self._reader: RingReader | None = None
        """Set while the ring is there to read; None after the end of stream or close."""
        self._segment: Segment | None = None
        self._presence: Presence | None = None
        problem = availability_for(capacity)
        if problem:
            self._closed = True
            raise ChannelUnavailable(f"{address.location}: {problem}")
        try:
            self._presence = Presence(
                address.token,
                "consumer",
                self.mode,
                handover_wait=float(self.settings["wait"]),
                channel=address.location,
            )
            self._presence.record("posix_shm", "/" + address.name)
            for semaphore_name in semaphore_names(address.name):
                self._presence.record("posix_sem", semaphore_name)
            Segment.remove_stale(address.name)
            self._segment = Segment.create(address.name, capacity, self.max_message_size, self.mode, address.location)
        except BaseException:
            self._teardown()
            self._closed = True
            raise
        self._reader = RingReader(
            self._segment,
            capacity,
            self.max_message_size,
            self.spin_seconds,
            self._producer_problem,
            address.location,
            self._end_of_stream,
        )

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit).

        Raises EndOfStream after the last one, Timeout, PeerGone, PeerTimeout (no producer
        within `wait`), ProtocolError (a ring that breaks the layout), ChannelClosed.
        """
        reader = self._reader
        if reader is None:
            self._refuse()
        return reader.take(timeout, False)

    def recv_view(self, timeout: float | None = None) -> memoryview:
        """The next message as a read-only view into the ring, valid until the next recv/recv_view/close.

        The view is released (and its bytes handed back to the producer) by the next call;
        keep bytes(view) to hold on to a message. Raises what recv() raises.
        """
        reader = self._reader
        if reader is None:
            self._refuse()
        return reader.take(timeout, True)

    def _recv(self, deadline: float | None) -> bytes:
        reader = self._reader
        if reader is None:
            self._refuse()
        return reader.take(remaining(deadline), False)

    def _refuse(self) -> NoReturn:
        """Raise why there is nothing to read: ChannelClosed, or EndOfStream after the end."""
        self._check_open()
        raise EndOfStream(f"{self.address.location}: the producer ended the stream")

    def _producer_problem(self) -> PeerGone | PeerTimeout | None:
        """PeerGone when the producer attached (or was seen) and is gone; PeerTimeout when it never came."""
        presence, reader = self._presence, self._reader
        assert presence is not None and reader is not None
        if presence.peer_state() is PeerState.ALIVE:
            return None
        if reader.producer_attached() or presence.peer_seen:
            return PeerGone(
                f"the producer of {self.address.location} is gone (it died or aborted without ending the stream)"
            )
        if time.monotonic() >= self.wait_deadline:
            return PeerTimeout(
                f"no producer appeared on {self.address.location} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )
        return None

    def _end_of_stream(self) -> None:
        self._ended = True
        self._teardown()

    def _close(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Tell a live producer we left, unmap, unlink segment and semaphores, leave. Idempotent.

        Only a consumer that claimed the channel (its presence) unlinks anything.
        """
        reader, self._reader = self._reader, None
        segment, self._segment = self._segment, None
        presence, self._presence = self._presence, None
        if reader is not None:
            reader.release()
            if not self._ended:
                reader.leave_early()
        if segment is not None:
            if presence is not None:
                segment.unlink()
            segment.close()
        if presence is not None:
            Segment.unlink_semaphores(self.address.name)
            remove_if_gone(presence.peer_path, presence.trust)  # left by a killed producer; nobody else would remove it
            presence.close()
