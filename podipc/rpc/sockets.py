"""Where request/reply meets the stream transports: listening, connecting and the hello, over unix:// and tcp://.

The server listens as a stream consumer does, and the client connects as a stream
producer does, with the same code (podipc.transports.unix and .tcp): a socket file with
`mode` and ownership checks (a link never followed, another user's file never replaced
or connected to, SO_PEERCRED once connected), an abstract name, a TCP port. Connecting
retries until the `wait` deadline, as a producer does, and may be woken by a waker.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from podipc.address import Address
from podipc.errors import AddressError, ChannelClosed, ChannelUnavailable, PeerTimeout, ProtocolError, Timeout
from podipc.stream import SEND_FLAGS, peer_gone
from podipc.stream_producer import CONNECT_RETRY_FIRST_SECONDS, CONNECT_RETRY_MAX_SECONDS, NOT_LISTENING_ERRNOS
from podipc.transports.tcp import listen_tcp, no_delay, tcp_endpoint
from podipc.transports.unix import UnixListener, check_socket_file, socket_address, verify_listener
from podipc.waking import POLLIN, POLLOUT, wait_for

from .wire import HELLO

SCHEMES = ("unix", "tcp")
"""The schemes request/reply runs over: the bidirectional stream sockets, one connection per client."""


def check_scheme(address: Address) -> None:
    """Raise AddressError unless request/reply runs over the address's scheme."""
    if address.scheme not in SCHEMES:
        raise AddressError(
            f"request/reply runs over {', '.join(s + '://' for s in SCHEMES)}, not {address.scheme}://; "
            "use unix://@name or tcp://127.0.0.1:PORT"
        )


def listen(address: Address, settings: Mapping[str, Any]) -> tuple[socket.socket, Callable[[], None]]:
    """A listening, non-blocking socket for a server, and what removes its traces (the socket file) at close."""
    check_scheme(address)
    if address.scheme == "unix":
        listening = UnixListener(address, int(settings["mode"]), role="server")
        listener = listening.listen()
        remove_traces = listening.remove_traces
    else:
        listener = listen_tcp(address)
        remove_traces = _nothing
    listener.setblocking(False)
    return listener, remove_traces


def _nothing() -> None:
    return None


def configure(address: Address, connection: socket.socket) -> None:
    """Options for a connected socket (TCP_NODELAY on tcp://)."""
    if address.scheme == "tcp":
        no_delay(connection)


class Connector:
    """Connects a client: retries until the server listens (or a deadline), checks who listens, says hello."""

    def __init__(self, address: Address, settings: Mapping[str, Any], wait_deadline: float) -> None:
        check_scheme(address)
        self.address = address
        self.mode = int(settings["mode"])
        self.wait = float(settings["wait"])
        self.wait_deadline = wait_deadline
        self.last_error: OSError | None = None
        self.server_seen = False

    def new_socket(self) -> tuple[socket.socket, Any, int | None]:
        """A fresh non-blocking socket, the address to connect it to, and the owner to verify (unix files)."""
        if self.address.scheme == "unix":
            expected = None if self.address.abstract else check_socket_file(self.address, self.mode)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = socket_address(self.address)
        else:
            expected = None
            family, target = tcp_endpoint(self.address)
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock, target, expected

    def refused(self, error: OSError) -> None:
        """A connection attempt failed: note it when retrying may help, else raise ChannelUnavailable."""
        if error.errno not in NOT_LISTENING_ERRNOS:
            if error.errno == errno.EACCES:
                raise ChannelUnavailable(f"no permission to connect to {self.address.location}") from error
            raise ChannelUnavailable(f"cannot connect to {self.address.location}: {error.strerror or error}") from error
        self.last_error = error

    def established(self, sock: socket.socket, expected: int | None) -> None:
        """The connection is up: check who listens (unix files), set options."""
        verify_listener(self.address, sock, expected)
        configure(self.address, sock)

    def check_answer(self, answer: bytes) -> None:
        """Raise ProtocolError unless the server's answer to the hello is the hello."""
        if answer != HELLO:
            raise ProtocolError(
                f"{self.address.location} answered {answer!r} instead of the podipc request/reply hello "
                f"{HELLO!r}; it is not a podipc server (a podipc consumer listens there?)"
            )
        self.server_seen = True

    def peer_timeout(self) -> PeerTimeout:
        """The error when no server answered within the wait deadline."""
        reason = f": {self.last_error.strerror}" if self.last_error is not None and self.last_error.strerror else ""
        return PeerTimeout(
            f"no server listening at {self.address.location} within the wait timeout (wait={self.wait:g}s)"
            f"{reason}; start the server (podipc reply) or raise wait="
        )

    def seconds_left(self, deadline: float | None) -> float | None:
        """Seconds the connecting may still wait: the first deadline reached decides (PeerTimeout, else Timeout)."""
        now = time.monotonic()
        if now >= self.wait_deadline:
            raise self.peer_timeout()
        if deadline is not None and now >= deadline:
            raise Timeout(f"no server answered at {self.address.location} within the call's timeout")
        limit = self.wait_deadline if deadline is None else min(deadline, self.wait_deadline)
        return None if limit == float("inf") else limit - now

    def connect(self, deadline: float | None, waker_fd: int, closed: Callable[[], bool]) -> socket.socket:
        """A connected, non-blocking socket past the hello; raises PeerTimeout, Timeout, ChannelClosed (woken by the waker)."""
        pause = CONNECT_RETRY_FIRST_SECONDS
        while True:
            if closed():
                raise ChannelClosed(f"the client for {self.address.location} is closed")
            seconds = self.seconds_left(deadline)
            sock, target, expected = self.new_socket()
            try:
                if self._connect_once(sock, target, deadline, waker_fd, closed):
                    self.established(sock, expected)
                    if self._hello(sock, deadline, waker_fd, closed):
                        return sock
            except BaseException:
                sock.close()
                raise
            sock.close()
            wait_for(-1, 0, waker_fd, pause if seconds is None else min(pause, seconds))
            pause = min(pause * 2, CONNECT_RETRY_MAX_SECONDS)

    def _connect_once(
        self, sock: socket.socket, target: Any, deadline: float | None, waker_fd: int, closed: Callable[[], bool]
    ) -> bool:
        code = sock.connect_ex(target)
        while code == errno.EINPROGRESS:
            wait_for(sock.fileno(), POLLOUT, waker_fd, self.seconds_left(deadline))
            if closed():
                raise ChannelClosed(f"the client for {self.address.location} is closed")
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                try:
                    sock.getpeername()
                except OSError:
                    code = errno.EINPROGRESS
        if code == 0:
            return True
        self.refused(OSError(code, os.strerror(code)))
        return False

    def _hello(self, sock: socket.socket, deadline: float | None, waker_fd: int, closed: Callable[[], bool]) -> bool:
        """Say hello and check the answer; False when the server vanished meanwhile (try again)."""
        try:
            sock.send(HELLO, SEND_FLAGS)  # 8 bytes into an empty buffer: all or an error
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.last_error = exc  # the server died between its accept and our hello (a restart): try again
            return False
        except OSError as exc:
            raise peer_gone(exc, self.address.location, "server") from exc
        answer = b""
        # a server that accepted just before the wait deadline still gets time to answer
        self.wait_deadline = max(self.wait_deadline, time.monotonic() + HELLO_ANSWER_SECONDS)
        while len(answer) < len(HELLO):
            try:
                chunk = sock.recv(len(HELLO) - len(answer))
            except BlockingIOError:
                wait_for(sock.fileno(), POLLIN, waker_fd, self.seconds_left(deadline))
                if closed():
                    raise ChannelClosed(f"the client for {self.address.location} is closed") from None
                continue
            except ConnectionResetError as exc:
                # a listener that closed with our connection in its backlog (a server dying as we came): try again;
                # one that accepted us and closed deliberately (EOF, below) is not a podipc server
                self.last_error = exc
                return False
            except OSError as exc:
                raise ProtocolError(
                    f"{self.address.location} dropped the connection instead of answering the podipc "
                    f"request/reply hello ({exc.strerror}); it is not a podipc server"
                ) from exc
            if not chunk:
                raise ProtocolError(
                    f"{self.address.location} closed the connection without answering the podipc request/reply "
                    f"hello (got {answer!r}); it is not a podipc server (a podipc consumer listens there?)"
                )
            answer += chunk
        self.check_answer(answer)
        return True


HELLO_ANSWER_SECONDS = 2.0
"""How long a client waits for the server's answer to its hello at least, even near its wait deadline."""
