"""The request/reply client over shm://: many calls in flight over a pair of rings, each waiting for its own reply.

The same shape as podipc.rpc.requesting's socket client: a call registers its call id,
writes its request (one ring message; the request writer's call gate lets one thread
write at a time) and waits for its reply. One waiting call at a time reads the reply ring
(the leader) and hands every reply it finds to its caller; the others wait on a
condition until their reply is there or the leader leaves. A reply whose call gave up
(Timeout) is discarded.

The server's liveness comes from the rings' presence files (the shm peer monitor): the
reply ring ends (PeerGone, EndOfStream) when the server that writes it dies or closes,
and the leader looks every LIVENESS_CHECK_SECONDS whether the request ring lost its
reader (a server that died before its first reply). Either way every call in flight
raises PeerGone and the next call opens a new pair of rings.

Shutdown from anywhere: close() from another thread, a signal handler or an event-loop
callback marks the client closed and closes the rings: a leader blocked on the reply
ring and a call blocked on the request ring raise ChannelClosed at once, the followers
within ABORT_CHECK_SECONDS.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from podipc.address import Address
from podipc.consuming import Consumer
from podipc.endpoint import ABORT_CHECK_SECONDS
from podipc.errors import (
    ChannelClosed,
    EndOfStream,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    RemoteError,
    Timeout,
)
from podipc.options import deadline_after
from podipc.transports.shm.endpoints import ShmProducer

from .requesting import _NotSent, _Pending
from .rings import LIVENESS_CHECK_SECONDS, body_limit, check_geometry, open_client_rings
from .sides import _FORKS, Side, gone_text, too_large
from .wire import (
    CALL_HEADER,
    CALL_HEADER_SIZE,
    ERROR,
    MAX_CALL_ID,
    REPLY,
    REQUEST,
    VERSION,
    deadline_ms,
    decode,
)

_pack_header = CALL_HEADER.pack
_unpack_header = CALL_HEADER.unpack_from

RING_CLOSE_SECONDS = 0.0
"""How long a closing client waits for the server to take its end of stream (0: it goes into the ring, no wait)."""


class _Rings:
    """One session with the server: the request writer, the reply reader, the calls in flight on them."""

    __slots__ = ("lost", "pending", "read_lock", "replies", "requests", "users")

    def __init__(self, requests: ShmProducer, replies: Consumer) -> None:
        self.requests = requests
        self.replies = replies
        self.pending: dict[int, _Pending] = {}
        self.read_lock = threading.Lock()
        """Held by the call (the leader) that reads the reply ring for everyone."""
        self.lost: PodIPCError | None = None
        self.users = 0
        """Calls using these rings now: a new session opens only once the last of a lost one's has left."""

    def close(self) -> None:
        """End the request stream (without waiting for the server) and leave the reply ring; never raises."""
        with contextlib.suppress(PodIPCError):
            self.requests.close(RING_CLOSE_SECONDS)
        with contextlib.suppress(PodIPCError):
            self.replies.close()


class RingClient(Side):
    """The client side of request/reply over shm://NAME: `call(request, timeout)`, shared by threads.

    Thread-safe like podipc.rpc.Client: any number of threads may call at once and close()
    may come from any thread or a signal handler. One client per NAME at a time: another
    client's first call raises ChannelUnavailable while this one is open. fork(): in a
    child a call raises ChannelClosed (open a client there) and close() frees only the
    child's copies.
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        check_geometry(address, settings)
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = body_limit(settings)
        """Largest request (and reply) body in bytes."""
        self.opened_at = time.monotonic()
        self._what = address.location
        self._note_birth()
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._connect_lock = threading.Lock()
        self._rings: _Rings | None = None
        self._retired: _Rings | None = None
        """The last lost session: a new one waits until its calls have left its rings (which it then frees)."""
        self._ids = itertools.count(1)
        self._closing = False
        self._freed = False
        self.discarded = 0
        """Replies that came after their call had given up (Timeout), and were dropped."""
        self.connections = 0
        """Sessions opened so far (more than one when the server went and came back)."""

    # --- calling ------------------------------------------------------------

    def call(self, request: bytes | bytearray | memoryview, timeout: float | None = None) -> bytes:
        """Send `request` and return the server's reply; wait at most `timeout` seconds (None: no limit).

        Raises what podipc.rpc.Client.call raises, and ChannelUnavailable when another
        client holds the server (shm:// serves one client at a time).
        """
        size = len(request) if type(request) is bytes else memoryview(request).nbytes
        if size > self.max_message_size:
            raise too_large(size, self.max_message_size)
        if self._closing:
            raise self._closed_error()
        if self._born_after != _FORKS[0]:
            raise self._inherited_error()
        deadline = None if timeout is None else deadline_after(timeout)
        rings = self._rings
        if rings is not None and rings.read_lock.acquire(False):
            # no other call reads the replies: this one sends and reads its own, with no thread hop
            try:
                return self._call_alone(rings, request, deadline)
            except _NotSent:
                pass  # the server went before this request left: on to a new session
            finally:
                rings.read_lock.release()
                if rings.pending:  # calls of other threads wait for their replies: one of them reads now
                    with self._condition:
                        self._condition.notify_all()
        while True:
            pending = _Pending()
            rings, call_id = self._attach(pending, deadline)
            try:
                self._send(rings, call_id, request, deadline)
                return self._await(rings, pending, deadline)
            except _NotSent:
                continue  # the server went before this request left: try a new session
            finally:
                self._detach(rings, call_id, pending)

    def _attach(self, pending: _Pending, deadline: float | None) -> tuple[_Rings, int]:
        while True:
            rings = self._rings or self._connect(deadline)
            with self._lock:
                if self._closing:
                    raise self._closed_error()
                if rings.lost is None:
                    rings.users += 1
                    call_id = next(self._ids) & MAX_CALL_ID
                    rings.pending[call_id] = pending
                    return rings, call_id

    def _detach(self, rings: _Rings, call_id: int, pending: _Pending) -> None:
        with self._condition:
            if pending.reply is None:
                rings.pending.pop(call_id, None)  # a reply that comes later is dropped
            rings.users -= 1
            if rings.lost is not None and not rings.users:
                self._condition.notify_all()  # a new session may open now

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"the client for {self._what} is closed")

    def _connect(self, deadline: float | None) -> _Rings:
        """A new session, opened by one call (the others wait for it, within their own deadline)."""
        while not self._connect_lock.acquire(timeout=ABORT_CHECK_SECONDS):
            self._check_deadline(deadline)
        try:
            rings = self._rings
            if rings is not None:
                return rings
            self._await_retired(deadline)
            requests, replies = open_client_rings(self.address, self.settings)
            rings = _Rings(requests, replies)
            with self._lock:
                if self._closing:
                    rings.close()
                    raise self._closed_error()
                self._rings = rings
                self.connections += 1
            return rings
        finally:
            self._connect_lock.release()

    def _await_retired(self, deadline: float | None) -> None:
        """Wait until no call is left inside the lost session's rings: their presence must be gone before ours."""
        with self._condition:
            retired = self._retired
            while retired is not None and retired.users:
                self._check_deadline(deadline)
                self._condition.wait(ABORT_CHECK_SECONDS)
        if retired is not None:
            while not retired.read_lock.acquire(timeout=ABORT_CHECK_SECONDS):  # a lone call still reads it
                self._check_deadline(deadline)
            retired.read_lock.release()
            self._retired = None

    def _check_deadline(self, deadline: float | None) -> None:
        if self._closing:
            raise self._closed_error()
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"no server answered at {self._what} within the call's timeout")

    def _send(
        self, rings: _Rings, call_id: int, request: bytes | bytearray | memoryview, deadline: float | None
    ) -> None:
        """Write one request; nothing of it went when this raises."""
        if deadline is None:
            left = None
            message = _pack_header(VERSION, REQUEST, 0, call_id, 0) + request
        else:
            left = max(0.0, deadline - time.monotonic())
            message = _pack_header(VERSION, REQUEST, 0, call_id, deadline_ms(left)) + request
        requests = rings.requests
        if requests.consumer_left:  # the server closed: this request would go nowhere
            self._lose(rings, PeerGone(gone_text(self._what)))
            if self._closing:
                raise self._closed_error()
            raise _NotSent
        try:
            requests.send(message, left)
        except PodIPCError as error:
            self._sending_failed(rings, error)

    def _sending_failed(self, rings: _Rings, error: PodIPCError) -> NoReturn:
        """Raise what a request's send that raised `error` means for the call (_NotSent: try a new session)."""
        if isinstance(error, PeerGone):
            self._lose(rings, PeerGone(gone_text(self._what)))
            if self._closing:
                raise self._closed_error() from error
            raise _NotSent from error
        if isinstance(error, ChannelClosed):
            if self._closing:
                raise self._closed_error() from error
            if rings.lost is not None:  # another call lost the session under this send
                raise _NotSent from error
            raise error
        if isinstance(error, PeerTimeout):
            raise PeerTimeout(
                f"no server listening at {self._what} within the wait timeout (wait={self.settings['wait']:g}s); "
                "start the server (podipc reply) or raise wait="
            ) from error
        if isinstance(error, Timeout):
            if self._closing:
                raise self._closed_error() from None
            raise Timeout(f"no room to send the request to {self._what} within the call's timeout") from None
        if isinstance(error, ProtocolError):
            raise self._lose(rings, ProtocolError(str(error))) from error
        raise error

    def _check_waiting(self, rings: _Rings, deadline: float | None) -> None:
        if self._closing:
            raise self._closed_error()
        if rings.lost is not None:
            raise type(rings.lost)(str(rings.lost))
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"no reply at {self._what} within the call's timeout")

    # --- waiting for the reply -------------------------------------------------

    def _await(self, rings: _Rings, pending: _Pending, deadline: float | None) -> bytes:
        condition = self._condition
        while True:
            if pending.reply is not None:  # the leader's own, most often: no lock needed to see it
                return pending.reply
            with condition:
                if pending.reply is not None:
                    return pending.reply
                if pending.error is not None:
                    raise pending.error
                self._check_waiting(rings, deadline)
                if not rings.read_lock.acquire(False):
                    seconds = ABORT_CHECK_SECONDS
                    if deadline is not None:
                        seconds = min(seconds, max(0.0, deadline - time.monotonic()))
                    condition.wait(seconds)
                    continue
            try:
                self._lead(rings, pending, deadline)
            finally:
                rings.read_lock.release()
                with condition:
                    if rings.pending:  # followers wait: one of them leads now
                        condition.notify_all()

    def _call_alone(self, rings: _Rings, request: bytes | bytearray | memoryview, deadline: float | None) -> bytes:
        """A call that holds the reply ring's read lock: send, then read replies until its own comes."""
        call_id = next(self._ids) & MAX_CALL_ID
        requests = rings.requests
        if deadline is not None or requests.consumer_left:
            self._send(rings, call_id, request, deadline)
        else:
            try:
                requests.send(_pack_header(VERSION, REQUEST, 0, call_id, 0) + request)
            except PodIPCError as error:
                self._sending_failed(rings, error)
        recv = rings.replies.recv
        while True:
            seconds = LIVENESS_CHECK_SECONDS
            if deadline is not None:
                seconds = min(seconds, max(0.0, deadline - time.monotonic()))
            try:
                message = recv(seconds)
            except PodIPCError as error:
                self._reading_failed(rings, error, deadline)
                continue
            if len(message) >= CALL_HEADER_SIZE:
                version, kind, flags, replied_to, _ = _unpack_header(message)
                if replied_to == call_id and version == VERSION and kind == REPLY and not flags:
                    return message[CALL_HEADER_SIZE:]
            answer = self._deliver(rings, message, None, call_id)
            if answer is not None:
                raise answer

    def _reading_failed(self, rings: _Rings, error: PodIPCError, deadline: float | None) -> None:
        """A receive from the reply ring raised `error`: return to read again, or raise what the call raises."""
        if isinstance(error, Timeout):
            if rings.requests.peer_lost or rings.requests.consumer_left:
                raise self._lose(rings, PeerGone(gone_text(self._what))) from None
            self._check_waiting(rings, deadline)
            return
        if isinstance(error, (PeerGone, EndOfStream)):
            raise self._lose(rings, PeerGone(gone_text(self._what))) from error
        if isinstance(error, ChannelClosed):
            if self._closing:
                raise self._closed_error() from error
            self._check_waiting(rings, deadline)  # lost by another call (it closed the rings)
            raise error
        if isinstance(error, ProtocolError):
            raise self._lose(rings, ProtocolError(str(error))) from error
        raise error

    def _lead(self, rings: _Rings, pending: _Pending, deadline: float | None) -> None:
        """Read replies, handing each to its call, until this call's came (or a deadline, close, loss)."""
        recv = rings.replies.recv
        while pending.reply is None and pending.error is None:
            seconds = LIVENESS_CHECK_SECONDS
            if deadline is not None:
                seconds = min(seconds, max(0.0, deadline - time.monotonic()))
            try:
                message = recv(seconds)
            except PodIPCError as error:
                self._reading_failed(rings, error, deadline)
                continue
            self._deliver(rings, message, pending)

    def _deliver(self, rings: _Rings, message: bytes, own: _Pending | None, own_id: int = -1) -> PodIPCError | None:
        """Hand a reply to its call; the RemoteError of the lone call's own failed call (`own_id`), else None."""
        try:
            kind, call_id, _, body = decode(message, f"the server at {self._what}")
            if kind == REQUEST:
                raise ProtocolError(f"the server at {self._what} sent a request; servers only reply")
        except ProtocolError as error:
            raise self._lose(rings, error) from None
        if call_id == own_id:
            assert kind == ERROR  # the lone call takes its own reply before this
            return RemoteError(body.decode("utf-8", "replace"))
        with self._condition:
            pending = rings.pending.pop(call_id, None)
            if pending is None:
                self.discarded += 1
                return None
            if kind == REPLY:
                pending.reply = body
            else:
                assert kind == ERROR
                pending.error = RemoteError(body.decode("utf-8", "replace"))
            if pending is not own:
                self._condition.notify_all()
        return None

    def _lose(self, rings: _Rings, error: PodIPCError) -> PodIPCError:
        """A session is lost: every call in flight on it raises `error`; the next call opens a new one."""
        if self._closing:
            return self._closed_error()
        with self._condition:
            if rings.lost is None:
                rings.lost = error
                if self._rings is rings:
                    self._rings = None
                    self._retired = rings
                rings.close()  # calls blocked on its rings raise ChannelClosed at once, and see `lost`
            for pending in rings.pending.values():
                if pending.reply is None and pending.error is None:
                    pending.error = type(rings.lost)(str(rings.lost))
            rings.pending.clear()
            self._condition.notify_all()
        return error

    # --- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the rings; calls blocked in other threads raise ChannelClosed. Idempotent.

        Safe from any thread, a signal handler or an event-loop callback: the rings' endpoints
        wake their blocked calls and free themselves once the last is out.
        """
        if self._closing:
            return
        self._closing = True
        rings, self._rings = self._rings, None
        if rings is not None:
            rings.close()  # in a forked child the endpoints free the child's copies only
        self._freed = True
        if not self._inherited:
            with self._condition:
                self._condition.notify_all()

    abort = close
    """The same as close() (for podipc.close_on_signals)."""
