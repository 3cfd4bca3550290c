"""`python -m podipc.bench serve`: the server side of a local bench run (started by the client)."""

from __future__ import annotations

import argparse
import sys

from podipc.bench.server import serve_forever_once


def main(argv: list[str] | None = None) -> int:
    """Listen, print 'listening PORT' on stdout, serve one client."""
    parser = argparse.ArgumentParser(prog="python -m podipc.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one bench client")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--wait", type=float, default=60.0)
    arguments = parser.parse_args(argv)

    def listening(port: int) -> None:
        print(f"listening {port}", flush=True)

    serve_forever_once(arguments.host, arguments.port, arguments.wait, listening)
    return 0


if __name__ == "__main__":
    sys.exit(main())
