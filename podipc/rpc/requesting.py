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


class Client(Side):
    """The client side of request/reply: `call(request, timeout)` over one connection, shared by threads.

    Thread-safe: any number of threads may call at once (each call waits for its own
    reply) and close() may come from any thread or a signal handler. fork(): in a child a
    call raises ChannelClosed (open a client there) and close() frees only the child's copy.
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = int(settings["max_message_size"])
        """Largest request (and reply) body in bytes."""
        self.opened_at = time.monotonic()
        self._connector = Connector(address, settings, self.opened_at + float(settings["wait"]))
        self._what = address.location
        self._note_birth()
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._waker = Waker()
        self._socket: socket.socket | None = None
        self._reader = FrameReader(self.max_message_size + CALL_HEADER_SIZE, f"the server at {self._what}")
        self._outbox = b""
        """The tail of a request that a Timeout interrupted: the next send writes it first."""
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._reading = False
        self._inside = 0
        self._closing = False
        self._freed = False
        self._lost: PodIPCError | None = None
        self.discarded = 0
        """Replies that came after their call had given up (Timeout), and were dropped."""

    # --- calling ------------------------------------------------------------

    def call(self, request: bytes | bytearray | memoryview, timeout: float | None = None) -> bytes:
        """Send `request` and return the server's reply; wait at most `timeout` seconds (None: no limit).

        The server is told the deadline and skips a request that expired before its turn.
        Raises MessageTooLarge (before sending), PeerTimeout (no server within `wait`),
        Timeout (this call only; a late reply is discarded), RemoteError (the handler
        failed: its message), PeerGone (the server went away with the call in flight: every
        call in flight gets it, and so does every later call), ChannelClosed (closed,
        also from another thread while the call waits), ProtocolError (the server's bytes
        are not request/reply frames).
        """
        view = memoryview(request)
        if view.nbytes > self.max_message_size:
            raise too_large(view.nbytes, self.max_message_size)
        deadline = deadline_after(timeout)
        pending = _Pending()
        call_id = self._enter(pending)
        try:
            sock = self._socket or self._connect(deadline)
            self._send(sock, call_id, view, deadline)
            return self._await(sock, pending, deadline)
        finally:
            with self._lock:
                if pending.reply is None:
                    self._pending.pop(call_id, None)  # a reply that comes later is dropped
                self._inside -= 1
                if self._closing and not self._inside:
                    self._free()

    def _enter(self, pending: _Pending) -> int:
        """Count the call in and register it (before its request leaves: its reply may come at once); its id."""
        if self._inherited:
            raise self._inherited_error()
        with self._lock:
            if self._closing:
                raise self._closed_error()
            if self._lost is not None:
                raise type(self._lost)(str(self._lost))
            self._inside += 1
            call_id = next(self._ids) & MAX_CALL_ID
            self._pending[call_id] = pending
        return call_id

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"the client for {self._what} is closed")

    def _connect(self, deadline: float | None) -> socket.socket:
        """The connection, made by the first call (the others wait for it, within their own deadline)."""
        while not self._connect_lock.acquire(timeout=ABORT_CHECK_SECONDS):
            if self._closing:
                raise self._closed_error()
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"no server answered at {self._what} within the call's timeout")
        try:
            if self._socket is not None:
                return self._socket
            if self._lost is not None:
                raise type(self._lost)(str(self._lost))
            sock = self._connector.connect(deadline, self._waker.fileno(), lambda: self._closing)
            sock.setblocking(True)  # every attempt that must not block says so (MSG_DONTWAIT)
            self._socket = sock
            return sock
        finally:
            self._connect_lock.release()

    def _send(self, sock: socket.socket, call_id: int, view: memoryview, deadline: float | None) -> None:
        """Write one request frame whole; on Timeout nothing of it went, or its tail waits in the outbox."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        prefix = frame_prefix(REQUEST, call_id, view.nbytes, deadline_ms(left))
        frame: bytes | memoryview = prefix + view if view.nbytes < COPY_BELOW else b""
        if not self._send_lock.acquire(blocking=False):
            while not self._send_lock.acquire(timeout=ABORT_CHECK_SECONDS):
                self._check_waiting(deadline, "no room to send the request")
        try:
            if self._outbox:
                self._outbox = self._write(sock, self._outbox, deadline, started=False)
            if frame:
                rest = self._write(sock, frame, deadline, started=False)
            else:
                rest = self._write_large(sock, prefix, view, deadline)
            self._outbox = bytes(rest)
            if rest:
                raise Timeout(f"the request to {self._what} could not be written within the call's timeout")
        finally:
            self._send_lock.release()

    def _write(self, sock: socket.socket, data: bytes | memoryview, deadline: float | None, started: bool) -> bytes:
        """Write `data`; what is left when the deadline passed after part of it went (b'' when all went)."""
        view = memoryview(data)
        sent = 0
        while sent < view.nbytes:
            try:
                sent += sock.send(view[sent:], _SEND_NOW)
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._lose(PeerGone(f"the server at {self._what} is gone ({exc.strerror})")) from exc
            if deadline is not None and time.monotonic() >= deadline:
                if sent or started:
                    return bytes(view[sent:])
                raise Timeout(f"no room to send the request to {self._what} within the call's timeout")
            self._wait_socket(sock, POLLOUT, deadline)
        return b""

    def _write_large(self, sock: socket.socket, prefix: bytes, view: memoryview, deadline: float | None) -> bytes:
        rest = self._write(sock, prefix, deadline, started=False)
        if rest:
            return rest + bytes(view)
        return self._write(sock, view, deadline, started=True)

    def _wait_socket(self, sock: socket.socket, events: int, deadline: float | None) -> None:
        seconds = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._closing:
            raise self._closed_error()
        wait_for(sock.fileno(), events, self._waker.fileno(), seconds)
        if self._closing:
            raise self._closed_error()

    def _check_waiting(self, deadline: float | None, what: str) -> None:
        if self._closing:
            raise self._closed_error()
        if self._lost is not None:
            raise type(self._lost)(str(self._lost))
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"{what} at {self._what} within the call's timeout")

    # --- waiting for the reply -------------------------------------------------

    def _await(self, sock: socket.socket, pending: _Pending, deadline: float | None) -> bytes:
        condition = self._condition
        while True:
            if pending.reply is not None:  # the leader's own, most often: no lock needed to see it
                return pending.reply
            with condition:
                if pending.reply is not None:
                    return pending.reply
                if pending.error is not None:
                    raise pending.error
                self._check_waiting(deadline, "no reply")
                if self._reading:
                    seconds = ABORT_CHECK_SECONDS
                    if deadline is not None:
                        seconds = min(seconds, max(0.0, deadline - time.monotonic()))
                    condition.wait(seconds)
                    continue
                self._reading = True
            try:
                self._lead(sock, pending, deadline)
            finally:
                with condition:
                    self._reading = False
                    if self._pending:  # followers wait: one of them leads now
                        condition.notify_all()

    def _lead(self, sock: socket.socket, pending: _Pending, deadline: float | None) -> None:
        """Read replies, handing each to its call, until this call's came (or a deadline, close, loss)."""
        read_frame = self._reader.read_frame
        # without a deadline the leader reads the blocking socket directly (one syscall; close() wakes
        # it with shutdown(SHUT_RD)); with one, it tries once and polls
        source: StreamSource = sock if deadline is None else _DontWait(sock)
        while pending.reply is None and pending.error is None:
            try:
                frame = read_frame(source)
            except BlockingIOError:
                self._check_waiting(deadline, "no reply")
                self._wait_socket(sock, POLLIN, deadline)
                continue
            except (PeerGone, EndOfStream) as exc:
                raise self._lose(PeerGone(gone_text(self._what))) from exc
            except ProtocolError as exc:
                raise self._lose(ProtocolError(str(exc))) from exc
            except OSError as exc:
                if self._closing:
                    raise self._closed_error() from exc
                raise self._lose(PeerGone(gone_text(self._what))) from exc
            self._deliver(frame, pending)

    def _deliver(self, frame: bytes, own: _Pending) -> None:
        try:
            kind, call_id, _, body = decode(frame, f"the server at {self._what}")
            if kind == REQUEST:
                raise ProtocolError(f"the server at {self._what} sent a request; servers only reply")
        except ProtocolError as error:
            raise self._lose(error) from None
        with self._condition:
            pending = self._pending.pop(call_id, None)
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

    def _lose(self, error: PodIPCError) -> PodIPCError:
        """The connection is lost: every call in flight and every later call raises `error`."""
        if self._closing:
            return self._closed_error()
        with self._condition:
            if self._lost is None:
                self._lost = error
            for pending in self._pending.values():
                if pending.reply is None and pending.error is None:
                    pending.error = type(self._lost)(str(self._lost))
            self._pending.clear()
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
        if self._inherited:  # the parent's connection: close this process's copy only, send nothing
            self._freed = True
            if self._socket is not None:
                self._socket.close()
            return
        self._waker.wake()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # a leader blocked in a read wakes at once
        with self._lock:
            if not self._inside:
                self._free()

    abort = close
    """The same as close(): a client has nothing to end gracefully (for podipc.close_on_signals)."""

    def _free(self) -> None:
        if self._freed:
            return
        self._freed = True
        sock, self._socket = self._socket, None
        if sock is not None:
            if not self._outbox:  # after a request's tail, the end marker would read as garbage
                with contextlib.suppress(OSError):
                    sock.send(end_of_stream_frame(), _SEND_NOW)
            sock.close()
