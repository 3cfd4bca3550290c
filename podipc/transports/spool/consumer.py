"""The consuming side of a spool: takes message files in sequence, commits each, resumes after the last."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

from podipc.address import Address
from podipc.channel import Consumer
from podipc.errors import (
    ChannelUnavailable,
    EndOfStream,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.presence import PeerState, probe
from podipc.transports.spool.side import (
    Backoff,
    PeerWatch,
    SpoolSide,
    entry_exists,
    remove_quietly,
    spool_error,
)
from podipc.transports.spool.wire import (
    READ_FLAGS,
    TRUNCATE_THRESHOLD,
    UNREADABLE_ERRNOS,
    done_name,
    end_name,
    message_name,
    parse_spool_name,
    read_message_file,
)


class SpoolConsumer(SpoolSide, Consumer):
    """Reads message files in sequence, commits each before returning it, cleans the spool at the end."""

    role = "consumer"

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self._dir_fd = -1
        self.max_message_size = int(self.settings["max_message_size"])
        self._fsync = bool(self.settings["fsync"])
        self._done: int | None = None
        try:
            self._open_spool()
        except BaseException:
            self._closed = True
            raise
        try:
            self._remove_stale_presence_temporaries()
            self._next_sequence = self._find_resume_point()
        except OSError as exc:
            self._closed = True
            self._leave()
            raise ChannelUnavailable(f"cannot open the spool {self.path}: {exc.strerror}") from exc
        except BaseException:
            self._closed = True
            self._leave()
            raise
        self.resumed_at = self._next_sequence
        self._watch = PeerWatch(self._presence, float(self.settings["restart_wait"]), self.wait_deadline, self.path)

    def _find_resume_point(self) -> int:
        """The first uncommitted sequence number; removes extra done files and garbage names."""
        dir_fd = self._dir_fd
        done, messages, ends = [], [], []
        for name in os.listdir(dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None:
                continue
            if parsed.kind == "done":
                done.append(parsed.sequence)
            elif parsed.kind == "message":
                messages.append(parsed.sequence)
            elif parsed.kind == "end":
                ends.append(parsed.sequence)
            elif parsed.kind == "malformed":
                self._remove_garbage(name)
        if done:
            done.sort()
            for older in done[:-1]:
                remove_quietly(done_name(older), dir_fd)
            self._done = done[-1]
            start = done[-1] + 1
        elif messages:
            start = min(messages)
            while start > 0 and entry_exists(message_name(start - 1), dir_fd):
                start -= 1
        elif ends:
            start = min(ends)
        else:
            start = 0
        for sequence in messages:
            if sequence < start:
                self._remove_garbage(message_name(sequence))
        return start

    def _remove_garbage(self, name: str) -> None:
        if remove_quietly(name, self._dir_fd):
            self.skipped += 1

    def _recv(self, deadline: float | None) -> bytes:
        try:
            return self._receive(deadline)
        except PodIPCError:
            raise
        except OSError as exc:
            raise spool_error(exc, self.path) from exc

    def _receive(self, deadline: float | None) -> bytes:
        dir_fd = self._dir_fd
        while True:
            sequence = self._next_sequence
            try:
                fd = os.open(message_name(sequence), READ_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                self._wait_for_message(sequence, deadline)
                continue
            except OSError as exc:
                if exc.errno not in UNREADABLE_ERRNOS:
                    raise
                self._commit(sequence, 0)
                self.skipped += 1
                continue
            try:
                data, size = read_message_file(fd, self.max_message_size)
            finally:
                os.close(fd)
            self._commit(sequence, size)
            if data is None:
                self.skipped += 1
                continue
            return data

    def _commit(self, sequence: int, size: int) -> None:
        dir_fd = self._dir_fd
        committed = done_name(sequence)
        try:
            os.rename(message_name(sequence), committed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise ProtocolError(
                f"message {sequence} vanished from {self.path} while being read ({exc.strerror}); "
                "is a second consumer using this spool?"
            ) from exc
        if self._done is not None:
            remove_quietly(done_name(self._done), dir_fd)
        self._done = sequence
        self._next_sequence = sequence + 1
        if size >= TRUNCATE_THRESHOLD:
            with contextlib.suppress(OSError):
                os.truncate(os.path.join(self.path, committed), 0)
        if self._fsync:
            os.fsync(dir_fd)

    def _wait_for_message(self, sequence: int, deadline: float | None) -> None:
        """Return once message `sequence` is in the spool; raise EndOfStream, Timeout, PeerGone..."""
        dir_fd = self._dir_fd
        wanted, marker = message_name(sequence), end_name(sequence)
        backoff = Backoff()
        watch = self._watch
        while True:
            if entry_exists(wanted, dir_fd):
                return
            if entry_exists(marker, dir_fd):
                if entry_exists(wanted, dir_fd):
                    return
                self._finish(sequence)
                raise EndOfStream(f"{self.address.location}: the producer ended the stream")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(f"no message arrived in {self.path} within the receive timeout")
            if watch.due(now):
                error = watch.verdict(now)
                if error is not None:
                    if entry_exists(wanted, dir_fd) or entry_exists(marker, dir_fd):
                        continue
                    self._check_for_gap(sequence)
                    raise error
            backoff.pause(deadline)

    def _check_for_gap(self, sequence: int) -> None:
        """Raise ProtocolError if the spool holds later messages or an end marker past a missing one."""
        later = []
        for name in os.listdir(self._dir_fd):
            parsed = parse_spool_name(name)
            if parsed is not None and parsed.kind in ("message", "end") and parsed.sequence > sequence:
                later.append(parsed)
        if later:
            first = min(later, key=lambda parsed: parsed.sequence)
            raise ProtocolError(
                f"message {sequence} is missing from {self.path}, yet the spool holds "
                f"{'an end marker' if first.kind == 'end' else 'message'} {first.sequence}: "
                "the stream has a gap (files removed by hand, or a foreign writer)"
            )

    def _finish(self, count: int) -> None:
        """The end of stream: remove every spool file, the end marker (the producer's ack) last, then our presence."""
        dir_fd = self._dir_fd
        if self._done is not None:
            remove_quietly(done_name(self._done), dir_fd)
            self._done = None
        producer_alive = self._presence.peer_state() is PeerState.ALIVE
        for name in os.listdir(dir_fd):
            parsed = parse_spool_name(name)
            if parsed is None:
                continue
            stale_end = parsed.kind == "end" and parsed.sequence != count
            stale_part = parsed.kind == "part" and not producer_alive
            if (
                parsed.kind == "presence"
                and name.endswith(".tmp")
                and probe(os.path.join(self.path, name), self._presence.trust) is PeerState.GONE
            ):
                remove_quietly(name, dir_fd)  # a claim cut short by a kill: nobody holds its lock
            if parsed.kind in ("message", "malformed"):
                self._remove_garbage(name)
            elif parsed.kind == "done" or stale_part or stale_end:
                remove_quietly(name, dir_fd)
        remove_quietly(end_name(count), dir_fd)
        if not producer_alive:
            self._remove_dead_producer_presence()
        self._leave()

    def _remove_dead_producer_presence(self) -> None:
        if self._presence.peer_state() is PeerState.GONE:
            remove_quietly(os.path.basename(self._presence.peer_path), self._dir_fd)

    def _close(self) -> None:
        if self._dir_fd >= 0:
            self._leave()
