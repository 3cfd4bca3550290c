"""The serving side of a doctor comparison: publish this container's facts through every medium.

`podipc doctor --serve` (DoctorServer) publishes one document with a random token under
the rendezvous name of podipc.doctor.peer, answers requests and takes acknowledgements;
the looking side and the comparison are podipc.doctor.peer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from podipc.doctor.facts import Facts
from podipc.doctor.peer import (
    CONNECTION_TIMEOUT_SECONDS,
    LENGTH,
    MAX_REQUEST_BYTES,
    POLL_SECONDS,
    PUBLISHED_FILE_MODE,
    QUEUE_MODE,
    REQUEST_DONE,
    REQUEST_FACTS,
    Rendezvous,
    encode_document,
    remove_file,
    write_file_atomically,
)


class DoctorServer:
    """Publish this container's facts through every medium; answer and count peers. Use as a context manager."""

    def __init__(self, facts: Facts, rendezvous: Rendezvous, exchange_dirs: tuple[str, ...] = ()) -> None:
        self.rendezvous = rendezvous
        self.exchange_dirs = exchange_dirs
        self.token = secrets.token_hex(8)
        self.document = encode_document(facts, self.token)
        self.published: dict[str, str] = {}
        """Medium -> 'ok' or why it could not be published."""
        self.acknowledgements = 0
        self._listeners: list[socket.socket] = []
        self._files: list[str] = []
        self._segment: Any = None
        self._queue: Any = None

    def __enter__(self) -> DoctorServer:
        try:
            self.publish()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def publish(self) -> None:
        """Listen first, then create the IPC objects, then write the files (so files mean 'ready')."""
        self._attempt(f"tcp {self.rendezvous}", self._listen_tcp)
        self._attempt(f"abstract unix @{self.rendezvous.name}", self._listen_abstract)
        self._attempt(f"sysv shm 0x{self.rendezvous.sysv_key:08x}", self._create_segment)
        self._attempt(f"posix mq {self.rendezvous.queue_name}", self._create_queue)
        for path in (self.rendezvous.dev_shm_file, *map(self.rendezvous.exchange_file, self.exchange_dirs)):
            self._attempt(f"file {path}", lambda path=path: self._write_file(path))

    def _attempt(self, medium: str, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # a medium this container lacks is a finding, not a failure
            self.published[medium] = f"{type(exc).__name__}: {exc}"
        else:
            self.published[medium] = "ok"

    def _listen_tcp(self) -> None:
        family = socket.AF_INET6 if ":" in self.rendezvous.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.rendezvous.host, self.rendezvous.port))
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        self._listeners.append(listener)

    def _listen_abstract(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.rendezvous.abstract_name)
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        self._listeners.append(listener)

    def _create_segment(self) -> None:
        import sysv_ipc

        with contextlib.suppress(sysv_ipc.ExistentialError):
            sysv_ipc.SharedMemory(self.rendezvous.sysv_key).remove()  # left by a killed server
        payload = LENGTH.pack(len(self.document)) + self.document
        self._segment = sysv_ipc.SharedMemory(
            self.rendezvous.sysv_key, sysv_ipc.IPC_CREX, mode=PUBLISHED_FILE_MODE, size=len(payload)
        )
        self._segment.write(payload)

    def _create_queue(self) -> None:
        import posix_ipc

        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_message_queue(self.rendezvous.queue_name)
        self._queue = posix_ipc.MessageQueue(
            self.rendezvous.queue_name, posix_ipc.O_CREX, mode=QUEUE_MODE, max_messages=1,
            max_message_size=MAX_REQUEST_BYTES,
        )  # fmt: skip

    def _write_file(self, path: str) -> None:
        remove_file(path + ".done")
        write_file_atomically(path, self.document, PUBLISHED_FILE_MODE)
        self._files.append(path)

    def serve(self, duration: float | None = None, once: bool = False) -> int:
        """Answer peers for `duration` seconds (None: until interrupted), or until one acknowledges with `once`.

        Returns how many peers acknowledged.
        """
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            readable, _, _ = select.select(self._listeners, [], [], POLL_SECONDS)
            for listener in readable:
                self._answer(listener)
            self._collect_acknowledgements()
            if once and self.acknowledgements:
                break
        return self.acknowledgements

    def _answer(self, listener: socket.socket) -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(CONNECTION_TIMEOUT_SECONDS)
            try:
                request = read_line(connection)
                if request == REQUEST_FACTS:
                    connection.sendall(self.document)
                elif request.startswith(REQUEST_DONE) and self.token.encode() in request:
                    self.acknowledgements += 1
            except OSError:
                pass  # a peer that hung up mid-request is its own problem

    def _collect_acknowledgements(self) -> None:
        for path in self._files:
            if os.path.exists(path + ".done"):
                remove_file(path + ".done")
                self.acknowledgements += 1
        if self._queue is not None:
            import posix_ipc

            with contextlib.suppress(posix_ipc.BusyError):
                message, _ = self._queue.receive(0)
                if self.token.encode() in message:
                    self.acknowledgements += 1

    def close(self) -> None:
        """Withdraw every published copy. Idempotent."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for path in self._files:
            remove_file(path)
            remove_file(path + ".done")
        self._files.clear()
        if self._segment is not None:
            with contextlib.suppress(Exception):
                self._segment.detach()
                self._segment.remove()
            self._segment = None
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.close()
                self._queue.unlink()
            self._queue = None


def read_line(connection: socket.socket) -> bytes:
    """One request line (at most MAX_REQUEST_BYTES), including its newline."""
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST_BYTES:
        chunk = connection.recv(MAX_REQUEST_BYTES - len(data))
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def serving(facts: Facts, rendezvous: Rendezvous, exchange_dirs: tuple[str, ...] = ()) -> Iterator[DoctorServer]:
    """A DoctorServer published for the duration of a with block."""
    with DoctorServer(facts, rendezvous, exchange_dirs) as server:
        yield server
