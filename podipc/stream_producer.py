"""The stream-socket Producer that tcp:// and unix:// share (their Consumer: podipc.stream).

Producer: connects (non-blocking) on its first send, try_send or close, retrying until
the `wait` deadline since the consumer may start later, sends HELLO and waits for the
answer. Its socket is non-blocking: a frame that went out only partly counts as sent,
its rest is kept and goes out first on the next send or close, so a Timeout (or a
ChannelClosed from a close elsewhere) always means that nothing of that message was
sent. Readiness: the socket (for writing, or for reading while it awaits the hello
answer or the end-of-stream ack); before it connects, a retry time.

Coalescing (option `coalesce`, on by default): a small message (COALESCE_SIZE) sent less
than STREAM_BURST_START_SECONDS after the previous send returned starts a burst and waits in
the producer's outbox, as does each small message within BURST_HOLD_SECONDS of the one
before; the outbox is written in one write at OUTBOX_BYTES and the burst goes on. A send
that had to wait for room goes on as a burst too (the consumer is behind: what follows
could not leave sooner). Every other message is written within its send(), behind the
outbox, and a pause of BURST_HOLD_SECONDS ends the burst. The last messages of a burst are written
by the process's flusher thread (podipc.flushing): as soon as it holds the interpreter and no
call is inside the producer, so at once when the sending thread blocks or sleeps, within
the interpreter's switch interval while it runs Python code, plus a FLUSH_TICK_SECONDS
tick when it found a send inside; a stream consumer of the same process writes them
before it blocks (`flush_pending`); flush() and close() write them at once. What the
outbox holds counts as sent: a Timeout still means nothing of that message was sent, and
a kill -9 loses the outbox (at most OUTBOX_BYTES). send_many() writes the outbox and the
batch's frames in one write (up to GATHER_BYTES at a time).

Why one module of ~630 lines: connecting, partial frames, the outbox and the flusher's
hand-off all act on the same socket state under the same call gate; the flusher itself
lives apart (podipc.flushing).
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from podipc.address import Address
from podipc.coalescing import CoalescingProducer
from podipc.endpoint import holds_call_gate
from podipc.errors import (
    AddressError,
    ChannelUnavailable,
    NameTaken,
    PeerGone,
    PeerTimeout,
    ProtocolError,
)
from podipc.flushing import BURST_HOLD_SECONDS, STREAM_BURST_START_SECONDS
from podipc.framing import (
    ACK,
    BROADCAST_HELLO,
    BUSY,
    FANIN_HELLO,
    HEADER,
    HEADER_SIZE,
    HELLO,
    NAME_TAKEN,
    WRONG_PATTERN,
    end_of_stream_frame,
    fanin_hello,
)
from podipc.options import Option, deadline_after
from podipc.producing import Producer
from podipc.stream import SEND_FLAGS, STREAM_OPTIONS, peer_gone, refuse_broadcast_options, take_message_limit
from podipc.waking import POLLIN, wait_for

COALESCE_SIZE = 2048
"""Messages up to this size are copied behind their header (and may wait in the outbox); larger ones use sendmsg."""
OUTBOX_BYTES = 64 * 1024
"""A burst's outbox is written as soon as it holds this many bytes; a send finding it that full waits for room."""
GATHER_BYTES = 256 * 1024
"""send_many writes at most this many bytes of small frames per attempt."""
HELLO_ANSWER_SECONDS = 2.0
"""How long a producer waits for the consumer's answer at least, even near its wait deadline."""
CONNECT_RETRY_FIRST_SECONDS = 0.005
CONNECT_RETRY_MAX_SECONDS = 0.1

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

_pack_header = HEADER.pack
_POLLOUT = select.POLLOUT
_monotonic = time.monotonic


# --- producer --------------------------------------------------------------

_UNCONNECTED, _CONNECTING, _HELLO, _READY, _ENDING, _DONE = range(6)


class StreamProducer(CoalescingProducer):
    """The producer of a stream-socket channel: connects on first use, sends frames.

    Coalescing (the `coalesce` option, on by default): a small message (up to
    COALESCE_SIZE bytes) sent back-to-back with the previous one waits in a user-space
    outbox, which leaves in one write; every other message goes out within its send()
    (behind what the outbox holds, in order). `_send` says what back-to-back means, the
    module docstring how long a message may wait.
    """

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    waits_forever: ClassVar[bool] = True
    _hello = HELLO
    """What this producer says first: HELLO, or a fan-in producer's FANIN_HELLO and name."""
    _accepted = HELLO
    """The consumer's answer that accepts it."""
    name = ""
    """A fan-in producer's name at the consumer ('' for a pair producer)."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        take_message_limit(self)
        self._what = address.location
        try:
            refuse_broadcast_options(self.settings, self._what)
        except AddressError:
            self._closed = self._freed = True
            raise
        self._socket: socket.socket | None = None
        self._phase = _UNCONNECTED
        self._answer = bytearray()
        self._retry_at = 0.0
        self._retry_pause = CONNECT_RETRY_FIRST_SECONDS
        self._last_error: OSError | None = None
        self._outbox = bytearray()
        """Bytes accepted but not yet written: frames of a burst, the tail of a frame the kernel took in part."""
        self._fast = False
        """Ready to send: send() may go straight to the outbox or the socket."""
        self._last_send = 0.0
        """When the last coalesced send began, or the last write ended (monotonic seconds)."""
        self._burst_start = 0.0
        """STREAM_BURST_START_SECONDS once connected, 0 when not (or coalescing is off)."""
        self._burst_window = 0.0
        """How soon after the previous send a small send joins an empty outbox: `_burst_start`, BURST_HOLD_SECONDS
        while a burst goes on (its outbox was just written, or the send before waited for room)."""
        self._interest = POLLIN
        self._coalesce_limit = min(COALESCE_SIZE, self.max_message_size)
        self._coalescing: bool = self.settings["coalesce"]
        if self.settings.get("name") or self.settings.get("pattern") == "fanin":
            self._join_fan_in(self.settings.get("name") or default_producer_name())

    def _join_fan_in(self, name: str) -> None:
        """Say the fan-in hello with `name` instead of the pair hello (the options name= or pattern=fanin)."""
        self.name = name
        self._hello = fanin_hello(name)
        self._accepted = FANIN_HELLO

    # hooks for transports
    def _connection_socket(self) -> tuple[socket.socket, Any]:
        """A new socket of the right family, and the address to connect it to."""
        raise NotImplementedError

    def _unreachable(self, error: OSError) -> ChannelUnavailable:
        """The error for a connection attempt that retrying cannot fix."""
        return ChannelUnavailable(f"cannot connect to {self._what}: {error.strerror or error}")

    # --- sending -------------------------------------------------------------

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit, 0: try once now).

        Raises as Producer.send does. This is its fast version for a small bytes or
        bytearray message on a connected producer: into the outbox when back-to-back, else
        one write; every other case is Producer.send's.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            Producer.send(self, data, timeout)
            return
        try:
            if not self._state and (type(data) is bytearray or type(data) is bytes):
                nbytes = len(data)
                outbox = self._outbox
                if nbytes <= self._coalesce_limit:
                    now = _monotonic()
                    if outbox:
                        if now - self._last_send < BURST_HOLD_SECONDS:
                            if len(outbox) < OUTBOX_BYTES:
                                self._last_send = now
                                outbox += _pack_header(nbytes)
                                outbox += data
                                if len(outbox) >= OUTBOX_BYTES:
                                    self._write_outbox()  # what the kernel does not take now stays, counted as sent
                                    self._last_send = _monotonic()
                                return
                        else:
                            self._burst_window = self._burst_start  # a pause ended the burst
                    elif now - self._last_send < self._burst_window:
                        self._last_send = now
                        self._burst_window = BURST_HOLD_SECONDS
                        outbox += _pack_header(nbytes)
                        outbox += data
                        if not self._watched:
                            self._watch()
                        return
                    else:
                        self._burst_window = self._burst_start
                if not outbox and self._fast and nbytes <= self.max_message_size:
                    sock = self._socket
                    assert sock is not None
                    try:
                        if nbytes <= COALESCE_SIZE:
                            sent = sock.send(_pack_header(nbytes) + data, SEND_FLAGS)
                            self._last_send = _monotonic()
                        else:
                            sent = sock.sendmsg([_pack_header(nbytes), data], (), SEND_FLAGS)
                    except BlockingIOError:
                        sent = -1  # no room: nothing went out; Producer.send waits
                    except OSError as exc:
                        raise peer_gone(exc, self._what, "consumer") from exc
                    if sent >= 0:
                        if sent != nbytes + HEADER_SIZE:
                            view = memoryview(data)
                            self._finish_frame(_pack_header(nbytes), view, sent, deadline_after(timeout))
                        return
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        Producer.send(self, data, timeout)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        """Send one message (the base's path: memoryviews, large messages, after send() found no room).

        A small message joins the outbox when back-to-back (as in send()); otherwise the
        message goes straight to the socket when nothing is pending, else through the
        base's loop (`_try_send`: the outbox and the frame in one write, waiting for room).
        """
        if self._fast:
            nbytes = len(view)
            outbox = self._outbox
            if nbytes <= COALESCE_SIZE:
                now = _monotonic()
                limit = BURST_HOLD_SECONDS if outbox else self._burst_window
                if now - self._last_send >= limit:
                    self._burst_window = self._burst_start  # no burst goes on
                elif len(outbox) < OUTBOX_BYTES:
                    if self._burst_start:
                        self._burst_window = BURST_HOLD_SECONDS
                    self._last_send = now
                    outbox += _pack_header(nbytes)
                    outbox += view
                    if len(outbox) >= OUTBOX_BYTES:
                        self._write_outbox()
                        self._last_send = _monotonic()
                    if outbox and not self._watched:
                        self._watch()
                    return
            if not outbox:
                sock = self._socket
                assert sock is not None
                try:
                    if nbytes <= COALESCE_SIZE:
                        sent = sock.send(_pack_header(nbytes) + view, SEND_FLAGS)
                    else:
                        sent = sock.sendmsg([_pack_header(nbytes), view], (), SEND_FLAGS)
                except BlockingIOError:
                    sent = -1  # no room: nothing went out; wait below
                except OSError as exc:
                    raise peer_gone(exc, self._what, "consumer") from exc
                if sent >= 0:
                    self._last_send = _monotonic()
                    if sent != nbytes + HEADER_SIZE:
                        self._finish_frame(_pack_header(nbytes), view, sent, deadline)
                    return
        connected, try_send = self._fast, self._try_send
        if not try_send(view):
            while True:
                self._await_readiness(deadline)
                if try_send(view):
                    break
            if connected and self._burst_start and len(view) <= COALESCE_SIZE:
                # it waited for room, so the consumer is behind: the small sends that follow join the outbox
                self._burst_window = BURST_HOLD_SECONDS
                self._last_send = _monotonic()
        if not self._try_flush():
            self._finish_sending(deadline)

    def _try_send(self, view: memoryview) -> bool:
        if self._phase != _READY and not self._progress():
            return False
        nbytes = len(view)
        header = _pack_header(nbytes)
        outbox = self._outbox
        held = len(outbox)
        sock = self._socket
        assert sock is not None
        try:
            sent = sock.sendmsg([outbox, header, view] if held else [header, view], (), SEND_FLAGS)
        except BlockingIOError:
            self._want(_POLLOUT)
            return False
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        if held:
            if sent < held:
                del outbox[:sent]
                self._want(_POLLOUT)
                return False
            outbox.clear()
            sent -= held
        if sent != nbytes + HEADER_SIZE:
            self._keep_rest([header, view], sent)
        return True

    def _try_send_many(self, views: Sequence[memoryview], start: int) -> int:
        """One write of the outbox and the next frames, up to GATHER_BYTES; the index after the last accepted.

        Small frames are copied into the outbox, which is written at once; what the kernel
        does not take stays there (those messages count as sent; the outbox stays
        bounded). A large frame goes from the caller's buffer with `_try_send`.
        """
        if self._phase != _READY and not self._progress():
            return start
        outbox = self._outbox
        if len(outbox) >= OUTBOX_BYTES and not self._write_outbox():
            return start
        index, total = start, len(views)
        while index < total and len(outbox) < GATHER_BYTES:
            view = views[index]
            nbytes = len(view)
            if nbytes > COALESCE_SIZE:
                if index == start:
                    return index + 1 if self._try_send(view) else index
                break
            outbox += _pack_header(nbytes)
            outbox += view
            index += 1
        self._write_outbox()
        if outbox and not self._watched:
            self._watch()
        return index

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
                sent = sock.sendmsg(pieces, (), SEND_FLAGS)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise peer_gone(exc, self._what, "consumer") from exc
            pieces = _skip(pieces, sent)
        if pieces:
            self._keep_rest(pieces, 0)

    def _keep_rest(self, pieces: list[Any], sent: int) -> None:
        """Keep what is left of `pieces` after `sent` bytes went out, to go out before anything else."""
        outbox = self._outbox
        for piece in _skip(pieces, sent):
            outbox += piece
        self._want(_POLLOUT)
        if not self._watched:
            self._watch()

    def _write_outbox(self) -> bool:
        """Write what the outbox holds, without blocking; True when it is empty."""
        outbox = self._outbox
        try:
            sent = self._socket.send(outbox, SEND_FLAGS)  # type: ignore[union-attr]
        except BlockingIOError:
            self._want(_POLLOUT)
            return False
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        if sent == len(outbox):
            outbox.clear()
            return True
        del outbox[:sent]
        self._want(_POLLOUT)
        return False

    def _try_flush(self) -> bool:
        return not self._outbox or self._write_outbox()

    def _try_prepare(self) -> bool:
        if self._phase != _READY and not self._progress():
            return False
        if self._outbox and not self._write_outbox():
            return False
        self._want(_POLLOUT)
        return True

    # --- the flusher's side ------------------------------------------------------

    def _write_outbox_now(self) -> bool:
        """Under the call gate, never blocking: True once the outbox is written (or it is not connected yet)."""
        return self._phase != _READY or not self._outbox or self._write_outbox()

    def _flusher_fd(self) -> int:
        """The socket the flusher waits on for room (-1 when there is none)."""
        sock = self._socket
        return sock.fileno() if sock is not None else -1

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
        self._verify_peer(sock)
        self._configure(sock)
        try:
            sock.send(self._hello, SEND_FLAGS)  # at most 265 bytes into an empty buffer: all or an error
        except OSError as exc:
            raise peer_gone(exc, self._what, "consumer") from exc
        self._phase = _HELLO
        # a consumer that accepted just before the wait deadline still gets time to answer
        self.wait_deadline = max(self.wait_deadline, time.monotonic() + HELLO_ANSWER_SECONDS)
        return self._read_answer()

    def _configure(self, sock: socket.socket) -> None:
        """Options for a connected socket (transport hook; tcp sets TCP_NODELAY)."""

    def _verify_peer(self, sock: socket.socket) -> None:
        """Check who listens at the other end before saying hello; raise ChannelUnavailable (transport hook; unix)."""

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
        if answer != self._accepted:
            self._refused_by_consumer(bytes(answer))
        self._phase = _READY
        self._peer_seen = True
        self._fast = True
        if self._coalescing:
            self._burst_start = self._burst_window = STREAM_BURST_START_SECONDS
        self._want(_POLLOUT)
        return True

    def _refused_by_consumer(self, answer: bytes) -> None:
        """Raise what the consumer's answer other than acceptance means (ChannelUnavailable, ProtocolError)."""
        if answer == BUSY and self.name:
            raise ChannelUnavailable(
                f"the fan-in consumer at {self._what} takes no more producers (its producers= limit is reached)"
            )
        if answer == BUSY:
            raise ChannelUnavailable(
                f"another producer is attached to {self._what}; a channel has one producer and one consumer "
                "(for many producers open the consumer with pattern=fanin and give each producer a name=)"
            )
        if answer == BROADCAST_HELLO:
            raise ProtocolError(
                f"a broadcast producer (pattern=broadcast) listens at {self._what}: this channel has one producer; "
                "open this side as a subscriber (podipc.consumer with pattern=broadcast, podipc consume --subscribers N)"
            )
        if answer == NAME_TAKEN:
            raise NameTaken(
                f"another live producer is named {self.name!r} at {self._what}; give each producer its own name="
            )
        if answer == WRONG_PATTERN and self.name:
            raise ProtocolError(
                f"the consumer at {self._what} takes one producer (pattern=pair), and this producer speaks "
                "fan-in (name= or pattern=fanin): open the consumer with pattern=fanin "
                "(podipc consume --producers N), or drop name= and pattern= here"
            )
        if answer == WRONG_PATTERN:
            raise ProtocolError(
                f"the consumer at {self._what} gathers many producers (pattern=fanin): give this producer "
                "a name= (or pattern=fanin; podipc produce --name NAME)"
            )
        raise ProtocolError(
            f"{self._what} answered {answer!r} instead of the podipc hello {self._accepted!r}; "
            "it is not a podipc consumer (or speaks another version)"
        )

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
            self._outbox += end_of_stream_frame()
            self._fast = False
            self._burst_start = self._burst_window = 0.0
            self._phase = _ENDING
        if self._outbox and not self._write_outbox():
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
        self._burst_start = self._burst_window = 0.0
        self._outbox.clear()

    def _drop_inherited(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._fast = False
        self._freed = True


def default_producer_name() -> str:
    """A fan-in producer's name when none is given: HOSTNAME-PID-RANDOM (a pod's containers share the hostname
    and each may run as PID 1, hence the random part)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


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
