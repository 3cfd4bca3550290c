"""Long-lived consumers: one consumer per producer session, across producer restarts, until closed.

A sidecar outlives the app it serves: the app container restarts, is redeployed, or runs
one job after another, and each run is a new producer with a new stream. `serve(url)`
gives the sidecar those streams one after another without restarting it:

    with podipc.serve("unix:///shared/logs.sock") as sessions, podipc.close_on_signals(sessions, drain=1.0):
        for inbox in sessions:                 # a consumer per producer session
            try:
                for line in inbox:             # ends at that producer's end of stream
                    ship(line)
            except podipc.PeerGone:            # that producer died mid-stream; the next is picked up
                pass

Semantics:

- Each session is a fresh `podipc.consumer(url)`, opened when the previous one ended, so
  every producer starts a new stream (as after a restart, docs/restart.md); the previous
  session's objects are freed first. A producer that starts between two sessions waits
  for the next one (the rendezvous rule: either side may start first). Sessions take one
  producer at a time: a second producer that starts while a session streams is refused at
  once, as on any channel (ChannelUnavailable "another producer is attached", exit 3 from
  `podipc produce`); many producers feeding one consumer at once are not a pair channel.
- A session waits for its producer forever (`wait=None`), unless the URL or the options
  give `wait`.
- `close()` (from any thread or a signal handler; `close_on_signals` does it) ends the
  iteration: a session waiting for its producer, or receiving, raises ChannelClosed in the
  loop, and no further session is opened. `drain()` (what `close_on_signals(drain=...)`
  calls) lets the session under way finish first and opens no further one.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

from podipc.address import parse_address
from podipc.channel import consumer
from podipc.consuming import Consumer


class Sessions:
    """The consumers of one channel URL, one per producer session, until closed. Iterate it; close() ends it."""

    def __init__(self, url: str, **options: object) -> None:
        self.url = url
        self.options = dict(options)
        if "wait" not in self.options and "wait" not in parse_address(url).options:
            self.options["wait"] = None
        self.opened = 0
        """Sessions opened so far (the one under way included)."""
        self.current: Consumer | None = None
        """The consumer of the session under way, if any."""
        self._closed = False
        self._last = False

    @property
    def closed(self) -> bool:
        """True once close() or abort() was called."""
        return self._closed

    @property
    def attached(self) -> bool:
        """True while a producer's stream is under way (its consumer saw the producer and no end of stream yet)."""
        current = self.current
        return current is not None and current._peer_seen and not current.ended and not current.closed

    def __iter__(self) -> Iterator[Consumer]:
        """Yield a consumer per producer session; the previous one is closed when the next is asked for.

        Raises what podipc.consumer() raises when a session cannot be opened
        (ChannelUnavailable, AddressError); ChannelClosed never escapes the iteration itself.
        """
        while not self._last:
            session = consumer(self.url, **self.options)
            # no lock: close() may run in a signal handler on this thread. It sets _closed, then reads
            # current; this sets current, then reads _closed: one of the two closes the session.
            self.current = session
            if self._closed:
                session.close()
                return
            self.opened += 1
            try:
                yield session
            finally:
                self.current = None
                session.close()

    def drain(self) -> bool:
        """Open no further session; True when the session under way has a producer attached (worth finishing).

        Without a producer attached the session under way is closed at once.
        """
        self._last = True
        if self.attached:
            return True
        self.close()
        return False

    def close(self) -> None:
        """End the iteration: the session under way stops (its blocked calls raise ChannelClosed). Idempotent."""
        self._closed = self._last = True
        current = self.current
        if current is not None:
            current.close()

    def abort(self) -> None:
        """Like close(), for close_on_signals' second signal."""
        self.close()

    def __enter__(self) -> Sessions:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def serve(url: str, **options: object) -> Sessions:
    """The consumers of `url`, one per producer session, until closed (see podipc.serving)."""
    return Sessions(url, **options)
