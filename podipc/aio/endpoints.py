"""The asyncio producer and consumer, built on the sync endpoints' non-blocking hooks (see podipc.aio)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
from collections.abc import Callable
from time import monotonic as _monotonic
from types import TracebackType
from typing import Any, TypeVar

import podipc.channel as channel
from podipc.consuming import Consumer
from podipc.endpoint import ABORT_CHECK_SECONDS
from podipc.errors import ChannelClosed, EndOfStream, PeerTimeout, PodIPCError, Timeout
from podipc.options import deadline_after, remaining
from podipc.producing import Producer
from podipc.waking import POLLOUT

T = TypeVar("T")

FAIRNESS_SECONDS = 0.0005
"""A task that sends or receives without ever waiting yields to its loop at least this often, so a
consumer at full rate never starves the loop's other tasks (a 1 ms ticker keeps its beat). The yield
comes before an attempt, never after one: a task cancelled there has taken or sent nothing."""


class _Watch:
    """Wakes the tasks of one endpoint that wait for its readiness descriptor or its waker, on one loop."""

    def __init__(self, endpoint: Producer | Consumer) -> None:
        self.endpoint = endpoint
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registered: tuple[int, bool, int] | None = None

    async def wait(self, seconds: float | None, closing: bool = False) -> None:
        """Wait until the next attempt may succeed, `seconds` pass, or a close wakes us (then raise ChannelClosed)."""
        endpoint = self.endpoint
        readiness = endpoint._readiness()
        assert readiness is not None
        fd, events, retry_after = readiness
        if retry_after is not None:
            seconds = retry_after if seconds is None else min(seconds, retry_after)
        if closing:  # the waker stays readable once closing began; look for an abort this often instead
            seconds = ABORT_CHECK_SECONDS if seconds is None else min(seconds, ABORT_CHECK_SECONDS)
            waker_fd = -1
        else:
            waker_fd = endpoint._waker_fd()
        if endpoint._state:
            endpoint._check_waiting(closing)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        self._register(loop, fd, bool(events & POLLOUT), waker_fd)
        timer = None if seconds is None else loop.call_later(max(0.0, seconds), _resolve, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.remove(future)
            if not self._waiters:
                self._unregister()
        if endpoint._state:
            endpoint._check_waiting(closing)

    def _register(self, loop: asyncio.AbstractEventLoop, fd: int, writable: bool, waker_fd: int) -> None:
        wanted = (fd, writable, waker_fd)
        if self._registered == wanted and self._loop is loop:
            return
        self._unregister()
        self._loop = loop
        if fd >= 0:
            (loop.add_writer if writable else loop.add_reader)(fd, self._fire)
        if waker_fd >= 0:
            loop.add_reader(waker_fd, self._fire)
        self._registered = wanted

    def _unregister(self) -> None:
        registered, loop = self._registered, self._loop
        self._registered = None
        if registered is None or loop is None or loop.is_closed():
            return
        fd, writable, waker_fd = registered
        if fd >= 0:
            (loop.remove_writer if writable else loop.remove_reader)(fd)
        if waker_fd >= 0:
            loop.remove_reader(waker_fd)

    def _fire(self) -> None:
        self._unregister()  # level-triggered: the woken tasks register again if they must wait more
        for future in self._waiters:
            _resolve(future)

    def wake_all(self) -> None:
        """From the loop's thread: stop watching and wake every waiting task (they re-check the state)."""
        self._fire()


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Worker:
    """One daemon thread per endpoint that runs its blocking calls in order (transports without readiness)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"podipc-aio {name}", daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `function(*args)` on the thread after what was submitted before; an asyncio future of its result."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((function, args, result))
        future = asyncio.wrap_future(result)
        # its error may be read by a later call, or never (the endpoint was closed first): either way it
        # must not be logged from a garbage collection that can strike anywhere, even inside ast.parse
        future.add_done_callback(_mark_retrieved)
        return future

    def stop(self) -> None:
        """Let the thread end after the jobs queued so far."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args, result = job
            if not result.set_running_or_notify_cancel():
                continue
            try:
                result.set_result(function(*args))
            except BaseException as error:
                result.set_exception(error)


class _AsyncEndpoint:
    """What both async sides share: the sync endpoint, its watch or helper thread, context management."""

    def __init__(self, endpoint: Producer | Consumer) -> None:
        self._sync = endpoint
        self._watch = _Watch(endpoint)
        self._worker = None if endpoint._contract else _Worker(endpoint.address.location)
        self._closing: asyncio.Future[None] | None = None
        """Resolved by close()/abort(): wakes tasks awaiting the helper thread (channels without readiness)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._yielded_at = 0.0

    async def _take_turns(self) -> None:
        """Yield to the loop; the hot paths call it once FAIRNESS_SECONDS passed since the last yield or wait
        (checked inline there: a coroutine more per message would cost more than the check)."""
        await asyncio.sleep(0)
        self._yielded_at = _monotonic()

    async def _on_worker(self, work: asyncio.Future[T]) -> T:
        """Await the helper thread's result, or raise ChannelClosed as soon as this side is closed."""
        loop = asyncio.get_running_loop()
        closing = self._closing
        if closing is None or self._loop is not loop:
            self._loop = loop
            closing = self._closing = loop.create_future()
            if self._sync.closed:
                _resolve(closing)
        waiting: set[asyncio.Future[Any]] = {work, closing}  # wait() never cancels them, even when we are
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ChannelClosed(f"{type(self._sync).__name__} for {self._sync.address.location} is closed")

    @property
    def endpoint(self) -> Producer | Consumer:
        """The sync endpoint underneath (its fileno(), summaries and options are the same)."""
        return self._sync

    @property
    def address(self) -> Any:
        """The parsed channel URL."""
        return self._sync.address

    @property
    def settings(self) -> dict[str, Any]:
        """The channel's options after defaults, URL and keywords were merged."""
        return self._sync.settings

    @property
    def max_message_size(self) -> int:
        """Largest message in bytes this channel carries here."""
        return self._sync.max_message_size

    @property
    def closed(self) -> bool:
        """True once close(), aclose() or abort() has begun."""
        return self._sync.closed

    def fileno(self) -> int:
        """The sync endpoint's readiness descriptor (see Producer.fileno)."""
        return self._sync.fileno()

    def abort(self) -> None:
        """Free this side without ending the stream; waiting tasks raise ChannelClosed. Any thread, any time."""
        self._wake_waiters()
        self._sync.abort()
        self._stop_worker()

    def _wake_waiters(self) -> None:
        closing, closing_loop = self._closing, self._loop
        if closing is not None and closing_loop is not None and not closing_loop.is_closed():
            closing_loop.call_soon_threadsafe(_resolve, closing)
        loop = self._watch._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._watch.wake_all()  # the sync close then wakes them through the waker too; this only unregisters first

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sync!r}>"


class AsyncProducer(_AsyncEndpoint):
    """The asyncio sending side: `await send(data)`, then `await aclose()` (or `async with`) to end the stream."""

    _sync: Producer

    def __init__(self, endpoint: Producer) -> None:
        super().__init__(endpoint)
        self._flusher: asyncio.Task[None] | None = None

    @property
    def resumed_at(self) -> int:
        """How many messages of this stream were sent before this producer opened (file:// resumes)."""
        return self._sync.resumed_at

    async def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message; wait at most `timeout` seconds for room (None: no limit, 0: try once now).

        Raises as Producer.send does. Cancelled, the message was sent whole or not at all.
        """
        endpoint = self._sync
        if self._worker is not None:
            await self._on_worker(self._worker.submit(endpoint.send, bytes(data), timeout))
            return
        if _monotonic() - self._yielded_at >= FAIRNESS_SECONDS:
            await self._take_turns()
        if not endpoint.try_send(data):
            deadline = deadline_after(timeout)
            watch = self._watch
            while True:
                await watch.wait(endpoint._seconds_to_wait(deadline))
                if endpoint.try_send(data):
                    break
        if self._flusher is None and not endpoint._flush_now():
            # the message is sent; its tail goes out in the background, so send() never has to be
            # cancelled after the message was accepted (a cancelled send sent nothing)
            self._flusher = asyncio.get_running_loop().create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        endpoint = self._sync
        try:
            while not endpoint._flush_now():
                await self._watch.wait(None)
        except PodIPCError:
            pass  # closed or the consumer is gone: the next call or aclose() says so
        finally:
            self._flusher = None

    async def aclose(self, timeout: float | None = None) -> None:
        """End the stream without blocking the loop: wait (at most `timeout`, else `wait`) for the consumer's ack.

        Raises as Producer.close does; this side is freed either way.
        """
        endpoint = self._sync
        if self._worker is not None:
            try:
                await self._worker.submit(endpoint.close, timeout)
            finally:
                self._stop_worker()
            return
        if endpoint._forked:
            endpoint.close()
            return
        if not endpoint._begin_closing(abort=False):
            return
        wait = float(endpoint.settings["wait"])
        deadline = deadline_after(timeout if timeout is not None else (None if wait == math.inf else wait))
        endpoint._close_deadline = deadline
        token = endpoint._token
        try:
            token.pop()
        except IndexError:
            # a thread is inside a call: finish the sync way, off the loop
            await asyncio.to_thread(endpoint._close_holding_gate)
            return
        endpoint._async_closing = True  # closers on this thread (loop callbacks) leave the finish to us
        try:
            await self._end_stream(endpoint, deadline)
        finally:
            endpoint._async_closing = False
            token.append(None)
            if endpoint._state:
                endpoint._after_call()

    async def _end_stream(self, endpoint: Producer, deadline: float | None) -> None:
        if endpoint._finished:
            return
        endpoint._finished = True
        try:
            if endpoint._aborting:
                raise ChannelClosed(f"{type(endpoint).__name__} for {endpoint.address.location} was aborted")
            while not endpoint._try_close():
                await self._watch.wait(endpoint._seconds_to_wait(deadline, closing=True), closing=True)
        finally:
            endpoint._free_once()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.abort()


class AsyncConsumer(_AsyncEndpoint):
    """The asyncio receiving side: `await recv()` or `async for message in inbox` until the end of stream."""

    _sync: Consumer

    def __init__(self, endpoint: Consumer) -> None:
        super().__init__(endpoint)
        self._inflight: asyncio.Future[bytes] | None = None

    @property
    def ended(self) -> bool:
        """True once the end of stream was received."""
        return self._sync.ended

    @property
    def resumed_at(self) -> int:
        """How many messages of this stream were consumed before this consumer opened (file:// resumes)."""
        return self._sync.resumed_at

    @property
    def skipped(self) -> int:
        """Messages that arrived malformed and were skipped (documented per channel)."""
        return self._sync.skipped

    @property
    def lost(self) -> int:
        """Messages known to be lost in transit (udp:// only)."""
        return self._sync.lost

    async def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit, 0: try once now).

        Raises as Consumer.recv does. Cancelled, nothing is lost: the next recv() gets the message.
        """
        endpoint = self._sync
        if self._worker is not None:
            return await self._recv_on_worker(timeout)
        if _monotonic() - self._yielded_at >= FAIRNESS_SECONDS:
            await self._take_turns()
        message = endpoint.try_recv()
        if message is not None:
            return message
        return await self._recv_after_waiting(timeout)

    async def recv_from(self, timeout: float | None = None) -> tuple[str, bytes]:
        """Receive the next message and the name of the producer that sent it (a fan-in consumer, pattern=fanin).

        Raises as recv() does; TypeError when the consumer is not a fan-in consumer.
        """
        sync = self._sync
        if not hasattr(sync, "recv_from"):
            raise TypeError(f"{type(sync).__name__} has no senders: open the consumer with pattern=fanin")
        message = await self.recv(timeout)
        return getattr(
            sync, "last_sender", None
        ) or "", message  # set by the receive just done: the loop runs one task at a time

    async def _recv_after_waiting(self, timeout: float | None) -> bytes:
        """recv() once the first attempt found nothing: wait for readiness, try again, until the deadline."""
        endpoint = self._sync
        deadline = deadline_after(timeout)
        watch = self._watch
        while True:
            await watch.wait(endpoint._seconds_to_wait(deadline))
            message = endpoint.try_recv()
            if message is not None:
                self._yielded_at = _monotonic()
                return message

    async def _recv_on_worker(self, timeout: float | None) -> bytes:
        """Receive on the helper thread; a receive still running when a task was cancelled serves the next call."""
        assert self._worker is not None
        deadline = deadline_after(timeout)
        while True:
            if self._inflight is None:
                left = remaining(deadline)
                self._inflight = self._worker.submit(self._sync.recv, left)
            inflight = self._inflight
            try:
                message = await self._on_worker(inflight)
            except PeerTimeout:
                self._inflight = None
                raise
            except Timeout:
                self._inflight = None
                left = remaining(deadline)
                if left is not None and left <= 0:
                    raise
                continue  # it was started by a cancelled call with a shorter timeout than ours
            except BaseException:
                # cancelled (even just as the receive finished) or closed: the receive in flight, and the
                # message it may have taken, serve the next recv()
                raise
            self._inflight = None
            return message

    def close(self) -> None:
        """Stop consuming and free this side; waiting tasks raise ChannelClosed. Any thread, a signal handler, a loop callback."""
        self._wake_waiters()
        self._sync.close()
        self._stop_worker()

    async def aclose(self) -> None:
        """close(), for `async with` and anyio-style code (channels without readiness close off the loop)."""
        if self._worker is not None:
            self._wake_waiters()
            await asyncio.to_thread(self._sync.close)
            self._stop_worker()
            return
        self.close()

    def __aiter__(self) -> AsyncConsumer:
        return self

    async def __anext__(self) -> bytes:
        # recv()'s fast path inline: one coroutine per message, not two
        try:
            if self._worker is None:
                if _monotonic() - self._yielded_at >= FAIRNESS_SECONDS:
                    await self._take_turns()
                message = self._sync.try_recv()
                if message is not None:
                    return message
                return await self._recv_after_waiting(None)
            return await self._recv_on_worker(None)
        except EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def producer(url: str, **options: object) -> AsyncProducer:
    """Open the producing side at `url` for asyncio (opening never waits for the peer, as in the sync API)."""
    return AsyncProducer(channel.producer(url, **options))


def consumer(url: str, **options: object) -> AsyncConsumer:
    """Open the consuming side at `url` for asyncio (opening never waits for the peer, as in the sync API)."""
    return AsyncConsumer(channel.consumer(url, **options))
