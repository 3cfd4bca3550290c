"""podipc: messages between the containers of one Kubernetes pod, over any channel they share."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from podipc.address import Address, parse_address
from podipc.channel import ChannelInfo, channels, consumer, producer
from podipc.consuming import Consumer
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    RemoteError,
    Timeout,
)
from podipc.producing import Producer
from podipc.readiness import wait
from podipc.rpc import Call, Client, Server, client, server
from podipc.serving import Sessions, serve
from podipc.signals import close_on_signals

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


def __getattr__(name: str) -> ModuleType:
    """podipc.aio is imported on first use (it imports asyncio, which sync programs need not pay for)."""
    if name == "aio":
        return importlib.import_module("podipc.aio")
    raise AttributeError(f"module 'podipc' has no attribute {name!r}")
