"""TCP stream channel: length-prefixed frames over one TCP connection.

Address:
    tcp://HOST:PORT[?wait=30&max_message_size=64MiB&coalesce=true]
    HOST is an IP address or localhost; in a pod, 127.0.0.1 reaches every container.
    wait               seconds either side waits for the other to appear (default 30)
    max_message_size   largest message in bytes, the same on both sides (default 64 MiB)
    coalesce           join back-to-back small sends into one write (default true; the
                       producer's option, see podipc.stream and the README's Batches)
    pattern            pair (default: one producer), fanin (the consumer takes many named
                       producers, podipc.fanin; a producer with name= is a fan-in producer) or
                       broadcast (the producer listens, N subscribers each get every message;
                       podipc.stream_broadcast)
    subscribers        broadcast: how many subscribers the producer's first send waits for (1-64)
    slow               broadcast: wait (default: a slow subscriber holds the producer back) or
                       drop (its messages are dropped and counted, in-band, for it alone)
    producers          fan-in consumer: end the stream once this many producers ended theirs
                       (default 0: never; > 0 implies pattern=fanin)
    name               fan-in producer: its name at the consumer (default HOSTNAME-PID-RANDOM)
    mode               accepted for symmetry; TCP creates no file

Requires:
    Nothing beyond the standard library.

Semantics:
    Boundaries and order kept (frames: 4-byte big-endian length + payload, see
    docs/wire/stream.md); reliable; flow-controlled by the kernel's socket buffers.
    Max message: the max_message_size option (podipc's default 64 MiB, at most
    4 GiB - 2 bytes); the consumer refuses larger frames with ProtocolError.
    The consumer binds and listens at open (SO_REUSEADDR) and owns the port; the
    producer connects on its first send or close, retrying until `wait`. Nothing
    is left behind: the port is free once the consumer closes.
    A connection that does not start with the podipc hello (a health probe, a
    browser) is dropped and counted; a second producer is refused. A port has no
    owner: any process of the pod's network namespace may connect (or listen first).
    Batches: send_many() is one gathered write, recv_many() cuts a whole read; a loop
    of single sends is coalesced (podipc.stream).
"""

from __future__ import annotations

import errno
import socket
from typing import ClassVar

from podipc.address import Address
from podipc.errors import ChannelUnavailable
from podipc.fanin import FanInConsumer
from podipc.framing import DEFAULT_MAX_MESSAGE_SIZE
from podipc.options import Option
from podipc.stream import LISTEN_BACKLOG, STREAM_OPTIONS, StreamConsumer, socket_problem
from podipc.stream_broadcast import StreamBroadcastProducer, StreamBroadcastSubscriber
from podipc.stream_producer import StreamProducer
from podipc.transport import AddressForm, Example, Transport, option_limit

__all__ = [
    "TRANSPORT",
    "TCPBroadcastProducer",
    "TCPBroadcastSubscriber",
    "TCPConsumer",
    "TCPFanInConsumer",
    "TCPProducer",
    "availability",
    "host_max_message_size",
    "listen_tcp",
    "no_delay",
    "tcp_endpoint",
]


def availability() -> str | None:
    """None when TCP sockets work here, else why not."""
    return socket_problem(socket.AF_INET, "TCP")


def host_max_message_size() -> int:
    """The default largest message: the max_message_size option's default (64 MiB)."""
    return DEFAULT_MAX_MESSAGE_SIZE


def tcp_endpoint(address: Address) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The address family and (host, port) to bind or connect to for a tcp:// address."""
    host = "127.0.0.1" if address.host == "localhost" else address.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, address.port)


def no_delay(connection: socket.socket) -> None:
    """Send small frames at once (TCP_NODELAY): requests and answers must not wait for Nagle."""
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen_tcp(address: Address) -> socket.socket:
    """Bind and listen on a tcp:// address (SO_REUSEADDR); ChannelUnavailable with the fix when impossible."""
    family, endpoint = tcp_endpoint(address)
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(endpoint)
        listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        listener.close()
        raise ChannelUnavailable(_bind_problem(address, exc)) from exc
    return listener


def _bind_problem(address: Address, error: OSError) -> str:
    where = address.location
    if error.errno == errno.EADDRINUSE:
        return f"{where}: port {address.port} is in use (another consumer or program listens); choose another port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {address.host} is not an address of this pod; use 127.0.0.1 or the pod IP"
    if error.errno == errno.EACCES:
        return f"{where}: ports below 1024 need privileges; use a port from 1024 to 65535"
    return f"{where}: cannot listen: {error.strerror or error}"


class TCPConsumer(StreamConsumer):
    """Receives frames on a TCP port it listens on from open until the end of stream."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS

    def _listen(self) -> socket.socket:
        return listen_tcp(self.address)

    def _configure_connection(self, connection: socket.socket) -> None:
        no_delay(connection)


class TCPFanInConsumer(FanInConsumer):
    """Receives frames from many named producers on a TCP port (pattern=fanin; podipc.fanin)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS

    def _listen(self) -> socket.socket:
        return listen_tcp(self.address)

    def _configure_connection(self, connection: socket.socket) -> None:
        no_delay(connection)


class _ConnectsOverTCP:
    """The connecting hooks of the tcp:// sides that connect (a producer, a broadcast subscriber)."""

    address: Address

    def _connection_socket(self) -> tuple[socket.socket, tuple[str, int]]:
        family, endpoint = tcp_endpoint(self.address)
        return socket.socket(family, socket.SOCK_STREAM), endpoint

    def _configure(self, sock: socket.socket) -> None:
        no_delay(sock)


class TCPProducer(_ConnectsOverTCP, StreamProducer):
    """Sends frames over a TCP connection to the consumer's port."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


class TCPBroadcastProducer(StreamBroadcastProducer):
    """Listens on a TCP port and writes every message to each subscriber (pattern=broadcast)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS

    def _listen(self) -> socket.socket:
        return listen_tcp(self.address)

    def _configure_connection(self, connection: socket.socket) -> None:
        no_delay(connection)


class TCPBroadcastSubscriber(_ConnectsOverTCP, StreamBroadcastSubscriber):
    """Connects to a broadcast producer's TCP port and reads every message (pattern=broadcast)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


TRANSPORT = Transport(
    name="tcp",
    title="TCP stream",
    schemes={"tcp": AddressForm.HOST_PORT},
    producer="podipc.transports.tcp:TCPProducer",
    consumer="podipc.transports.tcp:TCPConsumer",
    fanin_consumer="podipc.transports.tcp:TCPFanInConsumer",
    broadcast_producer="podipc.transports.tcp:TCPBroadcastProducer",
    broadcast_subscriber="podipc.transports.tcp:TCPBroadcastSubscriber",
    examples=(Example("tcp://127.0.0.1:7000", "loopback TCP", "the pod's shared network namespace"),),
    reliable=True,
    ordered=True,
    limit=option_limit(DEFAULT_MAX_MESSAGE_SIZE),
    options=STREAM_OPTIONS,
    capabilities=frozenset(),
    availability=availability,
    unusable_fix="the container cannot create TCP sockets (a seccomp profile?): allow socket(AF_INET)",
    rank=10,
)
