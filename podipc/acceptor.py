"""The thread that answers a stream consumer's connections: attaches one producer, refuses the rest.

Part of the stream base of tcp:// and unix:// (podipc.stream): a consumer listens at
open and this thread answers from then on, so a producer can start sending before the
consumer's first recv. The first connection that sends the podipc HELLO is attached
(answered with HELLO); later ones get BUSY; connections whose first bytes are not HELLO
are dropped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from typing import Any

from podipc.framing import (
    BUSY,
    HELLO,
)

SEND_FLAGS = socket.MSG_NOSIGNAL
HELLO_SECONDS = 5.0
"""How long the acceptor gives a new connection to send its HELLO."""
ACCEPTOR_JOIN_SECONDS = 5.0


class Acceptor:
    """Answers connections on a listening socket in a thread: attaches one producer, refuses the rest."""

    def __init__(self, listener: socket.socket, configure: Any, name: str) -> None:
        self.listener = listener
        self.configure = configure
        self.attached: socket.socket | None = None
        self.attached_event = threading.Event()
        self.rejected = 0
        self.first_rejected: bytes | None = None
        self.refused_busy = 0
        self.failure: OSError | None = None
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending: dict[int, tuple[socket.socket, bytearray, float]] = {}
        self._thread = threading.Thread(target=self._run, name=f"podipc-acceptor {name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every connection it still holds (not the attached one)."""
        if self._wake_write < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(ACCEPTOR_JOIN_SECONDS)
        os.close(self._wake_write)
        os.close(self._wake_read)
        self._wake_write = self._wake_read = -1

    def drop_inherited(self) -> None:
        """After fork: the thread is not here; close the pipe and pending copies only."""
        for connection, _, _ in self._pending.values():
            connection.close()
        self._pending.clear()
        if self._wake_write >= 0:
            os.close(self._wake_write)
            os.close(self._wake_read)
            self._wake_write = self._wake_read = -1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        poller.register(self.listener.fileno(), select.POLLIN)
        try:
            while True:
                events = poller.poll(self._poll_milliseconds())
                for fd, _ in events:
                    if fd == self._wake_read:
                        return
                    if fd == self.listener.fileno():
                        self._accept(poller)
                    else:
                        self._read_hello(poller, fd)
                self._expire(poller)
        except OSError as exc:  # the listener broke: tell the waiting recv
            self.failure = exc
            self.attached_event.set()
        finally:
            for connection, _, _ in self._pending.values():
                connection.close()
            self._pending.clear()

    def _poll_milliseconds(self) -> int:
        if not self._pending:
            return -1
        soonest = min(deadline for _, _, deadline in self._pending.values())
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _accept(self, poller: select.poll) -> None:
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)
                return
            raise
        connection.setblocking(False)
        self._pending[connection.fileno()] = (connection, bytearray(), time.monotonic() + HELLO_SECONDS)
        poller.register(connection.fileno(), select.POLLIN)

    def _read_hello(self, poller: select.poll, fd: int) -> None:
        connection, received, _ = self._pending[fd]
        try:
            chunk = connection.recv(len(HELLO) - len(received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        received += chunk
        if chunk and len(received) < len(HELLO) and HELLO.startswith(received):
            return
        poller.unregister(fd)
        del self._pending[fd]
        if bytes(received) != HELLO:
            self._reject(connection, bytes(received))
        elif self.attached is None:
            self._attach(connection)
        else:
            self.refused_busy += 1
            self._answer_and_close(connection, BUSY)

    def _attach(self, connection: socket.socket) -> None:
        try:
            connection.send(HELLO, SEND_FLAGS)
            self.configure(connection)
        except OSError as exc:
            self._reject(connection, HELLO, exc)
            return
        self.attached = connection
        self.attached_event.set()

    def _reject(self, connection: socket.socket, first_bytes: bytes, error: OSError | None = None) -> None:
        self.rejected += 1
        if self.first_rejected is None:
            self.first_rejected = first_bytes
        connection.close()

    @staticmethod
    def _answer_and_close(connection: socket.socket, answer: bytes) -> None:
        with contextlib.suppress(OSError):
            connection.send(answer, SEND_FLAGS)
        connection.close()

    def _expire(self, poller: select.poll) -> None:
        now = time.monotonic()
        for fd, (connection, received, deadline) in list(self._pending.items()):
            if deadline <= now:
                poller.unregister(fd)
                del self._pending[fd]
                self._reject(connection, bytes(received))

    def describe_rejections(self) -> str:
        """Say what connections were turned away, for a PeerTimeout message ('' when none)."""
        parts = []
        if self.rejected:
            parts.append(
                f"; rejected {self.rejected} connection(s) that were not podipc producers, "
                f"first bytes {self.first_rejected!r}"
            )
        if self.refused_busy:
            parts.append(f"; refused {self.refused_busy} producer(s) because one was attached")
        return "".join(parts)
