"""Request/reply: `podipc.client(url).call(request, timeout)` and `podipc.server(url).serve(handler)`.

Address:
    unix:///shared/app.sock  unix://@name  tcp://127.0.0.1:PORT
    [?wait=30&mode=0600&max_message_size=64MiB]
    shm:///name  [?wait=30&mode=0600&capacity=8MiB&max_message_size=...&spin=0.0005]
    wait               seconds a client's first call waits for the server to appear (default 30;
                       none/forever: no limit); the server waits for clients forever
    mode               octal permissions of the socket file (unix:///path) or the rings' objects
    max_message_size   largest request and reply body in bytes, the same on both sides (shm://:
                       default the ring's half less the 16-byte call header)
    capacity, spin     shm:// only: bytes of each ring, and its spin before sleeping (as shm://)

Requires:
    Nothing beyond the standard library (shm://: what shm:// needs, a shared /dev/shm).

Semantics:
    One connection per client, both ways (the stream transports' sockets, listening and
    connecting with their code: podipc.rpc.sockets). A server accepts any number of
    clients and answers them from one thread (podipc.rpc.replying); a client carries any
    number of calls in flight, from any number of threads (podipc.rpc.requesting). Every
    frame opens with a call header (kind, call id, deadline; podipc.rpc.wire,
    docs/wire/rpc.md), so replies may come in any order. A call's timeout travels as a
    deadline: the server skips a request that expired before its turn, the client raises
    Timeout for that call only and drops a late reply. A server that dies (SIGKILL too)
    closes its connections: every call in flight raises PeerGone, and the next call
    connects again (waiting up to `wait` for the server to be back). A handler's exception
    becomes the call's RemoteError; the server goes on. A client sending bytes that are
    not request/reply is dropped and counted (`rejected`); the others go on.
    The server creates the socket file (unix:///path) at open and removes it at close.

    Over shm:///NAME (podipc.rpc.rings, .ring_client, .ring_server): a pair ring each way,
    NAME.request (the server's, created at open) and NAME.reply (the client's, created on its
    first call), opened with the shm transport's endpoints, so their objects are created,
    trusted and cleaned by its rules. The calls, deadlines, RemoteError, PeerGone (the
    rings' presence files: a killed server is seen within about 0.2 s) and ChannelClosed are
    as above. One client at a time per NAME: another client's call raises
    ChannelUnavailable while one is attached; the server serves client after client (a
    closed or killed client ends its session). podipc.aio's client runs over the sockets only.
    Wire: docs/wire/rpc.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from podipc.address import Address, parse_address
from podipc.errors import AddressError
from podipc.options import resolve_options
from podipc.stream import MAX_MESSAGE_OPTION

from .replying import Call, Handler, Server, Serving
from .requesting import Client
from .sockets import SCHEMES as SOCKET_SCHEMES

if TYPE_CHECKING:
    from .ring_client import RingClient
    from .ring_server import RingServer

__all__ = [
    "RPC_OPTIONS",
    "SCHEMES",
    "Call",
    "Client",
    "Handler",
    "RingClient",
    "RingServer",
    "Server",
    "Serving",
    "client",
    "server",
]

RPC_OPTIONS = (MAX_MESSAGE_OPTION,)
"""The options of request/reply over the stream sockets beyond the common ones (wait, mode)."""
RING_SCHEME = "shm"
SCHEMES = (*SOCKET_SCHEMES, RING_SCHEME)
"""The schemes request/reply runs over: the stream sockets (one connection per client) and shm:// (a ring each way)."""


def _checked(url: str) -> Address:
    address = parse_address(url)
    if address.scheme not in SCHEMES:
        raise AddressError(
            f"request/reply runs over {', '.join(s + '://' for s in SCHEMES)}, not {address.scheme}://; "
            "use unix://@name, tcp://127.0.0.1:PORT or shm:///name"
        )
    return address


def client(url: str, **options: object) -> Client | RingClient:
    """Open the client side of request/reply at `url` (unix://, tcp:// or shm://; options override the URL's query).

    Opening never blocks: the first call connects, waiting up to `wait` seconds for the server.
    Raises AddressError for a bad URL or option, or a scheme request/reply does not run over.
    """
    address = _checked(url)
    if address.scheme == RING_SCHEME:
        from .ring_client import RingClient
        from .rings import RING_RPC_OPTIONS

        return RingClient(address, resolve_options(address, RING_RPC_OPTIONS, options))
    return Client(address, resolve_options(address, RPC_OPTIONS, options))


def server(url: str, **options: object) -> Server | RingServer:
    """Open the server side of request/reply at `url`: listens at once; answer with serve(handler) or iteration.

    Raises AddressError (bad URL or option, another scheme), ChannelUnavailable (cannot
    listen there, or create the request ring: the fix is in the message).
    """
    address = _checked(url)
    if address.scheme == RING_SCHEME:
        from .ring_server import RingServer
        from .rings import RING_RPC_OPTIONS

        return RingServer(address, resolve_options(address, RING_RPC_OPTIONS, options))
    return Server(address, resolve_options(address, RPC_OPTIONS, options))


_RING_NAMES = {"RingClient": ".ring_client", "RingServer": ".ring_server"}


def __getattr__(name: str) -> Any:
    """The shm:// classes are imported on first use (the shm transport, posix_ipc)."""
    if name in _RING_NAMES:
        return getattr(importlib.import_module(_RING_NAMES[name], __name__), name)
    raise AttributeError(f"module 'podipc.rpc' has no attribute {name!r}")
