"""The flusher's side of a coalescing producer: handing its outbox to the flusher thread and back.

StreamProducer (podipc.stream_producer) and UDPProducer (udp://) keep the tail of a burst of
sends in an outbox; `CoalescingProducer` is what both give the flusher (podipc.flushing's
`OutboxOwner`): joining and leaving `UNFLUSHED`, and one non-blocking attempt to write the
outbox out under the call gate. A subclass says how it writes (`_write_outbox_now`),
which descriptor shows room (`_flusher_fd`) and, when its outbox is not one buffer, what is
pending (`_has_pending`).
"""

from __future__ import annotations

from typing import Any

from podipc.errors import PodIPCError
from podipc.flushing import FLUSHED, IN_USE, NO_ROOM, UNFLUSHED, flusher
from podipc.producing import Producer
from podipc.waking import POLLOUT, is_ready


class CoalescingProducer(Producer):
    """A producer with an outbox that the process's flusher thread writes out once a burst ends."""

    _watched = False
    """True while the flusher thread holds this producer in `UNFLUSHED`."""
    _outbox: Any
    """What the burst left: the subclass's buffer (empty when there is nothing to write)."""

    def _has_pending(self) -> bool:
        """Whether anything waits to be written (read without the gate: a call may be inside)."""
        return bool(self._outbox)

    def _write_outbox_now(self) -> bool:
        """Under the call gate, never blocking: True once nothing is left to write (or none may be written yet)."""
        raise NotImplementedError

    def _flusher_fd(self) -> int:
        """The descriptor to wait on for room after NO_ROOM (-1: none, look again after a tick)."""
        raise NotImplementedError

    def _watch(self) -> None:
        """Hand this producer to the flusher thread, which writes the outbox out once the burst ends."""
        self._watched = True
        UNFLUSHED.add(self)
        flusher().wake()

    def _flush_for_flusher(self) -> int:
        """The flusher thread's attempt, under the call gate: FLUSHED, IN_USE (a call is inside) or NO_ROOM."""
        if self._state and (self._closing or self._forked or self._freed):
            self._unwatch()
            return FLUSHED  # a close writes the outbox out, an abort drops it
        token = self._token
        try:
            token.pop()
        except IndexError:
            if self._let_go_if_empty():
                return FLUSHED  # a call inside that leaves messages behind hands the producer over again
            # a send waiting for room writes the outbox itself when room comes
            fd = self._flusher_fd()
            return IN_USE if fd < 0 or is_ready(fd, POLLOUT) else NO_ROOM
        try:
            if self._write_outbox_now():
                self._unwatch()
                return FLUSHED
            return NO_ROOM
        except PodIPCError:
            self._unwatch()  # the outbox stays: the next call writes it, or meets the same error and raises it
            return FLUSHED
        finally:
            token.append(None)
            if self._state:
                self._after_call()

    def _unwatch(self) -> None:
        """Leave `UNFLUSHED` (the producer joins it again when its outbox next holds something)."""
        self._watched = False
        UNFLUSHED.discard(self)

    def _let_go_if_empty(self) -> bool:
        """Without the gate (a call is inside): stop watching if the outbox is empty; False when it holds messages.

        Every call that makes the outbox non-empty checks `_watched` afterwards and hands the
        producer over again when it is False; the order of the steps here (clear the flag,
        look, discard, look again) keeps that true whatever a call inside does meanwhile.
        """
        self._watched = False
        if self._has_pending():
            self._watched = True
            return False
        UNFLUSHED.discard(self)
        if self._watched:  # a call inside watched it again in between
            UNFLUSHED.add(self)
        return True
