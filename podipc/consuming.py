"""The receiving side's base: Consumer, the public calls a transport's consumer inherits.

The public methods check once, turn a per-call timeout into a `time.monotonic()`
deadline, then drive the transport's hooks (the contract: podipc.endpoint._Endpoint).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType

from podipc.endpoint import _Endpoint, holds_call_gate
from podipc.errors import (
    ChannelClosed,
    EndOfStream,
    PeerTimeout,
    PodIPCError,
    Timeout,
)
from podipc.options import deadline_after


class Consumer(_Endpoint):
    """The receiving side of a channel: recv() or iterate until the producer ends the stream.

    Thread-safe on channels of the endpoint contract: threads sharing a consumer each get
    whole messages, every message exactly once. close()/abort() may be called from any
    thread or a signal handler; blocked receives then raise ChannelClosed.
    """

    resumed_at: int = 0
    """How many messages of this stream were consumed before this consumer opened (file:// resumes)."""
    skipped: int = 0
    """Messages that arrived malformed and were skipped (documented per channel)."""
    lost: int = 0
    """Messages known to be lost in transit (udp:// only)."""
    _role = "consumer"
    _ended_flag = False
    _peeked: bytes | BaseException | None = None

    @property
    def ended(self) -> bool:
        """True once the end of stream was received."""
        return self._ended_flag

    @property
    def _ended(self) -> bool:
        return self._ended_flag

    @_ended.setter
    def _ended(self, value: bool) -> None:
        self._ended_flag = value
        if value:
            self._state = 1

    def _flags_set(self) -> bool:
        return super()._flags_set() or self._ended_flag or self._peeked is not None

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; wait at most `timeout` seconds (None: no limit, 0: try once now).

        Raises:
            EndOfStream: after the last message, once the producer ended the stream.
            Timeout: no message within `timeout`.
            PeerTimeout: no producer appeared within the `wait` option (counted from open).
            PeerGone: the producer died before ending the stream.
            ChannelClosed: the consumer was closed (also while this call waited), or inherited across fork().
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                peeked = self._take_state()
                if peeked is not None:
                    return peeked
            return self._recv(None if timeout is None else deadline_after(timeout))
        except EndOfStream:
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _take_state(self) -> bytes | None:
        """The slow path of recv's state check: closed, forked, ended, or a message poll() took."""
        self._check_usable()
        if self._ended_flag:
            raise EndOfStream(f"{self.address.location}: the producer ended the stream")
        peeked = self._peeked
        if peeked is None:
            return None
        self._peeked = None
        self._settle()
        if isinstance(peeked, BaseException):
            raise peeked
        return peeked

    @holds_call_gate
    def try_recv(self) -> bytes | None:
        """The next message if one is there now, else None; never waits (not even for another thread's call).

        Raises as recv() does (EndOfStream at the end, PeerTimeout once the `wait` deadline
        passed with no producer).
        """
        if not self._contract:
            try:
                return self.recv(0)
            except PeerTimeout:
                raise
            except Timeout:
                return None
        token = self._token
        try:
            token.pop()
        except IndexError:
            if self._closing or self._forked:
                raise self._closed_error() from None
            return None
        try:
            if self._state:
                peeked = self._take_state()
                if peeked is not None:
                    return peeked
            message = self._try_recv()
            if message is None and not self._peer_seen and time.monotonic() >= self.wait_deadline:
                raise self._peer_timeout()
            return message
        except EndOfStream:
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    @holds_call_gate
    def recv_many(self, max_count: int, timeout: float | None = None) -> list[bytes]:
        """Receive up to `max_count` messages: wait at most `timeout` seconds for the first, then take what is there now.

        Never returns an empty list and never waits for a second message; `timeout` as in
        recv() (None: no limit, 0: try once now). Where the transport can, the messages
        come out of one read (tcp:// and unix:// split every frame of a buffer in one pass).

        Raises as recv() does, but only when no message comes first: a batch that reaches
        the end of stream (or an error) returns its messages, and the next call raises.

        Raises:
            ValueError: max_count is below 1.
        """
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be a whole number >= 1, not {max_count!r}")
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
        try:
            if self._state:
                peeked = self._take_state()
                if peeked is not None:
                    return self._and_what_is_there([peeked], max_count)
            first = self._recv(None if timeout is None else deadline_after(timeout))
            return self._and_what_is_there([first], max_count)
        except EndOfStream:
            self._ended = True
            raise
        except PodIPCError as error:
            if self._closing and not isinstance(error, ChannelClosed):
                raise self._closed_error() from error
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _and_what_is_there(self, messages: list[bytes], max_count: int) -> list[bytes]:
        """`messages` and up to `max_count` in all of what is there now; an error after them is kept for the next call."""
        if len(messages) < max_count:
            try:
                messages += self._try_recv_many(max_count - len(messages))
            except EndOfStream:
                self._ended = True
            except PodIPCError as error:
                self._keep(error)
        return messages

    def _try_recv_many(self, max_count: int) -> list[bytes]:
        """Hook: up to `max_count` messages that are there now, never waiting; [] when there is none.

        Raises (EndOfStream, PeerGone, ...) only when it takes no message: an attempt that
        took some returns them and leaves the end of stream or the error to the next call
        (the default keeps it with `_ended` / `_keep`). The default takes them one by one
        with `_try_recv` (transports with only the blocking hooks: `_recv` with a deadline
        that has passed); a transport overrides it to split one read (tcp:// and unix://).
        """
        messages: list[bytes] = []
        take = self._try_recv if self._contract else self._recv_now
        try:
            while len(messages) < max_count:
                message = take()
                if message is None:
                    break
                messages.append(message)
        except PodIPCError as error:
            self._after_some(messages, error)
        return messages

    def _after_some(self, messages: list[bytes], error: PodIPCError) -> None:
        """What a batch met after `messages`: raised when it took none, else kept for the next call."""
        if not messages:
            raise error
        if isinstance(error, EndOfStream):
            self._ended = True
        else:
            self._keep(error)

    def _recv_now(self) -> bytes | None:
        """One receive that does not wait, on a transport with only the blocking hooks; None when there is none."""
        try:
            return self._recv(time.monotonic())
        except Timeout:
            return None

    def _recv(self, deadline: float | None) -> bytes:
        """Receive blocking until `deadline`: try, then wait on readiness and the waker (old hook; override or keep)."""
        try_recv = self._try_recv
        while True:
            message = try_recv()
            if message is not None:
                return message
            self._await_readiness(deadline)

    def _try_recv(self) -> bytes | None:
        raise NotImplementedError(f"{type(self).__name__} implements neither _recv nor _try_recv")

    @holds_call_gate
    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when recv() would return (or raise) without waiting; waits at most `timeout` seconds (None: no limit).

        A message found is kept for the next recv(); so are EndOfStream and errors.
        """
        token = self._token
        try:
            self._enter(timeout)
        except Timeout:
            return False
        try:
            if self._state and (self._ended_flag or self._peeked is not None or self._closing or self._forked):
                return True
            try:
                message = self._recv(None if timeout is None else deadline_after(timeout))
            except Timeout as error:
                if isinstance(error, PeerTimeout):
                    self._keep(error)
                    return True
                return False
            except EndOfStream:
                self._ended = True
                return True
            except PodIPCError as error:
                self._keep(error)
                return True
            self._keep(message)
            return True
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _keep(self, result: bytes | BaseException) -> None:
        self._peeked = result
        self._state = 1

    def recv_view(self, timeout: float | None = None) -> memoryview:
        """Receive the next message as a read-only memoryview, valid until the next receive.

        Channels that can hand out their buffer without copying (shm://) override this.
        """
        return memoryview(self.recv(timeout))

    def __iter__(self) -> Iterator[bytes]:
        """Yield messages until the end of stream (ChannelClosed if the consumer is closed meanwhile)."""
        recv = self.recv
        while True:
            try:
                yield recv()
            except EndOfStream:
                return

    def close(self) -> None:
        """Stop consuming and free what this side created. Idempotent; safe from any thread or a signal handler."""
        if self._forked:
            self._closed = True
            return
        if self._begin_closing(abort=False):
            self._close_holding_gate()

    def _complete_closing(self) -> None:
        self._close()

    def _close(self) -> None:
        """Free (old hook; the default is _free)."""
        self._free_once()

    def _abort(self) -> None:
        self._close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
