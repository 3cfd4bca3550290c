"""Request/reply: `podipc.client(url).call(request, timeout)` and `podipc.server(url).serve(handler)`.

Address:
    unix:///shared/app.sock  unix://@name  tcp://127.0.0.1:PORT
    [?wait=30&mode=0600&max_message_size=64MiB]
    wait               seconds a client's first call waits for the server to appear (default 30;
                       none/forever: no limit); the server waits for clients forever
    mode               octal permissions of the socket file (unix:///path), as for unix://
    max_message_size   largest request and reply body in bytes, the same on both sides

Requires:
    Nothing beyond the standard library.

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
