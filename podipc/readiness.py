"""podipc.wait(): wait on many endpoints at once, like multiprocessing.connection.wait.

An endpoint is ready when its next call would not wait: a consumer has a message (or
the end of stream, or an error) to hand out, a producer has room. Endpoints with a
readiness descriptor (fileno()) are polled together in one select.poll; endpoints of
channels without one yet are checked with a non-blocking poll() every
NO_DESCRIPTOR_POLL_SECONDS, so mixing both kinds works, at that latency for the latter.
"""

from __future__ import annotations

import select
from collections.abc import Iterable
from typing import TypeVar

from podipc.consuming import Consumer
from podipc.options import deadline_after, remaining
from podipc.producing import Producer

NO_DESCRIPTOR_POLL_SECONDS = 0.01
"""How often wait() re-checks endpoints that have no readiness descriptor."""

EndpointT = TypeVar("EndpointT", Producer, Consumer)


def wait(endpoints: Iterable[EndpointT], timeout: float | None = None) -> list[EndpointT]:
    """The endpoints of `endpoints` that are ready, waiting at most `timeout` seconds (None: no limit).

    Returns as soon as at least one is ready (an empty list when the timeout passed).
    A consumer is ready when recv() would not wait (a message, the end of stream or an
    error is there; poll() keeps the message for the next recv), a producer when send()
    would not wait. Closed endpoints count as ready (their next call raises ChannelClosed).
    """
    candidates = list(endpoints)
    deadline = deadline_after(timeout)
    while True:
        ready = [endpoint for endpoint in candidates if endpoint.closed or endpoint.poll(0)]
        if ready:
            return ready
        left = remaining(deadline)
        if left is not None and left <= 0:
            return []
        _sleep_until_something_may_be_ready(candidates, left)


def _sleep_until_something_may_be_ready(candidates: list[EndpointT], left: float | None) -> None:
    """One poll over every descriptor, bounded by `left`, retry hints and the re-check period of those without one."""
    poller = select.poll()
    for endpoint in candidates:
        readiness = endpoint._readiness()
        fd, events, retry_after = readiness if readiness is not None else (-1, 0, NO_DESCRIPTOR_POLL_SECONDS)
        if fd >= 0:
            poller.register(fd, events)
        if retry_after is not None:
            left = retry_after if left is None else min(left, retry_after)
    poller.poll(None if left is None else max(0, int(left * 1000 + 0.999)))
