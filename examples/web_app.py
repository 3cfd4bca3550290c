"""An asyncio web app (aiohttp) that hands every request's log line to a sidecar over podipc.

    python examples/web_app.py --port 8080 --logs unix://@web-logs

The loop never blocks on the sidecar: a send that must wait for room (the sidecar lags)
suspends only the request that logs, for at most --send-timeout seconds, and a line that
cannot be handed over is counted, not raised. Stopping the app (SIGTERM, Ctrl-C) ends the
stream, so the sidecar sees the end of this app's stream after its last line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

import podipc
import podipc.aio

SEND_TIMEOUT = 0.5
"""Seconds a request waits for room on a lagging sidecar before its log line is dropped (and counted)."""
LOGS = web.AppKey("logs", podipc.aio.AsyncProducer)
COUNTS = web.AppKey("counts", dict)


def make_app(logs_url: str, send_timeout: float = SEND_TIMEOUT) -> web.Application:
    """The app: GET /hello, logged to the sidecar at `logs_url`, and GET /health (not logged)."""

    async def open_logs(app: web.Application) -> AsyncIterator[None]:
        async with podipc.aio.producer(logs_url) as logs:  # opening never waits for the sidecar
            app[LOGS] = logs
            yield  # the app serves; leaving ends the stream (waits, off the loop, for the sidecar's ack)
        print(f"web app: {app[COUNTS]}", file=sys.stderr)

    @web.middleware
    async def log_request(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.monotonic()
        response = await handler(request)
        if request.path == "/health":  # the kubelet's probes stay out of the logs
            return response
        line = f"{request.method} {request.path_qs} {response.status} {(time.monotonic() - started) * 1000:.2f}ms"
        try:
            await request.app[LOGS].send(line.encode(), timeout=send_timeout)
            request.app[COUNTS]["logged"] += 1
        except podipc.PodIPCError as error:  # Timeout (the sidecar lags), PeerTimeout (no sidecar yet), PeerGone
            request.app[COUNTS]["dropped"] += 1
            print(f"web app: log line dropped: {error}", file=sys.stderr)
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.query.get('name', 'world')}\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(middlewares=[log_request])
    app[COUNTS] = {"logged": 0, "dropped": 0}
    app.cleanup_ctx.append(open_logs)
    app.router.add_get("/hello", hello)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    """Serve until SIGTERM or Ctrl-C (aiohttp runs the cleanup that ends the log stream)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--logs", default="unix://@web-logs", help="the sidecar's channel URL")
    parser.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT, help="seconds a log line may wait for room")
    arguments = parser.parse_args()
    web.run_app(make_app(arguments.logs, arguments.send_timeout), host="127.0.0.1", port=arguments.port, print=None)


if __name__ == "__main__":
    main()
