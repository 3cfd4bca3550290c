"""The sending side's base: Producer, the public calls a transport's producer inherits.

The public methods check once, turn a per-call timeout into a `time.monotonic()`
deadline, then drive the transport's hooks (the contract: podipc.endpoint._Endpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

from podipc.endpoint import _Endpoint, holds_call_gate
from podipc.errors import (
    ChannelClosed,
    MessageTooLarge,
    PeerTimeout,
    PodIPCError,
    Timeout,
)
from podipc.options import deadline_after
from podipc.waking import is_ready


class Producer(_Endpoint):
    """The sending side of a channel: send() messages, then close() to end the stream.

    Thread-safe on channels of the endpoint contract (see docs: each message whole and
    once, in order per thread). close()/abort() may be called from any thread or a signal
    handler; blocked sends then raise ChannelClosed having sent nothing.
    """

    resumed_at: int = 0
    """How many messages of this stream were sent before this producer opened (file:// resumes)."""
    _role = "producer"

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit, 0: try once now).

        Raises:
            MessageTooLarge: before anything is sent.
            Timeout: no room within `timeout` (nothing of the message was sent).
            PeerTimeout: no consumer appeared within the `wait` option (counted from open).
            PeerGone: the consumer died or went away.
            ChannelClosed: the producer was closed (also while this call waited), or inherited across fork().
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                self._check_usable()
            view = data if type(data) is memoryview else memoryview(data)
            if view.nbytes > self.max_message_size:
                raise MessageTooLarge(view.nbytes, self.max_message_size, self.max_message_source, self.max_message_fix)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._send(view, None if timeout is None else deadline_after(timeout))
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    @holds_call_gate
    def try_send(self, data: bytes | bytearray | memoryview) -> bool:
        """Send one message if that is possible now, without waiting; False when there is no room yet.

        Raises as send() does; PeerTimeout once the `wait` deadline passed with no consumer.
        """
        if not self._contract:
            try:
                self.send(data, 0)
            except PeerTimeout:
                raise
            except Timeout:
                return False
            return True
        token = self._token
        try:
            token.pop()
        except IndexError:
            if self._closing or self._forked:
                raise self._closed_error() from None
            return False
        try:
            if self._state:
                self._check_usable()
            view = self._checked_view(data)
            if self._try_send(view):
                return True
            if not self._peer_seen and time.monotonic() >= self.wait_deadline:
                raise self._peer_timeout()
            return False
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _checked_view(self, data: bytes | bytearray | memoryview) -> memoryview:
        """`data` as a flat byte view, refused with MessageTooLarge when above the limit."""
        view = data if type(data) is memoryview else memoryview(data)
        if view.nbytes > self.max_message_size:
            raise MessageTooLarge(view.nbytes, self.max_message_size, self.max_message_source, self.max_message_fix)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return view

    @holds_call_gate
    def send_many(self, messages: Iterable[bytes | bytearray | memoryview], timeout: float | None = None) -> int:
        """Send every message of `messages`, in order, each whole, as send() would; return how many were sent.

        Where the transport can, the batch leaves in few writes (tcp:// and unix://: gathered
        writes of many frames); elsewhere the messages go one by one. The iterable is read
        whole first and every size checked, so MessageTooLarge means nothing was sent (pass
        batches that fit in memory). `timeout` (seconds; None: no limit, 0: what fits now)
        covers the whole batch. Threads sharing the producer never put a message between
        those of a batch.

        Raises as send() does. When it raises after part of the batch went, `error.sent`
        says how many messages of the batch were sent (whole, in order); the rest were not.
        """
        try:
            views = self._batch_views(messages)
        except MessageTooLarge as error:
            error.sent = 0
            raise
        token = self._token
        try:
            token.pop()
        except IndexError:
            try:
                self._enter(timeout)
            except PodIPCError as error:  # closed, or another thread's call kept the gate: none of the batch went
                error.sent = 0
                raise
        sent = 0
        try:
            if self._state:
                self._check_usable()
            deadline = None if timeout is None else deadline_after(timeout)
            if not self._contract:
                send = self._send
                for view in views:
                    send(view, deadline)
                    sent += 1
                return sent
            try_send_many = self._try_send_many
            total = len(views)
            while sent < total:
                accepted = try_send_many(views, sent)
                if accepted == sent:
                    self._await_readiness(deadline)
                sent = accepted
            if not self._try_flush():
                self._finish_sending(deadline)
            return sent
        except PodIPCError as error:
            if self._closing and not isinstance(error, (ChannelClosed, MessageTooLarge)):
                closed = self._closed_error()
                closed.sent = sent
                raise closed from error
            error.sent = sent
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _batch_views(self, messages: Iterable[bytes | bytearray | memoryview]) -> Sequence[memoryview]:
        """Hook: a batch as what `_try_send_many` takes, every size checked (MessageTooLarge: nothing is sent).

        The default makes a flat byte view of each message; shm:// keeps a list of equal-sized
        bytes as it is, to send it in pack records.
        """
        return [self._checked_view(message) for message in messages]

    def _try_send_many(self, views: Sequence[memoryview], start: int) -> int:
        """Hook: ONE non-blocking attempt to send `views[start:]`; the index after the last message accepted.

        Returns `start` when nothing was accepted (the base then waits on `_readiness()`);
        raises only then. Like `_try_send`, a message is accepted whole or not at all (a
        frame partly written stays pending in the transport and counts as sent). The
        default sends one message at a time with `_try_send`; a transport overrides it for
        real batching (tcp:// and unix://: one gathered write).
        """
        try_send = self._try_send
        index = start
        try:
            for view in views[start:]:
                if not try_send(view):
                    break
                index += 1
        except PodIPCError:
            if index == start:
                raise
        return index

    @holds_call_gate
    def flush(self, timeout: float | None = None) -> None:
        """Hand every message sent so far to the channel now; wait at most `timeout` seconds for room (None: no limit).

        Only channels that hold messages back need it: tcp:// and unix:// coalesce
        back-to-back sends (see their docs for the bound on how long one waits), and may
        keep the tail of a frame the kernel took in part. Elsewhere it returns at once.

        Raises:
            Timeout: the channel had no room for it all within `timeout` (the rest goes out later; nothing is lost).
            PeerGone: the consumer died or went away.
            ChannelClosed: the producer was closed, or inherited across fork().
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                self._check_usable()
            if not self._contract or self._try_flush():
                return
            deadline = deadline_after(timeout)
            while True:
                self._await_readiness(deadline)
                if self._try_flush():
                    return
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _send(self, view: memoryview, deadline: float | None) -> None:
        """Send blocking until `deadline`: try, then wait on readiness and the waker (old hook; override or keep)."""
        try_send = self._try_send
        while not try_send(view):
            self._await_readiness(deadline)
        if not self._try_flush():
            self._finish_sending(deadline)

    def _finish_sending(self, deadline: float | None) -> None:
        """The message is sent but its tail is pending: push it out while the call has time, else leave it.

        A blocking send must not leave bytes behind that only a later call would push (the
        consumer could be waiting for them while we wait for its answer).
        """
        try:
            while True:
                self._await_readiness(deadline)
                if self._try_flush():
                    return
        except (Timeout, ChannelClosed):
            return  # counts as sent: the tail goes out first on the next send or close

    def _try_flush(self) -> bool:
        """Push out what an attempt left pending, without blocking; True when nothing is pending (hook)."""
        return True

    def _flush_now(self) -> bool:
        """One flush attempt under the call gate (for podipc.aio); False when the gate is busy or bytes remain."""
        token = self._token
        try:
            token.pop()
        except IndexError:
            if self._closing or self._forked:
                raise self._closed_error() from None
            return False
        try:
            if self._state:
                self._check_usable()
            return self._try_flush()
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _try_send(self, view: memoryview) -> bool:
        raise NotImplementedError(f"{type(self).__name__} implements neither _send nor _try_send")

    def _try_close(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} implements neither _close nor _try_close")

    def _try_prepare(self) -> bool:
        """One non-blocking step towards sending (connect, handshake, flush); True when a send may go out now."""
        return True

    @holds_call_gate
    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a send would not wait (there is room), waiting at most `timeout` seconds for that (None: no limit)."""
        deadline = deadline_after(timeout)
        token = self._token
        try:
            self._enter(timeout)
        except Timeout:
            return False
        try:
            while True:
                if self._state:
                    self._check_usable()
                if self._try_prepare():
                    readiness = self._readiness()
                    if (
                        readiness is None
                        or readiness[0] < 0
                        or readiness[2] == 0
                        or is_ready(readiness[0], readiness[1])
                    ):
                        return True
                try:
                    self._await_readiness(deadline)
                except Timeout:
                    return False
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def close(self, timeout: float | None = None) -> None:
        """End the stream: the consumer's iteration stops after every message sent. Idempotent.

        Waits (at most `timeout`, else the `wait` option) until the consumer has taken the
        end of stream, then frees what this side created. Safe from any thread or a signal
        handler: sends blocked elsewhere raise ChannelClosed (having sent nothing) and the
        stream still ends. Called from a signal handler that interrupted a send on the same
        thread, the end of stream is sent as that send leaves.

        Raises:
            Timeout: the consumer did not take the end of stream in time (this side is freed).
            PeerTimeout, PeerGone: no consumer, or it went away (this side is freed).
        """
        if self._forked:
            self._closed = True
            return
        if not self._begin_closing(abort=False):
            return
        wait = float(self.settings["wait"])
        seconds = timeout if timeout is not None else (None if wait == math.inf else wait)
        self._close_deadline = deadline_after(seconds)
        self._close_holding_gate()

    def _complete_closing(self) -> None:
        if self._aborting:
            self._abort()
            return
        try:
            self._close(self._close_deadline)
        except BaseException:
            self._abort()
            raise

    def _close(self, deadline: float | None) -> None:
        """End the stream, then free (old hook; the default runs _try_close until done, then _free)."""
        while not self._try_close():
            self._await_readiness(deadline, closing=True)
        self._free_once()

    def _abort(self) -> None:
        """Free without ending the stream (old hook; the default is _free)."""
        self._free_once()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
