"""The stream-socket Consumer that tcp:// and unix:// share, and what both stream sides share.

A transport subclass says only how to listen (`_listen`) and which socket to connect
to (`_connection_socket`); everything else is here: the hello handshake, frames
(podipc.framing), end of stream with its ack, and error translation. Both sides
implement the endpoint contract of podipc.endpoint (non-blocking attempts, a stable
readiness descriptor, release only when no call is inside); they are the reference
implementation other transports follow.

Consumer: listens at open; a small acceptor thread answers connections from then on,
so a producer can start sending before the consumer's first recv. The first
connection that sends the podipc HELLO is attached (answered with HELLO); later ones
get BUSY; connections whose first bytes are not HELLO are dropped and counted, and a
consumer that then times out says so (PeerTimeout names the bytes it saw). Readiness:
the acceptor's "attached" eventfd, then the connection. A recv without a timeout reads
the blocking socket directly (the fast path); close() from elsewhere wakes it with
shutdown(SHUT_RD). One read takes up to 256 KiB and every frame in it is cut at once
(podipc.framing): recv() hands them out one by one with no other work, recv_many()
several at a time.

Producer: podipc.stream_producer (connecting, coalescing); the per-process thread that
writes the last messages of a burst: podipc.flushing. Fan-in (many producers, one
consumer): podipc.fanin; broadcast (one listening producer, N subscribers): podipc.stream_broadcast.

Neither side keeps its socket registered anywhere while it does not wait: a wait-queue
entry on a socket makes every send or receive of the peer run a wakeup callback, which
costs the other side measurably. fileno() (the base's stable epoll mirror) is created
only when asked for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import _Endpoint, holds_call_gate
from podipc.errors import (
    AddressError,
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
    DEFAULT_MAX_MESSAGE_SIZE,
    FANIN_HELLO,
    HELLO,
    MAX_FRAME_LENGTH,
    WRONG_PATTERN,
    FrameReader,
    check_max_message_size,
    check_producer_name,
)
from podipc.options import Option, parse_bool
from podipc.waking import POLLIN

MAX_MESSAGE_OPTION = Option(
    "max_message_size",
    check_max_message_size,
    DEFAULT_MAX_MESSAGE_SIZE,
    "largest message in bytes (give both sides the same value; at most 4 GiB - 2)",
)
COALESCE_OPTION = Option(
    "coalesce",
    parse_bool,
    True,
    "join back-to-back small sends into one write (false: every send writes at once)",
)
PATTERNS = ("pair", "fanin", "broadcast")
"""pair: one producer and one consumer (the default); fanin: many named producers into one consumer (podipc.fanin);
broadcast: one producer, N subscribers each get every message (podipc.stream_broadcast)."""
SLOW_POLICIES = ("wait", "drop")
MAX_SUBSCRIBERS = 64
"""Most subscribers a broadcast producer takes (as shm://'s broadcast ring)."""


def parse_pattern(value: object) -> str:
    """The pattern option: 'pair', 'fanin' or 'broadcast'."""
    pattern = str(value).strip().lower()
    if pattern not in PATTERNS:
        raise ValueError(f"expected one of {', '.join(PATTERNS)}")
    return pattern


def parse_producers(value: object) -> int:
    """The producers option: a whole number >= 0 (0: no limit)."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = value if isinstance(value, int) else int(str(value), 10)
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def parse_subscribers(value: object) -> int:
    """The subscribers option: a count from 1 to MAX_SUBSCRIBERS."""
    count = parse_producers(value)
    if not 1 <= count <= MAX_SUBSCRIBERS:
        raise ValueError(f"must be from 1 to {MAX_SUBSCRIBERS}")
    return count


def parse_slow(value: object) -> str:
    """The slow option: 'wait' or 'drop'."""
    policy = str(value).strip().lower()
    if policy not in SLOW_POLICIES:
        raise ValueError(f"must be one of {', '.join(SLOW_POLICIES)}")
    return policy


def refuse_broadcast_options(settings: Mapping[str, Any], location: str) -> None:
    """AddressError for subscribers= or slow= without pattern=broadcast (they would be silently ignored)."""
    if settings.get("subscribers") is not None or settings.get("slow", "wait") != "wait":
        raise AddressError(f"{location}: subscribers= and slow= apply to pattern=broadcast only")


PATTERN_OPTION = Option(
    "pattern",
    parse_pattern,
    "pair",
    "pair (one producer), fanin (many named producers into one consumer; a producer with name= is fanin) "
    "or broadcast (one producer, N subscribers each get every message)",
)
PRODUCERS_OPTION = Option(
    "producers",
    parse_producers,
    0,
    "fan-in consumer (implies pattern=fanin when > 0): the stream ends once this many producers ended theirs "
    "(0: never, until closed)",
)
NAME_OPTION = Option(
    "name",
    check_producer_name,
    "",
    "fan-in producer: its name at the consumer, unique among live producers (default HOSTNAME-PID-RANDOM)",
)
SUBSCRIBERS_OPTION = Option(
    "subscribers",
    parse_subscribers,
    None,
    f"broadcast: subscribers (1 to {MAX_SUBSCRIBERS}, default 1); the producer waits for this many before its "
    "first send",
)
SLOW_OPTION = Option(
    "slow",
    parse_slow,
    "wait",
    "broadcast: a slow subscriber is waited for (wait) or its messages dropped, counting its loss (drop)",
)
STREAM_OPTIONS = (
    MAX_MESSAGE_OPTION,
    COALESCE_OPTION,
    PATTERN_OPTION,
    PRODUCERS_OPTION,
    NAME_OPTION,
    SUBSCRIBERS_OPTION,
    SLOW_OPTION,
)

HELLO_SECONDS = 5.0
"""How long the acceptor gives a new connection to send its HELLO."""
LISTEN_BACKLOG = 16
HELLO_REST_BYTES = 512
"""Enough to read what follows a fan-in hello (its name) before answering and closing."""
ACCEPTOR_JOIN_SECONDS = 5.0

SEND_FLAGS = socket.MSG_NOSIGNAL
"""Flags of every send on a stream socket: a vanished peer is an error, never SIGPIPE."""
_DONTWAIT = socket.MSG_DONTWAIT
_ATTACHED = (1).to_bytes(8, "little")


def socket_problem(family: socket.AddressFamily, kind: str) -> str | None:
    """None when stream sockets of `family` can be created here, else why not (`kind` names them: 'TCP', 'Unix')."""
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"cannot create {kind} sockets here: {exc.strerror}"
    return None


def take_message_limit(endpoint: _Endpoint) -> None:
    """Set a stream endpoint's largest message, and where that limit comes from, from its max_message_size option."""
    endpoint.max_message_size = int(endpoint.settings["max_message_size"])
    endpoint.max_message_source = "max_message_size option"
    endpoint.max_message_fix = f"raise max_message_size= on both sides (at most {MAX_FRAME_LENGTH})"


def peer_gone(error: OSError, what: str, peer: str) -> PeerGone:
    """A PeerGone for an OSError on a connected stream socket."""
    reason = error.strerror or type(error).__name__
    return PeerGone(f"the {peer} of {what} is gone ({reason}): it died or closed without ending the stream")


# --- consumer --------------------------------------------------------------


def hang_up(connection: socket.socket, how: int) -> None:
    """End a connection the acceptor turns away for everyone holding it, then close our descriptor.

    shutdown() acts on the connection, close() only on this descriptor: a child forked while the
    acceptor thread held the connection outside `_pending` (between accept and the verdict) keeps
    a copy that the child's fork hook cannot know of, and with close() alone the stranger would
    wait for that child to exit before it saw the connection end. SHUT_WR after an answer lets the
    peer read the answer first.
    """
    with contextlib.suppress(OSError):
        connection.shutdown(how)
    connection.close()


class _Acceptor:
    """Answers connections on a listening socket in a thread: attaches one producer, refuses the rest.

    Makes `attached_fd` (an eventfd) readable once a producer is attached or listening failed.
    """

    def __init__(self, listener: socket.socket, configure: Any, name: str) -> None:
        self.listener = listener
        self.configure = configure
        self.attached: socket.socket | None = None
        self.rejected = 0
        self.first_rejected: bytes | None = None
        self.refused_busy = 0
        self.refused_pattern = 0
        self.failure: OSError | None = None
        self.attached_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending: dict[int, tuple[socket.socket, bytearray, float]] = {}
        self._thread = threading.Thread(target=self._run, name=f"podipc-acceptor {name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every connection it still holds (not the attached one)."""
        if self._wake_write < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(ACCEPTOR_JOIN_SECONDS)
        self._close_descriptors()

    def drop_inherited(self) -> None:
        """After fork: the thread is not here; close the pipe, the eventfd and pending copies only."""
        for connection, _, _ in self._pending.values():
            connection.close()
        self._pending.clear()
        if self.attached is not None:
            self.attached.close()
        self._close_descriptors()

    def _close_descriptors(self) -> None:
        if self._wake_write >= 0:
            os.close(self._wake_write)
            os.close(self._wake_read)
            os.close(self.attached_fd)
            self._wake_write = self._wake_read = self.attached_fd = -1

    def _signal(self) -> None:
        os.write(self.attached_fd, _ATTACHED)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        poller.register(self.listener.fileno(), select.POLLIN)
        try:
            while True:
                events = poller.poll(self._poll_milliseconds())
                for fd, _ in events:
                    if fd == self._wake_read:
                        return
                    if fd == self.listener.fileno():
                        self._accept(poller)
                    else:
                        self._read_hello(poller, fd)
                self._expire(poller)
        except OSError as exc:  # the listener broke: tell the waiting recv
            self.failure = exc
            self._signal()
        finally:
            for connection, _, _ in self._pending.values():
                connection.close()
            self._pending.clear()

    def _poll_milliseconds(self) -> int:
        if not self._pending:
            return -1
        soonest = min(deadline for _, _, deadline in self._pending.values())
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _accept(self, poller: select.poll) -> None:
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)
                return
            raise
        connection.setblocking(False)
        self._pending[connection.fileno()] = (connection, bytearray(), time.monotonic() + HELLO_SECONDS)
        poller.register(connection.fileno(), select.POLLIN)

    def _read_hello(self, poller: select.poll, fd: int) -> None:
        connection, received, _ = self._pending[fd]
        try:
            chunk = connection.recv(len(HELLO) - len(received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        received += chunk
        if chunk and len(received) < len(HELLO) and HELLO.startswith(received):
            return
        poller.unregister(fd)
        del self._pending[fd]
        if bytes(received) == FANIN_HELLO:
            self.refused_pattern += 1
            self._answer_other_pattern(connection)
        elif bytes(received) != HELLO:
            self._reject(connection, bytes(received))
        elif self.attached is None:
            self._attach(connection)
        else:
            self.refused_busy += 1
            self._answer_and_close(connection, BUSY)

    def _attach(self, connection: socket.socket) -> None:
        try:
            connection.send(HELLO, SEND_FLAGS)
            self.configure(connection)
            connection.setblocking(True)
        except OSError as exc:
            self._reject(connection, HELLO, exc)
            return
        self.attached = connection
        self._signal()

    def _reject(self, connection: socket.socket, first_bytes: bytes, error: OSError | None = None) -> None:
        self.rejected += 1
        if self.first_rejected is None:
            self.first_rejected = first_bytes
        hang_up(connection, socket.SHUT_RDWR)

    def _answer_other_pattern(self, connection: socket.socket) -> None:
        """A producer of the other pattern: read the rest of its hello (closing on unread bytes resets), say so."""
        with contextlib.suppress(OSError):
            connection.recv(HELLO_REST_BYTES)
        self._answer_and_close(connection, WRONG_PATTERN)

    @staticmethod
    def _answer_and_close(connection: socket.socket, answer: bytes) -> None:
        with contextlib.suppress(OSError):
            connection.send(answer, SEND_FLAGS)
        hang_up(connection, socket.SHUT_WR)

    def _expire(self, poller: select.poll) -> None:
        now = time.monotonic()
        for fd, (connection, received, deadline) in list(self._pending.items()):
            if deadline <= now:
                poller.unregister(fd)
                del self._pending[fd]
                self._reject(connection, bytes(received))

    def describe_rejections(self) -> str:
        """Say what connections were turned away, for a PeerTimeout message ('' when none)."""
        parts = []
        if self.rejected:
            parts.append(
                f"; rejected {self.rejected} connection(s) that were not podipc producers, "
                f"first bytes {self.first_rejected!r}"
            )
        if self.refused_busy:
            parts.append(f"; refused {self.refused_busy} producer(s) because one was attached")
        if self.refused_pattern:
            parts.append(
                f"; refused {self.refused_pattern} producer(s) of the other pattern "
                "(fan-in producers at a pair consumer, or pair producers at a fan-in consumer)"
            )
        return "".join(parts)


class _DontWait:
    """A blocking socket read once without waiting (MSG_DONTWAIT): what FrameReader reads in an attempt."""

    __slots__ = ("_socket",)

    def __init__(self, connection: socket.socket) -> None:
        self._socket = connection

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        return self._socket.recv_into(buffer, nbytes, _DONTWAIT)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        return self._socket.recv(bufsize, flags | _DONTWAIT)


class StreamConsumer(Consumer):
    """The consumer of a stream-socket channel: listens at open, reads frames from one producer."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        take_message_limit(self)
        self._what = address.location
        try:
            refuse_broadcast_options(self.settings, self._what)
        except AddressError:
            self._closed = self._freed = True
            raise
        self._reader = FrameReader(self.max_message_size, address.location)
        self._ready = self._reader.ready
        self._buffered_frame = self._reader.buffered_frame
        self._read_frame = self._reader.read_frame
        self._connection: socket.socket | None = None
        self._dontwait: _DontWait | None = None
        self._acceptor: _Acceptor | None = None
        self._listener: socket.socket | None = None
        try:
            self._listener = self._listen()
            self._acceptor = _Acceptor(self._listener, self._configure_connection, self._what)
        except BaseException:
            self._closed = True
            self._freed = True
            if self._acceptor is not None:
                self._acceptor.stop()
            self._close_listener()
            raise

    # hooks for transports
    def _listen(self) -> socket.socket:
        """Create, bind and listen; raise ChannelUnavailable with the fix when that is impossible."""
        raise NotImplementedError

    def _configure_connection(self, connection: socket.socket) -> None:
        """Set options on an attached connection (TCP_NODELAY for tcp)."""

    def _remove_listener_traces(self) -> None:
        """Remove what listening left behind (the socket file of unix:///path)."""

    @property
    def rejected(self) -> int:
        """Connections turned away because their first bytes were not the podipc HELLO."""
        return self._acceptor.rejected if self._acceptor is not None else self._rejected_at_close

    _rejected_at_close = 0

    # --- the endpoint contract ---------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit, 0: try once now).

        Raises as Consumer.recv does. This is its fast version for a consumer with a
        producer attached: the next frame already cut from the last read, else a blocking
        read when there is no timeout (woken by `_interrupt()` when closed from elsewhere);
        every other case is Consumer.recv's.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.recv(self, timeout)
        try:
            if not self._state:
                ready = self._ready
                if ready:
                    return ready.pop()
                if timeout is None:
                    connection = self._connection
                    if connection is not None:
                        if UNFLUSHED:
                            flush_pending()  # what this process sent may be what we are waiting for
                        return self._read_frame(connection)
        except EndOfStream:
            self._finish_stream()
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        except OSError as exc:
            if self._closing:
                raise self._closed_error() from exc
            raise peer_gone(exc, self._what, "producer") from exc
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.recv(self, timeout)

    @holds_call_gate
    def try_recv(self) -> bytes | None:
        """The next message if one is there now, else None; never waits (as Consumer.try_recv).

        This is its fast version: a frame already cut from the last read (what the asyncio
        consumer takes most of the time); every other case is Consumer.try_recv's.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return Consumer.try_recv(self)
        try:
            if not self._state:
                ready = self._ready
                if ready:
                    return ready.pop()
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.try_recv(self)

    def _try_recv_many(self, max_count: int) -> list[bytes]:
        frames = self._reader.buffered_frames(max_count)
        if len(frames) == max_count or (frames and self._reader.buffered):
            return frames  # what is left in the buffer is the start of a frame still coming
        try:
            frame = self._try_recv()
        except EndOfStream:
            if not frames:
                raise
            self._ended = True
            return frames
        except PodIPCError as error:
            if not frames:
                raise
            self._keep(error)
            return frames
        if frame is None:
            return frames
        frames.append(frame)
        if len(frames) < max_count:
            frames += self._reader.buffered_frames(max_count - len(frames))
        return frames

    def _recv(self, deadline: float | None) -> bytes:
        connection = self._connection
        if deadline is None and connection is not None:
            return self._read_blocking(connection)
        if UNFLUSHED:
            flush_pending()
        return Consumer._recv(self, deadline)

    def _read_blocking(self, connection: socket.socket) -> bytes:
        """The next frame from a blocking read of the connection, woken by _interrupt() when closed from elsewhere."""
        if UNFLUSHED:
            flush_pending()  # what this process sent may be what we are waiting for
        try:
            return self._read_frame(connection)
        except EndOfStream:
            self._finish_stream()
            raise
        except PodIPCError:
            raise
        except OSError as exc:
            raise peer_gone(exc, self._what, "producer") from exc

    def _try_recv(self) -> bytes | None:
        frame = self._buffered_frame()
        if frame is not None:
            return frame
        source = self._dontwait
        if source is None:
            if not self._adopt():
                return None
            source = self._dontwait
            assert source is not None
        try:
            return self._read_frame(source)
        except BlockingIOError:
            return None
        except EndOfStream:
            self._finish_stream()
            raise
        except PodIPCError:
            raise
        except OSError as exc:
            raise peer_gone(exc, self._what, "producer") from exc

    def _adopt(self) -> bool:
        """Take the connection the acceptor attached, if any; raise if listening failed."""
        acceptor = self._acceptor
        if acceptor is None:
            raise PeerGone(f"{self._what}: the consumer has stopped listening")
        if acceptor.failure is not None:
            raise ChannelUnavailable(f"{self._what}: listening failed: {acceptor.failure}") from acceptor.failure
        connection = acceptor.attached
        if connection is None:
            return False
        self._dontwait = _DontWait(connection)
        self._connection = connection
        self._peer_seen = True
        self._readiness_changed()
        return True

    def _readiness(self) -> tuple[int, int, float | None]:
        connection = self._connection
        if connection is not None:
            return connection.fileno(), POLLIN, None
        acceptor = self._acceptor
        return (acceptor.attached_fd if acceptor is not None else -1), POLLIN, None

    def _peer_timeout(self) -> PeerTimeout:
        rejections = self._acceptor.describe_rejections() if self._acceptor is not None else ""
        return PeerTimeout(
            f"no producer connected to {self._what} within the wait timeout "
            f"(wait={self.settings['wait']:g}s){rejections}"
        )

    def _interrupt(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)

    def _finish_stream(self) -> None:
        """The end of stream arrived: acknowledge it and free everything (we are the call inside)."""
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.send(ACK, SEND_FLAGS)
        self._free_once()

    def _free(self) -> None:
        acceptor = self._acceptor
        if acceptor is not None:
            acceptor.stop()
            self._rejected_at_close = acceptor.rejected
            self._acceptor = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        elif acceptor is not None and acceptor.attached is not None:
            acceptor.attached.close()
        self._dontwait = None
        self._close_listener()

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        self._remove_listener_traces()

    def _drop_inherited(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.drop_inherited()
        for held in (self._connection, self._listener):
            if held is not None:
                held.close()
        self._connection = self._listener = None
        self._dontwait = None
        self._freed = True
