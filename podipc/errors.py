"""The exception hierarchy: every error podipc raises derives from PodIPCError."""

from __future__ import annotations


class PodIPCError(Exception):
    """Root of every podipc error, so callers can catch one thing."""

    sent: int | None = None
    """On an error raised by Producer.send_many: how many messages of the batch were sent (whole, in order) first."""


class AddressError(PodIPCError, ValueError):
    """A channel URL or option is malformed, unknown or out of range."""


class ChannelUnavailable(PodIPCError):
    """This host cannot provide the channel (missing facility, limit, busy); the message says the fix."""


class NameTaken(ChannelUnavailable):
    """A fan-in producer's name is already held by a live producer at that consumer; give each its own name=."""


class MessageTooLarge(PodIPCError, ValueError):
    """A message exceeds the channel's maximum size; raised before anything is sent."""

    def __init__(self, size: int, limit: int, source: str, fix: str = "") -> None:
        self.size = size
        self.limit = limit
        self.source = source
        message = f"{size} bytes > {source} {limit}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class Timeout(PodIPCError, TimeoutError):
    """A send, receive or close did not complete within its timeout."""


class PeerTimeout(Timeout):
    """The other side never showed up within the wait timeout (option `wait`)."""


class EndOfStream(PodIPCError):
    """The producer closed the stream cleanly; no more messages will come."""


class PeerGone(PodIPCError, ConnectionError):
    """The other side died or vanished before the stream ended."""


class ProtocolError(PodIPCError):
    """Bytes arrived that are not a valid podipc frame or record."""


class ChannelClosed(PodIPCError):
    """The producer or consumer was used after close()."""


class RemoteError(PodIPCError):
    """The server's handler failed on this request; the message is what it said (request/reply)."""
