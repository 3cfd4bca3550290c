"""The producing side of a spool: each message a file, written atomically in sequence; resumes a stream."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping
from typing import Any

from podipc.address import Address
from podipc.channel import Producer
from podipc.errors import (
    ChannelClosed,
    ChannelUnavailable,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.transports.spool.side import (
    Backoff,
    PeerWatch,
    SpoolSide,
    entry_exists,
    exists_in_stream,
    remove_quietly,
    spool_error,
)
from podipc.transports.spool.wire import (
    MAX_SEQUENCE,
    PART_PREFIX,
    RESUME_ATTEMPTS,
    WRITE_FLAGS,
    end_name,
    message_name,
    parse_spool_name,
    part_name,
)


class SpoolProducer(SpoolSide, Producer):
    """Writes each message as a file, atomically, in sequence; resumes a stream left in the spool."""

    role = "producer"

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._dir_fd = -1
        self.max_message_size = int(self.settings["max_message_size"])
        self._depth = int(self.settings["depth"])
        self._max_bytes = int(self.settings["max_bytes"])
        self._fsync = bool(self.settings["fsync"])
        try:
            self._open_spool()
        except BaseException:
            self._closed = True
            raise
        try:
            self._remove_stale_temporaries()
            self._next_sequence, self._stream_ended = self._find_resume_point()
            self.resumed_at = self._next_sequence
            self._pending: collections.deque[tuple[int, int]] = collections.deque(self._pending_messages())
            self._pending_bytes = sum(size for _, size in self._pending)
            self._consumer_was_here = False
        except OSError as exc:
            self._closed = True
            self._leave()
            raise ChannelUnavailable(f"cannot open the spool {self.path}: {exc.strerror}") from exc
        except BaseException:
            self._closed = True
            self._leave()
            raise
        self._watch = PeerWatch(self._presence, float(self.settings["restart_wait"]), self.wait_deadline, self.path)

    def _remove_stale_temporaries(self) -> None:
        self._remove_stale_presence_temporaries()
        for name in os.listdir(self._dir_fd):
            if name.startswith(PART_PREFIX):
                remove_quietly(name, self._dir_fd)

    def _find_resume_point(self) -> tuple[int, bool]:
        """The next sequence number, read from the spool, and whether the stream already ended.

        The consumer may be committing while we look; message P-1 (the last one written)
        always exists as msg or done until message P is written, and nothing above it, so
        a candidate X from a listing is right when X is absent and X-1 is present.
        """
        empty_listings = 0
        for _ in range(RESUME_ATTEMPTS):
            highest = -1
            for name in os.listdir(self._dir_fd):
                parsed = parse_spool_name(name)
                if parsed is None:
                    continue
                if parsed.kind == "end":
                    return parsed.sequence, True
                if parsed.kind in ("message", "done"):
                    highest = max(highest, parsed.sequence)
            if highest < 0:
                empty_listings += 1
                if empty_listings == 2:
                    return 0, False
                continue
            candidate = highest + 1
            if not exists_in_stream(candidate, self._dir_fd) and exists_in_stream(highest, self._dir_fd):
                return candidate, False
            empty_listings = 0
        raise ChannelUnavailable(f"the spool {self.path} kept changing while the producer looked for its end")

    def _pending_messages(self) -> list[tuple[int, int]]:
        pending = []
        for name in os.listdir(self._dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None or parsed.kind != "message" or parsed.sequence >= self._next_sequence:
                continue
            try:
                size = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            pending.append((parsed.sequence, size))
        pending.sort()
        return pending

    def _send(self, view: memoryview, deadline: float | None) -> None:
        try:
            self._send_message(view, deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _send_message(self, view: memoryview, deadline: float | None) -> None:
        if self._stream_ended:
            raise ChannelClosed(
                f"the stream in {self.path} already ended after {self._next_sequence} messages "
                "(its end marker is in the spool); close() to wait until the consumer takes it"
            )
        size = view.nbytes
        if len(self._pending) >= self._depth or self._pending_bytes + size > self._max_bytes:
            self._wait_for_room(size, deadline)
        sequence = self._next_sequence
        if sequence > MAX_SEQUENCE:
            raise ProtocolError(f"the spool {self.path} ran out of sequence numbers ({MAX_SEQUENCE})")
        self._write_message(sequence, view)
        self._next_sequence = sequence + 1
        self._pending.append((sequence, size))
        self._pending_bytes += size

    def _write_message(self, sequence: int, view: memoryview) -> None:
        dir_fd = self._dir_fd
        temporary = part_name(sequence)
        try:
            fd = os.open(temporary, WRITE_FLAGS, self._mode, dir_fd=dir_fd)
            try:
                if self._chmod_needed:
                    os.fchmod(fd, self._mode)
                written = os.write(fd, view) if view.nbytes else 0
                while written < view.nbytes:
                    written += os.write(fd, view[written:])
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, message_name(sequence), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            remove_quietly(temporary, dir_fd)
            raise spool_error(exc, self.path) from exc
        if self._fsync:
            os.fsync(dir_fd)

    def _release_consumed(self) -> None:
        pending, dir_fd = self._pending, self._dir_fd
        while pending and not entry_exists(message_name(pending[0][0]), dir_fd):
            self._pending_bytes -= pending.popleft()[1]
            self._consumer_was_here = True

    def _has_room(self, size: int) -> bool:
        if not self._pending:
            return True
        return len(self._pending) < self._depth and self._pending_bytes + size <= self._max_bytes

    def _wait_for_room(self, size: int, deadline: float | None) -> None:
        backoff = Backoff()
        while True:
            self._release_consumed()
            if self._has_room(size):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(
                    f"the spool {self.path} stayed full ({len(self._pending)} messages, {self._pending_bytes} bytes; "
                    f"depth={self._depth}, max_bytes={self._max_bytes}) until the send timeout"
                )
            if self._watch.due(now):
                error = self._watch.verdict(now, self._consumer_was_here)
                if error is not None:
                    self._release_consumed()
                    if self._has_room(size):  # the peer made room just before it left
                        return
                    raise error
            backoff.pause(deadline)

    def _close(self, deadline: float | None) -> None:
        try:
            self._end_stream(deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _end_stream(self, deadline: float | None) -> None:
        count = self._next_sequence
        marker = end_name(count)
        if not self._stream_ended:
            try:
                self._write_empty(marker)
                if self._fsync:
                    os.fsync(self._dir_fd)
            except OSError as exc:
                raise spool_error(exc, self.path) from exc
            self._stream_ended = True
        self._wait_until_taken(marker, deadline)
        self._leave()

    def _wait_until_taken(self, marker: str, deadline: float | None) -> None:
        backoff = Backoff()
        dir_fd = self._dir_fd
        while entry_exists(marker, dir_fd):
            now = time.monotonic()
            if self._watch.due(now):
                self._release_consumed()
                error = self._watch.verdict(now, self._consumer_was_here)
                if error is not None:
                    if not entry_exists(marker, dir_fd):  # taken just before the consumer left
                        return
                    raise error
            if deadline is not None and now >= deadline:
                if not self._presence.peer_seen:
                    raise PeerTimeout(f"no consumer took the end of stream of {self.path} within the close timeout")
                raise Timeout(f"the consumer of {self.path} did not take the end of stream within the close timeout")
            backoff.pause(deadline)

    def _abort(self) -> None:
        if self._dir_fd >= 0:
            self._leave()
