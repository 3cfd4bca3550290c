"""What a request/reply client and server share: closing state, context manager, the unclosed warning, errors."""

from __future__ import annotations

import contextlib
import os
import warnings
from types import TracebackType
from typing import Self

from podipc.errors import ChannelClosed, MessageTooLarge

_FORKS = [0]
"""How many forks this process is down its line (counted in the child): sides opened before one refuse use."""


def _count_fork() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_count_fork)


class Side:
    """The base of Client, Server and AsyncClient: `closed`, `with`, a ResourceWarning when dropped unclosed."""

    _what: str
    """The address's location, for messages."""
    _closing: bool
    """Set by the subclass's __init__ once it holds something (an object whose __init__ failed holds nothing)."""

    _born_after = 0
    """The fork count when this side was opened (see `_inherited`)."""
    _pid = 0

    def _note_birth(self) -> None:
        """Remember the process and fork count this side is opened in (call first in __init__)."""
        self._pid = os.getpid()
        self._born_after = _FORKS[0]

    @property
    def _inherited(self) -> bool:
        """True in a child forked after this side was opened: the child must neither use nor free what it shares."""
        return self._born_after != _FORKS[0]

    def _inherited_error(self) -> ChannelClosed:
        return ChannelClosed(
            f"the {type(self).__name__} for {self._what} was opened in process {self._pid} before fork(); "
            "open it again in the child"
        )

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self._closing

    def close(self) -> None:
        """Close this side (each class says what that means)."""
        raise NotImplementedError

    def _release_unclosed(self) -> None:
        """Free what a side dropped without close() holds (default: close())."""
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closing", True):
            return
        warnings.warn(f"unclosed {type(self).__name__} for {self._what}", ResourceWarning, stacklevel=2)
        with contextlib.suppress(Exception):
            self._release_unclosed()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._what} {'closed' if self._closing else 'open'}>"


def too_large(size: int, limit: int) -> MessageTooLarge:
    """The MessageTooLarge of a request or reply body over max_message_size."""
    return MessageTooLarge(size, limit, "max_message_size option", "raise max_message_size= on both sides")


def gone_text(where: str) -> str:
    """What PeerGone says when the server's connection ended with calls in flight."""
    return (
        f"the server at {where} went away (it died or closed) with calls in flight; open a new client once it is back"
    )
