"""Producer and Consumer base classes, channel options, deadlines, and opening a channel by URL.

A channel module (podipc/transports/*.py) subclasses Producer and Consumer and
implements the endpoint contract's private hooks (`_try_send`, `_try_recv`,
`_try_close`, `_readiness`, `_free`, ...; the full list, what each must
guarantee and what the base does with it: the docstring of `_Endpoint` below).
The public methods here check once, turn a per-call timeout into a
`time.monotonic()` deadline, then delegate.

Rendezvous rule, the same on every channel: opening never blocks on the peer.
A side creates what is its own and returns; the first send or receive waits for
the peer, at most until `wait` seconds after opening (PeerTimeout; wait=None:
forever), or until the call's own timeout (Timeout), whichever comes first.

Which classes serve a URL scheme, and what `channels()` says about each, comes from the
transports' descriptors (podipc.transport), never from a list here.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, ClassVar, TypeVar

from podipc.address import Address, parse_address, suggest
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerTimeout,
    PodIPCError,
    Timeout,
)
from podipc.ownership import check_mode_option
from podipc.transport import transport_for, transports
from podipc.waking import POLLIN, POLLOUT, Waker, is_ready, wait_for

DEFAULT_WAIT_SECONDS = 30.0
DEFAULT_MODE = 0o600


# --- deadlines -------------------------------------------------------------


def deadline_after(timeout: float | None) -> float | None:
    """Turn a timeout in seconds (None: no limit) into a monotonic deadline."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout}")
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a deadline (never negative), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two deadlines, where None means never."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


# --- options ---------------------------------------------------------------

SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def parse_size(value: object) -> int:
    """A size in bytes: an int, or text like '4096', '64KiB', '1MiB', '8M'."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().lower()
        number = text.rstrip("kmgib")
        suffix = text[len(number) :]
        if not number.isdigit() or suffix not in SIZE_SUFFIXES:
            raise ValueError("expected a size in bytes such as 4096, 64KiB or 1MiB")
        size = int(number) * SIZE_SUFFIXES[suffix]
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_seconds(value: object) -> float:
    """A duration in seconds, >= 0."""
    if isinstance(value, bool):
        raise ValueError("expected seconds")
    seconds = float(value)  # type: ignore[arg-type]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError("expected a finite number of seconds >= 0")
    return seconds


FOREVER_WORDS = frozenset({"none", "inf", "infinity", "forever"})


def parse_wait(value: object) -> float:
    """The `wait` option: seconds >= 0, or None / 'inf' / 'forever' to wait for the peer forever (math.inf)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in FOREVER_WORDS):
        return math.inf
    if isinstance(value, float) and value == math.inf:
        return math.inf
    return parse_seconds(value)


def parse_count(value: object) -> int:
    """A whole number >= 1."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = value if isinstance(value, int) else int(str(value), 10)
    if number < 1:
        raise ValueError("expected a whole number >= 1")
    return number


def parse_mode(value: object) -> int:
    """A file mode: octal text ('0660', '660') or an int; owner rw, never anything for "other" users."""
    if isinstance(value, bool):
        raise ValueError("expected an octal mode like 0600")
    mode = value if isinstance(value, int) else int(str(value), 8)
    check_mode_option(mode)
    return mode


def parse_bool(value: object) -> bool:
    """A boolean: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Option:
    """One tuning option a channel accepts, in its URL query or as a keyword argument."""

    name: str
    convert: Callable[[object], Any]
    default: Any
    help: str


COMMON_OPTIONS = (
    Option("wait", parse_wait, DEFAULT_WAIT_SECONDS, "seconds a side waits for its peer to appear (none/inf: forever)"),
    Option("mode", parse_mode, DEFAULT_MODE, "octal permissions of created IPC objects (0660 to share a group)"),
)


def resolve_options(address: Address, accepted: tuple[Option, ...], overrides: Mapping[str, object]) -> dict[str, Any]:
    """Merge defaults, URL query options and keyword overrides, converting and checking each."""
    specs = {option.name: option for option in (*COMMON_OPTIONS, *accepted)}
    given: dict[str, object] = {**address.options, **overrides}
    settings: dict[str, Any] = {name: spec.default for name, spec in specs.items()}
    for name, raw in given.items():
        spec = specs.get(name)
        if spec is None:
            raise AddressError(
                f"unknown option {name!r} for {address.scheme}://{suggest(name, tuple(specs))}; "
                f"known: {', '.join(sorted(specs))}"
            )
        try:
            settings[name] = spec.convert(raw)
        except (TypeError, ValueError) as exc:
            raise AddressError(f"option {name}={raw!r} for {address.scheme}://: {exc}") from exc
    return settings


# --- producer and consumer -------------------------------------------------

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


class Producer(_Endpoint):
    """The sending side of a channel: send() messages, then close() to end the stream.

    Thread-safe on channels of the endpoint contract (see docs: each message whole and
    once, in order per thread). close()/abort() may be called from any thread or a signal
    handler; blocked sends then raise ChannelClosed having sent nothing.
    """

    resumed_at: int = 0
    """How many messages of this stream were sent before this producer opened (file:// resumes)."""
    _role = "producer"

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
            views = [self._checked_view(message) for message in messages]
        except MessageTooLarge as error:
            error.sent = 0
            raise
        token = self._token
        try:
            token.pop()
        except IndexError:
            self._enter(timeout)
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
        except EndOfStream:
            if not messages:
                raise
            self._ended = True
        except PodIPCError as error:
            if not messages:
                raise
            self._keep(error)
        return messages

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


# --- opening by URL ----------------------------------------------------------


def channel_class(scheme: str, role: str) -> type[Producer] | type[Consumer]:
    """The Producer or Consumer class of a scheme's transport; imports only that transport's endpoints.

    Raises AddressError for an unknown scheme, ChannelUnavailable when a package it needs is missing.
    """
    transport = transport_for(scheme)
    return transport.producer_class() if role == "producer" else transport.consumer_class()


def producer(url: str, **options: object) -> Producer:
    """Open the producing side of the channel at `url` (options override the URL's query)."""
    address = parse_address(url)
    cls = channel_class(address.scheme, "producer")
    settings = resolve_options(address, cls.options, options)
    result = cls(address, settings)
    assert isinstance(result, Producer)
    return result


def consumer(url: str, **options: object) -> Consumer:
    """Open the consuming side of the channel at `url` (options override the URL's query)."""
    address = parse_address(url)
    cls = channel_class(address.scheme, "consumer")
    settings = resolve_options(address, cls.options, options)
    result = cls(address, settings)
    assert isinstance(result, Consumer)
    return result


@dataclass(frozen=True)
class ChannelInfo:
    """One row of the channel table: a scheme, whether it works on this host, and why not."""

    scheme: str
    usable: bool
    reason: str
    max_message_size: int | None
    example: str
    transport: str = ""
    """The name of the transport that serves the scheme (podipc.transport.Transport.name)."""
    reliable: bool = True
    capabilities: tuple[str, ...] = ()


def channels() -> list[ChannelInfo]:
    """List every scheme, whether it is usable on this host, and the reason (with the fix) when not."""
    rows = []
    for transport in transports():
        problem = transport.problem()
        limit: int | None = None
        if transport.missing_requirement() is None:
            try:
                limit = int(transport.limit.host_default())
            except ChannelUnavailable as exc:
                problem = problem or str(exc)
        capabilities = tuple(sorted(capability.value for capability in transport.capabilities))
        rows += [
            ChannelInfo(
                scheme,
                problem is None,
                problem or "",
                limit,
                transport.example_for(scheme),
                transport.name,
                transport.reliable,
                capabilities,
            )
            for scheme in transport.schemes
        ]
    return rows


_CALL_CODES = set(
    function.__code__
    for function in (
        Producer.send,
        Producer.try_send,
        Producer.poll,
        Producer.send_many,
        Producer.flush,
        Consumer.recv,
        Consumer.recv_many,
        Consumer.try_recv,
        Consumer.poll,
        _Endpoint._close_holding_gate,
        _Endpoint._after_call,
    )
)
"""The frames of calls that hold (or wait for) an endpoint's token; see _Endpoint._inside_call_here."""

_Call = TypeVar("_Call", bound=Callable[..., Any])


def holds_call_gate(function: _Call) -> _Call:
    """Mark a transport's own fast version of a public call (it takes the call gate, as send and recv do).

    close() from a signal handler then sees such a call interrupted on its thread (see
    `_Endpoint._inside_call_here`) and leaves the release to it instead of waiting for it.
    Where the fast version hands over to the base's call without holding the gate, it sets
    a local `delegated` first, so that frame no longer counts as holding it.
    """
    _CALL_CODES.add(function.__code__)
    return function
