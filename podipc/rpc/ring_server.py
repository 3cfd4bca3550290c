"""The request/reply server over shm://: one client at a time, session after session, from one thread.

The server creates the request ring at open and reads it from the thread that iterates
it (`for call in server`, or `serve(handler)`); each request becomes a Call. The reading
looks every ABORT_CHECK_SECONDS whether close() was called: the rings stay open until
the calls under way are answered, so a client learns the server closed from the end of
its reply ring (or the request ring's reader leaving), never earlier. The reply
ring is the client's: the server attaches to it with the session's first reply, and a
reply is written by whichever thread answers (`call.reply()` is thread-safe: the reply
writer's call gate lets one thread write at a time). A reply waits for room at most
until its call's deadline (the client has given up then: counted in `undelivered`).

A session ends when its client leaves: its end of stream, its death (the request ring's
PeerGone, after every request it sent), or bytes that are not a request (counted in
`rejected`). The server then leaves the client's reply ring, replaces its request ring
and waits for the next client: it serves client after client until closed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from threading import get_ident
from typing import Any

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import ABORT_CHECK_SECONDS
from podipc.errors import ChannelClosed, EndOfStream, PeerGone, PodIPCError, ProtocolError, Timeout
from podipc.producing import Producer

from .replying import Call, Handler, Serving
from .rings import await_client_leaving, body_limit, check_geometry, open_reply_writer, open_request_reader
from .sides import _FORKS, too_large
from .wire import CALL_HEADER, CALL_HEADER_SIZE, ERROR, REPLY, REQUEST, VERSION, call_header

_unpack_header = CALL_HEADER.unpack_from
_pack_header = CALL_HEADER.pack

SENDERS_LEAVE_SECONDS = 5.0
"""How long a session's end waits for replies still being written to leave the closed reply ring."""


class _Session:
    """One client: its reply ring (attached with the first reply), and the replies being written to it."""

    __slots__ = ("condition", "open", "replies", "sending")

    def __init__(self) -> None:
        self.replies: Producer | None = None
        self.open = True
        self.sending = 0
        self.condition = threading.Condition(threading.RLock())
        """Reentrant: a close() from a signal handler may interrupt a reply holding it, on the same thread."""

    def end(self) -> None:
        """Refuse further replies, leave the reply ring, and wait (bounded) for the replies under way to leave it."""
        with self.condition:
            self.open = False
            replies, self.replies = self.replies, None
        if replies is not None:
            with contextlib.suppress(PodIPCError):
                replies.abort()
        until = time.monotonic() + SENDERS_LEAVE_SECONDS
        with self.condition:
            while self.sending and time.monotonic() < until:
                self.condition.wait(ABORT_CHECK_SECONDS)


class RingServer(Serving):
    """The server side of request/reply over shm://NAME: iterate for calls, or serve(handler); one client at a time.

    Thread-safety: one thread at a time iterates (or serves); `Call.reply()`/`fail()` from
    any thread; close() from any thread, a signal handler or an event-loop callback.
    fork(): in a child the server refuses use (ChannelClosed) and close() closes only the
    child's copies.
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        check_geometry(address, settings)
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = body_limit(settings)
        """Largest request (and reply) body in bytes."""
        self._what = address.location
        self._note_birth()
        self._requests: Consumer = open_request_reader(address, self.settings)
        self._session = _Session()
        self._lock = threading.RLock()
        self._iterating = threading.Lock()
        self._inside = 0
        self._closing = False
        self._freed = False
        self.clients = 0
        """Client sessions begun so far (a client's first request begins one)."""
        self.rejected = 0
        """Clients dropped for messages that are not requests."""
        self.calls = 0
        """Requests received."""
        self.replied = 0
        """Calls answered with a reply."""
        self.failed = 0
        """Calls answered with an error (fail(), or the handler raised)."""
        self.expired = 0
        """Requests skipped because their deadline passed before their turn."""
        self.undelivered = 0
        """Answers whose client had gone or given up."""
        self._session_begun = False
        self._iterator = 0
        """The thread that iterated last (its answers need not guard against the session ending meanwhile)."""

    # --- the loop ---------------------------------------------------------------

    def __next__(self) -> Call:
        """The next call; waits for one without limit. The iteration stops once the server is closed."""
        if not self._iterating.acquire(blocking=False):
            raise RuntimeError(
                f"another thread iterates the server for {self._what}; one thread does (serve(handler, workers=N) "
                "hands calls to more)"
            )
        try:
            if self._born_after != _FORKS[0]:
                raise self._inherited_error()
            self._iterator = get_ident()
            call = self._next_call()
        finally:
            self._iterating.release()
            if self._closing:
                self._free_when_idle()
        if call is None:
            raise StopIteration
        return call

    def _free_when_idle(self) -> None:
        """Free once closed and nobody iterates or serves (whoever leaves last does it)."""
        with self._lock:
            if self._closing and not self._inside and not self._iterating.locked():
                self._free()

    def _enter(self) -> None:
        if self._inherited:
            raise self._inherited_error()
        with self._lock:
            self._inside += 1

    def _leave(self) -> None:
        with self._lock:
            self._inside -= 1
        if self._closing:
            self._free_when_idle()

    def _next_call(self) -> Call | None:
        while not self._closing:
            try:
                message = self._requests.recv(ABORT_CHECK_SECONDS)
            except Timeout:
                continue
            except ChannelClosed:
                if self._closing:
                    return None
                raise
            except (EndOfStream, PeerGone):
                self._next_session()
                continue
            except ProtocolError:
                self._next_session(rejected=True)
                continue
            call = self._take(message)
            if call is not None:
                return call
        return None

    def _take(self, message: bytes) -> Call | None:
        """The Call a message carries (None: expired, or not a request, which ends the session)."""
        if len(message) < CALL_HEADER_SIZE:
            self._next_session(rejected=True)
            return None
        version, kind, flags, call_id, deadline_ms = _unpack_header(message)
        if version != VERSION or kind != REQUEST or flags:
            self._next_session(rejected=True)
            return None
        if not self._session_begun:
            self._session_begun = True
            self.clients += 1
        self.calls += 1
        # the deadline counts from now (at least 1 ms): a request is never expired on arrival
        deadline = time.monotonic() + deadline_ms / 1000 if deadline_ms else None
        return Call(self, self._session, call_id, message[CALL_HEADER_SIZE:], deadline)

    def _next_session(self, rejected: bool = False) -> None:
        """The client left (or is dropped): leave its rings, and open a fresh request ring for the next one."""
        if rejected:
            self.rejected += 1
        self._session.end()
        with self._lock:
            if self._closing:
                return
            self._session = _Session()
            self._session_begun = False
            old = self._requests
        old.close()
        await_client_leaving(self.address, self.settings)
        fresh = open_request_reader(self.address, self.settings)
        with self._lock:
            self._requests = fresh
            closing = self._closing
        if closing:
            fresh.close()

    # --- serving alone ------------------------------------------------------------

    def serve(self, handler: Handler, workers: int = 1) -> None:
        """Answer every call with `handler(request) -> reply` until the server is closed (as Server.serve).

        With workers=1 the loop's thread reads each request, runs the handler and writes
        its reply itself, with no Call between (`_serve_alone`); with more, Serving.serve.
        """
        if workers != 1:
            super().serve(handler, workers)
            return
        if not self._iterating.acquire(blocking=False):
            raise RuntimeError(f"another thread iterates or serves the server for {self._what}")
        try:
            self._enter()
            try:
                self._serve_alone(handler)
            finally:
                self._leave()
        finally:
            self._iterating.release()
            if self._closing:
                self._free_when_idle()  # _leave could not: this thread still held the iteration

    def _serve_alone(self, handler: Handler) -> None:
        """The loop of serve(handler) in one thread: each request read, handled and answered in turn."""
        monotonic = time.monotonic
        while not self._closing:
            try:
                message = self._requests.recv(ABORT_CHECK_SECONDS)
            except Timeout:
                continue
            except ChannelClosed:
                if self._closing:
                    return
                raise
            except (EndOfStream, PeerGone):
                self._next_session()
                continue
            except ProtocolError:
                self._next_session(rejected=True)
                continue
            if len(message) < CALL_HEADER_SIZE:
                self._next_session(rejected=True)
                continue
            version, kind, flags, call_id, deadline_ms = _unpack_header(message)
            if version != VERSION or kind != REQUEST or flags:
                self._next_session(rejected=True)
                continue
            if not self._session_begun:
                self._session_begun = True
                self.clients += 1
            self.calls += 1
            deadline = monotonic() + deadline_ms / 1000 if deadline_ms else None
            try:
                answer = handler(message[CALL_HEADER_SIZE:])
            except Exception as exc:
                answer = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
                kind = ERROR
            else:
                kind, answer = self._checked(answer)
            replies = self._session.replies
            if kind != REPLY or replies is None or deadline is not None:
                self._send_alone(kind, call_id, answer, deadline)
                continue
            self.replied += 1
            try:
                replies.send(_pack_header(VERSION, REPLY, 0, call_id, 0) + answer)
            except PodIPCError:  # the client left
                self.undelivered += 1

    def _checked(self, result: object) -> tuple[int, bytes | bytearray | memoryview]:
        """(REPLY, the handler's reply) or (ERROR, why it cannot be one): as Serving._handle answers."""
        if type(result) is bytes and len(result) <= self.max_message_size:
            return REPLY, result
        if not isinstance(result, bytes | bytearray | memoryview):
            return ERROR, f"the handler returned {type(result).__name__}, not bytes".encode()
        size = len(result) if type(result) is bytes else memoryview(result).nbytes
        if size > self.max_message_size:
            return ERROR, f"the reply is too large: {too_large(size, self.max_message_size)}".encode()
        return REPLY, result

    def _send_alone(
        self, kind: int, call_id: int, answer: bytes | bytearray | memoryview, deadline: float | None
    ) -> None:
        """Write an answer to the session's reply ring (opened with its first), waiting at most until `deadline`."""
        if kind == REPLY:
            self.replied += 1
        else:
            self.failed += 1
        session = self._session
        replies = session.replies
        if replies is None:
            if not session.open:
                self.undelivered += 1
                return
            try:
                replies = session.replies = open_reply_writer(self.address, self.settings)
            except PodIPCError:
                session.open = False
                self.undelivered += 1
                return
        try:
            replies.send(
                _pack_header(VERSION, kind, 0, call_id, 0) + answer,
                None if deadline is None else max(0.0, deadline - time.monotonic()),
            )
        except PodIPCError:  # the client left or gave up (Timeout: no room before its deadline)
            self.undelivered += 1

    # --- answering --------------------------------------------------------------

    def _answer(self, call: Call, kind: int, body: memoryview) -> None:
        if kind == REPLY and body.nbytes > self.max_message_size:
            raise too_large(body.nbytes, self.max_message_size)
        self._count_answer(call, kind)
        session: _Session = call._connection
        replies = session.replies
        if replies is not None and session.open and get_ident() == self._iterator:
            # the iterating thread: only it ends sessions, so the session cannot end under this send
            deadline = call.deadline
            try:
                replies.send(
                    _pack_header(VERSION, kind, 0, call._id, 0) + body,
                    None if deadline is None else max(0.0, deadline - time.monotonic()),
                )
            except PodIPCError:  # the client left or gave up
                self._count_undelivered()
            return
        replies = self._reply_writer(session)
        if replies is None:
            self._count_undelivered()
            return
        try:
            replies.send(call_header(kind, call._id) + body, call.remaining())
        except PodIPCError:  # the client left or gave up (Timeout: no room before its deadline)
            self._count_undelivered()
        finally:
            with session.condition:
                session.sending -= 1
                session.condition.notify_all()

    def _reply_writer(self, session: _Session) -> Producer | None:
        """The session's reply writer (opened with its first reply), counted as in use; None once it ended."""
        with session.condition:
            if not session.open:
                return None
            if session.replies is None:
                try:
                    session.replies = open_reply_writer(self.address, self.settings)
                except PodIPCError:
                    session.open = False
                    return None
            session.sending += 1
            return session.replies

    def _count_undelivered(self) -> None:
        with self._lock:
            self.undelivered += 1

    # --- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Stop: the iteration (or serve) ends, calls under way in serve() are answered, then the client's reply
        ring is left (its calls in flight raise PeerGone) and the request ring removed. Idempotent.

        Safe from any thread, a signal handler or an event-loop callback.
        """
        if self._closing:
            return
        self._closing = True
        if self._inherited:  # the parent's rings: the endpoints close only this process's copies
            self._freed = True
            self._requests.close()
            replies = self._session.replies
            if replies is not None:
                replies.abort()
            return
        # the rings stay open until the calls under way are answered: the iterating thread sees `_closing`
        # within ABORT_CHECK_SECONDS, and the last one out frees
        self._free_when_idle()

    abort = close
    """The same as close() (for podipc.close_on_signals)."""

    def _free(self) -> None:
        if self._freed:
            return
        self._freed = True
        session = self._session
        with session.condition:
            session.open = False
            replies, session.replies = session.replies, None
        if replies is not None:
            with contextlib.suppress(PodIPCError):
                replies.close(0)  # the end of stream goes into the client's ring: its calls in flight end at once
        with contextlib.suppress(PodIPCError):
            self._requests.close()
