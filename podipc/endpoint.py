"""The endpoint base every Producer and Consumer builds on: the endpoint contract.

`_Endpoint` holds what both sides share: the call gate (threads), the waker and the
stable fileno() mirror (readiness), shutdown from any thread or a signal handler, and
fork safety (an inherited endpoint refuses use). Its docstring is the contract every
transport implements; podipc.producing and podipc.consuming add the public calls.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import threading
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, ClassVar, TypeVar

from podipc.address import Address
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    PeerTimeout,
    Timeout,
)
from podipc.options import Option, deadline_after, remaining
from podipc.waking import POLLIN, POLLOUT, Waker, wait_for

CALLS_LEAVE_SECONDS = 1.0
"""How long close()/abort() waits for calls in other threads to leave before leaving the release to them."""


class _Endpoint(ABC):
    """What producers and consumers share: the endpoint contract every transport builds on.

    The public methods (send, try_send, recv, try_recv, poll, fileno, close, abort) are
    written once here. A transport implements private hooks; the base turns them into
    blocking calls with timeouts, thread safety, shutdown from anywhere and fork safety.

    Hooks a transport implements (the non-blocking contract; tcp:// and unix:// are the reference):

    - `_try_send(view: memoryview) -> bool` (producer): ONE attempt that never blocks. True:
      the whole message is accepted (a frame partly written may stay pending inside the
      transport; it goes out before anything else and counts as sent). False: nothing of
      it was accepted; the base waits on `_readiness()` and tries again. May raise
      PeerGone, ProtocolError, ChannelUnavailable; never Timeout (the base owns deadlines).
    - `_try_recv() -> bytes | None` (consumer): ONE attempt that never blocks: the next whole
      message, or None when there is none now. At the end of stream it acknowledges what
      the wire needs and raises EndOfStream. A message is either returned or left in place:
      an attempt never half-consumes one (that is what makes asyncio cancellation safe).
    - `_try_flush() -> bool` (producer, when `_try_send` can leave a tail pending): push the
      pending tail without blocking; True when nothing is pending. A blocking send calls it
      until done while it has time; podipc.aio flushes in the background; flush() waits for it.
    - `_try_send_many(views, start) -> int` / `_try_recv_many(max_count) -> list[bytes]`
      (optional): one non-blocking attempt at a batch, for send_many() and recv_many(); the
      defaults call `_try_send` / `_try_recv` per message. Override them for real batching
      (tcp:// and unix://: one gathered write; every frame of a read cut at once).
    - `_try_close() -> bool` (producer): one non-blocking step of ending the stream (connect
      if needed, flush what is pending, send the end marker, take the ack); True when the
      consumer has taken the end of stream.
    - `_readiness() -> tuple[int, int, float | None]`: what to wait on before the next
      attempt: (fd, POLLIN or POLLOUT, retry_after); fd -1 when there is nothing to watch
      yet. Ready when the next attempt may succeed (spurious wakes are fine, missed ones are
      not). It may name another fd over time (a socket connected, a peer attached): call
      `_readiness_changed()` then; the base keeps fileno() stable with an epoll mirror made
      only on demand. Keep the fd registered nowhere while not waiting (a wait-queue entry
      makes every peer's send or receive run a wakeup callback: measured +20 % per message
      on unix://). `retry_after`: seconds after which to try again even without an event
      (a connect backoff), or None; 0 means ready now (an edge-triggered fd, such as
      zmq's, whose event came already). A transport whose kernel object has no descriptor
      provides one (an eventfd fed by a helper thread, a FIFO, inotify), or returns
      (-1, 0, seconds) and the base re-tries at that period.
    - `_free()`: free everything this side holds (fds, mappings, files it owns). Called
      exactly once, and only when no call is inside the endpoint ("last one out frees").
    - `_interrupt()` (optional): wake a call blocked in the kernel on a faster path than
      the poll loop (e.g. shutdown(SHUT_RD) of a stream consumer's socket). Called from any
      thread or a signal handler while a call may be inside: it must not free anything.
    - `_drop_inherited()` (optional): in a forked child, close the child's copies of this
      endpoint's descriptors; never unlink, never send, never touch shared state.
    - `_peer_seen` (attribute): set True once the peer has appeared (the base's PeerTimeout
      rule reads it); `_peer_timeout() -> PeerTimeout` (optional) to say more than the default.
    - `_readiness_changed()` (the base's, for the transport to call): whenever `_readiness()`
      starts naming another fd or other events, so the fileno() mirror follows.
    - Peer loss: a monitor (presence.watch) calls `endpoint._signal_peer_lost()` from its
      thread; that sets `_peer_lost`, sets `_state` and wakes blocked calls, and the
      transport's next attempt decides what it means (drain what is queued, then PeerGone).

    A transport is on this contract when it overrides `_readiness` (that is how the base and
    podipc.aio tell); it then declares `waits_forever = True` once wait=None works for it.

    A transport may keep a faster blocking path by overriding `_send(view, deadline)` /
    `_recv(deadline)` (call the base's for everything but its fast case) as long as
    `_interrupt()` wakes it. It may even override a public call for its commonest case
    (tcp:// and unix:// send and recv, zmq's, shm's send, loan, commit, recv and recv_view: taking
    the gate, checking `_state`, then the base's call for everything else), marked with
    `@holds_call_gate` so close() from a signal handler sees it. Transports not yet on this contract override `_send`, `_recv`,
    `_close` and `_abort` directly (the old hooks); they get the call gate, the state check
    and fork safety, but a blocked call on them wakes only when its own call returns (close
    then waits CALLS_LEAVE_SECONDS and leaves the release to that call), and aio runs them
    on one helper thread per endpoint.

    What the base guarantees on top:

    - Timeouts: `timeout=None` waits without limit, `timeout=0` tries once, now. The rule
      for which error a waiting call raises, the same on every channel: the first deadline
      reached decides. PeerTimeout when the `wait` deadline (counted from open; `wait=None`
      means forever) passed and the peer was never seen; otherwise Timeout when the call's
      own timeout ran out (even before the peer appeared). PeerTimeout subclasses Timeout.
      Once the peer was seen, only Timeout (and PeerGone, EndOfStream).
    - Threads: each side has one call gate, a lock (producer: send and close; consumer:
      recv), so an endpoint shared by threads delivers each message whole and once, in order
      per thread. The hot path adds the gate (a one-element token list, see `_enter`) and
      one check of `_state` (non-zero: closing, forked, ended, a polled message waiting, a
      deferred release, peer lost, threads waiting for the gate).
    - Shutdown from anywhere: close()/abort() from any thread, a signal handler or an
      event-loop callback mark the endpoint closing, wake its waker and `_interrupt()`,
      then take the call gate: every blocked call raises ChannelClosed (within ~100 ms on
      transports of this contract). A producer closed while a send waited: that send raises
      ChannelClosed having sent nothing, and close still ends the stream (end marker, ack).
      Resources are freed only once no call is inside; a close from a signal handler that
      interrupted a call on the same thread leaves the release (and the end of stream) to
      that call's exit.
    - fork: an endpoint inherited by a child raises ChannelClosed ("opened in process N
      before fork(); open it again in the child"); its close() in the child frees only the
      child's copies.
    """

    options: ClassVar[tuple[Option, ...]] = ()
    waits_forever: ClassVar[bool] = False
    """Whether this transport accepts wait=None (wait for the peer forever)."""
    max_message_size: int
    """Largest message in bytes this channel carries here."""
    max_message_source: str = "max_message_size"
    """Where the limit comes from, e.g. '/proc/sys/fs/mqueue/msgsize_max'."""
    max_message_fix: str = "raise the max_message_size option on both sides"
    """How to lift the limit, said in MessageTooLarge."""
    # Flags of the slow path live on the class until set: an instance with more than 30
    # attributes loses CPython's shared-key layout, and every attribute read on the hot
    # path gets slower (measured: +150 ns per recv on unix://).
    _peer_seen: bool = False
    _closing = False
    _aborting = False
    _forked = False
    _deferred = False
    _peer_lost = False
    _finished = False
    _freed = False
    _close_deadline: float | None = None
    _gate_waiters = 0
    _gate_cond: threading.Condition | None = None
    _async_closing = False
    _waker: Waker | None = None
    _mirror: select.epoll | None = None
    _mirrored: tuple[int, int] | None = None
    _role = "endpoint"

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        wait = float(settings["wait"])
        if wait == math.inf and not self.waits_forever:
            raise AddressError(f"wait=forever is not supported by {address.scheme}:// yet; give a number of seconds")
        self.opened_at = time.monotonic()
        self.wait_deadline: float = self.opened_at + wait
        self._closed = False
        self._state = 0
        """Non-zero when a call must take the slow path; details in the flags below."""
        self._pid = os.getpid()
        self._token: list[None] = [None]
        self._contract = type(self)._has_try_hooks()
        """True when the transport implements the non-blocking hooks (else only the old blocking ones)."""
        _open_endpoints.add(self)

    @property
    def closed(self) -> bool:
        """True once close() or abort() has begun."""
        return self._closed

    @property
    def peer_lost(self) -> bool:
        """True once the peer monitor saw the peer die or leave (transports with presence files; else False)."""
        return self._peer_lost

    # --- state ------------------------------------------------------------

    def _settle(self) -> None:
        """Recompute `_state` after clearing a flag (clear first, then re-check: setters set flag, then state)."""
        self._state = 0
        if self._flags_set():
            self._state = 1

    def _flags_set(self) -> bool:
        return self._closing or self._forked or self._deferred or self._peer_lost or self._gate_waiters > 0

    def _closed_error(self) -> ChannelClosed:
        if self._forked:
            return ChannelClosed(
                f"{type(self).__name__} for {self.address.location} was opened in process {self._pid} "
                f"before fork(); open it again in the child"
            )
        return ChannelClosed(f"{type(self).__name__} for {self.address.location} is closed")

    def _check_usable(self) -> None:
        """The slow path of the state check: raise ChannelClosed when closing or forked."""
        if self._closing or self._forked:
            raise self._closed_error()

    def _check_open(self) -> None:
        """Raise ChannelClosed once closed (for transports that check on their own fast paths)."""
        if self._closed:
            raise self._closed_error()

    def _signal_peer_lost(self) -> None:
        """Called by the presence monitor (any thread): the peer died; wake blocked calls so the transport sees it."""
        self._peer_lost = True
        self._state = 1
        self._wake()

    # --- waking -----------------------------------------------------------

    def _waker_fd(self) -> int:
        """The waker's eventfd, created on first need; callers check the state after this (see _begin_closing)."""
        waker = self._waker
        if waker is None:
            with _WAKER_CREATION:
                waker = self._waker
                if waker is None:
                    waker = self._waker = Waker()
        return waker.fileno()

    def _wake(self) -> None:
        waker = self._waker  # the eventfd lives as long as this object, so a closer never writes to a reused fd
        if waker is not None:
            waker.wake()

    def _interrupt(self) -> None:
        """Wake a call blocked in the kernel (transport hook; default: nothing to do)."""
        return None

    def _drop_inherited(self) -> None:
        """In a forked child: close the child's copies of descriptors (transport hook)."""
        return None

    # --- the non-blocking hooks and the wait ------------------------------

    def _readiness(self) -> tuple[int, int, float | None] | None:
        """(fd, poll events, retry_after) to wait on before the next attempt; None: this transport has none."""
        return None

    def _free(self) -> None:
        """Free everything this side holds (transport hook of the non-blocking contract)."""
        return None

    def _free_once(self) -> None:
        if not self._freed:
            self._freed = True
            self._free()
            if self._mirror is not None:
                self._mirror.close()

    @classmethod
    def _has_try_hooks(cls) -> bool:
        """True when the transport implements the non-blocking contract (not only the old blocking hooks)."""
        return cls._readiness is not _Endpoint._readiness

    def _peer_timeout(self) -> PeerTimeout:
        other = "consumer" if self._role == "producer" else "producer"
        return PeerTimeout(
            f"no {other} appeared at {self.address.location} within the wait timeout "
            f"(wait={self.settings['wait']:g}s); start the {other} or raise wait="
        )

    def _timeout(self, closing: bool = False) -> Timeout:
        where = self.address.location
        if closing:
            return Timeout(f"the consumer at {where} did not take the end of stream within the timeout")
        if self._role == "producer":
            if self._peer_seen:
                return Timeout(f"no room on {where} within the timeout: the consumer is not reading")
            return Timeout(f"no consumer ready at {where} within the timeout")
        if self._peer_seen:
            return Timeout(f"no message on {where} within the timeout")
        return Timeout(f"no producer attached to {where} within the timeout")

    def _seconds_to_wait(self, deadline: float | None, closing: bool = False) -> float | None:
        """Seconds the next wait may last (None: no limit); raise PeerTimeout or Timeout when a deadline passed.

        The first deadline reached decides (see the class docstring).
        """
        now = time.monotonic()
        limit = deadline
        if not self._peer_seen:
            if now >= self.wait_deadline:
                raise self._peer_timeout()
            limit = self.wait_deadline if limit is None else min(limit, self.wait_deadline)
        if deadline is not None and now >= deadline:
            raise self._timeout(closing)
        if limit is None or limit == math.inf:
            return None
        return limit - now

    def _await_readiness(self, deadline: float | None, closing: bool = False) -> None:
        """Wait until the next attempt may succeed, a deadline passes (raises) or a close wakes us (raises)."""
        seconds = self._seconds_to_wait(deadline, closing)
        readiness = self._readiness()
        fd, events, retry_after = readiness if readiness is not None else (-1, 0, NO_READINESS_POLL_SECONDS)
        if retry_after is not None:
            seconds = retry_after if seconds is None else min(seconds, retry_after)
        if closing:
            # the waker stays readable once closing began (never drained: a waiter on another thread or
            # loop must not miss it), so the close's own waits leave it out and look for an abort this often
            seconds = ABORT_CHECK_SECONDS if seconds is None else min(seconds, ABORT_CHECK_SECONDS)
            waker_fd = -1
        else:
            waker_fd = self._waker_fd()
        if self._state:  # after the waker exists: a closer that set the state before it existed is seen here
            self._check_waiting(closing)
        wait_for(fd, events, waker_fd, seconds)
        if self._state:
            self._check_waiting(closing)

    def _check_waiting(self, closing: bool) -> None:
        if closing:
            if self._aborting or self._forked:
                raise ChannelClosed(f"{type(self).__name__} for {self.address.location} was aborted while closing")
        else:
            self._check_usable()

    # --- readiness API ----------------------------------------------------

    def fileno(self) -> int:
        """A descriptor that becomes readable when the next send/receive may succeed (for selectors, add_reader).

        Stable for the endpoint's life: an epoll descriptor that follows the transport's
        readiness (sockets come and go underneath), created on the first call. Readiness
        is a hint, like zmq's FD: after it fires, call try_recv()/try_send() until they
        return None/False (a consumer may hold several messages already read). A stream
        producer has something to watch only once it began connecting: call poll() or
        try_send() once first. Raises ChannelUnavailable on channels that have no
        descriptor (podipc.wait() and podipc.aio still handle them).
        """
        if self._state:
            self._check_usable()
        if not self._contract:
            raise ChannelUnavailable(
                f"{self.address.scheme}:// has no readiness descriptor yet; use podipc.wait() or podipc.aio"
            )
        mirror = self._mirror
        if mirror is None:
            with _WAKER_CREATION:
                mirror = self._mirror
                if mirror is None:
                    mirror = self._mirror = select.epoll()
                    self._sync_mirror()
        return mirror.fileno()

    def _readiness_changed(self) -> None:
        """Transport hook to call when `_readiness()` now names another fd or other events (cheap without fileno())."""
        if self._mirror is not None:
            self._sync_mirror()

    def _sync_mirror(self) -> None:
        mirror = self._mirror
        assert mirror is not None
        readiness = None if self._freed else self._readiness()  # a freed endpoint's descriptors are closed
        fd, events = (readiness[0], readiness[1]) if readiness is not None else (-1, 0)
        wanted = (fd, (select.EPOLLOUT if events & POLLOUT else 0) | (select.EPOLLIN if events & POLLIN else 0))
        if wanted == self._mirrored:
            return
        if self._mirrored is not None:
            with contextlib.suppress(OSError):  # already gone when its fd was closed
                mirror.unregister(self._mirrored[0])
        self._mirrored = None
        if wanted[0] >= 0:
            mirror.register(wanted[0], wanted[1])
            self._mirrored = wanted

    # --- closing ----------------------------------------------------------

    def _begin_closing(self, abort: bool) -> bool:
        """Mark closing (or aborting) and wake every blocked call; False when that was done already."""
        if abort:
            if self._aborting:
                return False
            self._aborting = True
        elif self._closing:
            return False
        first = not self._closing
        self._closing = True
        self._closed = True
        self._state = 1
        self._wake()
        if first:
            self._interrupt()
        return True

    def _finish_closing(self) -> None:
        """End (producer, unless aborting) and free; run by whoever holds the call lock with no call inside."""
        if self._finished:
            return
        self._finished = True
        self._complete_closing()

    @abstractmethod
    def _complete_closing(self) -> None: ...

    # --- the call gate ----------------------------------------------------
    # One call at a time per side. The token is a one-element list: pop() takes it,
    # append() gives it back; each is one C call, atomic under the GIL, together ~25 ns
    # where threading.Lock's acquire+release costs ~70 ns (x2 in the hot path's real
    # context), which alone would exceed the 5 % budget on a 64-byte stream recv.
    # A thread that finds the token taken waits on a Condition and says so in
    # `_gate_waiters` (which sets `_state`, so the leaving call's exit check notifies it).

    def _enter(self, timeout: float | None, closer: bool = False) -> None:
        """Take the token, waiting at most `timeout` seconds (None: no limit) for another thread's call to leave.

        A call (not the closer) that waits for the token raises ChannelClosed once closing began:
        the closer may hold the token for long (a producer's close waits for the consumer's ack).
        """
        token = self._token
        try:
            token.pop()
            return
        except IndexError:
            pass
        if self._inside_call_here(3):  # above _inside_call_here, _enter and the call that wants the token
            raise RuntimeError(
                f"{type(self).__name__} for {self.address.location}: a call began while another one runs on this "
                "thread (from a signal handler?); only close() and abort() may be called there"
            )
        deadline = deadline_after(timeout)
        condition = self._gate_condition()
        with condition:
            self._gate_waiters += 1
            self._state = 1
            try:
                while True:
                    try:
                        token.pop()
                        return
                    except IndexError:
                        pass
                    if not closer and (self._closing or self._forked):
                        raise self._closed_error()
                    left = remaining(deadline)
                    if left is not None and left <= 0:
                        raise Timeout(
                            f"another thread kept using {type(self).__name__} for {self.address.location} "
                            "for the whole timeout"
                        )
                    # a close elsewhere does not notify: look again at this period
                    condition.wait(ABORT_CHECK_SECONDS if left is None else min(left, ABORT_CHECK_SECONDS))
            finally:
                self._gate_waiters -= 1
                self._settle()

    def _gate_condition(self) -> threading.Condition:
        condition = self._gate_cond
        if condition is None:
            with _WAKER_CREATION:
                condition = self._gate_cond
                if condition is None:
                    condition = self._gate_cond = threading.Condition()
        return condition

    def _inside_call_here(self, depth: int) -> bool:
        """True when this thread is inside a call on this endpoint further up its stack (a signal handler interrupted it)."""
        if threading.current_thread() is not threading.main_thread():
            return False  # Python runs signal handlers in the main thread only
        frame: FrameType | None = sys._getframe(depth)
        while frame is not None:
            if frame.f_code in _CALL_CODES and frame.f_locals.get("self") is self and "delegated" not in frame.f_locals:
                return True
            frame = frame.f_back
        return False

    def _close_holding_gate(self) -> None:
        """Take the token (blocked calls leave, woken) and finish; else leave the finish to the last call out."""
        if self._async_closing or self._inside_call_here(2):
            # a signal handler (or loop callback) interrupted a call on this very thread: it finishes on its exit
            self._defer()
            return
        try:
            self._enter(CALLS_LEAVE_SECONDS, closer=True)
        except Timeout:
            self._defer()
            self._after_call()
            return
        try:
            self._finish_closing()
        finally:
            self._token.append(None)
            if self._state:
                self._after_call()

    def _defer(self) -> None:
        self._deferred = True
        self._state = 1

    def _after_call(self) -> None:
        """At a call's exit with the state set: wake a thread waiting for the token; run a deferred finish."""
        if self._gate_waiters:
            self._notify_waiter()
        if not self._deferred:
            return
        token = self._token
        try:
            token.pop()
        except IndexError:
            return  # another call is inside: it finishes on its exit
        try:
            if self._deferred:
                self._deferred = False
                self._settle()
                self._finish_closing()
        finally:
            token.append(None)
            if self._gate_waiters:
                self._notify_waiter()

    def _notify_waiter(self) -> None:
        condition = self._gate_condition()
        with condition:
            condition.notify()

    def abort(self) -> None:
        """Free what this side holds without ending the stream (the peer sees PeerGone). Idempotent.

        Safe from any thread, a signal handler or an event-loop callback: blocked calls
        raise ChannelClosed, a close() in progress stops.
        """
        if self._forked:
            self._closed = True
            return
        if self._begin_closing(abort=True):
            self._close_holding_gate()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"unclosed {type(self).__name__} for {self.address.location}", ResourceWarning, stacklevel=2)
        with contextlib.suppress(Exception):
            self.abort()

    def summary_fields(self) -> dict[str, object]:
        """Fields this transport adds to the CLI's summary line (e.g. a broadcast's per-subscriber counts); none here."""
        return {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.address.location} {state}>"


ABORT_CHECK_SECONDS = 0.05
"""How often a graceful close() that waits for the consumer looks whether abort() was called meanwhile."""
NO_READINESS_POLL_SECONDS = 0.01
"""How often a wait re-tries a transport that gives no readiness descriptor."""
_WAKER_CREATION = threading.Lock()
_open_endpoints: weakref.WeakSet[_Endpoint] = weakref.WeakSet()


def _forget_after_fork() -> None:
    """In a forked child: every inherited endpoint refuses use and drops its copies, touching nothing shared."""
    for endpoint in list(_open_endpoints):
        endpoint._forked = True
        endpoint._closed = True
        endpoint._state = 1
        endpoint._token = [None]  # a token held by a parent thread would never come back here
        endpoint._gate_waiters = 0
        endpoint._gate_cond = None
        with contextlib.suppress(Exception):
            endpoint._drop_inherited()
        if endpoint._waker is not None:
            endpoint._waker.close()
        if endpoint._mirror is not None:
            endpoint._mirror.close()
    _open_endpoints.clear()


os.register_at_fork(after_in_child=_forget_after_fork)

_CALL_CODES = {_Endpoint._close_holding_gate.__code__, _Endpoint._after_call.__code__}
"""The frames of calls that hold (or wait for) an endpoint's token; see _Endpoint._inside_call_here."""

_Call = TypeVar("_Call", bound=Callable[..., Any])


def holds_call_gate(function: _Call) -> _Call:
    """Mark a call that takes the call gate: the base's public calls and a transport's own fast versions of them.

    close() from a signal handler then sees such a call interrupted on its thread (see
    `_Endpoint._inside_call_here`) and leaves the release to it instead of waiting for it.
    Where the fast version hands over to the base's call without holding the gate, it sets
    a local `delegated` first, so that frame no longer counts as holding it.
    """
    _CALL_CODES.add(function.__code__)
    return function
