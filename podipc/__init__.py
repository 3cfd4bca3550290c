"""podipc: messages between the containers of one Kubernetes pod, over any channel they share."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from podipc.address import Address, parse_address
from podipc.channel import ChannelInfo, Consumer, Producer, channels, consumer, producer
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
    Timeout,
)

try:
    __version__ = version("podipc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Address",
    "AddressError",
    "ChannelClosed",
    "ChannelInfo",
    "ChannelUnavailable",
    "Consumer",
    "EndOfStream",
    "MessageTooLarge",
    "PeerGone",
    "PeerTimeout",
    "PodIPCError",
    "Producer",
    "ProtocolError",
    "Timeout",
    "__version__",
    "channels",
    "consumer",
    "parse_address",
    "producer",
]
