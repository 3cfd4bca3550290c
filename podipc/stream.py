"""The stream-socket Producer and Consumer that tcp:// and unix:// share.

A transport subclass says only how to listen (`_listen`) and how to connect
(`_connect_once`); everything else is here: the hello handshake, frames
(podipc.framing), end of stream with its ack, timeouts and error translation.

Consumer: listens at open; a small acceptor thread answers connections from then on,
so a producer can start sending before the consumer's first recv. The first
connection that sends the podipc HELLO is attached (answered with HELLO); later ones
get BUSY; connections whose first bytes are not HELLO are dropped and counted, and a
consumer that then times out says so (PeerTimeout names the bytes it saw).

Producer: connects on its first send (or close), retrying until the `wait` deadline
since the consumer may start later, sends HELLO and waits for the answer. A frame
that went out partly before a send's deadline is still counted as sent: its rest is
kept and goes out first on the next send or close, so a Timeout always means that
nothing of that message was sent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, earliest, remaining
from podipc.errors import (
    ChannelUnavailable,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.framing import (
    ACK,
    BUSY,
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    HEADER_SIZE,
    HELLO,
    MAX_FRAME_LENGTH,
    FrameReader,
    check_max_message_size,
    end_of_stream_frame,
)

MAX_MESSAGE_OPTION = Option(
    "max_message_size",
    check_max_message_size,
    DEFAULT_MAX_MESSAGE_SIZE,
    "largest message in bytes (give both sides the same value; at most 4 GiB - 2)",
)
STREAM_OPTIONS = (MAX_MESSAGE_OPTION,)

COALESCE_SIZE = 2048
"""Messages up to this size are copied behind their header and sent with one send; larger ones use sendmsg."""
HELLO_SECONDS = 5.0
"""How long the acceptor gives a new connection to send its HELLO."""
HELLO_ANSWER_SECONDS = 2.0
"""How long a producer waits for the consumer's answer at least, even near its wait deadline."""
CONNECT_RETRY_FIRST_SECONDS = 0.005
CONNECT_RETRY_MAX_SECONDS = 0.1
LISTEN_BACKLOG = 16
ACCEPTOR_JOIN_SECONDS = 5.0

NOT_LISTENING_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ENOENT,
        errno.EAGAIN,
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)

_SEND_FLAGS = socket.MSG_NOSIGNAL
_pack_header = HEADER.pack
_open_endpoints: weakref.WeakSet[StreamProducer | StreamConsumer] = weakref.WeakSet()


def _forget_after_fork() -> None:
    """In a forked child, drop the copies of the parent's sockets without touching the parent's stream."""
    for endpoint in list(_open_endpoints):
        endpoint._drop_inherited()


os.register_at_fork(after_in_child=_forget_after_fork)


def peer_gone(error: OSError, what: str, peer: str) -> PeerGone:
    """A PeerGone for an OSError on a connected stream socket."""
    reason = error.strerror or type(error).__name__
    return PeerGone(f"the {peer} of {what} is gone ({reason}): it died or closed without ending the stream")


# --- consumer --------------------------------------------------------------


class _Acceptor:
    """Answers connections on a listening socket in a thread: attaches one producer, refuses the rest."""

    def __init__(self, listener: socket.socket, configure: Any, name: str) -> None:
        self.listener = listener
        self.configure = configure
        self.attached: socket.socket | None = None
        self.attached_event = threading.Event()
        self.rejected = 0
        self.first_rejected: bytes | None = None
        self.refused_busy = 0
        self.failure: OSError | None = None
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
        os.close(self._wake_write)
        os.close(self._wake_read)
        self._wake_write = self._wake_read = -1

    def drop_inherited(self) -> None:
        """After fork: the thread is not here; close the pipe and pending copies only."""
        for connection, _, _ in self._pending.values():
            connection.close()
        self._pending.clear()
        if self._wake_write >= 0:
            os.close(self._wake_write)
            os.close(self._wake_read)
            self._wake_write = self._wake_read = -1

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
            self.attached_event.set()
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
        if bytes(received) != HELLO:
            self._reject(connection, bytes(received))
        elif self.attached is None:
            self._attach(connection)
        else:
            self.refused_busy += 1
            self._answer_and_close(connection, BUSY)

    def _attach(self, connection: socket.socket) -> None:
        try:
            connection.send(HELLO, _SEND_FLAGS)
            self.configure(connection)
        except OSError as exc:
            self._reject(connection, HELLO, exc)
            return
        self.attached = connection
        self.attached_event.set()

    def _reject(self, connection: socket.socket, first_bytes: bytes, error: OSError | None = None) -> None:
        self.rejected += 1
        if self.first_rejected is None:
            self.first_rejected = first_bytes
        connection.close()

    @staticmethod
    def _answer_and_close(connection: socket.socket, answer: bytes) -> None:
        with contextlib.suppress(OSError):
            connection.send(answer, _SEND_FLAGS)
        connection.close()

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
        return "".join(parts)


class StreamConsumer(Consumer):
    """The consumer of a stream-socket channel: listens at open, reads frames from one producer."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = int(self.settings["max_message_size"])
        self.max_message_source = "max_message_size option"
        self.max_message_fix = f"raise max_message_size= on both sides (at most {MAX_FRAME_LENGTH})"
        self._what = address.location
        self._reader = FrameReader(self.max_message_size, address.location)
        self._buffered_frame = self._reader.buffered_frame
        self._read_frame = self._reader.read_frame
        self._connection: socket.socket | None = None
        self._blocking = True
        self._acceptor: _Acceptor | None = None
        self._listener: socket.socket | None = None
        try:
            self._listener = self._listen()
            self._acceptor = _Acceptor(self._listener, self._configure_connection, self._what)
        except BaseException:
            self._closed = True
            self._close_listener()
            raise
        _open_endpoints.add(self)

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

    def _recv(self, deadline: float | None) -> bytes:
        if deadline is None and self._blocking:
            connection = self._connection
            if connection is not None:
                try:
                    return self._read_frame(connection)
                except PodIPCError as error:
                    self._after_error(error)
                    raise
                except OSError as exc:
                    raise peer_gone(exc, self._what, "producer") from exc
        return self._recv_slowly(deadline)

    def _recv_slowly(self, deadline: float | None) -> bytes:
        frame = self._buffered_frame()
        if frame is not None:
            return frame
        connection = self._connection
        if connection is None:
            connection = self._wait_for_producer(deadline)
        try:
            if deadline is None:
                if not self._blocking:
                    connection.settimeout(None)
                    self._blocking = True
                return self._read_frame(connection)
            self._blocking = False
            return self._read_frame(_DeadlineSocket(connection, deadline))
        except PodIPCError as error:
            self._after_error(error)
            raise
        except TimeoutError as exc:
            raise Timeout(f"no message on {self._what} within the timeout") from exc
        except OSError as exc:
            raise peer_gone(exc, self._what, "producer") from exc

    def _after_error(self, error: PodIPCError) -> None:
        """At the end of stream, acknowledge it and free everything."""
        if isinstance(error, EndOfStream):
            self._finish()

    def _wait_for_producer(self, deadline: float | None) -> socket.socket:
        acceptor = self._acceptor
        if acceptor is None:
            raise PeerGone(f"{self._what}: the consumer has stopped listening")
        limit = earliest(deadline, self.wait_deadline)
        acceptor.attached_event.wait(remaining(limit))
        if acceptor.failure is not None:
            raise ChannelUnavailable(f"{self._what}: listening failed: {acceptor.failure}") from acceptor.failure
        connection = acceptor.attached
        if connection is None:
            if deadline is not None and deadline < self.wait_deadline:
                raise Timeout(f"no producer attached to {self._what} within the timeout")
            raise PeerTimeout(
                f"no producer connected to {self._what} within the wait timeout "
                f"(wait={self.settings['wait']:g}s){acceptor.describe_rejections()}"
            )
        connection.setblocking(True)
        self._blocking = True
        self._connection = connection
        return connection

    def _finish(self) -> None:
        """The end of stream arrived: acknowledge it and free everything."""
        connection = self._connection
        if connection is not None:
            try:
                connection.settimeout(None)
                connection.send(ACK, _SEND_FLAGS)
            except OSError:
                pass
        self._release()

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
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
        self._close_listener()
        _open_endpoints.discard(self)

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
        self._closed = True


class _DeadlineSocket:
    """A socket seen through a deadline: every receive waits at most until then."""

    __slots__ = ("_deadline", "_socket")

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        self._socket = connection
        self._deadline = deadline

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._socket.settimeout(left)

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        self._arm()
        return self._socket.recv_into(buffer, nbytes)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        self._arm()
        return self._socket.recv(bufsize, flags)


# --- producer --------------------------------------------------------------


class StreamProducer(Producer):
    """The producer of a stream-socket channel: connects on first use, sends frames."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = int(self.settings["max_message_size"])
        self.max_message_source = "max_message_size option"
        self.max_message_fix = f"raise max_message_size= on both sides (at most {MAX_FRAME_LENGTH})"
        self._what = address.location
        self._socket: socket.socket | None = None
        self._answer = bytearray()
        self._ready = False
        self._fast = False
        """Connected, blocking and nothing pending: send() may go straight to the socket."""
        self._blocking = True
        self._pending = b""
        self._sendall: Any = None
        self._sendmsg: Any = None
        _open_endpoints.add(self)

    def _connect_once(self, timeout: float | None) -> socket.socket:
        """One connection attempt; OSError with an errno in NOT_LISTENING_ERRNOS means try again."""
        raise NotImplementedError

    def _unreachable(self, error: OSError) -> ChannelUnavailable:
        """The error for a connection attempt that retrying cannot fix."""
        return ChannelUnavailable(f"cannot connect to {self._what}: {error.strerror or error}")

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if deadline is None and self._fast:
            nbytes = len(view)
            try:
                if nbytes <= COALESCE_SIZE:
                    self._sendall(_pack_header(nbytes) + view, _SEND_FLAGS)
                else:
                    sent = self._sendmsg([_pack_header(nbytes), view], (), _SEND_FLAGS)
                    if sent != nbytes + HEADER_SIZE:
                        self._send_pieces([_pack_header(nbytes), view], sent)
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            return
        self._send_slowly(view, deadline)

    def _send_pieces(self, pieces: list[Any], sent: int = 0) -> None:
        """Send buffers with sendmsg until all are out (blocking socket); `sent` bytes went out already."""
        sendmsg = self._socket.sendmsg  # type: ignore[union-attr]
        left = sum(memoryview(piece).nbytes for piece in pieces) - sent
        while left:
            pieces = _skip(pieces, sent)
            sent = sendmsg(pieces, (), _SEND_FLAGS)
            left -= sent

    def _send_slowly(self, view: memoryview, deadline: float | None) -> None:
        self._ensure_ready(deadline)
        sock = self._socket
        assert sock is not None
        pieces = [_pack_header(len(view)), view]
        try:
            if self._pending:
                self._flush_pending(deadline)
            if deadline is None:
                self._set_blocking(sock)
                self._send_pieces(pieces)
                self._fast = True
                return
            self._fast = False
            self._send_before(sock, pieces, deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc

    def _send_before(self, sock: socket.socket, pieces: list[Any], deadline: float) -> None:
        """Send a frame; Timeout if none of it went out by the deadline, else keep its rest pending."""
        self._blocking = False
        left = sum(memoryview(piece).nbytes for piece in pieces)
        sent_any = False
        while left:
            wait = deadline - time.monotonic()
            try:
                if wait <= 0:
                    raise TimeoutError
                sock.settimeout(wait)
                sent = sock.sendmsg(pieces, (), _SEND_FLAGS)
            except TimeoutError as exc:
                if not sent_any:
                    raise Timeout(f"no room on {self._what} within the timeout: the consumer is not reading") from exc
                self._pending = b"".join(bytes(piece) for piece in pieces)
                return
            sent_any = True
            left -= sent
            pieces = _skip(pieces, sent)

    def _flush_pending(self, deadline: float | None) -> None:
        """Finish the frame a previous send left partly sent (Timeout if it cannot)."""
        sock = self._socket
        assert sock is not None
        view = memoryview(self._pending)
        sent_total = 0
        try:
            while sent_total < len(view):
                if deadline is None:
                    self._set_blocking(sock)
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise TimeoutError
                    self._blocking = False
                    sock.settimeout(wait)
                sent_total += sock.send(view[sent_total:], _SEND_FLAGS)
        except TimeoutError as exc:
            self._pending = bytes(view[sent_total:])
            raise Timeout(
                f"no room on {self._what} within the timeout: the consumer is not reading "
                "(the previous message is still going out)"
            ) from exc
        self._pending = b""

    def _set_blocking(self, sock: socket.socket) -> None:
        if not self._blocking:
            sock.settimeout(None)
            self._blocking = True

    def _ensure_ready(self, deadline: float | None) -> None:
        """Connect and complete the handshake, waiting for the consumer as the rendezvous rule says."""
        if self._ready:
            return
        if self._socket is None:
            self._socket = self._connect(deadline)
            try:
                self._socket.send(HELLO, _SEND_FLAGS)
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            self._answer_deadline = max(self.wait_deadline, time.monotonic() + HELLO_ANSWER_SECONDS)
        self._await_answer(deadline)
        sock = self._socket
        sock.settimeout(None)
        self._blocking = True
        self._sendall = sock.sendall
        self._sendmsg = sock.sendmsg
        self._ready = True
        self._fast = not self._pending

    def _connect(self, deadline: float | None) -> socket.socket:
        limit = earliest(deadline, self.wait_deadline)
        pause = CONNECT_RETRY_FIRST_SECONDS
        last_error: OSError | None = None
        while True:
            try:
                left = remaining(limit)
                return self._connect_once(None if left is None else max(left, CONNECT_RETRY_FIRST_SECONDS))
            except OSError as exc:
                if exc.errno not in NOT_LISTENING_ERRNOS and not isinstance(exc, TimeoutError):
                    raise self._unreachable(exc) from exc
                last_error = exc
            left = remaining(limit)
            if left is not None and left <= 0:
                if deadline is not None and limit == deadline and deadline < self.wait_deadline:
                    raise Timeout(f"no consumer listening at {self._what} within the timeout") from last_error
                raise PeerTimeout(
                    f"no consumer listening at {self._what} within the wait timeout (wait={self.settings['wait']:g}s): "
                    f"{last_error.strerror if last_error is not None else ''}; start the consumer or raise wait="
                ) from last_error
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, CONNECT_RETRY_MAX_SECONDS)

    def _await_answer(self, deadline: float | None) -> None:
        sock = self._socket
        assert sock is not None
        answer = self._answer
        limit = earliest(deadline, self._answer_deadline)
        while len(answer) < len(HELLO):
            left = remaining(limit)
            try:
                if left is not None and left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(len(HELLO) - len(answer))
            except TimeoutError as exc:
                if deadline is not None and deadline < self._answer_deadline:
                    raise Timeout(f"the consumer at {self._what} did not answer within the timeout") from exc
                raise PeerTimeout(
                    f"connected to {self._what}, but no podipc consumer answered the hello within the wait "
                    f"timeout; is a podipc consumer listening there?"
                ) from exc
            except ConnectionResetError as exc:
                raise ProtocolError(
                    f"{self._what} reset the connection instead of answering the podipc hello; "
                    "it is not a podipc consumer (or it died)"
                ) from exc
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            if not chunk:
                raise ProtocolError(
                    f"{self._what} closed the connection without answering the podipc hello "
                    f"(got {bytes(answer)!r}); it is not a podipc consumer"
                )
            answer += chunk
        if answer == BUSY:
            raise ChannelUnavailable(
                f"another producer is attached to {self._what}; a channel has one producer and one consumer"
            )
        if answer != HELLO:
            raise ProtocolError(
                f"{self._what} answered {bytes(answer)!r} instead of the podipc hello {HELLO!r}; "
                "it is not a podipc consumer (or speaks another version)"
            )

    def _close(self, deadline: float | None) -> None:
        self._ensure_ready(deadline)
        sock = self._socket
        assert sock is not None
        try:
            if self._pending:
                self._flush_pending(deadline)
            self._send_end(sock, deadline)
            self._await_ack(sock, deadline)
        except PodIPCError:
            raise
        except TimeoutError as exc:
            raise Timeout(f"the consumer at {self._what} did not take the end of stream within the timeout") from exc
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        self._release()

    def _send_end(self, sock: socket.socket, deadline: float | None) -> None:
        if deadline is None:
            self._set_blocking(sock)
        else:
            sock.settimeout(max(remaining(deadline) or 0.0, 1e-6))
        sock.sendall(end_of_stream_frame(), _SEND_FLAGS)

    def _await_ack(self, sock: socket.socket, deadline: float | None) -> None:
        sock.settimeout(None if deadline is None else max(remaining(deadline) or 0.0, 1e-6))
        answer = sock.recv(1)
        if not answer:
            raise PeerGone(f"the consumer of {self._what} closed the connection before taking the end of stream")
        if answer != ACK:
            raise ProtocolError(f"{self._what} answered the end of stream with {answer!r} instead of {ACK!r}")

    def _abort(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._ready = self._fast = False
        self._sendall = None
        self._sendmsg = None
        _open_endpoints.discard(self)

    def _drop_inherited(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._ready = self._fast = False
        self._closed = True


def _skip(pieces: list[Any], count: int) -> list[Any]:
    """The buffers left after the first `count` bytes of `pieces` went out."""
    rest: list[Any] = []
    for piece in pieces:
        view = memoryview(piece)
        if count >= view.nbytes:
            count -= view.nbytes
            continue
        rest.append(view[count:])
        count = 0
    return rest
