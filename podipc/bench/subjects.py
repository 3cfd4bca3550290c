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

Subjects with `api == "async"` (podipc.aio endpoints, zmq.asyncio) open the client's ends
as coroutines instead (AsyncSender, AsyncReceiver: the same calls, awaited; the loops are
podipc.bench.aio's); the server's side of their cells stays sync, so a figure shows what
asyncio costs on one side. Subjects with `batch` move lists of messages per call
(send_many / recv_many) and are measured one way only.

A podipc channel is named by its scheme, optionally with URL options and prefixes:
`file?sync=batch` (the channel with those options), `aio-unix` (its asyncio endpoints),
`batch-shm` (its send_many / recv_many). parse_channel_name() reads such a name.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from urllib.parse import parse_qsl

import podipc
import podipc.aio
from podipc.errors import ChannelUnavailable, MessageTooLarge, Timeout
from podipc.options import COMMON_OPTIONS
from podipc.transport import Capability, schemes, transport_for

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


class AsyncSender(Protocol):
    """The sending end of a link, for asyncio."""

    async def send(self, data: Buffer) -> object:
        """Send one message."""

    async def close(self) -> None:
        """End the stream: the receiver gets EndOfStream after the last message."""

    def abort(self) -> None:
        """Free without ending the stream."""


class AsyncReceiver(Protocol):
    """The receiving end of a link, for asyncio."""

    async def recv(self) -> Buffer:
        """The next message; EndOfStream after the end marker."""

    async def idle(self, seconds: float) -> None:
        """Wait up to `seconds` for a message that is not expected (to measure an idle wait)."""

    async def close(self) -> None:
        """Free what this end holds."""

    def abort(self) -> None:
        """Free what this end holds at once, without a loop (after a failure)."""

    def wakeup(self) -> str:
        """How a waiting receive is woken: READINESS (a descriptor the loop watches) or HELPER_THREAD."""


READINESS = "readiness"
"""An asyncio end that waits on a descriptor the event loop watches (no thread hop per message)."""
HELPER_THREAD = "helper thread"
"""An asyncio end whose blocking calls run on one helper thread (channels without a readiness descriptor)."""


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
    baseline: str | None = None
    """The subject this one's ratios are taken against: a channel's raw peer, an asyncio end's sync twin."""
    api: str = "sync"
    """'async' when the client's ends are coroutines (open_async_sender / open_async_receiver)."""
    modes: tuple[str, ...] = ("latency", "throughput")
    """The modes this subject is measured in."""

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

    def open_async_sender(self, resources: Mapping[str, str], key: str, size: int) -> AsyncSender:
        """Open the asyncio sending end of link `key` (subjects with api 'async')."""
        raise TypeError(f"{self.name} has no asyncio ends")

    def open_async_receiver(self, resources: Mapping[str, str], key: str, size: int) -> AsyncReceiver:
        """Open the asyncio receiving end of link `key` (subjects with api 'async')."""
        raise TypeError(f"{self.name} has no asyncio ends")


# --- podipc channels -----------------------------------------------------------

SHARED_PLACES = {
    "directory": "the bench directory (--dir) for socket and spool paths",
    "dev_shm": "/dev/shm (presence files, shared memory)",
    "iceoryx2": "/tmp/iceoryx2 (iceoryx2's service registry)",
}
"""Places a subject may need both sides to share; the client probes each one at the handshake."""

ASYNC_PREFIX = "aio-"
BATCH_PREFIX = "batch-"


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


class BatchSender(ChannelSender):
    """A producer that also sends lists of messages in one call: `send_many(buffers)`."""

    def __init__(self, channel: podipc.Producer) -> None:
        super().__init__(channel)
        self.send_many: Callable[[Sequence[Buffer]], object] = channel.send_many


class BatchReceiver(ChannelReceiver):
    """A consumer that also receives several messages in one call: `recv_many(most)`."""

    def __init__(self, channel: podipc.Consumer, lossy: bool) -> None:
        super().__init__(channel, lossy, zero_copy=False)
        self._receive_many: Callable[..., Sequence[Buffer]] = channel.recv_many
        self._timeout = LOSSY_RECV_TIMEOUT_SECONDS if lossy else None

    def recv_many(self, most: int) -> Sequence[Buffer]:
        """Up to `most` messages, waiting for the first (EndOfStream after the end marker)."""
        return self._receive_many(most, self._timeout)


class AsyncChannelSender:
    """A podipc.aio producer in the AsyncSender shape."""

    def __init__(self, channel: podipc.aio.AsyncProducer) -> None:
        self.channel = channel
        self.send = channel.send

    async def close(self) -> None:
        """End the stream, waiting at most CLOSE_TIMEOUT_SECONDS for the consumer to take it."""
        await self.channel.aclose(CLOSE_TIMEOUT_SECONDS)

    def abort(self) -> None:
        """Abort the producer."""
        self.channel.abort()


class AsyncChannelReceiver:
    """A podipc.aio consumer in the AsyncReceiver shape."""

    def __init__(self, channel: podipc.aio.AsyncConsumer, lossy: bool) -> None:
        self.channel = channel
        self.recv: Callable[[], Any] = partial(channel.recv, LOSSY_RECV_TIMEOUT_SECONDS) if lossy else channel.recv

    async def idle(self, seconds: float) -> None:
        """Wait for a message that should not come; a Timeout is the expected outcome."""
        try:
            await self.channel.recv(seconds)
        except Timeout:
            return
        raise RuntimeError("a message arrived during the idle probe")

    async def close(self) -> None:
        """Close the consumer."""
        await self.channel.aclose()

    def abort(self) -> None:
        """Close the consumer at once."""
        self.channel.abort()

    def wakeup(self) -> str:
        """READINESS when the channel has a readiness descriptor (fileno()), else HELPER_THREAD (podipc.aio's fallback)."""
        try:
            self.channel.endpoint.fileno()
        except ChannelUnavailable:
            return HELPER_THREAD
        return READINESS


def parse_channel_name(name: str) -> tuple[str, str, str, bool] | None:
    """(scheme, URL options, api, batch) of a channel subject's name ('aio-file?sync=batch'), None if it is none."""
    api, batch = "sync", False
    if name.startswith(ASYNC_PREFIX):
        api, name = "async", name[len(ASYNC_PREFIX) :]
    if name.startswith(BATCH_PREFIX):
        batch, name = True, name[len(BATCH_PREFIX) :]
    scheme, _, query = name.partition("?")
    if scheme not in schemes() or (api == "async" and batch):
        return None
    return scheme, query, api, batch


def channel_name(scheme: str, query: str = "", api: str = "sync", batch: bool = False) -> str:
    """The subject name of a channel with URL options, its asyncio ends or its batch calls."""
    prefix = (ASYNC_PREFIX if api == "async" else "") + (BATCH_PREFIX if batch else "")
    return f"{prefix}{scheme}{'?' + query if query else ''}"


class ChannelSubject(Subject):
    """A podipc channel, opened through the public API only; what it is comes from its transport's descriptor.

    `query` adds URL options (`sync=batch`); `api='async'` opens the client's ends with
    podipc.aio; `batch` measures send_many / recv_many (one way only).
    """

    kind = "channel"

    def __init__(
        self, scheme: str, query: str = "", api: str = "sync", batch: bool = False, baseline: str | None = None
    ) -> None:
        self.name = channel_name(scheme, query, api, batch)
        self.scheme = scheme
        self.query = query
        self.api = api
        self.batch = batch
        self.baseline = baseline
        self.transport = transport_for(scheme)
        self.lossy = not self.transport.reliable
        self.zero_copy_receive = self.transport.has(Capability.ZERO_COPY_RECEIVE) and not batch
        if batch:
            self.modes = ("throughput",)
        places = set()
        if self.transport.schemes[scheme].names_path:
            places.add("directory")
        if self.transport.needs_dev_shm:
            places.add("dev_shm")
        self.shared_places = frozenset(places)

    def availability(self) -> str | None:
        """Why this channel cannot be used here, from its module's availability() (and its options, batch calls)."""
        problem, _ = _channel_rows()[self.scheme]
        return problem or self._options_problem() or self._batch_problem()

    def _options_problem(self) -> str | None:
        known = {option.name: option for option in (*COMMON_OPTIONS, *self.transport.options)}
        for name, value in parse_qsl(self.query, keep_blank_values=True):
            option = known.get(name)
            if option is None:
                return f"{self.scheme}:// has no option {name!r} in this podipc {podipc.__version__}"
            try:
                option.convert(value)
            except ValueError as exc:
                return f"{self.scheme}:// option {name}={value!r}: {exc}"
        return None

    def _batch_problem(self) -> str | None:
        if self.batch and not (hasattr(podipc.Producer, "send_many") and hasattr(podipc.Consumer, "recv_many")):
            return f"podipc {podipc.__version__} has no send_many/recv_many (batches, issue 13)"
        return None

    def size_problem(self, size: int) -> str | None:
        """Why `size` bytes exceed this channel's default limit here (None when they fit)."""
        _, limit = _channel_rows()[self.scheme]
        if limit is None or size <= limit:
            return None
        return f"{self.scheme}:// carries at most {limit} bytes here ({self.transport.limit.source})"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """Fresh URLs for links a and b (with this subject's URL options)."""
        return {key: self._url(place, key, free_port) for key in ("a", "b")}

    def _url(self, place: CellPlace, key: str, free_port: Callable[[str], int]) -> str:
        url = self.transport.fresh_url(self.scheme, place.name(key), lambda: place.path(key, ".ch"), free_port)
        if self.query:
            url += ("&" if "?" in url else "?") + self.query
        return url

    def _options(self, size: int) -> dict[str, object]:
        """Each channel runs with its defaults, as a user would get it; only the rendezvous wait is set."""
        return {"wait": PEER_WAIT_SECONDS}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """A podipc producer; a size above its max_message_size raises MessageTooLarge here."""
        channel = podipc.producer(resources[key], **self._options(size))
        _check_limit(channel, size)
        return BatchSender(channel) if self.batch else ChannelSender(channel)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """A podipc consumer (recv_view on zero-copy channels, a per-message timeout on lossy ones)."""
        channel = podipc.consumer(resources[key], **self._options(size))
        _check_limit(channel, size)
        if self.batch:
            return BatchReceiver(channel, self.lossy)
        return ChannelReceiver(channel, self.lossy, self.zero_copy_receive)

    def open_async_sender(self, resources: Mapping[str, str], key: str, size: int) -> AsyncSender:
        """A podipc.aio producer."""
        channel = podipc.aio.producer(resources[key], **self._options(size))
        _check_limit(channel.endpoint, size, channel.abort)
        return AsyncChannelSender(channel)

    def open_async_receiver(self, resources: Mapping[str, str], key: str, size: int) -> AsyncReceiver:
        """A podipc.aio consumer (a per-message timeout on lossy channels)."""
        channel = podipc.aio.consumer(resources[key], **self._options(size))
        _check_limit(channel.endpoint, size, channel.abort)
        return AsyncChannelReceiver(channel, self.lossy)


def _check_limit(channel: podipc.Producer | podipc.Consumer, size: int, free: Callable[[], None] | None = None) -> None:
    """MessageTooLarge (after freeing the end: `free`, else the channel's abort) when `size` is above its limit."""
    if size > channel.max_message_size:
        limit, source, fix = channel.max_message_size, channel.max_message_source, channel.max_message_fix
        (free or channel.abort)()
        raise MessageTooLarge(size, limit, source, fix)


_ROWS: dict[str, tuple[str | None, int | None]] = {}


def _channel_rows() -> dict[str, tuple[str | None, int | None]]:
    """(why not usable or None, host max message size) by scheme, computed once per process (podipc.channels())."""
    if not _ROWS:
        _ROWS.update({row.scheme: (row.reason or None, row.max_message_size) for row in podipc.channels()})
    return _ROWS
