"""podipc: messages between the containers of one Kubernetes pod, over any channel they share."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from podipc.address import Address, parse_address
from podipc.channel import ChannelInfo, channels, consumer, producer
from podipc.consuming import Consumer
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    NameTaken,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    RemoteError,
    Timeout,
)
from podipc.producing import Producer
from podipc.readiness import wait
from podipc.serving import Sessions, serve
from podipc.signals import close_on_signals

if TYPE_CHECKING:
    from podipc.rpc import Call, Client, RingClient, RingServer, Server

try:
    __version__ = version("podipc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Address",
    "AddressError",
    "Call",
    "ChannelClosed",
    "ChannelInfo",
    "ChannelUnavailable",
    "Client",
    "Consumer",
    "EndOfStream",
    "MessageTooLarge",
    "NameTaken",
    "PeerGone",
    "PeerTimeout",
    "PodIPCError",
    "Producer",
    "ProtocolError",
    "RemoteError",
    "Server",
    "Sessions",
    "Timeout",
    "__version__",
    "aio",
    "channels",
    "client",
    "close_on_signals",
    "consumer",
    "parse_address",
    "producer",
    "serve",
    "server",
    "wait",
]


def client(url: str, **options: object) -> Client | RingClient:
    """Open the client side of request/reply at `url` (unix://, tcp:// or shm://): `call(request, timeout)`.

    See podipc.rpc (imported on first use, as the stream transports it runs over).
    """
    from podipc.rpc import client as open_client

    return open_client(url, **options)


def server(url: str, **options: object) -> Server | RingServer:
    """Open the server side of request/reply at `url` (unix://, tcp:// or shm://): `serve(handler)` or iteration.

    See podipc.rpc (imported on first use, as the stream transports it runs over).
    """
    from podipc.rpc import server as open_server

    return open_server(url, **options)


_REQUEST_REPLY_NAMES = ("Call", "Client", "Server")


def __getattr__(name: str) -> Any:
    """podipc.aio and the request/reply classes are imported on first use (asyncio, the stream transports)."""
    if name == "aio":
        return importlib.import_module("podipc.aio")
    if name in _REQUEST_REPLY_NAMES:
        return getattr(importlib.import_module("podipc.rpc"), name)
    raise AttributeError(f"module 'podipc' has no attribute {name!r}")
