"""Opening a channel by URL (producer(), consumer()) and the table of channels (channels()).

A channel module (podipc/transports/*.py) subclasses Producer and Consumer and
implements the endpoint contract's private hooks (`_try_send`, `_try_recv`,
`_try_close`, `_readiness`, `_free`, ...; the full list, what each must
guarantee and what the base does with it: the docstring of `podipc.endpoint._Endpoint`).
The public methods (podipc.producing, podipc.consuming) check once, turn a per-call
timeout into a `time.monotonic()` deadline, then delegate; options and deadlines live
in podipc.options.

Rendezvous rule, the same on every channel: opening never blocks on the peer.
A side creates what is its own and returns; the first send or receive waits for
the peer, at most until `wait` seconds after opening (PeerTimeout; wait=None:
forever), or until the call's own timeout (Timeout), whichever comes first.

Which classes serve a URL scheme, and what `channels()` says about each, comes from the
transports' descriptors (podipc.transport), never from a list here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from podipc.address import Address, parse_address
from podipc.consuming import Consumer
from podipc.errors import (
    AddressError,
    ChannelUnavailable,
)
from podipc.options import resolve_options
from podipc.producing import Producer
from podipc.transport import Transport, fanin_schemes, transport_for, transports


def channel_class(scheme: str, role: str) -> type[Producer] | type[Consumer]:
    """The Producer or Consumer class of a scheme's transport; imports only that transport's endpoints.

    Raises AddressError for an unknown scheme, ChannelUnavailable when a package it needs is missing.
    """
    transport = transport_for(scheme)
    return transport.producer_class() if role == "producer" else transport.consumer_class()


FANIN_OPTIONS = ("producers", "name")
"""The options of fan-in (podipc.fanin) besides pattern=fanin, declared only by the transports that have it."""
DEFAULT_PATTERN = "pair"


def _pattern(address: Address, options: Mapping[str, object]) -> str | None:
    value = options.get("pattern", address.options.get("pattern"))
    return None if value is None else str(value).strip().lower()


def _takes_pattern(transport: Transport, pattern: str) -> bool:
    """True when the transport declares a pattern option that accepts `pattern`."""
    for option in transport.options:
        if option.name == "pattern":
            try:
                option.convert(pattern)
            except (ValueError, TypeError):
                return False
            return True
    return False


def check_pattern(address: Address, options: Mapping[str, object]) -> None:
    """Raise AddressError, naming the channels that have it, when a pattern is asked of a transport without it.

    Fan-in (pattern=fanin, producers=, name=) runs over the transports with a fan-in consumer;
    any other pattern (broadcast: shm://, unix://, tcp://) over the transports whose pattern option takes it.
    """
    transport = transport_for(address.scheme)
    pattern = _pattern(address, options)
    if not transport.fanin_consumer:
        for name in FANIN_OPTIONS:
            value = options.get(name, address.options.get(name))
            if value is not None:
                raise AddressError(
                    f"{name}={value} is fan-in (many producers into one consumer), which "
                    f"{address.scheme}:// does not have; it runs over {', '.join(fanin_schemes())}"
                )
        if pattern == "fanin":
            raise AddressError(
                f"pattern=fanin (many producers into one consumer) is not for {address.scheme}://; "
                f"it runs over {', '.join(fanin_schemes())}"
            )
    if pattern not in (None, DEFAULT_PATTERN, "fanin") and not _takes_pattern(transport, pattern):
        takers = [
            f"{scheme}://" for other in transports() if _takes_pattern(other, pattern) for scheme in other.schemes
        ]
        raise AddressError(
            f"pattern={pattern} is not for {address.scheme}://; "
            + (f"it runs over {', '.join(takers)}" if takers else "no channel has it (pair, fanin, broadcast)")
        )


def _without_pair_pattern(address: Address, options: dict[str, object]) -> Address:
    """Drop pattern=pair (every channel's default) for a transport that does not declare the option."""
    if any(option.name == "pattern" for option in transport_for(address.scheme).options):
        return address
    options.pop("pattern", None)
    if "pattern" not in address.options:
        return address
    return replace(address, options={k: v for k, v in address.options.items() if k != "pattern"})


def producer(url: str, **options: object) -> Producer:
    """Open the producing side of the channel at `url` (options override the URL's query)."""
    address = parse_address(url)
    check_pattern(address, options)
    address = _without_pair_pattern(address, options)
    cls = channel_class(address.scheme, "producer")
    settings = resolve_options(address, cls.options, options)
    if settings.get("pattern") == "broadcast":
        cls = transport_for(address.scheme).broadcast_class("producer") or cls
    elif settings.get("name") or settings.get("pattern") == "fanin":
        cls = transport_for(address.scheme).fanin_producer_class()
    result = cls(address, settings)
    assert isinstance(result, Producer)
    return result


def consumer(url: str, **options: object) -> Consumer:
    """Open the consuming side of the channel at `url` (options override the URL's query).

    pattern=fanin opens a fan-in consumer: many named producers (podipc.fanin over unix:// and tcp://,
    podipc.queue_fanin over mq:// and sysvmq://); pattern=broadcast a subscriber (shm://: its ring's;
    unix://, tcp://: podipc.stream_broadcast).
    """
    address = parse_address(url)
    check_pattern(address, options)
    transport = transport_for(address.scheme)
    address = _without_pair_pattern(address, options)
    cls = channel_class(address.scheme, "consumer")
    settings = resolve_options(address, cls.options, options)
    if settings.get("pattern") == "fanin" or settings.get("producers"):
        if ("pattern" in options or "pattern" in address.options) and settings["pattern"] != "fanin":
            raise AddressError(
                f"producers={settings['producers']} is fan-in: it needs pattern=fanin, not {settings['pattern']}"
            )
        settings["pattern"] = "fanin"
        cls = transport.fanin_consumer_class()
    elif settings.get("pattern") == "broadcast":
        cls = transport.broadcast_class("consumer") or cls
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
