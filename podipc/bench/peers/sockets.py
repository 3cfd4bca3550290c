"""Raw stream and datagram sockets with no podipc layer: the baselines of tcp://, unix:// and udp://.

RawTCP is also the base of the other peers that can run across two containers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from podipc.bench.subjects import (
    LOSSY_RECV_TIMEOUT_SECONDS,
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    Receiver,
    Sender,
    Subject,
)
from podipc.errors import EndOfStream, PeerTimeout

FRAME_HEADER = struct.Struct("!I")
UDP_MAX_PAYLOAD = 65507
UDP_RECEIVE_BUFFER = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
CLOSE_WAIT_SECONDS = 5.0
SMALL_FRAME = 16384
"""Frames up to this size are joined with their header into one send; larger ones use sendmsg."""


def missing_package(module: str, extra: str = "peers") -> str | None:
    """Why a peer's package cannot be used here (and the extra that installs it), or None."""
    if importlib.util.find_spec(module) is None:
        return f"Python package {module!r} is not installed: pip install 'podipc[{extra}]'"
    return None


def wait_for(deadline: float, what: str) -> None:
    """Sleep a moment before trying again; PeerTimeout once the deadline passed."""
    if time.monotonic() >= deadline:
        raise PeerTimeout(f"{what}: the peer did not appear")
    time.sleep(0.005)


# --- stream sockets: TCP and Unix ---------------------------------------------------


class StreamSender:
    """Length-prefixed frames over a connected stream socket; close = shutdown + wait for the peer's close."""

    def __init__(self, family: int, address: Any) -> None:
        self.family, self.address = family, address
        self.sock: socket.socket | None = None
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS

    def _connect(self) -> socket.socket:
        while True:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                wait_for(self.deadline, f"connect {self.address}")
                continue
            if self.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            return sock

    def send(self, data: Buffer) -> None:
        """Send one frame."""
        sock = self.sock or self._connect()
        length = len(data) if type(data) is not memoryview else data.nbytes
        if length <= SMALL_FRAME:
            sock.sendall(FRAME_HEADER.pack(length) + data)
            return
        sent = sock.sendmsg([FRAME_HEADER.pack(length), data])
        total = length + FRAME_HEADER.size
        if sent < total:
            rest = memoryview(data).cast("B")
            skip = sent - FRAME_HEADER.size
            if skip < 0:
                sock.sendall(FRAME_HEADER.pack(length)[sent:])
                skip = 0
            sock.sendall(rest[skip:])

    def close(self) -> None:
        """Half-close, then wait until the receiver has read everything and closed."""
        sock = self.sock or self._connect()
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(CLOSE_WAIT_SECONDS)
        try:
            sock.recv(1)
        finally:
            sock.close()

    def abort(self) -> None:
        """Close at once."""
        if self.sock is not None:
            self.sock.close()


class StreamReceiver:
    """Listens at open, accepts on the first recv, reads frames with MSG_WAITALL."""

    def __init__(self, family: int, address: Any) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(1)
        self.address = address
        self.sock: socket.socket | None = None

    def _accept(self, timeout: float | None = None) -> socket.socket:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        self.sock = sock
        return sock

    def recv(self) -> bytes:
        """The next frame's payload; EndOfStream when the sender has closed."""
        sock = self.sock or self._accept()
        header = sock.recv(4, socket.MSG_WAITALL)
        if len(header) < 4:
            if not header:
                raise EndOfStream("the sender closed")
            header += sock.recv(4 - len(header), socket.MSG_WAITALL)
        (length,) = FRAME_HEADER.unpack(header)
        payload = sock.recv(length, socket.MSG_WAITALL)
        while len(payload) < length:
            more = sock.recv(length - len(payload), socket.MSG_WAITALL)
            if not more:
                raise EndOfStream("the sender closed inside a frame")
            payload += more
        return payload

    def idle(self, seconds: float) -> None:
        """Wait for a connection and a frame that should not come."""
        try:
            sock = self.sock or self._accept(seconds)
            sock.settimeout(seconds)
            try:
                sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.settimeout(None)
        except TimeoutError:
            return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close the connection and the listener, unlink a socket file."""
        if self.sock is not None:
            self.sock.close()
        self.listener.close()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


class RawTCP(Subject):
    """A TCP socket on loopback with length-prefixed frames: the raw baseline of tcp://."""

    name, kind = "raw-tcp", "raw"
    baseline_of: str | None = "tcp"

    def availability(self) -> str | None:
        """Always available."""
        return None

    def size_problem(self, size: int) -> str | None:
        """Any size fits a stream."""
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A free loopback port per link."""
        return {"a": str(free_port("tcp")), "b": str(free_port("tcp"))}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Connect on the first send."""
        return StreamSender(socket.AF_INET, ("127.0.0.1", int(resources[key])))

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Listen now."""
        return StreamReceiver(socket.AF_INET, ("127.0.0.1", int(resources[key])))


class RawUnix(RawTCP):
    """A Unix stream socket with length-prefixed frames: the raw baseline of unix://."""

    name, baseline_of = "raw-unix", "unix"
    shared_places = frozenset({"directory"})

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A socket path per link in the shared directory."""
        return {key: place.path(key, ".raw.sock") for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Connect on the first send."""
        return StreamSender(socket.AF_UNIX, resources[key])

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Bind and listen now."""
        return StreamReceiver(socket.AF_UNIX, resources[key])

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Remove socket files left by a failed cell."""
        for path in resources.values():
            with contextlib.suppress(OSError):
                os.unlink(path)


# --- UDP -----------------------------------------------------------------------------


class UDPSender:
    """One datagram per message; close sends a few empty datagrams (they may be lost too)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.send: Callable[[Buffer], int] = self.sock.send

    def close(self) -> None:
        """Send the end marker three times, 1 ms apart."""
        for _ in range(3):
            try:
                self.sock.send(b"")
            except ConnectionRefusedError:
                break
            time.sleep(0.001)
        self.sock.close()

    def abort(self) -> None:
        """Close at once."""
        self.sock.close()


class UDPReceiver:
    """Bound at open; each recv waits at most LOSSY_RECV_TIMEOUT_SECONDS (TimeoutError)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # the receive buffer udp:// asks for, so both lose alike
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(LOSSY_RECV_TIMEOUT_SECONDS)
        receive = self.sock.recv

        def recv() -> bytes:
            data = receive(UDP_MAX_PAYLOAD)
            if not data:
                raise EndOfStream("udp: end marker")
            return data

        self.recv = recv

    def idle(self, seconds: float) -> None:
        """Wait for a datagram that should not come."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(UDP_MAX_PAYLOAD, socket.MSG_PEEK)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(LOSSY_RECV_TIMEOUT_SECONDS)
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class RawUDP(RawTCP):
    """A UDP socket on loopback, one datagram per message: the raw baseline of udp:// (lossy)."""

    name, lossy, baseline_of = "raw-udp", True, "udp"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A free loopback UDP port per link."""
        return {"a": str(free_port("udp")), "b": str(free_port("udp"))}

    def size_problem(self, size: int) -> str | None:
        """A datagram on IPv4 carries at most 65,507 bytes."""
        if size > UDP_MAX_PAYLOAD:
            return f"a UDP datagram carries at most {UDP_MAX_PAYLOAD} bytes (IPv4)"
        return None

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """A connected datagram socket."""
        return UDPSender(int(resources[key]))

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """A bound datagram socket."""
        return UDPReceiver(int(resources[key]))
