"""The request/reply client: many calls in flight over one connection, each waiting for its own reply.

Threads share one Client. A call registers its call id, writes its request (one frame,
under the send lock) and waits for its reply. Whoever waits reads: one waiting call at a
time reads the socket (the leader) and hands every reply it finds to its caller; the
others wait on a condition until their reply is there or the leader leaves, when one of
them leads. So a lone call reads its own reply with no thread hop, and there is no
reader thread. A reply whose call is no longer waiting (its Timeout came first) is
discarded.

Shutdown from anywhere: close() from another thread, a signal handler or an event-loop
callback marks the client closed, wakes the leader (the waker) and the followers (they
look every ABORT_CHECK_SECONDS), and each blocked call raises ChannelClosed; the socket
is freed by the last call out.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from podipc.address import Address
from podipc.endpoint import ABORT_CHECK_SECONDS
from podipc.errors import (
    ChannelClosed,
    EndOfStream,
    PeerGone,
    PodIPCError,
    ProtocolError,
    RemoteError,
    Timeout,
)
from podipc.framing import FrameReader, StreamSource, end_of_stream_frame
from podipc.options import deadline_after
from podipc.stream import SEND_FLAGS, _DontWait
from podipc.waking import POLLIN, POLLOUT, Waker, wait_for

from .sides import Side, gone_text, too_large
from .sockets import Connector
from .wire import CALL_HEADER_SIZE, ERROR, MAX_CALL_ID, REPLY, REQUEST, deadline_ms, decode, frame_prefix

_SEND_NOW = SEND_FLAGS | socket.MSG_DONTWAIT

COPY_BELOW = 64 * 1024
"""Requests smaller than this are copied behind their header (one send); larger ones are written after it."""


class _Pending:
    """One call waiting for its reply."""

    __slots__ = ("error", "reply")

    def __init__(self) -> None:
        self.reply: bytes | None = None
        self.error: PodIPCError | None = None


class _Link:
    """One connection to the server and what is its own: the reader, an unsent tail, the calls in flight on it."""

    __slots__ = ("lost", "outbox", "pending", "reader", "reading", "sock", "users")

    def __init__(self, sock: socket.socket, reader: FrameReader) -> None:
        self.sock = sock
        self.reader = reader
        self.outbox = b""
        """The tail of a request that a Timeout interrupted: the next send on this link writes it first."""
        self.pending: dict[int, _Pending] = {}
        self.reading = False
        """True while a call (the leader) reads this link's socket for everyone."""
        self.lost: PodIPCError | None = None
        self.users = 0
        """Calls using this link now: a lost link's socket is closed when the last of them leaves."""


class _NotSent(Exception):
    """The link broke before any byte of this request was written: the call may go on a new connection."""


class Client(Side):
    """The client side of request/reply: `call(request, timeout)` over one connection, shared by threads.

    Thread-safe: any number of threads may call at once (each call waits for its own
    reply) and close() may come from any thread or a signal handler. When the server goes,
    the calls in flight raise PeerGone and the next call connects again (waiting up to
    `wait` seconds for the server to be back). fork(): in a child a call raises
    ChannelClosed (open a client there) and close() frees only the child's copy.
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = int(settings["max_message_size"])
        """Largest request (and reply) body in bytes."""
        self.opened_at = time.monotonic()
        self._what = address.location
        self._note_birth()
        self._wait = float(settings["wait"])
        self._connector = Connector(address, settings, self.opened_at + self._wait)
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._waker = Waker()
        self._link: _Link | None = None
        self._ids = itertools.count(1)
        self._inside = 0
        self._closing = False
        self._freed = False
        self.discarded = 0
        """Replies that came after their call had given up (Timeout), and were dropped."""
        self.connections = 0
        """Connections made so far (more than one when the server went and came back)."""

    # --- calling ------------------------------------------------------------

    def call(self, request: bytes | bytearray | memoryview, timeout: float | None = None) -> bytes:
        """Send `request` and return the server's reply; wait at most `timeout` seconds (None: no limit).

        The server is told the deadline and skips a request that expired before its turn.
        Raises MessageTooLarge (before sending), PeerTimeout (no server within `wait`),
        Timeout (this call only; a late reply is discarded), RemoteError (the handler
        failed: its message), PeerGone (the server went away with the call in flight: every
        call in flight gets it; the next call connects again), ChannelClosed (closed, also
        from another thread while the call waits), ProtocolError (the server's bytes are
        not request/reply frames).
        """
        view = memoryview(request)
        if view.nbytes > self.max_message_size:
            raise too_large(view.nbytes, self.max_message_size)
        deadline = deadline_after(timeout)
        self._enter()
        try:
            while True:
                pending = _Pending()
                link, call_id = self._attach(pending, deadline)
                try:
                    self._send(link, call_id, view, deadline)
                    return self._await(link, pending, deadline)
                except _NotSent:
                    continue  # the server went before this request left: try the next connection
                finally:
                    self._detach(link, call_id, pending)
        finally:
            with self._lock:
                self._inside -= 1
                if self._closing and not self._inside:
                    self._free()

    def _enter(self) -> None:
        if self._inherited:
            raise self._inherited_error()
        with self._lock:
            if self._closing:
                raise self._closed_error()
            self._inside += 1

    def _attach(self, pending: _Pending, deadline: float | None) -> tuple[_Link, int]:
        """The live link (connecting when there is none) with this call registered on it (before its request
        leaves: the reply may come at once), and the call's id."""
        while True:
            link = self._link or self._connect(deadline)
            with self._lock:
                if self._closing:
                    raise self._closed_error()
                if link.lost is None:
                    link.users += 1
                    call_id = next(self._ids) & MAX_CALL_ID
                    link.pending[call_id] = pending
                    return link, call_id

    def _detach(self, link: _Link, call_id: int, pending: _Pending) -> None:
        with self._lock:
            if pending.reply is None:
                link.pending.pop(call_id, None)  # a reply that comes later is dropped
            link.users -= 1
            if link.lost is not None and not link.users and link is not self._link:
                link.sock.close()

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"the client for {self._what} is closed")

    def _connect(self, deadline: float | None) -> _Link:
        """The connection, made by one call (the others wait for it, within their own deadline)."""
        while not self._connect_lock.acquire(timeout=ABORT_CHECK_SECONDS):
            if self._closing:
                raise self._closed_error()
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"no server answered at {self._what} within the call's timeout")
        try:
            link = self._link
            if link is not None:
                return link
            sock = self._connector.connect(deadline, self._waker.fileno(), lambda: self._closing)
            sock.setblocking(True)  # every attempt that must not block says so (MSG_DONTWAIT)
            link = _Link(sock, FrameReader(self.max_message_size + CALL_HEADER_SIZE, f"the server at {self._what}"))
            with self._lock:
                if self._closing:
                    sock.close()
                    raise self._closed_error()
                self._link = link
                self.connections += 1
            return link
        finally:
            self._connect_lock.release()

    def _send(self, link: _Link, call_id: int, view: memoryview, deadline: float | None) -> None:
        """Write one request frame whole; on Timeout nothing of it went, or its tail waits in the outbox."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        prefix = frame_prefix(REQUEST, call_id, view.nbytes, deadline_ms(left))
        frame: bytes | memoryview = prefix + view if view.nbytes < COPY_BELOW else b""
        if not self._send_lock.acquire(blocking=False):
            while not self._send_lock.acquire(timeout=ABORT_CHECK_SECONDS):
                self._check_waiting(link, deadline, "no room to send the request")
        try:
            if link.lost is not None:
                raise _NotSent
            if link.outbox:
                link.outbox = self._write(link, link.outbox, deadline, started=True)
                if link.outbox:
                    raise Timeout(f"no room to send the request to {self._what} within the call's timeout")
            if frame:
                rest = self._write(link, frame, deadline, started=False)
            else:
                rest = self._write_large(link, prefix, view, deadline)
            link.outbox = bytes(rest)
            if rest:
                raise Timeout(f"the request to {self._what} could not be written within the call's timeout")
        finally:
            self._send_lock.release()

    def _write(self, link: _Link, data: bytes | memoryview, deadline: float | None, started: bool) -> bytes:
        """Write `data`; what is left when the deadline passed after part of it went (b'' when all went).

        `started`: part of this frame went already (a Timeout now keeps the rest instead).
        """
        view = memoryview(data)
        sent = 0
        sock = link.sock
        while sent < view.nbytes:
            try:
                sent += sock.send(view[sent:], _SEND_NOW)
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                self._lose(link, PeerGone(f"the server at {self._what} is gone ({exc.strerror})"))
                if self._closing:
                    raise self._closed_error() from exc
                if sent or started:
                    raise PeerGone(gone_text(self._what)) from exc
                raise _NotSent from exc
            if deadline is not None and time.monotonic() >= deadline:
                if sent or started:
                    return bytes(view[sent:])
                raise Timeout(f"no room to send the request to {self._what} within the call's timeout")
            self._wait_socket(sock, POLLOUT, deadline)
        return b""

    def _write_large(self, link: _Link, prefix: bytes, view: memoryview, deadline: float | None) -> bytes:
        rest = self._write(link, prefix, deadline, started=False)
        if rest:
            return rest + bytes(view)
        return self._write(link, view, deadline, started=True)

    def _wait_socket(self, sock: socket.socket, events: int, deadline: float | None) -> None:
        seconds = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._closing:
            raise self._closed_error()
        wait_for(sock.fileno(), events, self._waker.fileno(), seconds)
        if self._closing:
            raise self._closed_error()

    def _check_waiting(self, link: _Link, deadline: float | None, what: str) -> None:
        if self._closing:
            raise self._closed_error()
        if link.lost is not None:
            raise type(link.lost)(str(link.lost))
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"{what} at {self._what} within the call's timeout")

    # --- waiting for the reply -------------------------------------------------

    def _await(self, link: _Link, pending: _Pending, deadline: float | None) -> bytes:
        condition = self._condition
        while True:
            if pending.reply is not None:  # the leader's own, most often: no lock needed to see it
                return pending.reply
            with condition:
                if pending.reply is not None:
                    return pending.reply
                if pending.error is not None:
                    raise pending.error
                self._check_waiting(link, deadline, "no reply")
                if link.reading:
                    seconds = ABORT_CHECK_SECONDS
                    if deadline is not None:
                        seconds = min(seconds, max(0.0, deadline - time.monotonic()))
                    condition.wait(seconds)
                    continue
                link.reading = True
            try:
                self._lead(link, pending, deadline)
            finally:
                with condition:
                    link.reading = False
                    if link.pending:  # followers wait: one of them leads now
                        condition.notify_all()

    def _lead(self, link: _Link, pending: _Pending, deadline: float | None) -> None:
        """Read replies, handing each to its call, until this call's came (or a deadline, close, loss)."""
        read_frame = link.reader.read_frame
        sock = link.sock
        # without a deadline the leader reads the blocking socket directly (one syscall; close() wakes
        # it with shutdown(SHUT_RD)); with one, it tries once and polls
        source: StreamSource = sock if deadline is None else _DontWait(sock)
        while pending.reply is None and pending.error is None:
            try:
                frame = read_frame(source)
            except BlockingIOError:
                self._check_waiting(link, deadline, "no reply")
                self._wait_socket(sock, POLLIN, deadline)
                continue
            except (PeerGone, EndOfStream) as exc:
                raise self._lose(link, PeerGone(gone_text(self._what))) from exc
            except ProtocolError as exc:
                raise self._lose(link, ProtocolError(str(exc))) from exc
            except OSError as exc:
                if self._closing:
                    raise self._closed_error() from exc
                raise self._lose(link, PeerGone(gone_text(self._what))) from exc
            self._deliver(link, frame, pending)

    def _deliver(self, link: _Link, frame: bytes, own: _Pending) -> None:
        try:
            kind, call_id, _, body = decode(frame, f"the server at {self._what}")
            if kind == REQUEST:
                raise ProtocolError(f"the server at {self._what} sent a request; servers only reply")
        except ProtocolError as error:
            raise self._lose(link, error) from None
        with self._condition:
            pending = link.pending.pop(call_id, None)
            if pending is None:
                self.discarded += 1
                return
            if kind == REPLY:
                pending.reply = body
            else:
                assert kind == ERROR
                pending.error = RemoteError(body.decode("utf-8", "replace"))
            if pending is not own:
                self._condition.notify_all()

    def _lose(self, link: _Link, error: PodIPCError) -> PodIPCError:
        """A connection is lost: every call in flight on it raises `error`; the next call connects again."""
        if self._closing:
            return self._closed_error()
        with self._condition:
            if link.lost is None:
                link.lost = error
                if self._link is link:
                    self._link = None
                    self._connector.wait_deadline = time.monotonic() + self._wait  # for the server to come back
                with contextlib.suppress(OSError):
                    link.sock.shutdown(socket.SHUT_RDWR)  # calls blocked on it (a send) see it at once
            for pending in link.pending.values():
                if pending.reply is None and pending.error is None:
                    pending.error = type(link.lost)(str(link.lost))
            link.pending.clear()
            self._condition.notify_all()
        return error

    # --- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; calls blocked in other threads raise ChannelClosed. Idempotent.

        Safe from any thread, a signal handler or an event-loop callback; the socket is
        freed once no call is inside.
        """
        if self._closing:
            return
        self._closing = True
        link = self._link
        if self._inherited:  # the parent's connection: close this process's copy only, send nothing
            self._freed = True
            if link is not None:
                link.sock.close()
            return
        self._waker.wake()
        if link is not None:
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_RD)  # a leader blocked in a read wakes at once
        with self._lock:
            if not self._inside:
                self._free()

    abort = close
    """The same as close(): a client has nothing to end gracefully (for podipc.close_on_signals)."""

    def _free(self) -> None:
        if self._freed:
            return
        self._freed = True
        link, self._link = self._link, None
        if link is not None:
            if not link.outbox:  # after a request's tail, the end marker would read as garbage
                with contextlib.suppress(OSError):
                    link.sock.send(end_of_stream_frame(), _SEND_NOW)
            link.sock.close()
