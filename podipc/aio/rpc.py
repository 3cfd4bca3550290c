"""The asyncio request/reply client: `await client.call(request, timeout=)`, many tasks over one connection.

No thread: the socket is non-blocking; while calls are in flight the loop watches it
(loop.add_reader) and hands each reply to its task's future; a request that does not
fit the socket at once waits in an outbox the loop writes when there is room
(loop.add_writer), whole and in order. So a cancelled call never breaks the others: its
request, once written (or queued), goes out whole, and its reply, should it come, is
dropped (counted in `discarded`). `asyncio.timeout()` works like `timeout=`.
close() (sync) may come from any thread, a signal handler or a loop callback: every
waiting task raises ChannelClosed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from podipc.address import Address, parse_address
from podipc.errors import (
    AddressError,
    ChannelClosed,
    EndOfStream,
    PeerGone,
    PodIPCError,
    ProtocolError,
    RemoteError,
    Timeout,
)
from podipc.framing import FrameReader, end_of_stream_frame
from podipc.options import resolve_options
from podipc.rpc import RPC_OPTIONS
from podipc.rpc.sides import Side, gone_text, too_large
from podipc.rpc.sockets import Connector, check_scheme
from podipc.rpc.wire import (
    CALL_HEADER_SIZE,
    ERROR,
    HELLO,
    MAX_CALL_ID,
    REPLY,
    REQUEST,
    deadline_ms,
    decode,
    frame_prefix,
)
from podipc.stream import SEND_FLAGS
from podipc.stream_producer import CONNECT_RETRY_FIRST_SECONDS, CONNECT_RETRY_MAX_SECONDS

OUTBOX_LIMIT = 4 * 1024 * 1024
"""Bytes of requests waiting for room beyond which a new call waits before queueing its own."""


class _NotSent(Exception):
    """The connection broke before any byte of this request was written: the call may go on a new connection."""


class AsyncClient(Side):
    """The asyncio client of request/reply: `await call(request, timeout=None)` from any number of tasks.

    Bound to the event loop of its first call. close() is safe from any thread, a signal
    handler or a loop callback; aclose() is the same, awaitable. fork(): as podipc.Client
    (a child's call raises ChannelClosed, its close() frees only the child's copy).
    """

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        self.max_message_size = int(settings["max_message_size"])
        """Largest request (and reply) body in bytes."""
        self._what = address.location
        self._note_birth()
        self._wait = float(settings["wait"])
        self._connector = Connector(address, settings, time.monotonic() + self._wait)
        self._reader = FrameReader(self.max_message_size + CALL_HEADER_SIZE, f"the server at {self._what}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: socket.socket | None = None
        self._connecting: asyncio.Task[socket.socket] | None = None
        self._closed_signal: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._outbox = bytearray()
        self._room: asyncio.Future[None] | None = None
        self._reading = False
        self._writing = False
        self._closing = False
        self.discarded = 0
        """Replies that came after their call had given up (timeout, cancellation), and were dropped."""

    async def call(self, request: bytes | bytearray | memoryview, timeout: float | None = None) -> bytes:
        """Send `request` and return the reply; at most `timeout` seconds (None: no limit).

        Raises as podipc.Client.call does: MessageTooLarge (before sending), PeerTimeout,
        Timeout (this call only), RemoteError, PeerGone (every call in flight when the
        server goes; the next call connects again), ChannelClosed, ProtocolError.
        Cancelling it affects no other call.
        """
        view = memoryview(request)
        if view.nbytes > self.max_message_size:
            raise too_large(view.nbytes, self.max_message_size)
        self._check_usable()
        loop = self._bound_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        return await self._call_once(loop, view, timeout, started)
                    except _NotSent:
                        continue  # the server went before this request left: try the next connection
        except TimeoutError as error:
            if isinstance(error, Timeout):
                raise
            self._check_usable()
            raise Timeout(f"no reply from {self._what} within the call's timeout") from None

    async def _call_once(
        self, loop: asyncio.AbstractEventLoop, view: memoryview, timeout: float | None, started: float
    ) -> bytes:
        sock = self._socket
        if sock is None:
            sock = await asyncio.shield(self._connect_task(loop))
        while len(self._outbox) > OUTBOX_LIMIT:
            await self._wait_for_room(loop)
        self._check_usable()
        if sock is not self._socket:
            raise _NotSent  # lost while this call waited for room
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        call_id = next(self._ids) & MAX_CALL_ID
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending[call_id] = future
        try:
            self._write(loop, sock, frame_prefix(REQUEST, call_id, view.nbytes, deadline_ms(left)) + view)
            self._watch(loop, sock)
            return await future
        finally:
            if self._pending.pop(call_id, None) is not None and not self._pending:
                self._unwatch(loop, sock)

    def _check_usable(self) -> None:
        if self._inherited:
            raise self._inherited_error()
        if self._closing:
            raise ChannelClosed(f"the client for {self._what} is closed")

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._closed_signal = loop.create_future()
        elif self._loop is not loop:
            raise RuntimeError(f"the client for {self._what} is used from another event loop than its first call's")
        return loop

    # --- connecting ---------------------------------------------------------------

    def _connect_task(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[socket.socket]:
        task = self._connecting
        if task is None:
            task = self._connecting = loop.create_task(self._connect(loop))
            task.add_done_callback(_retrieve)
        return task

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        connector = self._connector
        pause = CONNECT_RETRY_FIRST_SECONDS
        while True:
            self._check_usable()
            seconds = connector.seconds_left(None)
            sock, target, expected = connector.new_socket()
            try:
                connected = await self._until_closed(self._connect_once(loop, sock, target), seconds)
                if connected:
                    connector.established(sock, expected)
                    if await self._until_closed(self._hello(loop, sock), connector.seconds_left(None)):
                        self._socket = sock
                        return sock
            except BaseException:
                sock.close()
                raise
            sock.close()
            await self._until_closed(asyncio.sleep(pause if seconds is None else min(pause, seconds)), None)
            pause = min(pause * 2, CONNECT_RETRY_MAX_SECONDS)

    async def _connect_once(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, target: Any) -> bool:
        try:
            await loop.sock_connect(sock, target)
        except OSError as error:
            code = error.errno if error.errno is not None else errno.ECONNREFUSED
            self._connector.refused(OSError(code, os.strerror(code)))
            return False
        return True

    async def _hello(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
        """Say hello and check the answer; False when the server vanished meanwhile (try again), as the sync client."""
        try:
            await loop.sock_sendall(sock, HELLO)
            answer = b""
            while len(answer) < len(HELLO):
                chunk = await loop.sock_recv(sock, len(HELLO) - len(answer))
                if not chunk:
                    break
                answer += chunk
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._connector.last_error = exc  # a server dying as we came (see podipc.rpc.sockets)
            return False
        except OSError as exc:
            raise ProtocolError(
                f"{self._what} dropped the connection instead of answering the podipc request/reply hello "
                f"({exc.strerror}); it is not a podipc server"
            ) from exc
        self._connector.check_answer(answer)
        return True

    async def _until_closed(self, work: Any, seconds: float | None) -> Any:
        """Await `work`; ChannelClosed when closed meanwhile, PeerTimeout when `seconds` (the wait) ran out."""
        task = asyncio.ensure_future(work)
        signal = self._closed_signal
        assert signal is not None
        try:
            done, _ = await asyncio.wait({task, signal}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self._check_usable()
        raise self._connector.peer_timeout()

    # --- writing and reading ----------------------------------------------------

    def _write(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, frame: bytes) -> None:
        if not self._outbox:
            try:
                sent = sock.send(frame, SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lose(PeerGone(gone_text(self._what)), exc)
                self._check_usable()
                raise _NotSent from exc  # nothing of it went: it may go on the next connection
            if sent == len(frame):
                return
            frame = frame[sent:]
        self._outbox += frame
        if not self._writing:
            self._writing = True
            loop.add_writer(sock.fileno(), self._on_writable, sock)

    def _on_writable(self, sock: socket.socket) -> None:
        try:
            sent = sock.send(self._outbox, SEND_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(PeerGone(gone_text(self._what)), exc)
            return
        del self._outbox[:sent]
        if len(self._outbox) <= OUTBOX_LIMIT and self._room is not None:
            _resolve(self._room)
            self._room = None
        if not self._outbox:
            self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing and self._loop is not None and self._socket is not None and not self._loop.is_closed():
            self._loop.remove_writer(self._socket.fileno())
        self._writing = False

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._room is None:
            self._room = loop.create_future()
        await asyncio.shield(self._room)
        self._check_usable()

    def _watch(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if not self._reading and sock is self._socket and not self._closing:
            self._reading = True
            loop.add_reader(sock.fileno(), self._on_readable, sock)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if self._reading:
            self._reading = False
            if not loop.is_closed() and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())

    def _on_readable(self, sock: socket.socket) -> None:
        read_frame = self._reader.read_frame
        while True:
            try:
                frame = read_frame(sock)
            except BlockingIOError:
                return
            except (PeerGone, EndOfStream, OSError) as exc:
                self._lose(PeerGone(gone_text(self._what)), exc)
                return
            except ProtocolError as exc:
                self._lose(ProtocolError(str(exc)), exc)
                return
            try:
                kind, call_id, _, body = decode(frame, f"the server at {self._what}")
                if kind == REQUEST:
                    raise ProtocolError(f"the server at {self._what} sent a request; servers only reply")
            except ProtocolError as exc:
                self._lose(exc, exc)
                return
            future = self._pending.pop(call_id, None)
            if future is None or future.done():
                self.discarded += 1
                continue
            if kind == REPLY:
                future.set_result(body)
            else:
                assert kind == ERROR
                future.set_exception(RemoteError(body.decode("utf-8", "replace")))

    def _lose(self, error: PodIPCError, cause: BaseException) -> None:
        """The connection is lost (on the loop): every call in flight raises `error`; the next call connects again."""
        error.__cause__ = cause
        self._fail_all(error if not self._closing else ChannelClosed(f"the client for {self._what} is closed"))
        if self._closing:
            return
        sock, self._socket = self._socket, None
        self._connecting = None
        self._reader = FrameReader(self.max_message_size + CALL_HEADER_SIZE, f"the server at {self._what}")
        self._outbox.clear()
        self._connector.wait_deadline = time.monotonic() + self._wait  # for the server to come back
        if sock is not None:
            sock.close()

    def _fail_all(self, error: PodIPCError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(type(error)(str(error)))
                future.add_done_callback(_retrieve)
        if self._room is not None:
            _resolve(self._room)
            self._room = None
        loop, sock = self._loop, self._socket
        if loop is not None and sock is not None:
            self._unwatch(loop, sock)
            self._stop_writing()

    # --- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; every waiting task raises ChannelClosed. Idempotent.

        Safe from any thread, a signal handler or a loop callback.
        """
        if self._closing:
            return
        self._closing = True
        loop = self._loop
        if self._inherited:  # the parent's connection and loop: close this process's copy only, send nothing
            sock, self._socket = self._socket, None
            if sock is not None:
                sock.close()
            return
        if loop is None or loop.is_closed():
            self._free()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._finish_closing()
        else:
            loop.call_soon_threadsafe(self._finish_closing)

    abort = close
    """The same as close() (for podipc.close_on_signals)."""

    async def aclose(self) -> None:
        """close(), awaitable (for `async with`)."""
        self.close()

    def _finish_closing(self) -> None:
        self._fail_all(ChannelClosed(f"the client for {self._what} is closed"))
        if self._closed_signal is not None:
            _resolve(self._closed_signal)
        self._free()

    def _free(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            if not self._outbox:
                with contextlib.suppress(OSError):
                    sock.send(end_of_stream_frame(), SEND_FLAGS)
            sock.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _release_unclosed(self) -> None:
        self._free()  # its loop may be gone: only the socket


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def client(url: str, **options: object) -> AsyncClient:
    """Open the asyncio client side of request/reply at `url` (as podipc.client; no I/O until the first call)."""
    address = parse_address(url)
    if address.scheme == "shm":
        raise AddressError(
            "the asyncio request/reply client runs over unix:// and tcp:// only; over shm:// call "
            "podipc.client(url).call from a thread (loop.run_in_executor)"
        )
    check_scheme(address)
    return AsyncClient(address, resolve_options(address, RPC_OPTIONS, options))
