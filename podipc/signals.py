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
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType

from podipc.channel import Consumer, Producer
from podipc.errors import ChannelClosed, PodIPCError

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class close_on_signals:
    """Context manager: on SIGTERM/SIGINT (or `signals`), close the endpoints named; restore handlers on exit.

    Attributes after a signal: `received` (the first signal's number, else None) and
    `errors` (what closing raised, e.g. PeerGone when the consumer was gone; the
    endpoint is then aborted).
    """

    def __init__(self, *endpoints: Producer | Consumer, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.endpoints = endpoints
        self.signals = tuple(signals)
        self.received: int | None = None
        self.errors: list[PodIPCError] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> close_on_signals:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("close_on_signals() must be entered in the main thread (Python runs handlers there)")
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = number
        for endpoint in self.endpoints:
            if not first:
                endpoint.abort()
                continue
            try:
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
        return self.received is not None and isinstance(exc, ChannelClosed)
