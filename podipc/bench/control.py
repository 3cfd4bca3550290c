"""The bench's control connection: JSON lines over loopback TCP, shared by the containers of a pod.

The server listens on a fixed port (default 47700, `--control-port`,
PODIPC_BENCH_CONTROL_PORT); the client connects, retrying until its wait runs out, so
either may start first. Messages, one JSON object per line, each with a "type":

    client -> server  hello {protocol, run_id, directory}   server -> hello {facts}
    client -> server  cell {cell}                            server -> ready | failed {status, reason}
    client -> server  go | abort                             server -> done {count, wall, cpu, error}
    client -> server  bye
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from podipc.errors import PeerGone, PeerTimeout, ProtocolError

PROTOCOL_VERSION = 2
DEFAULT_CONTROL_PORT = 47700
MAX_LINE_BYTES = 1 << 20
CONNECT_RETRY_SECONDS = 0.05


class Control:
    """One end of the control connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, kind: str, **fields: Any) -> None:
        """Send one message of type `kind`."""
        self.sock.sendall(json.dumps({"type": kind, **fields}).encode() + b"\n")

    def recv(self, timeout: float | None = None, expect: tuple[str, ...] = ()) -> dict[str, Any]:
        """The next message (at most `timeout` seconds); ProtocolError when its type is not in `expect`."""
        self.sock.settimeout(timeout)
        try:
            line = self.reader.readline(MAX_LINE_BYTES)
        except TimeoutError as exc:
            raise PeerTimeout(f"bench control: no answer from the peer within {timeout} s") from exc
        except OSError as exc:
            raise PeerGone(f"bench control: connection lost: {exc}") from exc
        if not line:
            raise PeerGone("bench control: the peer closed the connection")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"bench control: not a JSON line: {line[:80]!r}") from exc
        if not isinstance(message, dict) or "type" not in message:
            raise ProtocolError(f"bench control: not a message: {line[:80]!r}")
        if expect and message["type"] not in expect:
            raise ProtocolError(f"bench control: expected {' or '.join(expect)}, got {message['type']!r}")
        return message

    def close(self) -> None:
        """Close the connection."""
        self.reader.close()
        self.sock.close()


class ControlListener:
    """The server's listening socket (bound at once, so a client may connect before accept)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1)
        self.port: int = self.sock.getsockname()[1]

    def accept(self, wait: float | None) -> Control:
        """Wait at most `wait` seconds for the client."""
        self.sock.settimeout(wait)
        try:
            sock, _ = self.sock.accept()
        except TimeoutError as exc:
            raise PeerTimeout(f"bench server: no client connected to port {self.port} within {wait} s") from exc
        sock.settimeout(None)
        return Control(sock)

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()


def connect(host: str, port: int, wait: float) -> Control:
    """Connect to the bench server, retrying for up to `wait` seconds (it may start later)."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect((host, port))
            return Control(sock)
        except OSError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise PeerTimeout(
                    f"bench client: no server on {host}:{port} within {wait} s "
                    "(start `podipc bench --role server` in the other container)"
                ) from exc
            time.sleep(CONNECT_RETRY_SECONDS)
