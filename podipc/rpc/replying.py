"""The request/reply server: one thread answers many clients over a selector loop.

The server listens at open (as a stream consumer does). The thread that iterates it
(`for call in server`, or `serve(handler)`) runs the loop: it accepts clients, checks
their hello, cuts request frames and hands out one Call at a time; a reply is written
by whichever thread answers (`call.reply()` is thread-safe), straight to the socket,
and what the socket does not take at once waits in that client's outbox, which the
loop writes when the socket has room. So a client that stops reading delays nobody.

A client whose bytes are not request/reply frames (wrong hello, a bad length or call
header, a reply where a request belongs) is dropped and counted in `rejected`; the others
go on. A request whose deadline passed before its turn is skipped (counted in
`expired`): its client has given up on it already.

Handlers: `serve(handler)` runs the handler in the loop's thread, one request at a
time in arrival order; `serve(handler, workers=N)` runs up to N at once on a pool of N
threads (replies then leave in completion order: the call id says whose they are).
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

from podipc.address import Address
from podipc.endpoint import ABORT_CHECK_SECONDS
from podipc.errors import EndOfStream, MessageTooLarge, PeerGone, ProtocolError
from podipc.framing import FrameReader
from podipc.stream import HELLO_SECONDS, SEND_FLAGS
from podipc.waking import Waker

from .sides import Side, too_large
from .sockets import configure, listen
from .wire import CALL_HEADER_SIZE, ERROR, HELLO, REPLY, REQUEST, decode, frame_prefix

FRAMES_PER_TURN = 64
"""Requests read from one client before the loop looks at the others (fairness)."""
READ_BUFFER_SIZE = 64 * 1024
"""Bytes of each client's receive buffer."""
ACCEPT_BACKOFF_SECONDS = 0.05
"""How long the loop pauses when accept() finds no descriptor free (EMFILE), instead of spinning."""
OUTBOX_LIMIT = 64 * 1024 * 1024
"""Bytes of replies a client may leave unread before it is dropped (beyond one reply of any size)."""

_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
"""Events that send the loop to read a client: data, or its end (the read then finds EOF or the error)."""
_WRITABLE = select.EPOLLOUT
_WRITTEN, _KEPT, _UNDELIVERED = "written", "kept", "undelivered"

Handler = Callable[[bytes], bytes | bytearray | memoryview]


class _Connection:
    """One client: its socket, its frame reader, the replies waiting for room."""

    __slots__ = ("closed", "greeting", "lock", "outbox", "reader", "sock")

    def __init__(self, sock: socket.socket, reader: FrameReader) -> None:
        self.sock = sock
        self.reader = reader
        self.greeting: bytearray | None = bytearray()
        """The hello received so far; None once the client is accepted."""
        self.outbox = bytearray()
        self.lock = threading.RLock()
        """Reentrant: a close() from a signal handler may interrupt a reply() holding it, on the same thread."""
        self.closed = False


class Call:
    """One request: `request` (bytes) and its deadline; answer it once with reply() or fail(), from any thread."""

    __slots__ = ("_answered", "_connection", "_id", "_server", "deadline", "request")

    def __init__(self, server: Serving, connection: Any, call_id: int, request: bytes, deadline: float | None):
        self.request = request
        """The request's bytes."""
        self.deadline = deadline
        """When the client stops waiting (time.monotonic() seconds), or None."""
        self._server = server
        self._connection = connection
        self._id = call_id
        self._answered = False

    @property
    def expired(self) -> bool:
        """True once the client's deadline passed: it no longer waits for the reply."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self) -> float | None:
        """Seconds until the client's deadline (never negative), or None when it waits without limit."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def reply(self, data: bytes | bytearray | memoryview) -> None:
        """Send the reply. Raises MessageTooLarge (nothing sent; fail() may still answer), RuntimeError when answered."""
        self._server._answer(self, REPLY, memoryview(data))

    def fail(self, message: str) -> None:
        """Answer with an error: the client's call raises RemoteError(message). RuntimeError when answered."""
        self._server._answer(self, ERROR, memoryview(message.encode("utf-8", "replace")))

    def __repr__(self) -> str:
        return f"<Call {self._id} {len(self.request)} bytes>"


class Serving(Side):
    """What every request/reply server shares: serve(handler) over its own iteration, and the answer counters.

    A subclass iterates Calls (`__next__`), answers them (`_answer`) and counts its users
    (`_enter`, `_leave`: the last one out after close() frees).
    """

    _lock: threading.RLock
    _closing: bool
    calls: int
    replied: int
    failed: int
    expired: int
    undelivered: int

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Call:
        raise NotImplementedError

    def _enter(self) -> None:
        raise NotImplementedError

    def _leave(self) -> None:
        raise NotImplementedError

    def _answer(self, call: Call, kind: int, body: memoryview) -> None:
        raise NotImplementedError

    def _count_answer(self, call: Call, kind: int) -> None:
        """Mark `call` answered and count it; RuntimeError when it was answered already."""
        with self._lock:
            if call._answered:
                raise RuntimeError(f"{call!r} was answered already; a call gets one reply")
            call._answered = True
            if kind == REPLY:
                self.replied += 1
            else:
                self.failed += 1

    def serve(self, handler: Handler, workers: int = 1) -> None:
        """Answer every call with `handler(request) -> reply` until the server is closed.

        `workers=1` runs the handler in this thread, one call at a time; `workers=N` on a
        pool of N threads, up to N at once. A handler that raises answers its call with an
        error (the client raises RemoteError with "ExceptionType: message"), and serving
        goes on; so it does for a reply that is not bytes or is too large. Returns once
        closed (from another thread or a signal handler), after the calls under way are
        answered.
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._enter()
        try:
            if workers == 1:
                for call in self:
                    self._handle(handler, call)
                return
            slots = threading.BoundedSemaphore(workers)
            with ThreadPoolExecutor(workers, thread_name_prefix="podipc-reply") as pool:
                for call in self:
                    while not slots.acquire(timeout=ABORT_CHECK_SECONDS):
                        if self._closing:
                            return
                    pool.submit(self._handle_on_worker, handler, call, slots)
        finally:
            self._leave()

    def _handle_on_worker(self, handler: Handler, call: Call, slots: threading.BoundedSemaphore) -> None:
        try:
            self._handle(handler, call)
        finally:
            slots.release()

    def _handle(self, handler: Handler, call: Call) -> None:
        if call.expired:
            with self._lock:
                self.expired += 1
            return
        try:
            result = handler(call.request)
        except Exception as exc:
            call.fail(f"{type(exc).__name__}: {exc}")
            return
        if not isinstance(result, bytes | bytearray | memoryview):
            call.fail(f"the handler returned {type(result).__name__}, not bytes")
            return
        try:
            call.reply(result)
        except MessageTooLarge as exc:
            call.fail(f"the reply is too large: {exc}")


class Server(Serving):
    """The server side of request/reply: iterate for calls, or serve(handler); many clients at once.

    Thread-safety: one thread at a time iterates (or serves); `Call.reply()`/`fail()` from
    any thread; close() from any thread, a signal handler or an event-loop callback.
    fork(): in a child the server refuses use (ChannelClosed) and close() closes only the
    child's copies (the socket file stays the parent's).
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = int(settings["max_message_size"])
        """Largest request (and reply) body in bytes."""
        self._what = address.location
        self._note_birth()
        self._listener, self._remove_traces = listen(address, settings)
        self._epoll = select.epoll()
        self._waker = Waker()
        self._listener_fd = self._listener.fileno()
        self._epoll.register(self._listener_fd, select.EPOLLIN)
        self._epoll.register(self._waker.fileno(), select.EPOLLIN)
        self._connections: dict[int, _Connection] = {}
        self._calls: collections.deque[Call] = collections.deque()
        self._lock = threading.RLock()
        self._greeting: dict[_Connection, float] = {}
        """Connections that have not said hello yet, and when they are dropped for it."""
        self._backlog: set[_Connection] = set()
        """Clients left at FRAMES_PER_TURN: read again at the next turn, whether or not their socket is readable."""
        self._changed: set[_Connection] = set()
        """Clients whose outbox filled or emptied, or that broke: the loop updates or drops them."""
        self._iterating = threading.Lock()
        self._inside = 0
        self._closing = False
        self._freed = False
        self.clients = 0
        """Clients accepted so far."""
        self.rejected = 0
        """Clients dropped for bytes that are not request/reply (a bad hello or frame)."""
        self.calls = 0
        """Requests received."""
        self.replied = 0
        """Calls answered with a reply."""
        self.failed = 0
        """Calls answered with an error (fail(), or the handler raised)."""
        self.expired = 0
        """Requests skipped because their deadline passed before their turn."""
        self.undelivered = 0
        """Answers whose client had gone."""

    # --- the loop ---------------------------------------------------------------

    def __next__(self) -> Call:
        """The next call; waits for one without limit. The iteration stops once the server is closed."""
        if not self._iterating.acquire(blocking=False):
            raise RuntimeError(
                f"another thread iterates the server for {self._what}; one thread does (serve(handler, workers=N) "
                "hands calls to more)"
            )
        try:
            self._enter()
            try:
                call = self._next_call()
            finally:
                self._leave()
        finally:
            self._iterating.release()
        if call is None:
            raise StopIteration
        return call

    def _next_call(self) -> Call | None:
        calls = self._calls
        while not self._closing:
            while calls:
                call = calls.popleft()
                if not call.expired:
                    return call
                with self._lock:
                    self.expired += 1
            self._poll()
        return None

    def _enter(self) -> None:
        if self._inherited:
            raise self._inherited_error()
        with self._lock:
            self._inside += 1

    def _leave(self) -> None:
        with self._lock:
            self._inside -= 1
            if self._closing and not self._inside:
                self._free()

    def _poll(self) -> None:
        if self._changed:
            self._apply_changes()
        backlog, self._backlog = self._backlog, set()
        connections, listener, waker = self._connections, self._listener_fd, self._waker.fileno()
        timeout = 0.0 if backlog else self._until_hello_expires()
        for fd, events in self._epoll.poll(timeout):
            connection = connections.get(fd)
            if connection is not None:
                if events & _WRITABLE:
                    self._flush(connection)
                if events & _READABLE and not connection.closed:
                    backlog.discard(connection)
                    self._read(connection)
            elif fd == listener:
                self._accept()
            elif fd == waker:
                with contextlib.suppress(BlockingIOError):
                    os.read(waker, 8)
        for connection in backlog:
            if not connection.closed:
                self._read(connection)
        if self._greeting:
            self._expire_greetings()

    def _until_hello_expires(self) -> float:
        """Seconds the loop may sleep (-1: no limit) before a connection that has not said hello is dropped."""
        if not self._greeting:
            return -1
        return max(0.0, min(self._greeting.values()) - time.monotonic())

    def _expire_greetings(self) -> None:
        now = time.monotonic()
        for connection, deadline in list(self._greeting.items()):
            if connection.closed or connection.greeting is None:
                del self._greeting[connection]
            elif deadline <= now:
                del self._greeting[connection]
                self._drop(connection, rejected=bool(connection.greeting))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                time.sleep(ACCEPT_BACKOFF_SECONDS)  # out of descriptors (EMFILE...): the client waits in the backlog
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                configure(self.address, sock)
            reader = FrameReader(
                self.max_message_size + CALL_HEADER_SIZE, f"a client of {self._what}", READ_BUFFER_SIZE
            )
            connection = _Connection(sock, reader)
            self._connections[sock.fileno()] = connection
            self._greeting[connection] = time.monotonic() + HELLO_SECONDS  # then dropped, as by a stream consumer
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, connection: _Connection) -> None:
        """One receive (the socket is level-triggered: what is left is reported again), then the frames it cut."""
        if connection.greeting is not None:
            self._read_hello(connection)
            return
        reader = connection.reader
        try:
            frame = reader.read_frame(connection.sock)
        except BlockingIOError:
            return
        except (EndOfStream, PeerGone):
            self._drop(connection)
            return
        except ProtocolError:
            self._drop(connection, rejected=True)
            return
        except OSError:
            self._drop(connection)
            return
        if not self._take(connection, frame):
            return
        if not reader.ready:
            return  # a read cuts every whole frame it holds into `ready`: nothing else is complete
        for frame in reader.buffered_frames(FRAMES_PER_TURN):
            if not self._take(connection, frame):
                return
        if reader.ready:
            self._backlog.add(connection)  # its next frames are cut already: the socket may not say so

    def _take(self, connection: _Connection, frame: bytes) -> bool:
        """Queue the call a frame carries; False when the frame is not a request (the client is dropped)."""
        try:
            kind, call_id, deadline_ms, body = decode(frame, f"a client of {self._what}")
        except ProtocolError:
            kind = 0
        if kind != REQUEST:
            self._drop(connection, rejected=True)
            return False
        deadline = time.monotonic() + deadline_ms / 1000 if deadline_ms else None
        self.calls += 1
        self._calls.append(Call(self, connection, call_id, body, deadline))
        return True

    def _read_hello(self, connection: _Connection) -> None:
        greeting = connection.greeting
        assert greeting is not None
        try:
            chunk = connection.sock.recv(len(HELLO) - len(greeting))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        greeting += chunk
        if not chunk or not HELLO.startswith(greeting):
            self._drop(connection, rejected=bool(greeting))
            return
        if len(greeting) < len(HELLO):
            return
        try:
            connection.sock.send(HELLO, SEND_FLAGS)
        except OSError:
            self._drop(connection)
            return
        connection.greeting = None
        self._greeting.pop(connection, None)
        self.clients += 1

    def _drop(self, connection: _Connection, rejected: bool = False) -> None:
        """Forget a client (gone, or rejected for its bytes); its calls' answers are then dropped."""
        with connection.lock:
            if connection.closed:
                return
            connection.closed = True
            connection.outbox.clear()
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(connection.sock.fileno())
            self._connections.pop(connection.sock.fileno(), None)
            connection.sock.close()
        if rejected:
            self.rejected += 1

    # --- answering --------------------------------------------------------------

    def _answer(self, call: Call, kind: int, body: memoryview) -> None:
        if kind == REPLY and body.nbytes > self.max_message_size:
            raise too_large(body.nbytes, self.max_message_size)
        self._count_answer(call, kind)
        frame = frame_prefix(kind, call._id, body.nbytes) + body
        connection = call._connection
        # never under the connection's lock, which _free takes while it holds ours
        outcome = self._write_or_keep(connection, frame)
        if outcome is _KEPT:
            self._changed_by(connection)
        elif outcome is _UNDELIVERED:
            with self._lock:
                self.undelivered += 1

    @staticmethod
    def _write_or_keep(connection: _Connection, frame: bytes) -> str:
        """Write a frame now, or keep what the socket did not take for the loop (_KEPT; also when it broke)."""
        with connection.lock:
            if connection.closed:
                return _UNDELIVERED
            if connection.outbox:
                connection.outbox += frame
                return _KEPT
            try:
                sent = connection.sock.send(frame, SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError:
                return _KEPT  # the loop finds the socket broken and drops the client
            if sent == len(frame):
                return _WRITTEN
            connection.outbox += memoryview(frame)[sent:]
            return _KEPT

    def _changed_by(self, connection: _Connection) -> None:
        with self._lock:
            self._changed.add(connection)
        self._waker.wake()

    def _flush(self, connection: _Connection) -> None:
        with connection.lock:
            if connection.closed:
                return
            try:
                sent = connection.sock.send(connection.outbox, SEND_FLAGS)
            except BlockingIOError:
                return
            except OSError:
                sent = -1
            if sent >= 0:
                del connection.outbox[:sent]
        if sent < 0:
            self._drop(connection)
        elif not connection.outbox:
            self._changed_by(connection)

    def _apply_changes(self) -> None:
        with self._lock:
            changed, self._changed = self._changed, set()
        for connection in changed:
            if connection.closed:
                continue
            if len(connection.outbox) > OUTBOX_LIMIT + self.max_message_size:
                self._drop(connection)  # it does not read its replies
                continue
            events = select.EPOLLIN | (select.EPOLLOUT if connection.outbox else 0)
            try:
                self._epoll.modify(connection.sock.fileno(), events)
            except (ValueError, OSError):
                self._drop(connection)  # its socket broke under a send

    # --- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Stop: the iteration (or serve) ends, calls under way in serve() are answered, then every client is
        disconnected (their calls in flight raise PeerGone) and the socket file removed. Idempotent.

        Safe from any thread, a signal handler or an event-loop callback.
        """
        if self._closing:
            return
        self._closing = True
        if self._inherited:  # the parent's server: close this process's copies only, remove and send nothing
            self._freed = True
            for connection in self._connections.values():
                connection.sock.close()
            self._listener.close()
            self._epoll.close()
            return
        self._waker.wake()
        with self._lock:
            if not self._inside:
                self._free()

    abort = close
    """The same as close() (for podipc.close_on_signals)."""

    def _free(self) -> None:
        if self._freed:
            return
        self._freed = True
        for connection in list(self._connections.values()):
            with connection.lock:
                if connection.outbox and not connection.closed:
                    with contextlib.suppress(OSError):
                        connection.sock.send(connection.outbox, SEND_FLAGS)  # answers of the last calls
            self._drop(connection)
        self._epoll.close()
        self._listener.close()
        self._remove_traces()
