"""close_on_signals(): turn SIGTERM (the kubelet's stop) and SIGINT into a graceful close of named endpoints.

    with podipc.producer(url) as out, podipc.close_on_signals(out):
        for line in source:
            out.send(line)          # after SIGTERM: the stream is ended, the loop leaves quietly

On the first signal the handler closes every endpoint named: a producer ends its stream
(the consumer sees the end of stream after every message sent; a send blocked at that
moment sends nothing and the end of stream goes out as it leaves), a consumer stops.
Calls blocked on those endpoints, in any thread, raise ChannelClosed; leaving the
`with` block by that ChannelClosed is quiet (the exception is swallowed). A second
signal aborts instead of waiting for the consumer's ack. The previous handlers are
restored when the block exits. Only the main thread can install signal handlers
(a Python rule), so enter the block there.

For a pod, where every container gets SIGTERM at once:

- `drain=SECONDS`: a consumer whose producer is attached keeps receiving for up to that
  long after the signal, so the end of stream of a producer stopped at the same moment
  still arrives (both sides then agree on what was delivered); it is closed when the
  time is up. A consumer with no producer attached (or a podipc.serving.Sessions between
  two producers) is closed at once.
- `close_timeout=SECONDS`: how long a producer's close may wait for the consumer to take
  the end of stream (default: the channel's `wait` option), so a stop stays within the
  pod's grace period even when the consumer has stopped reading.
- `add(endpoint)` names an endpoint opened after the block began (install the handlers
  first, then open: a signal that comes meanwhile is not lost; the endpoint is closed
  as it is added).
- `fileno()` / `sleep(seconds)`: an eventfd readable from the first signal on, for code
  that waits on something else than an endpoint (standard input, a pause between sends).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Protocol, Self, TypeVar

from podipc.consuming import Consumer
from podipc.errors import ChannelClosed, PodIPCError
from podipc.producing import Producer
from podipc.waking import POLLIN, Waker, is_ready, wait_for

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_exit_code(number: int) -> int:
    """The exit code of a command stopped by signal `number`: 128 + number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + number


def signal_name(number: int) -> str:
    """'SIGTERM' for 15, and so on."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Closable(Protocol):
    """What close_on_signals can stop: an endpoint, or anything with close() and abort() (podipc.serving.Sessions)."""

    def close(self) -> None:
        """Stop gracefully."""

    def abort(self) -> None:
        """Stop at once."""


class Drainable(Closable, Protocol):
    """A Closable that can finish what is under way before it closes (podipc.serving.Sessions)."""

    def drain(self) -> bool:
        """Take nothing new after what is under way; True when something is under way (worth waiting for)."""


ClosableT = TypeVar("ClosableT", bound=Closable)


class close_on_signals:
    """Context manager: on SIGTERM/SIGINT (or `signals`), close the endpoints named; restore handlers on exit.

    Attributes after a signal: `received` (the first signal's number, else None) and
    `errors` (what closing raised, e.g. PeerGone when the consumer was gone; the
    endpoint is then aborted).
    """

    def __init__(
        self,
        *endpoints: Closable,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        drain: float = 0.0,
        close_timeout: float | None = None,
    ) -> None:
        if drain < 0 or (close_timeout is not None and close_timeout < 0):
            raise ValueError("drain and close_timeout are seconds >= 0")
        self.endpoints: list[Closable] = list(endpoints)
        self.signals = tuple(signals)
        self.drain = drain
        """Seconds a consumer with an attached producer keeps receiving after the signal (0: close at once)."""
        self.close_timeout = close_timeout
        """Seconds a producer's close may wait for the consumer's ack (None: the channel's wait option)."""
        self.received: int | None = None
        self.errors: list[PodIPCError] = []
        self._previous: dict[int, object] = {}
        self._signalled = Waker()
        self._exited = Waker()
        self._draining: list[Closable] = []
        self._drainer: threading.Thread | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("close_on_signals() must be entered in the main thread (Python runs handlers there)")
        if self.drain > 0:
            # started here, not in the handler: a handler may interrupt the main thread inside threading's locks
            self._drainer = threading.Thread(target=self._close_drained, name="podipc-drain", daemon=True)
            self._drainer.start()
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    @property
    def stopping(self) -> bool:
        """True once a signal was received."""
        return self.received is not None

    def add(self, endpoint: ClosableT) -> ClosableT:
        """Name one more endpoint (returned); closed at once when a signal came already."""
        self.endpoints.append(endpoint)
        if self.received is not None:
            self._close_quietly(endpoint)
        return endpoint

    def fileno(self) -> int:
        """An eventfd that becomes readable at the first signal and stays so (poll it beside your own input)."""
        return self._signalled.fileno()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, or less when a signal comes; True when stopping."""
        deadline = time.monotonic() + seconds
        while self.received is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait_for(self._signalled.fileno(), POLLIN, -1, left)
        return self.received is not None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            for endpoint in self.endpoints:
                endpoint.abort()
            return
        self.received = number
        for endpoint in list(self.endpoints):
            if self._drainer is not None and _begin_draining(endpoint):
                self._draining.append(endpoint)
            else:
                self._close_quietly(endpoint)
        self._signalled.wake()

    def _close_drained(self) -> None:
        """The drain thread: after the signal, give draining consumers `drain` seconds, then close them."""
        signalled, exited = self._signalled.fileno(), self._exited.fileno()
        while self.received is None:
            if wait_for(signalled, POLLIN, exited, None) and is_ready(exited, POLLIN):
                return
        if wait_for(exited, POLLIN, -1, self.drain):
            return
        for endpoint in self._draining:
            self._close_quietly(endpoint)

    def _close_quietly(self, endpoint: Closable) -> None:
        try:
            if isinstance(endpoint, Producer):
                endpoint.close(self.close_timeout)
            else:
                endpoint.close()
        except PodIPCError as error:  # raised inside a handler it would surface anywhere: keep it
            self.errors.append(error)
            endpoint.abort()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        for number, previous in self._previous.items():
            signal.signal(number, previous)  # type: ignore[arg-type]
        self._previous.clear()
        self._exited.wake()
        if self._drainer is not None:
            self._drainer.join()
        self._signalled.close()
        self._exited.close()
        return self.received is not None and isinstance(exc, ChannelClosed)


def _begin_draining(endpoint: Closable) -> bool:
    """True for a consumer whose producer is attached and whose stream has not ended (worth draining).

    A transport not yet on the endpoint contract does not say whether its producer is
    attached (`_peer_seen`): its consumers are drained unless their stream ended.
    """
    if isinstance(endpoint, Consumer):
        attached = endpoint._peer_seen or not endpoint._contract
        return attached and not endpoint.ended and not endpoint.closed
    drain = getattr(endpoint, "drain", None)
    return bool(drain()) if callable(drain) else False
