"""Where request/reply meets shm://: a pair ring each way, opened with the shm transport's own endpoints.

    shm:///NAME   requests go client -> server in the ring NAME.request (the server is its consumer:
                  it creates it at open), replies go server -> client in the ring NAME.reply (the
                  client is its consumer: it creates it before its first request goes)

Each message in either ring is one call header and its body (podipc.rpc.wire, without the
stream frames' length: a ring keeps message boundaries). The rings are plain shm:// pair
rings (podipc.transports.shm): their presence files, ownership checks, stale-object
replacement, peer monitor and wake-ups are the transport's. Being pair rings, they carry
one client at a time: a second client's claim on NAME.request is refused
(ChannelUnavailable, see `busy`). A client that left (closed or died) ends the server's
session; the server opens the next one, so it serves client after client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from podipc.address import Address, parse_address
from podipc.channel import consumer, producer
from podipc.consuming import Consumer
from podipc.errors import AddressError, ChannelUnavailable, PeerTimeout
from podipc.options import Option
from podipc.ownership import Trust
from podipc.presence import ENDING, PROBE_INTERVAL_SECONDS, PeerState, declares, presence_path, probe
from podipc.producing import Producer
from podipc.transports.shm.endpoints import ShmProducer
from podipc.transports.shm.layout import ALIGNMENT
from podipc.transports.shm.options import RING_OPTIONS, default_max_message_size

from .wire import CALL_HEADER_SIZE

REQUEST_SUFFIX = ".request"
REPLY_SUFFIX = ".reply"
RING_RPC_OPTIONS: tuple[Option, ...] = RING_OPTIONS
"""capacity (of each ring), max_message_size (largest body; default the ring's half less the call header), spin."""
LEAVING_SECONDS = 5.0
"""How long a server waits for a client that ended its requests to leave, before it opens the next request ring."""
LIVENESS_CHECK_SECONDS = 0.05
"""How often a client waiting for a reply looks whether the server's request ring lost its consumer."""


def ring_urls(address: Address) -> tuple[str, str]:
    """The shm:// URLs (no query) of the request ring and the reply ring of `address`."""
    return f"shm:///{address.name}{REQUEST_SUFFIX}", f"shm:///{address.name}{REPLY_SUFFIX}"


def body_limit(settings: Mapping[str, Any]) -> int:
    """The largest request or reply body in bytes: max_message_size, or the default ring's less the call header."""
    given = settings["max_message_size"]
    if given is not None:
        return int(given)
    return default_max_message_size(int(settings["capacity"])) - CALL_HEADER_SIZE


def ring_options(settings: Mapping[str, Any], wait: float | None) -> dict[str, object]:
    """The options of one ring: the geometry (a message is a header and a body) and `wait` (None: forever)."""
    record = body_limit(settings) + CALL_HEADER_SIZE
    return {
        "capacity": settings["capacity"],
        "max_message_size": (record + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT,
        "spin": settings["spin"],
        "mode": settings["mode"],
        "wait": math.inf if wait is None else wait,
    }


def check_geometry(address: Address, settings: Mapping[str, Any]) -> None:
    """AddressError when a message of max_message_size bytes and its header do not fit a ring of `capacity`."""
    capacity = int(settings["capacity"])
    record = ring_options(settings, None)["max_message_size"]
    if not isinstance(record, int) or record + ALIGNMENT > capacity:
        raise AddressError(
            f"{address.location}: max_message_size={body_limit(settings)} and its {CALL_HEADER_SIZE}-byte call "
            f"header do not fit a ring of capacity={capacity}; raise capacity= or lower max_message_size="
        )


def open_request_reader(address: Address, settings: Mapping[str, Any]) -> Consumer:
    """The server's side of the request ring (created now; it waits for its client forever)."""
    request_url, _ = ring_urls(address)
    return consumer(request_url, **ring_options(settings, None))


def open_reply_writer(address: Address, settings: Mapping[str, Any]) -> Producer:
    """The server's side of a client's reply ring (it attaches on the first reply)."""
    _, reply_url = ring_urls(address)
    return producer(reply_url, **ring_options(settings, float(settings["wait"])))


def open_client_rings(address: Address, settings: Mapping[str, Any]) -> tuple[ShmProducer, Consumer]:
    """The client's request writer (claimed first: a second client is refused here) and its reply ring (created).

    Raises ChannelUnavailable (`busy`) when another client holds the server.
    """
    request_url, reply_url = ring_urls(address)
    try:
        requests = producer(request_url, **ring_options(settings, float(settings["wait"])))
    except ChannelUnavailable as exc:
        raise busy(address, exc) from exc
    assert isinstance(requests, ShmProducer)
    try:
        await_previous_reply_writer(address, reply_url, settings)
        replies = consumer(reply_url, **ring_options(settings, None))
    except ChannelUnavailable as exc:
        requests.abort()
        raise busy(address, exc) from exc
    except BaseException:
        requests.abort()
        raise
    return requests, replies


def await_previous_reply_writer(address: Address, reply_url: str, settings: Mapping[str, Any]) -> None:
    """Wait until the server has left the previous client's reply ring (its session ends as that client leaves).

    A new reply ring opened while that writer still lives would take it for its own writer,
    and its leaving for the server's death. Raises PeerTimeout after `wait` seconds.
    """
    path = presence_path(parse_address(reply_url).token, "producer")
    trust = Trust.for_mode(int(settings["mode"]))
    deadline = time.monotonic() + float(settings["wait"])
    while probe(path, trust) is PeerState.ALIVE:
        if time.monotonic() >= deadline:
            raise PeerTimeout(
                f"the server at {address.location} still writes to the previous client's reply ring after "
                f"{float(settings['wait']):g} s; it ends that session once that client has left"
            )
        time.sleep(PROBE_INTERVAL_SECONDS)


def await_client_leaving(address: Address, settings: Mapping[str, Any]) -> None:
    """Wait (at most LEAVING_SECONDS) while the client that ended its requests still holds its place.

    A client's close puts the end of stream into the request ring and then leaves; the next
    request ring must open once it has left, or it would take that leaving for a new client's
    death (and the next client would wait for it). Its place declares ENDING meanwhile, which
    a new client's never does.
    """
    request_url, _ = ring_urls(address)
    path = presence_path(parse_address(request_url).token, "producer")
    trust = Trust.for_mode(int(settings["mode"]))
    deadline = time.monotonic() + LEAVING_SECONDS
    while probe(path, trust) is PeerState.ALIVE and declares(path, ENDING, trust):
        if time.monotonic() >= deadline:
            return
        time.sleep(PROBE_INTERVAL_SECONDS)


def busy(address: Address, cause: ChannelUnavailable) -> ChannelUnavailable:
    """The error of a client refused its rings: another client is attached (or an object there is not ours)."""
    if "is attached" in str(cause):
        return ChannelUnavailable(
            f"request/reply over {address.location} serves one client at a time and another client is attached; "
            f"close that client first, or give each client its own shm:// name ({cause})"
        )
    return ChannelUnavailable(f"request/reply over {address.location}: {cause}")
