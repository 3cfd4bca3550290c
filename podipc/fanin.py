"""Fan-in over the stream sockets (unix://, tcp://): many named producers into one consumer.

(The kernel queues mq:// and sysvmq:// have their own, with the same consumer API: podipc.queue_fanin.)

Opened with `pattern=fanin` (and `producers=N`) on the consumer; a producer joins with
`name=` (or `pattern=fanin`, which names it HOSTNAME-PID-RANDOM). On the wire
(docs/wire/stream.md, "Fan-in") each producer has its own connection, says FANIN_HELLO and
its name, and then sends frames and its end of stream exactly as in a pair; the consumer
acknowledges each producer's end of stream, so each producer's close() still means
"delivered".

Consumer: the acceptor thread (podipc.stream's, with the fan-in hello) claims each name;
the claim is atomic because that one thread decides every claim, under `_Claims`' lock:
a second live producer with a name is refused with NAME_TAKEN (the producer raises
NameTaken), and once `producers` producers are attached or done, later ones get BUSY.
recv() interleaves the producers, each producer's messages in its order: it hands out the
frames one read of one producer cut, then the next producer's (round robin over what is
readable), so a busy producer cannot starve the others. Readiness: one epoll descriptor
holding every producer's connection and the acceptor's "attached" eventfd.

Ends: a producer's end of stream is acknowledged when its last message was handed out; a
producer that dies (EOF or reset without the end marker, or garbage) is recorded as died
for it alone, its name freed (a restarted producer may take it again) and the others go
on. With `producers=N` the consumer's stream ends (EndOfStream) once N producers ended
theirs cleanly; a dead one does not count, so a restarted one can still complete it. With
`producers=0` (the default) it never ends by itself: close() it.

Cost: recv() hands out the next frame of the batch as a pair's recv does, and recv_from()
the same with its producer's name; each batch (one read of one producer, ~1000 frames of
64 B when the producers outpace the consumer) is then counted and folded into its sender's
SHA-256 at once (`senders`, exact between receives); one epoll poll per batch, not per
message. Measured on 2 cores with a bare recv() loop: the consumer takes ~3.7M msg/s per
CPU-second at 64 B with 1 producer and within 5 % of that with 4. What made the consumer
cost more was its producers' writes, not its own work: on a loaded VM a producer whose burst
a pause or a preemption ended wrote each message alone (podipc.stream_producer's start
window was shorter than its own loop), and the consumer paid one small kernel segment per
message (with 4 producers: 11 syscalls per 1000 messages and 160 ns of system CPU per
message; 0.7 and 26 ns with STREAM_BURST_START_SECONDS, measured side by side). The bench cells
fanin-unix-N / fanin-tcp-N (podipc.bench.fanin) measure N producer processes into one
consumer that checks every producer's sequence with recv_from(); benchmarks/fanin.py runs
them and adds the consumer's messages per CPU-second.
Threads: as every consumer (one call gate); `recv_from()` returns the sender with the
message under the same gate, where `last_sender` is only right for a single receiving thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import (
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
)
from podipc.flushing import UNFLUSHED, flush_pending
from podipc.framing import (
    ACK,
    BUSY,
    FANIN_HELLO,
    HELLO,
    NAME_LENGTH,
    NAME_TAKEN,
    WRONG_PATTERN,
    FrameReader,
)
from podipc.options import Option, deadline_after
from podipc.stream import (
    SEND_FLAGS,
    STREAM_OPTIONS,
    _Acceptor,
    _DontWait,
    peer_gone,
    take_message_limit,
)
from podipc.waking import POLLIN

FANIN_HEAD = len(FANIN_HELLO) + NAME_LENGTH.size
"""Bytes of a fan-in hello before the name."""
ENDED = "end of stream"
DIED = "died"


@dataclass(frozen=True)
class ProducerSummary:
    """One producer of a fan-in consumer, as the consumer saw it."""

    name: str
    messages: int
    bytes: int
    sha256: str
    """SHA-256 over this producer's payloads, concatenated in order (what its own summary line says)."""
    ended: str | None
    """'end of stream', 'died', or None while it is attached."""
    error: str = ""
    """Why it counts as died (the PeerGone or ProtocolError text)."""

    def as_dict(self) -> dict[str, object]:
        """The JSON-ready dict of the CLI's summary line (`producers` list)."""
        fields: dict[str, object] = {
            "name": self.name,
            "messages": self.messages,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "ended": self.ended,
        }
        if self.error:
            fields["error"] = self.error
        return fields


class _Sender:
    """A producer attached to a fan-in consumer: its connection, its frame reader and its counts."""

    __slots__ = ("bytes", "connection", "digest", "ended", "error", "messages", "name", "reader", "source")

    def __init__(self, name: str, connection: socket.socket, reader: FrameReader) -> None:
        self.name = name
        self.connection = connection
        self.reader = reader
        self.source = _DontWait(connection)
        self.messages = 0
        self.bytes = 0
        self.digest = hashlib.sha256()
        self.ended: str | None = None
        self.error = ""

    def account(self, frames: list[bytes]) -> None:
        """Count messages handed out (in order) and fold them into the digest: once per batch, not per message."""
        payloads = b"".join(frames)
        self.messages += len(frames)
        self.bytes += len(payloads)
        self.digest.update(payloads)

    def summary(self, handed_out: list[bytes]) -> ProducerSummary:
        """What it sent so far, with `handed_out`: messages of its batch in progress not accounted yet."""
        digest = self.digest
        if handed_out:
            digest = digest.copy()
            digest.update(b"".join(handed_out))
        return ProducerSummary(
            self.name,
            self.messages + len(handed_out),
            self.bytes + sum(map(len, handed_out)),
            digest.hexdigest(),
            self.ended,
            self.error,
        )


class _Claims:
    """Which names live producers hold, and how many producers may still come; one lock, so a claim is atomic."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._live: dict[str, socket.socket] = {}
        self._ended_cleanly = 0

    def claim(self, name: str, connection: socket.socket) -> bytes:
        """The answer to a producer named `name` on `connection`: FANIN_HELLO (claimed), NAME_TAKEN or BUSY.

        A name whose holder's connection has hung up (a producer killed a moment ago, which the
        consumer has not read to its end yet) goes to the newcomer: nothing more can come from the
        holder, whose record still ends as died (or ended) once its last bytes are read.
        """
        with self._lock:
            holder = self._live.get(name)
            if holder is not None and not _hung_up(holder):
                return NAME_TAKEN
            if holder is None and self.limit and len(self._live) + self._ended_cleanly >= self.limit:
                return BUSY
            self._live[name] = connection
            return FANIN_HELLO

    def release(self, name: str, connection: socket.socket, cleanly: bool) -> None:
        """The producer named `name` on `connection` finished (cleanly: with its end of stream): its name is free."""
        with self._lock:
            if self._live.get(name) is connection:
                del self._live[name]
            if cleanly:
                self._ended_cleanly += 1

    @property
    def ended_cleanly(self) -> int:
        """How many producers ended their streams so far."""
        return self._ended_cleanly


def _hung_up(connection: socket.socket) -> bool:
    """True when the peer of `connection` closed it (or it is closed here): nothing more will come from it."""
    fd = connection.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, _HANG_UP)
    return any(events & _HANG_UP for _, events in poller.poll(0))


_HANG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _FanInAcceptor(_Acceptor):
    """The stream acceptor with the fan-in hello: claims names, hands claimed connections to the consumer."""

    def __init__(self, listener: socket.socket, configure: Any, name: str, claims: _Claims) -> None:
        self.claims = claims
        self.arrivals: list[tuple[str, socket.socket]] = []
        self.refused_names = 0
        self.refused_full = 0
        super().__init__(listener, configure, name)

    def take_arrivals(self) -> list[tuple[str, socket.socket]]:
        """The producers attached since the last call (list.pop is atomic: nothing is taken twice)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.attached_fd, 8)
        taken = []
        arrivals = self.arrivals
        while arrivals:
            taken.append(arrivals.pop(0))
        return taken

    def _read_hello(self, poller: select.poll, fd: int) -> None:
        connection, received, _ = self._pending[fd]
        try:
            chunk = connection.recv((_hello_length(received) or len(HELLO)) - len(received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        received += chunk
        wanted = _hello_length(received)
        if chunk and wanted is not None and len(received) < wanted:
            return
        poller.unregister(fd)
        del self._pending[fd]
        self._decide(connection, bytes(received))

    def _decide(self, connection: socket.socket, received: bytes) -> None:
        if received == HELLO:
            self.refused_pattern += 1
            self._answer_and_close(connection, WRONG_PATTERN)
            return
        name = _name_of(received)
        if name is None:
            self._reject(connection, received[: len(HELLO)])
            return
        answer = self.claims.claim(name, connection)
        if answer != FANIN_HELLO:
            if answer == NAME_TAKEN:
                self.refused_names += 1
            else:
                self.refused_full += 1
            self._answer_and_close(connection, answer)
            return
        try:
            connection.send(FANIN_HELLO, SEND_FLAGS)
            self.configure(connection)
            connection.setblocking(True)
        except OSError as exc:
            self.claims.release(name, connection, cleanly=False)
            self._reject(connection, received[: len(HELLO)], exc)
            return
        self.arrivals.append((name, connection))
        self._signal()

    def describe_rejections(self) -> str:
        parts = [super().describe_rejections()]
        if self.refused_names:
            parts.append(f"; refused {self.refused_names} producer(s) whose name a live producer held")
        if self.refused_full:
            parts.append(f"; refused {self.refused_full} producer(s) beyond producers={self.claims.limit}")
        return "".join(parts)


def _hello_length(received: bytearray | bytes) -> int | None:
    """How many bytes the hello that starts with `received` has in all; None when it is no fan-in hello."""
    head = bytes(received[: len(HELLO)])
    if len(received) < len(HELLO):
        return len(HELLO) if FANIN_HELLO.startswith(head) or HELLO.startswith(head) else None
    if head != FANIN_HELLO:
        return None
    if len(received) < FANIN_HEAD:
        return FANIN_HEAD
    return int(FANIN_HEAD + NAME_LENGTH.unpack_from(received, len(HELLO))[0])


def _name_of(received: bytes) -> str | None:
    """The producer name of a whole fan-in hello; None when `received` is not one."""
    if len(received) <= FANIN_HEAD or _hello_length(received) != len(received):
        return None
    try:
        return received[FANIN_HEAD:].decode()
    except UnicodeDecodeError:
        return None


class ProducerRoster:
    """A fan-in consumer's account of its producers, the same on every fan-in channel.

    Subclasses give `senders` and `last_sender`; `summary()` and the CLI's summary fields follow from them.
    """

    @property
    def senders(self) -> list[ProducerSummary]:
        """Every producer that attached so far, in order of arrival: name, counts, SHA-256, how it ended."""
        raise NotImplementedError

    @property
    def last_sender(self) -> str | None:
        """The name of the producer of the message the last receive returned (one receiving thread; else recv_from)."""
        raise NotImplementedError

    def summary(self) -> list[dict[str, object]]:
        """`senders` as JSON-ready dicts (the `producers` list of the CLI's summary line)."""
        return [producer.as_dict() for producer in self.senders]

    def summary_fields(self) -> dict[str, object]:
        """The CLI summary's `producers` list (`summary()`)."""
        return {"producers": self.summary()}


class FanInConsumer(ProducerRoster, Consumer):
    """The consumer of a fan-in stream channel: listens at open, reads frames from many named producers.

    Transports subclass it with the same hooks as podipc.stream.StreamConsumer
    (`_listen`, `_configure_connection`, `_remove_listener_traces`).
    """

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        take_message_limit(self)
        self._what = address.location
        self._limit = int(self.settings["producers"])
        self._claims = _Claims(self._limit)
        self._senders: list[_Sender] = []
        """Every producer that attached, in order of arrival (the finished ones too)."""
        self._active: list[_Sender] = []
        self._by_fd: dict[int, _Sender] = {}
        self._batch: list[bytes] = []
        """Frames of one producer's read not handed out yet, the next one LAST."""
        self._batch_sender: _Sender | None = None
        self._batch_frames: list[bytes] = []
        """The frames of the batch, in order: accounted to its sender once handed out (see _settle_batch)."""
        self._turn = 0
        self._acceptor: _FanInAcceptor | None = None
        self._listener: socket.socket | None = None
        self._epoll: select.epoll | None = None
        try:
            self._epoll = select.epoll()
            self._listener = self._listen()
            self._acceptor = _FanInAcceptor(self._listener, self._configure_connection, self._what, self._claims)
            self._epoll.register(self._acceptor.attached_fd, select.EPOLLIN)
        except BaseException:
            self._closed = True
            self._freed = True
            self._free()
            raise

    # hooks for transports (as podipc.stream.StreamConsumer's)
    def _listen(self) -> socket.socket:
        """Create, bind and listen; raise ChannelUnavailable with the fix when that is impossible."""
        raise NotImplementedError

    def _configure_connection(self, connection: socket.socket) -> None:
        """Set options on an attached connection (TCP_NODELAY for tcp)."""

    def _remove_listener_traces(self) -> None:
        """Remove what listening left behind (the socket file of unix:///path)."""

    # --- what the consumer knows of its producers --------------------------

    @property
    def last_sender(self) -> str | None:
        """The name of the producer of the message the last receive returned (one receiving thread; else recv_from)."""
        sender = self._batch_sender
        return None if sender is None else sender.name

    @property
    def senders(self) -> list[ProducerSummary]:
        """Every producer that attached so far, in order of arrival: name, counts, SHA-256, how it ended.

        Exact between receives (taken from another thread while one runs, a count may be one batch behind).
        """
        current, handed_out = self._batch_sender, self._handed_out()
        return [sender.summary(handed_out if sender is current else []) for sender in list(self._senders)]

    def _handed_out(self) -> list[bytes]:
        """The frames of the batch in progress already handed out."""
        frames = self._batch_frames
        return frames[: len(frames) - len(self._batch)]

    def _settle_batch(self) -> None:
        """Account the handed-out frames of the batch in progress to its sender; the rest stays (or is dropped)."""
        sender = self._batch_sender
        if sender is not None and self._batch_frames:
            handed_out = self._handed_out()
            sender.account(handed_out)
            self._batch_frames = self._batch_frames[len(handed_out) :]

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
            if self._state:
                peeked = self._take_state()
                if peeked is not None:
                    return self.last_sender or "", peeked
            else:
                batch = self._batch
                if batch:
                    sender = self._batch_sender
                    assert sender is not None, "a batch without its sender"
                    return sender.name, batch.pop()  # the fast path: the next frame of one producer's read
            message = self._recv(None if timeout is None else deadline_after(timeout))
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

    # --- the endpoint contract ---------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message of any producer; `timeout` as Consumer.recv's, which raises as it says.

        This is its fast version: the next frame of the batch in progress (one producer's
        read); every other case is Consumer.recv's (EndOfStream once `producers` ended).
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.recv(self, timeout)
        try:
            if not self._state:
                batch = self._batch
                if batch:
                    return batch.pop()
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.recv(self, timeout)

    @holds_call_gate
    def try_recv(self) -> bytes | None:
        """The next message if one is there now, else None; never waits (as Consumer.try_recv, its fast version)."""
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.try_recv(self)
        try:
            if not self._state:
                batch = self._batch
                if batch:
                    return batch.pop()
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.try_recv(self)

    def _recv(self, deadline: float | None) -> bytes:
        if UNFLUSHED:
            flush_pending()  # what this process's producers sent may be what we are waiting for
        return Consumer._recv(self, deadline)

    def _try_recv(self) -> bytes | None:
        batch = self._batch
        if not batch:
            if not self._refill():
                return None
            batch = self._batch
        return batch.pop()

    def _refill(self) -> bool:
        """Fill the batch with the frames of the next producer that has some; False when none has any now.

        Raises EndOfStream once `producers` producers ended their streams and nothing is left.
        """
        acceptor = self._acceptor
        if acceptor is None:
            raise PeerGone(f"{self._what}: the consumer has stopped listening")
        if acceptor.arrivals:
            self._adopt(acceptor.take_arrivals())
        previous = self._batch_sender
        if previous is not None and previous.ended is None and previous.reader.holds_header():
            # its last read holds more than the frames cut (its end of stream): no event would say so
            self._read(previous)
        if self._take_batch():
            return True
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            sender = self._by_fd.get(fd)
            if sender is not None:
                self._read(sender)
            elif fd == acceptor.attached_fd:
                if acceptor.failure is not None:
                    raise ChannelUnavailable(
                        f"{self._what}: listening failed: {acceptor.failure}"
                    ) from acceptor.failure
                self._adopt(acceptor.take_arrivals())
        if self._take_batch():
            return True
        if self._limit and self._claims.ended_cleanly >= self._limit and not self._active:
            self._free_once()
            raise EndOfStream(f"{self._what}: all {self._limit} producers ended their streams")
        return False

    def _take_batch(self) -> bool:
        """Move the cut frames of the next producer (round robin) into the batch; False when none has any."""
        active = self._active
        count = len(active)
        for step in range(count):
            sender = active[(self._turn + step) % count]
            ready = sender.reader.ready
            if ready:
                self._turn = (self._turn + step + 1) % count
                self._settle_batch()
                self._batch_frames = ready[::-1]
                sender.reader.ready = self._batch
                self._batch = ready
                self._batch_sender = sender
                return True
        return False

    def _read(self, sender: _Sender) -> None:
        """One non-blocking read of a producer's connection: its frames cut, or its end recorded."""
        reader = sender.reader
        if reader.ready:
            return  # its frames go out first; its end of stream is read after them
        try:
            frame = reader.read_frame(sender.source)
        except BlockingIOError:
            return
        except EndOfStream:
            self._finish(sender, None)
            return
        except PodIPCError as error:
            self._finish(sender, error)
            return
        except OSError as exc:
            self._finish(sender, peer_gone(exc, f"{self._what} ({sender.name})", "producer"))
            return
        reader.ready.append(frame)

    def _adopt(self, arrivals: list[tuple[str, socket.socket]]) -> None:
        assert self._epoll is not None
        for name, connection in arrivals:
            sender = _Sender(name, connection, FrameReader(self.max_message_size, f"{self._what} ({name})"))
            self._senders.append(sender)
            self._active.append(sender)
            self._by_fd[connection.fileno()] = sender
            self._epoll.register(connection.fileno(), select.EPOLLIN)
            self._peer_seen = True

    def _finish(self, sender: _Sender, error: PodIPCError | None) -> None:
        """A producer ended its stream (error None: acknowledge it) or died; the others go on."""
        connection = sender.connection
        if error is None:
            with contextlib.suppress(OSError):
                connection.send(ACK, SEND_FLAGS)
            sender.ended = ENDED
        else:
            sender.ended = DIED
            sender.error = f"{type(error).__name__}: {error}"
        self._drop(sender)
        self._claims.release(sender.name, connection, cleanly=error is None)

    def _drop(self, sender: _Sender) -> None:
        connection = sender.connection
        fd = connection.fileno()
        self._by_fd.pop(fd, None)
        if self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        self._active.remove(sender)
        connection.close()

    def _readiness(self) -> tuple[int, int, float | None]:
        epoll = self._epoll
        return (epoll.fileno() if epoll is not None else -1), POLLIN, None

    def _peer_timeout(self) -> PeerTimeout:
        rejections = self._acceptor.describe_rejections() if self._acceptor is not None else ""
        return PeerTimeout(
            f"no producer connected to {self._what} within the wait timeout "
            f"(wait={self.settings['wait']:g}s){rejections}"
        )

    def _free(self) -> None:
        self._settle_batch()
        self._batch_frames = []
        self._batch.clear()  # read but never handed out: not counted
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.stop()
            for _, connection in acceptor.arrivals:
                connection.close()
            acceptor.arrivals.clear()
        for sender in list(self._active):
            self._drop(sender)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._remove_listener_traces()

    def _drop_inherited(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.drop_inherited()
            for _, connection in acceptor.arrivals:
                connection.close()
        for sender in self._active:
            sender.connection.close()
        self._active = []
        for held in (self._epoll, self._listener):
            if held is not None:
                held.close()
        self._epoll = None
        self._listener = None
        self._freed = True
