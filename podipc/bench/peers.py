"""The same jobs with no podipc layer: raw primitives and the libraries people would use instead.

Each peer is written the way a careful person would by hand: length-prefixed frames
and MSG_WAITALL on stream sockets, one datagram per message on UDP, posix_ipc and
sysv_ipc queues used directly, a busy-poll mmap ring (podipc.bench.ring), pyzmq
PUSH/PULL, multiprocessing Pipe and Queue, faster-fifo, and iceoryx2 publish-subscribe.
An empty message (or the peer's own marker) ends a stream, so bench messages are
never empty (they carry an 8-byte sequence number).

Optional peers (faster-fifo, iceoryx2: `pip install 'podipc[peers]'`) that are not
installed are listed as skipped with the reason. multiprocessing-based peers need a
parent and child process and are skipped across containers (pod mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import multiprocessing
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from podipc.address import sysv_key_from_name
from podipc.bench.ring import SPIN_BEFORE_YIELD, RingReceiver, RingSender, ring_capacity_for
from podipc.bench.subjects import (
    LOSSY_RECV_TIMEOUT_SECONDS,
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    Receiver,
    Sender,
    Subject,
)
from podipc.errors import EndOfStream, PeerTimeout, Timeout
from podipc.proc import read_int

FRAME_HEADER = struct.Struct("!I")
UDP_MAX_PAYLOAD = 65507
UDP_RECEIVE_BUFFER = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
CLOSE_WAIT_SECONDS = 5.0
SMALL_FRAME = 16384
"""Frames up to this size are joined with their header into one send; larger ones use sendmsg."""


def _missing(module: str, extra: str = "peers") -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"Python package {module!r} is not installed: pip install 'podipc[{extra}]'"
    return None


def _wait_until(deadline: float, what: str) -> None:
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
                _wait_until(self.deadline, f"connect {self.address}")
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


# --- POSIX message queue -----------------------------------------------------------


class PosixMQSender:
    """Opens the receiver's queue on the first send; an empty message ends the stream."""

    def __init__(self, name: str) -> None:
        self.name = "/" + name
        self.queue: Any = None
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS

    def _open(self) -> Any:
        import posix_ipc

        while True:
            try:
                self.queue = posix_ipc.MessageQueue(self.name, read=False)
            except posix_ipc.ExistentialError:
                _wait_until(self.deadline, f"mq {self.name}")
                continue
            self.send = self.queue.send  # type: ignore[method-assign]
            return self.queue

    def send(self, data: Buffer) -> None:
        """Send one message (blocks while the queue is full)."""
        (self.queue or self._open()).send(data)

    def close(self) -> None:
        """Send the end marker, wait (bounded) until the queue drained, close."""
        queue = self.queue or self._open()
        queue.send(b"")
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while queue.current_messages and time.monotonic() < deadline:
            time.sleep(0.0005)
        queue.close()

    def abort(self) -> None:
        """Close without the end marker."""
        if self.queue is not None:
            self.queue.close()


class PosixMQReceiver:
    """Creates the queue at open and unlinks it at close."""

    def __init__(self, name: str, size: int) -> None:
        import posix_ipc

        self.queue = posix_ipc.MessageQueue(
            "/" + name,
            posix_ipc.O_CREX,
            mode=0o600,
            # the kernel limits, as mq:// uses them by default, so both queues are alike
            max_messages=read_int("/proc/sys/fs/mqueue/msg_max") or 10,
            max_message_size=max(size, read_int("/proc/sys/fs/mqueue/msgsize_max") or size),
        )
        receive = self.queue.receive

        def recv() -> bytes:
            data: bytes = receive()[0]
            if not data:
                raise EndOfStream("mq: end marker")
            return data

        self.recv = recv
        self.busy_error = posix_ipc.BusyError

    def idle(self, seconds: float) -> None:
        """Wait for a message that should not come."""
        try:
            self.queue.receive(seconds)
        except self.busy_error:
            return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close and unlink the queue."""
        self.queue.close()
        with contextlib.suppress(Exception):
            self.queue.unlink()


class RawPosixMQ(RawTCP):
    """posix_ipc.MessageQueue used directly: the raw baseline of mq://."""

    name, baseline_of = "raw-posix-mq", "mq"

    def availability(self) -> str | None:
        """posix_ipc and /dev/mqueue support."""
        return _missing("posix_ipc", "posix_ipc") or (
            None if os.path.exists("/proc/sys/fs/mqueue/msgsize_max") else "no POSIX message queues here"
        )

    def size_problem(self, size: int) -> str | None:
        """At most /proc/sys/fs/mqueue/msgsize_max bytes."""
        limit = read_int("/proc/sys/fs/mqueue/msgsize_max")
        if limit is not None and size > limit:
            return f"{size} bytes > /proc/sys/fs/mqueue/msgsize_max {limit}"
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A queue name per link."""
        return {key: place.name(key) + "r" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Open the queue on the first send."""
        return PosixMQSender(resources[key])

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the queue now."""
        return PosixMQReceiver(resources[key], size)

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Unlink queues left by a failed cell."""
        import posix_ipc

        for name in resources.values():
            with contextlib.suppress(posix_ipc.Error):
                posix_ipc.unlink_message_queue("/" + name)


# --- SysV message queue ------------------------------------------------------------

SYSV_DATA_TYPE, SYSV_END_TYPE = 1, 2
SYSV_MSGMAX = read_int("/proc/sys/kernel/msgmax") or 8192
"""sysv_ipc receives into a buffer of max_message_size bytes (default 2048): use the kernel's limit."""


class SysVSender:
    """Attaches to the receiver's queue on the first send; a message of type 2 ends the stream."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.queue: Any = None
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS

    def _open(self) -> Any:
        import sysv_ipc

        while True:
            try:
                self.queue = sysv_ipc.MessageQueue(self.key, max_message_size=SYSV_MSGMAX)
            except sysv_ipc.ExistentialError:
                _wait_until(self.deadline, f"sysvmq {self.key}")
                continue
            self.send = self.queue.send  # type: ignore[method-assign]
            return self.queue

    def send(self, data: Buffer) -> None:
        """Send one message of type 1 (blocks while the queue is full)."""
        (self.queue or self._open()).send(data)

    def close(self) -> None:
        """Send the end marker, wait (bounded) until the queue drained."""
        import sysv_ipc

        queue = self.queue or self._open()
        queue.send(b"", type=SYSV_END_TYPE)
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        try:
            while queue.current_messages and time.monotonic() < deadline:
                time.sleep(0.0005)
        except sysv_ipc.ExistentialError:
            pass

    def abort(self) -> None:
        """Nothing to free: the receiver owns the queue."""


class SysVReceiver:
    """Creates the queue at open and removes it at close."""

    def __init__(self, key: int) -> None:
        import sysv_ipc

        self.queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=SYSV_MSGMAX)
        receive = self.queue.receive

        def recv() -> bytes:
            data, kind = receive()
            if kind == SYSV_END_TYPE:
                raise EndOfStream("sysvmq: end marker")
            return data  # type: ignore[no-any-return]

        self.recv = recv
        self.busy_error = sysv_ipc.BusyError

    def idle(self, seconds: float) -> None:
        """Poll without blocking for `seconds` (sysv_ipc has no receive timeout), 1 ms apart."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.queue.receive(block=False)
            except self.busy_error:
                time.sleep(0.001)
                continue
            raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Remove the queue."""
        with contextlib.suppress(Exception):
            self.queue.remove()


class RawSysVMQ(RawTCP):
    """sysv_ipc.MessageQueue used directly: the raw baseline of sysvmq://."""

    name, baseline_of = "raw-sysv-mq", "sysvmq"

    def availability(self) -> str | None:
        """sysv_ipc installed."""
        return _missing("sysv_ipc", "sysv_ipc")

    def size_problem(self, size: int) -> str | None:
        """At most kernel.msgmax bytes per message."""
        limit = read_int("/proc/sys/kernel/msgmax")
        if limit is not None and size > limit:
            return f"{size} bytes > /proc/sys/kernel/msgmax {limit}"
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A queue key per link."""
        return {key: str(sysv_key_from_name(place.name(key) + "r")) for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Attach on the first send."""
        return SysVSender(int(resources[key]))

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the queue now."""
        return SysVReceiver(int(resources[key]))

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Remove queues left by a failed cell."""
        import sysv_ipc

        for key in resources.values():
            with contextlib.suppress(sysv_ipc.Error):
                sysv_ipc.MessageQueue(int(key)).remove()


# --- busy-poll ring -----------------------------------------------------------------


class RawRing(RawTCP):
    """A hand-written busy-poll mmap ring in /dev/shm: the raw baseline of shm://."""

    name, zero_copy_receive, baseline_of = "raw-ring", True, "shm"
    shared_places = frozenset({"dev_shm"})

    def availability(self) -> str | None:
        """Needs /dev/shm."""
        return None if os.path.isdir("/dev/shm") else "no /dev/shm here"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A ring file name per link."""
        return {key: place.name(key) + ".ring" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Map the ring on the first send."""
        return RingSender(resources[key], PEER_WAIT_SECONDS)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the ring now."""
        return RingReceiver(resources[key], ring_capacity_for(size))

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Remove ring files left by a failed cell."""
        for name in resources.values():
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")


# --- pyzmq --------------------------------------------------------------------------


class ZMQSender:
    """A PUSH socket that connects; an empty frame ends the stream."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.socket: Any = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # the first send waits for a connected peer
        self.socket.connect(endpoint)
        self.send: Callable[..., Any] = self.socket.send

    def close(self) -> None:
        """Send the end frame and close, lingering until it is delivered."""
        self.socket.send(b"")
        self.socket.close(linger=int(CLOSE_WAIT_SECONDS * 1000))

    def abort(self) -> None:
        """Close at once."""
        self.socket.close(linger=0)


class ZMQReceiver:
    """A PULL socket that binds."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.socket: Any = zmq.Context.instance().socket(zmq.PULL)
        self.socket.bind(endpoint)
        receive: Callable[[], bytes] = self.socket.recv

        def recv() -> bytes:
            data: bytes = receive()
            if not data:
                raise EndOfStream("zmq: end frame")
            return data

        self.recv = recv
        self.endpoint = endpoint

    def idle(self, seconds: float) -> None:
        """Poll for a frame that should not come."""
        if self.socket.poll(int(seconds * 1000)):
            raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close the socket."""
        self.socket.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://") :])


class PyZMQ(RawTCP):
    """pyzmq PUSH/PULL used directly: the baseline of zmq+tcp:// (or zmq+ipc://)."""

    kind = "library"

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.name = f"pyzmq-{transport}"
        self.baseline_of = f"zmq+{transport}"
        self.shared_places = frozenset({"directory"} if transport == "ipc" else set())

    def availability(self) -> str | None:
        """pyzmq installed."""
        return _missing("zmq", "zmq")

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A zmq endpoint per link."""
        if self.transport == "tcp":
            return {key: f"tcp://127.0.0.1:{free_port('tcp')}" for key in ("a", "b")}
        return {key: f"ipc://{place.path(key, '.rawzmq')}" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """PUSH, connect."""
        return ZMQSender(resources[key])

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """PULL, bind."""
        return ZMQReceiver(resources[key])


# --- iceoryx2 -----------------------------------------------------------------------

ICEORYX_BUFFER = 8
_ICEORYX_NODE: list[Any] = []


def _iceoryx_service(name: str) -> Any:
    import iceoryx2 as iox2

    if not _ICEORYX_NODE:
        iox2.set_log_level(iox2.LogLevel.Error)
        _ICEORYX_NODE.append(iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc))
    return (
        _ICEORYX_NODE[0]
        .service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .enable_safe_overflow(False)
        .subscriber_max_buffer_size(ICEORYX_BUFFER)
        .history_size(0)
        .max_publishers(1)
        .max_subscribers(1)
        .open_or_create()
    )


class IceoryxSender:
    """A publisher that waits for its subscriber, copies each message into a loaned sample, and
    retries until delivered (no loss). A zero-length sample ends the stream."""

    def __init__(self, name: str, size: int) -> None:
        import iceoryx2 as iox2

        self.service = _iceoryx_service(name)
        self.publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(max(size, 1))
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.connected = False
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS
        self.loan = self.publisher.loan_slice_uninit

    def _connect(self) -> None:
        while not self.service.dynamic_config.number_of_subscribers:
            _wait_until(self.deadline, "iceoryx2 subscriber")
        self.publisher.update_connections()
        self.connected = True

    def send(self, data: Buffer) -> None:
        """Loan a sample, copy the message in, send it."""
        if not self.connected:
            self._connect()
        length = len(data) if type(data) is not memoryview else data.nbytes
        sample = self.loan(length)
        ctypes.memmove(sample.payload_ptr, _source(data), length)
        sample.assume_init().send()

    def close(self) -> None:
        """Send the end sample and wait (bounded) for the subscriber to leave."""
        if not self.connected:
            self._connect()
        self.loan(0).assume_init().send()
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while self.service.dynamic_config.number_of_subscribers and time.monotonic() < deadline:
            time.sleep(0.0005)
        self.abort()

    def abort(self) -> None:
        """Drop the publisher."""
        self.publisher.delete()


def _source(data: Buffer) -> Any:
    """What ctypes.memmove can copy from without an extra copy: bytes as they are, else the buffer's address."""
    if type(data) is bytes:
        return data
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return bytes(data)


class IceoryxReceiver:
    """A subscriber polled in a busy loop (the Python API has no blocking receive without an event service)."""

    def __init__(self, name: str) -> None:
        self.service = _iceoryx_service(name)
        self.subscriber = self.service.subscriber_builder().buffer_size(ICEORYX_BUFFER).create()
        receive = self.subscriber.receive
        sched_yield = os.sched_yield
        holder: list[Any] = [None]

        def recv() -> memoryview:
            holder[0] = None
            sample = receive()
            spins = 0
            while sample is None:
                spins += 1
                if spins > SPIN_BEFORE_YIELD:
                    sched_yield()
                sample = receive()
            length = sample.header.number_of_elements
            if not length:
                raise EndOfStream("iceoryx2: end sample")
            holder[0] = sample
            return memoryview((ctypes.c_char * length).from_address(sample.payload_ptr)).cast("B")

        self.recv = recv
        self.holder = holder

    def idle(self, seconds: float) -> None:
        """Poll for a sample that should not come."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.subscriber.has_samples():
                raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Drop the subscriber."""
        self.holder[0] = None
        self.subscriber.delete()


class Iceoryx2(RawTCP):
    """iceoryx2 publish-subscribe over shared memory (Slice[c_uint8], busy-polled)."""

    name, kind, zero_copy_receive = "iceoryx2", "library", True
    baseline_of = None  # a library doing shm://'s job differently, not its raw primitive
    shared_places = frozenset({"dev_shm", "iceoryx2"})

    def availability(self) -> str | None:
        """iceoryx2 installed."""
        return _missing("iceoryx2")

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A service name per link."""
        return {key: place.name(key) + "-iox" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """A publisher."""
        return IceoryxSender(resources[key], size)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """A subscriber."""
        return IceoryxReceiver(resources[key])


# --- multiprocessing-based libraries (parent and child only) ---------------------------


class LocalSubject(Subject):
    """A peer whose links are objects a parent hands to its child process (not across containers)."""

    kind, local_only = "library", True

    def availability(self) -> str | None:
        """Always available (stdlib)."""
        return None

    def size_problem(self, size: int) -> str | None:
        """Any size fits."""
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """No names: the links are inherited objects."""
        return {}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Not addressable by name."""
        raise NotImplementedError("a multiprocessing peer is opened from inherited objects")

    open_receiver = open_sender  # type: ignore[assignment]

    def create_links(self, context: Any, size: int) -> dict[str, Any]:
        """The shared objects of links a and b, made in the parent."""
        raise NotImplementedError

    def sender_from(self, link: Any) -> Sender:
        """The sending end of an inherited link."""
        raise NotImplementedError

    def receiver_from(self, link: Any) -> Receiver:
        """The receiving end of an inherited link."""
        raise NotImplementedError


class CallSender:
    """A Sender made of a send callable and an end marker."""

    def __init__(self, send: Callable[[Any], Any], end: object = b"") -> None:
        self.send = send
        self.end = end

    def close(self) -> None:
        """Send the end marker."""
        self.send(self.end)

    def abort(self) -> None:
        """Nothing to free."""


class CallReceiver:
    """A Receiver made of a blocking get and a get with a timeout (raising `empty_error`)."""

    def __init__(self, get: Callable[[], Any], get_timeout: Callable[[float], Any], empty_error: Any) -> None:
        def recv() -> Any:
            data = get()
            if not data:
                raise EndOfStream("end marker")
            return data

        self.recv = recv
        self.get_timeout = get_timeout
        self.empty_error = empty_error

    def idle(self, seconds: float) -> None:
        """Wait for an item that should not come."""
        try:
            self.get_timeout(seconds)
        except self.empty_error:
            return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Nothing to free here; the parent owns the objects."""


class MPPipe(LocalSubject):
    """multiprocessing.Pipe(duplex=False): send_bytes / recv_bytes."""

    name = "mp-pipe"

    def create_links(self, context: Any, size: int) -> dict[str, Any]:
        """One one-way pipe per link."""
        return {key: context.Pipe(duplex=False) for key in ("a", "b")}

    def sender_from(self, link: Any) -> Sender:
        """The writing connection."""
        return CallSender(link[1].send_bytes)

    def receiver_from(self, link: Any) -> Receiver:
        """The reading connection (poll for the idle probe)."""
        reader = link[0]

        def get_timeout(seconds: float) -> None:
            if not reader.poll(seconds):
                raise TimeoutError
            reader.recv_bytes()

        return CallReceiver(reader.recv_bytes, get_timeout, TimeoutError)


class MPQueue(LocalSubject):
    """multiprocessing.Queue: put / get (pickled, a feeder thread per queue)."""

    name = "mp-queue"

    def create_links(self, context: Any, size: int) -> dict[str, Any]:
        """One queue per link."""
        return {key: context.Queue(64) for key in ("a", "b")}

    def sender_from(self, link: Any) -> Sender:
        """put a bytes copy (the queue pickles later, in its feeder thread)."""
        put = link.put
        return CallSender(lambda data: put(bytes(data)))

    def receiver_from(self, link: Any) -> Receiver:
        """get."""
        import queue

        return CallReceiver(link.get, lambda seconds: link.get(timeout=seconds), queue.Empty)


class FasterFifo(LocalSubject):
    """faster_fifo.Queue: put / get over a shared circular buffer."""

    name = "faster-fifo"

    def availability(self) -> str | None:
        """faster-fifo installed."""
        return _missing("faster_fifo")

    def create_links(self, context: Any, size: int) -> dict[str, Any]:
        """One queue per link, with room for a few messages of `size`."""
        import faster_fifo

        room = max(1 << 20, 8 * (size + 256))
        return {key: faster_fifo.Queue(max_size_bytes=room) for key in ("a", "b")}

    def sender_from(self, link: Any) -> Sender:
        """put (blocks while full)."""
        return CallSender(lambda data: link.put(data, block=True, timeout=3600.0))

    def receiver_from(self, link: Any) -> Receiver:
        """get."""
        import queue

        return CallReceiver(
            lambda: link.get(block=True, timeout=3600.0), lambda seconds: link.get(timeout=seconds), queue.Empty
        )


def peer_subjects() -> list[Subject]:
    """Every peer, in report order."""
    return [
        RawTCP(),
        RawUDP(),
        RawUnix(),
        RawPosixMQ(),
        RawSysVMQ(),
        RawRing(),
        PyZMQ("tcp"),
        PyZMQ("ipc"),
        Iceoryx2(),
        MPPipe(),
        MPQueue(),
        FasterFifo(),
    ]


def local_context() -> Any:
    """The multiprocessing context used for parent/child peers."""
    return multiprocessing.get_context("forkserver")


__all__ = ["Timeout", "local_context", "peer_subjects"]
