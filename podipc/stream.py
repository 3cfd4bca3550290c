"""The stream-socket Producer and Consumer that tcp:// and unix:// share.

A transport subclass says only how to listen (`_listen`) and which socket to connect
to (`_connection_socket`); everything else is here: the hello handshake, frames
(podipc.framing), end of stream with its ack, and error translation. Both sides
implement the endpoint contract of podipc.channel (non-blocking attempts, a stable
readiness descriptor, release only when no call is inside); they are the reference
implementation other transports follow.

Consumer: listens at open; a small acceptor thread answers connections from then on,
so a producer can start sending before the consumer's first recv. The first
connection that sends the podipc HELLO is attached (answered with HELLO); later ones
get BUSY; connections whose first bytes are not HELLO are dropped and counted, and a
consumer that then times out says so (PeerTimeout names the bytes it saw). Readiness:
the acceptor's "attached" eventfd, then the connection. A recv without a timeout reads the blocking socket directly (the fast path);
close() from elsewhere wakes it with shutdown(SHUT_RD).

Producer: connects (non-blocking) on its first send, try_send or close, retrying until
the `wait` deadline since the consumer may start later, sends HELLO and waits for the
answer. Its socket is non-blocking: a frame that went out only partly counts as sent,
its rest is kept and goes out first on the next send or close, so a Timeout (or a
ChannelClosed from a close elsewhere) always means that nothing of that message was
sent. Readiness: the socket (for writing, or for reading while it awaits the hello
answer or the end-of-stream ack); before it connects, a retry time.

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
from podipc.channel import Consumer, Option, Producer
from podipc.errors import (
    ChannelUnavailable,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
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
from podipc.waking import POLLIN, wait_for

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
_DONTWAIT = socket.MSG_DONTWAIT
_pack_header = HEADER.pack
_POLLOUT = select.POLLOUT
_ATTACHED = (1).to_bytes(8, "little")


def peer_gone(error: OSError, what: str, peer: str) -> PeerGone:
    """A PeerGone for an OSError on a connected stream socket."""
    reason = error.strerror or type(error).__name__
    return PeerGone(f"the {peer} of {what} is gone ({reason}): it died or closed without ending the stream")


# --- consumer --------------------------------------------------------------


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
        self.max_message_size = int(self.settings["max_message_size"])
        self.max_message_source = "max_message_size option"
        self.max_message_fix = f"raise max_message_size= on both sides (at most {MAX_FRAME_LENGTH})"
        self._what = address.location
        self._reader = FrameReader(self.max_message_size, address.location)
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

    def _recv(self, deadline: float | None) -> bytes:
        connection = self._connection
        if deadline is None and connection is not None:
            try:  # the fast path: a blocking read, woken by _interrupt() when closed from elsewhere
                return self._read_frame(connection)
            except EndOfStream:
                self._finish_stream()
                raise
            except PodIPCError:
                raise
            except OSError as exc:
                raise peer_gone(exc, self._what, "producer") from exc
        return Consumer._recv(self, deadline)

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
                connection.send(ACK, _SEND_FLAGS)
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


# --- producer --------------------------------------------------------------

_UNCONNECTED, _CONNECTING, _HELLO, _READY, _ENDING, _DONE = range(6)


class StreamProducer(Producer):
    """The producer of a stream-socket channel: connects on first use, sends frames."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = int(self.settings["max_message_size"])
        self.max_message_source = "max_message_size option"
        self.max_message_fix = f"raise max_message_size= on both sides (at most {MAX_FRAME_LENGTH})"
        self._what = address.location
        self._socket: socket.socket | None = None
        self._phase = _UNCONNECTED
        self._answer = bytearray()
        self._answer_deadline = 0.0
        self._retry_at = 0.0
        self._retry_pause = CONNECT_RETRY_FIRST_SECONDS
        self._last_error: OSError | None = None
        self._pending = memoryview(b"")
        self._fast = False
        """Ready and nothing pending: send() may go straight to the socket."""
        self._sock_send: Any = None
        self._sendmsg: Any = None
        self._interest = POLLIN

    # hooks for transports
    def _connection_socket(self) -> tuple[socket.socket, Any]:
        """A new socket of the right family, and the address to connect it to."""
        raise NotImplementedError

    def _unreachable(self, error: OSError) -> ChannelUnavailable:
        """The error for a connection attempt that retrying cannot fix."""
        return ChannelUnavailable(f"cannot connect to {self._what}: {error.strerror or error}")

    # --- sending -------------------------------------------------------------

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._fast:
            nbytes = len(view)
            try:
                if nbytes <= COALESCE_SIZE:
                    sent = self._sock_send(_pack_header(nbytes) + view, _SEND_FLAGS)
                else:
                    sent = self._sendmsg([_pack_header(nbytes), view], (), _SEND_FLAGS)
            except BlockingIOError:
                pass  # no room: nothing went out; wait below
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            else:
                if sent != nbytes + HEADER_SIZE:
                    self._finish_frame(_pack_header(nbytes), view, sent, deadline)
                return
        Producer._send(self, view, deadline)

    def _try_send(self, view: memoryview) -> bool:
        if self._phase != _READY and not self._progress():
            return False
        if self._pending and not self._flush():
            return False
        nbytes = len(view)
        header = _pack_header(nbytes)
        try:
            sent = self._socket.sendmsg([header, view], (), _SEND_FLAGS)  # type: ignore[union-attr]
        except BlockingIOError:
            self._want(_POLLOUT)
            return False
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        if sent != nbytes + HEADER_SIZE:
            self._keep_rest(header, view, sent)
        return True

    def _finish_frame(self, header: bytes, view: memoryview, sent: int, deadline: float | None) -> None:
        """A frame went out partly: send the rest from the caller's buffer while we may wait, else keep it pending."""
        sock = self._socket
        assert sock is not None
        pieces = _skip([header, view], sent)
        waker_fd = self._waker_fd()
        while pieces:
            if self._state or (deadline is not None and time.monotonic() >= deadline):
                break  # closing or out of time: the frame counts as sent, its rest goes out first later
            wait_for(sock.fileno(), select.POLLOUT, waker_fd, None if deadline is None else deadline - time.monotonic())
            try:
                sent = sock.sendmsg(pieces, (), _SEND_FLAGS)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            pieces = _skip(pieces, sent)
        if pieces:
            self._pending = memoryview(b"".join(bytes(piece) for piece in pieces))
            self._fast = False
            self._want(_POLLOUT)

    def _keep_rest(self, header: bytes, view: memoryview, sent: int) -> None:
        self._pending = memoryview(b"".join(bytes(piece) for piece in _skip([header, view], sent)))
        self._fast = False
        self._want(_POLLOUT)

    def _flush(self) -> bool:
        """Send what a previous frame left pending; True when nothing is left."""
        try:
            sent = self._socket.send(self._pending, _SEND_FLAGS)  # type: ignore[union-attr]
        except BlockingIOError:
            self._want(_POLLOUT)
            return False
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        self._pending = self._pending[sent:]
        if self._pending:
            self._want(_POLLOUT)
            return False
        if self._phase == _READY:
            self._fast = True
        return True

    def _try_flush(self) -> bool:
        return not self._pending or self._flush()

    def _try_prepare(self) -> bool:
        if self._phase != _READY and not self._progress():
            return False
        if self._pending and not self._flush():
            return False
        self._want(_POLLOUT)
        return True

    # --- connecting and the handshake -----------------------------------------

    def _progress(self) -> bool:
        """One non-blocking step of connecting and the hello handshake; True once ready to send."""
        if self._phase == _UNCONNECTED and not self._start_connect():
            return False
        if self._phase == _CONNECTING and not self._check_connected():
            return False
        if self._phase == _HELLO and not self._read_answer():
            return False
        if self._phase in (_ENDING, _DONE):
            raise self._closed_error()
        return self._phase == _READY

    def _start_connect(self) -> bool:
        now = time.monotonic()
        if now < self._retry_at:
            return False
        sock, where = self._connection_socket()
        sock.setblocking(False)
        code = sock.connect_ex(where)
        if code in (0, errno.EINPROGRESS):
            self._adopt(sock)
            self._phase = _CONNECTING
            if code == 0:
                return self._connected()
            self._want(_POLLOUT)
            return False
        sock.close()
        self._refused(OSError(code, os.strerror(code)))
        return False

    def _adopt(self, sock: socket.socket) -> None:
        self._socket = sock
        self._readiness_changed()

    def _refused(self, error: OSError) -> None:
        """A connection attempt failed: retry later if the consumer may still come, else raise."""
        if error.errno not in NOT_LISTENING_ERRNOS:
            raise self._unreachable(error) from error
        self._last_error = error
        self._retry_at = time.monotonic() + self._retry_pause
        self._retry_pause = min(self._retry_pause * 2, CONNECT_RETRY_MAX_SECONDS)

    def _check_connected(self) -> bool:
        sock = self._socket
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            try:
                sock.getpeername()
            except OSError:  # still in progress (a spurious wake)
                self._want(_POLLOUT)
                return False
            return self._connected()
        self._drop_socket()
        self._phase = _UNCONNECTED
        self._refused(OSError(code, os.strerror(code)))
        return False

    def _drop_socket(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
            self._readiness_changed()

    def _connected(self) -> bool:
        sock = self._socket
        assert sock is not None
        self._configure(sock)
        try:
            sock.send(HELLO, _SEND_FLAGS)  # 8 bytes into an empty buffer: all or an error
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        self._phase = _HELLO
        # a consumer that accepted just before the wait deadline still gets time to answer
        self._answer_deadline = max(self.wait_deadline, time.monotonic() + HELLO_ANSWER_SECONDS)
        self.wait_deadline = self._answer_deadline
        return self._read_answer()

    def _configure(self, sock: socket.socket) -> None:
        """Options for a connected socket (transport hook; tcp sets TCP_NODELAY)."""

    def _read_answer(self) -> bool:
        sock = self._socket
        assert sock is not None
        answer = self._answer
        while len(answer) < len(HELLO):
            try:
                chunk = sock.recv(len(HELLO) - len(answer))
            except BlockingIOError:
                self._want(POLLIN)
                return False
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
        self._phase = _READY
        self._peer_seen = True
        self._sock_send = sock.send
        self._sendmsg = sock.sendmsg
        self._fast = not self._pending
        self._want(_POLLOUT)
        return True

    def _peer_timeout(self) -> PeerTimeout:
        if self._phase == _HELLO:
            return PeerTimeout(
                f"connected to {self._what}, but no podipc consumer answered the hello within the wait "
                f"timeout; is a podipc consumer listening there?"
            )
        reason = self._last_error.strerror if self._last_error is not None else ""
        return PeerTimeout(
            f"no consumer listening at {self._what} within the wait timeout (wait={self.settings['wait']:g}s): "
            f"{reason}; start the consumer or raise wait="
        )

    # --- readiness, closing ---------------------------------------------------

    def _want(self, events: int) -> None:
        """Say what the socket must become ready for before the next attempt (POLLIN or POLLOUT)."""
        if events != self._interest:
            self._interest = events
            self._readiness_changed()

    def _readiness(self) -> tuple[int, int, float | None]:
        sock = self._socket
        if sock is None:
            return -1, 0, max(0.0, self._retry_at - time.monotonic())
        return sock.fileno(), self._interest, None

    def _try_close(self) -> bool:
        if self._phase < _READY and not self._progress():
            return False
        if self._phase == _READY:
            if self._pending and not self._flush():
                return False
            self._pending = memoryview(end_of_stream_frame())
            self._fast = False
            self._phase = _ENDING
        if self._pending and not self._flush():
            return False
        return self._read_ack()

    def _read_ack(self) -> bool:
        sock = self._socket
        assert sock is not None
        try:
            answer = sock.recv(1)
        except BlockingIOError:
            self._want(POLLIN)
            return False
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        if not answer:
            raise PeerGone(f"the consumer of {self._what} closed the connection before taking the end of stream")
        if answer != ACK:
            raise ProtocolError(f"{self._what} answered the end of stream with {answer!r} instead of {ACK!r}")
        self._phase = _DONE
        return True

    def _free(self) -> None:
        self._drop_socket()
        self._fast = False
        self._sock_send = self._sendmsg = None

    def _drop_inherited(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._fast = False
        self._freed = True


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
