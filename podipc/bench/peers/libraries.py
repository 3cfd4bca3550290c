"""The libraries people would use instead: pyzmq, multiprocessing Pipe and Queue, faster-fifo."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any

from podipc.bench.peers.sockets import CLOSE_WAIT_SECONDS, RawTCP, missing_package
from podipc.bench.subjects import (
    READINESS,
    AsyncReceiver,
    AsyncSender,
    Buffer,
    CellPlace,
    Receiver,
    Sender,
    Subject,
)
from podipc.errors import EndOfStream

# --- pyzmq --------------------------------------------------------------------------


_MONITORS = itertools.count()


class LeaveWatch:
    """Sees the PULL a PUSH socket is connected to leave (a socket monitor's disconnect event).

    A PUSH over ipc:// that closes while its pipe is at the high-water mark loses the tail
    of the stream even with a linger (libzmq 4.3.5; a slow consumer, such as a zmq.asyncio
    PULL, hits it every time). So a sender ends its stream as the raw socket peers do: the
    end frame, then it waits for the receiver to leave, then it closes.
    """

    def __init__(self, socket: Any) -> None:
        import zmq

        endpoint = f"inproc://podipc-bench-leave-{os.getpid()}-{next(_MONITORS)}"
        socket.monitor(endpoint, zmq.EVENT_DISCONNECTED)
        self.events: Any = zmq.Context.instance().socket(zmq.PAIR)
        self.events.connect(endpoint)

    def wait(self, seconds: float) -> None:
        """Wait (at most `seconds`) until the receiver has disconnected."""
        self.events.poll(int(seconds * 1000))

    def close(self, socket: Any) -> None:
        """Stop monitoring."""
        with contextlib.suppress(Exception):
            socket.disable_monitor()
        self.events.close(linger=0)


def push_socket(context: Any, endpoint: str) -> Any:
    """A connecting PUSH socket: at most 1000 messages queued, the first send waits for a connected peer."""
    import zmq

    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 1000)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.connect(endpoint)
    return socket


class ZMQSender:
    """A PUSH socket that connects; an empty frame ends the stream."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.socket: Any = push_socket(zmq.Context.instance(), endpoint)
        self.leave = LeaveWatch(self.socket)
        self.send: Callable[..., Any] = self.socket.send

    def close(self) -> None:
        """Send the end frame, wait for the receiver to leave, close."""
        self.socket.send(b"")
        self.leave.wait(CLOSE_WAIT_SECONDS)
        self.abort()

    def abort(self) -> None:
        """Close at once."""
        self.leave.close(self.socket)
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
        close_pull(self.socket, self.endpoint)


def close_pull(socket: Any, endpoint: str) -> None:
    """Close a bound PULL socket at once and remove its ipc socket file."""
    socket.close(linger=0)
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://") :])


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
        return missing_package("zmq", "zmq")

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


class AsyncZMQSender:
    """A zmq.asyncio PUSH socket that connects; an empty frame ends the stream."""

    def __init__(self, endpoint: str) -> None:
        import zmq
        import zmq.asyncio

        self.socket: Any = push_socket(zmq.asyncio.Context.shadow(zmq.Context.instance()), endpoint)
        self.leave = LeaveWatch(self.socket)
        self.send: Callable[[Buffer], Any] = self.socket.send

    async def close(self) -> None:
        """Send the end frame, wait for the receiver to leave (off the loop), close."""
        await self.socket.send(b"")
        await asyncio.to_thread(self.leave.wait, CLOSE_WAIT_SECONDS)
        self.abort()

    def abort(self) -> None:
        """Close at once."""
        self.leave.close(self.socket)
        self.socket.close(linger=0)


class AsyncZMQReceiver:
    """A zmq.asyncio PULL socket that binds (the loop watches its FD)."""

    def __init__(self, endpoint: str) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context.shadow(zmq.Context.instance())
        self.socket: Any = context.socket(zmq.PULL)
        self.socket.bind(endpoint)
        self.endpoint = endpoint
        receive = self.socket.recv

        async def recv() -> bytes:
            data: bytes = await receive()
            if not data:
                raise EndOfStream("zmq: end frame")
            return data

        self.recv = recv

    async def idle(self, seconds: float) -> None:
        """Poll for a frame that should not come."""
        if await self.socket.poll(int(seconds * 1000)):
            raise RuntimeError("a message arrived during the idle probe")

    async def close(self) -> None:
        """Close the socket."""
        close_pull(self.socket, self.endpoint)

    def abort(self) -> None:
        """Close the socket."""
        close_pull(self.socket, self.endpoint)

    def wakeup(self) -> str:
        """zmq.asyncio waits on the socket's FD in the loop."""
        return READINESS


class PyZMQAsyncio(PyZMQ):
    """pyzmq's zmq.asyncio PULL (and PUSH for round trips) in an asyncio loop; the other side plain pyzmq."""

    api = "async"

    def __init__(self, transport: str) -> None:
        super().__init__(transport)
        self.name = f"pyzmq-asyncio-{transport}"
        self.baseline_of = None
        self.baseline = f"pyzmq-{transport}"

    def open_async_sender(self, resources: Mapping[str, str], key: str, size: int) -> AsyncSender:
        """zmq.asyncio PUSH, connect."""
        return AsyncZMQSender(resources[key])

    def open_async_receiver(self, resources: Mapping[str, str], key: str, size: int) -> AsyncReceiver:
        """zmq.asyncio PULL, bind."""
        return AsyncZMQReceiver(resources[key])


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
        return missing_package("faster_fifo")

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
