"""Producer and Consumer base classes, channel options, deadlines, and opening a channel by URL.

A channel module (podipc/transports/*.py) subclasses Producer and Consumer and
implements the private hooks `_send`, `_recv`, `_close` and `_abort`. The public
methods here check once (closed, size, end of stream), turn a per-call timeout
into a `time.monotonic()` deadline, then delegate.

Rendezvous rule, the same on every channel: opening never blocks on the peer.
A side creates what is its own and returns; the first send or receive waits for
the peer, at most until `wait` seconds after opening (PeerTimeout), or until the
call's own timeout (Timeout), whichever comes first.

Which classes serve a URL scheme, and what `channels()` says about each, comes from the
transports' descriptors (podipc.transport), never from a list here.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

from podipc.address import Address, parse_address, suggest
from podipc.errors import AddressError, ChannelClosed, ChannelUnavailable, EndOfStream, MessageTooLarge
from podipc.ownership import check_mode_option
from podipc.transport import transport_for, transports

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
    Option("wait", parse_seconds, DEFAULT_WAIT_SECONDS, "seconds a side waits for its peer to appear"),
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


class _Endpoint(ABC):
    """What producers and consumers share: address, settings, closing and the unclosed warning."""

    options: ClassVar[tuple[Option, ...]] = ()
    max_message_size: int
    """Largest message in bytes this channel carries here."""
    max_message_source: str = "max_message_size"
    """Where the limit comes from, e.g. '/proc/sys/fs/mqueue/msgsize_max'."""
    max_message_fix: str = "raise the max_message_size option on both sides"
    """How to lift the limit, said in MessageTooLarge."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        self.address = address
        self.settings = dict(settings)
        self.opened_at = time.monotonic()
        self.wait_deadline: float = self.opened_at + float(settings["wait"])
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once close() or abort() has run."""
        return self._closed

    def abort(self) -> None:
        """Free what this side holds without ending the stream (the peer sees PeerGone). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abort()

    @abstractmethod
    def _abort(self) -> None: ...

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"{type(self).__name__} for {self.address.location} is closed")

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"unclosed {type(self).__name__} for {self.address.location}", ResourceWarning, stacklevel=2)
        with contextlib.suppress(Exception):
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.address.location} {state}>"


class Producer(_Endpoint):
    """The sending side of a channel: send() messages, then close() to end the stream."""

    resumed_at: int = 0
    """How many messages of this stream were sent before this producer opened (file:// resumes)."""

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (bytes); wait at most `timeout` seconds for room (None: no limit)."""
        if self._closed:
            self._check_open()
        view = data if type(data) is memoryview else memoryview(data)
        if view.nbytes > self.max_message_size:
            raise MessageTooLarge(view.nbytes, self.max_message_size, self.max_message_source, self.max_message_fix)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._send(view, None if timeout is None else deadline_after(timeout))

    def close(self, timeout: float | None = None) -> None:
        """End the stream: the consumer's iteration stops after every message sent. Idempotent.

        Waits (at most `timeout`, else the `wait` option) until the consumer has taken the
        end of stream, then frees what this side created.
        """
        if self._closed:
            return
        self._closed = True
        deadline = deadline_after(timeout if timeout is not None else float(self.settings["wait"]))
        try:
            self._close(deadline)
        except BaseException:
            self._abort()
            raise

    @abstractmethod
    def _send(self, view: memoryview, deadline: float | None) -> None: ...

    @abstractmethod
    def _close(self, deadline: float | None) -> None: ...

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
    """The receiving side of a channel: recv() or iterate until the producer ends the stream."""

    resumed_at: int = 0
    """How many messages of this stream were consumed before this consumer opened (file:// resumes)."""
    skipped: int = 0
    """Messages that arrived malformed and were skipped (documented per channel)."""
    lost: int = 0
    """Messages known to be lost in transit (udp:// only)."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._ended = False

    @property
    def ended(self) -> bool:
        """True once the end of stream was received."""
        return self._ended

    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message; raise EndOfStream after the last one, Timeout after `timeout` seconds."""
        if self._closed:
            self._check_open()
        if self._ended:
            raise EndOfStream(f"{self.address.location}: the producer ended the stream")
        try:
            return self._recv(None if timeout is None else deadline_after(timeout))
        except EndOfStream:
            self._ended = True
            raise

    def recv_view(self, timeout: float | None = None) -> memoryview:
        """Receive the next message as a read-only memoryview, valid until the next receive.

        Channels that can hand out their buffer without copying (shm://) override this.
        """
        return memoryview(self.recv(timeout))

    def __iter__(self) -> Iterator[bytes]:
        """Yield messages until the end of stream."""
        recv = self.recv
        while True:
            try:
                yield recv()
            except EndOfStream:
                return

    def close(self) -> None:
        """Stop consuming and free what this side created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close()

    @abstractmethod
    def _recv(self, deadline: float | None) -> bytes: ...

    @abstractmethod
    def _close(self) -> None: ...

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
