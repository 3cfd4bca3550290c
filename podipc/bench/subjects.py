"""What the bench measures: podipc channels and, with --peers, raw primitives and other libraries.

A Subject opens the two ends of a one-way link, a Sender and a Receiver, from
`resources` (URLs, ports, names) that the client chooses for each cell, so that both
sides of a pod agree on them. Latency cells use two links ("a": client to server,
"b": back); throughput cells use "a" only, the server sending.

Every end keeps the same small shape, so one set of loops (podipc.bench.workloads)
drives them all:

    sender.send(buffer); sender.close()  # close ends the stream (end marker)
    receiver.recv() -> buffer            # raises EndOfStream after the end marker;
                                         # lossy links raise TimeoutError after recv_timeout
    receiver.idle(seconds)               # wait for a message that should not come
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import podipc
from podipc.errors import MessageTooLarge, Timeout
from podipc.transport import Capability, transport_for

Buffer = bytes | bytearray | memoryview
LOSSY_RECV_TIMEOUT_SECONDS = 0.5
"""How long a receiver of a lossy link waits for one message before calling it lost."""
PEER_WAIT_SECONDS = 20.0
CLOSE_TIMEOUT_SECONDS = 5.0
"""How long either end of a cell waits for the other to appear."""


class Sender(Protocol):
    """The sending end of a link."""

    def send(self, data: Buffer) -> object:
        """Send one message."""

    def close(self) -> None:
        """End the stream: the receiver gets EndOfStream after the last message."""

    def abort(self) -> None:
        """Free without ending the stream."""


class Receiver(Protocol):
    """The receiving end of a link."""

    def recv(self) -> Buffer:
        """The next message; EndOfStream after the end marker."""

    def idle(self, seconds: float) -> None:
        """Wait up to `seconds` for a message that is not expected (to measure an idle wait)."""

    def close(self) -> None:
        """Free what this end holds."""


@dataclass(frozen=True)
class CellPlace:
    """Where a cell's links live: unique per cell, chosen by the client, shared with the server."""

    run_id: str
    index: int
    directory: str

    def name(self, key: str) -> str:
        """A unique short name for link `key` of this cell."""
        return f"podipc-bench-{self.run_id}-{self.index}{key}"

    def path(self, key: str, suffix: str) -> str:
        """A unique path in the shared directory for link `key`."""
        return os.path.join(self.directory, f"pb-{self.run_id}-{self.index}{key}{suffix}")


class Subject(ABC):
    """One thing to measure: a podipc channel, a raw primitive or a library."""

    name: str
    kind: str  # "channel" (podipc), "raw" (primitive, no podipc) or "library"
    lossy: bool = False
    local_only: bool = False
    """True when both ends must be parent and child processes (multiprocessing objects)."""
    zero_copy_receive: bool = False
    shared_places: frozenset[str] = frozenset()
    """Places (SHARED_PLACES keys) both sides must see alike: in a pod, volumes the containers share."""
    baseline_of: str | None = None
    """For a raw peer: the podipc scheme it does the job of with no podipc layer (its baseline)."""

    @abstractmethod
    def availability(self) -> str | None:
        """None when usable here, else why not (and the fix)."""

    @abstractmethod
    def size_problem(self, size: int) -> str | None:
        """None when a message of `size` bytes fits, else why it cannot be carried here."""

    @abstractmethod
    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """The addresses of links 'a' and 'b' of one cell (JSON-ready strings)."""

    @abstractmethod
    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Open the sending end of link `key`; never blocks on the peer."""

    @abstractmethod
    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Open the receiving end of link `key`; never blocks on the peer."""

    def cleanup(self, resources: Mapping[str, str]) -> None:  # noqa: B027 - optional hook
        """Remove anything a failed cell may have left behind (best effort)."""


# --- podipc channels -----------------------------------------------------------

SHARED_PLACES = {
    "directory": "the bench directory (--dir) for socket and spool paths",
    "dev_shm": "/dev/shm (presence files, shared memory)",
    "iceoryx2": "/tmp/iceoryx2 (iceoryx2's service registry)",
}
"""Places a subject may need both sides to share; the client probes each one at the handshake."""


class ChannelSender:
    """A podipc Producer in the Sender shape; `send` is the producer's own bound method."""

    def __init__(self, channel: podipc.Producer) -> None:
        self.channel = channel
        self.send = channel.send

    def close(self) -> None:
        """End the stream, waiting at most CLOSE_TIMEOUT_SECONDS for the consumer to take it."""
        self.channel.close(CLOSE_TIMEOUT_SECONDS)

    def abort(self) -> None:
        """Abort the producer."""
        self.channel.abort()


class ChannelReceiver:
    """A podipc Consumer in the Receiver shape; `recv` is the consumer's own bound method."""

    def __init__(self, channel: podipc.Consumer, lossy: bool, zero_copy: bool) -> None:
        self.channel = channel
        receive = channel.recv_view if zero_copy else channel.recv
        self.recv: Callable[[], Buffer] = partial(receive, LOSSY_RECV_TIMEOUT_SECONDS) if lossy else receive

    def idle(self, seconds: float) -> None:
        """Wait for a message that should not come; a Timeout is the expected outcome."""
        try:
            self.channel.recv(seconds)
        except Timeout:
            return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close the consumer."""
        self.channel.close()


class ChannelSubject(Subject):
    """A podipc channel, opened through the public API only; what it is comes from its transport's descriptor."""

    kind = "channel"

    def __init__(self, scheme: str) -> None:
        self.name = scheme
        self.scheme = scheme
        self.transport = transport_for(scheme)
        self.lossy = not self.transport.reliable
        self.zero_copy_receive = self.transport.has(Capability.ZERO_COPY_RECEIVE)
        places = set()
        if self.transport.schemes[scheme].names_path:
            places.add("directory")
        if self.transport.needs_dev_shm:
            places.add("dev_shm")
        self.shared_places = frozenset(places)

    def availability(self) -> str | None:
        """Why this channel cannot be used here, from its module's availability()."""
        problem, _ = _channel_rows()[self.scheme]
        return problem

    def size_problem(self, size: int) -> str | None:
        """Why `size` bytes exceed this channel's default limit here (None when they fit)."""
        _, limit = _channel_rows()[self.scheme]
        if limit is None or size <= limit:
            return None
        return f"{self.scheme}:// carries at most {limit} bytes here ({self.transport.limit.source})"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """Fresh URLs for links a and b."""
        return {key: self._url(place, key, free_port) for key in ("a", "b")}

    def _url(self, place: CellPlace, key: str, free_port: Callable[[str], int]) -> str:
        return self.transport.fresh_url(self.scheme, place.name(key), lambda: place.path(key, ".ch"), free_port)

    def _options(self, size: int) -> dict[str, object]:
        """Each channel runs with its defaults, as a user would get it; only the rendezvous wait is set."""
        return {"wait": PEER_WAIT_SECONDS}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """A podipc producer; a size above its max_message_size raises MessageTooLarge here."""
        channel = podipc.producer(resources[key], **self._options(size))
        _check_limit(channel, size)
        return ChannelSender(channel)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """A podipc consumer (recv_view on zero-copy channels, a per-message timeout on lossy ones)."""
        channel = podipc.consumer(resources[key], **self._options(size))
        _check_limit(channel, size)
        return ChannelReceiver(channel, self.lossy, self.zero_copy_receive)


def _check_limit(channel: podipc.Producer | podipc.Consumer, size: int) -> None:
    if size > channel.max_message_size:
        limit, source, fix = channel.max_message_size, channel.max_message_source, channel.max_message_fix
        channel.abort()
        raise MessageTooLarge(size, limit, source, fix)


_ROWS: dict[str, tuple[str | None, int | None]] = {}


def _channel_rows() -> dict[str, tuple[str | None, int | None]]:
    """(why not usable or None, host max message size) by scheme, computed once per process (podipc.channels())."""
    if not _ROWS:
        _ROWS.update({row.scheme: (row.reason or None, row.max_message_size) for row in podipc.channels()})
    return _ROWS
