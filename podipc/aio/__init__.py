"""podipc.aio: asyncio endpoints with the same URLs, options, errors and end of stream as the sync API.

    async with podipc.aio.producer("unix://@logs") as out:
        await out.send(b"hello")

    async with podipc.aio.consumer("unix://@logs") as inbox:
        async for message in inbox:          # stops at the end of stream
            ...
        message = await inbox.recv(timeout=1.0)

How it waits: a call makes one non-blocking attempt and, when it must wait, registers the
endpoint's readiness descriptor and its waker with loop.add_reader/add_writer: no thread, no
hop per message. Every channel has such a descriptor (sysvmq:// through one helper thread
per endpoint that feeds an eventfd; the README's Lifecycle table says which is which); a
transport written without the non-blocking hooks runs its blocking calls on ONE helper
thread per endpoint (not per message).

Cancellation: an attempt never half-happens, so cancelling a task blocked in recv() loses
no message (the next recv() gets it) and cancelling send() leaves the message sent whole or
not at all; asyncio.timeout() works. close() (sync, from any thread, a signal handler or a
loop callback) wakes every waiting task with ChannelClosed; aclose() ends a producer's
stream without blocking the loop.

Request/reply: `podipc.aio.client(url)` -> `await client.call(request, timeout=)`, any number
of tasks in flight over one connection (podipc.aio.rpc); serve with the sync podipc.server.

anyio: works under anyio's asyncio backend (it is asyncio). Under trio there is no asyncio
loop: the first call raises RuntimeError ("no running event loop"); there, use the sync
endpoints with `await trio.lowlevel.wait_readable(endpoint.fileno())` and try_recv()/
try_send(), or anyio.to_thread.
"""

from __future__ import annotations

from podipc.aio.endpoints import AsyncConsumer, AsyncProducer, consumer, producer
from podipc.aio.rpc import AsyncClient, client

__all__ = ["AsyncClient", "AsyncConsumer", "AsyncProducer", "client", "consumer", "producer"]
