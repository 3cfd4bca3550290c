"""`podipc call` and `podipc reply`: request/reply from a shell, or as a sidecar.

    podipc reply unix://@app --echo                      # a server answering each request with itself
    podipc reply unix://@app --command 'tr a-z A-Z'      # CMD per request: request on stdin, reply from stdout
    podipc call unix://@app --data hello --timeout 2     # prints the reply (raw) on stdout

`reply` stops cleanly on SIGTERM/SIGINT (the calls under way are answered first) and prints
one JSON summary line; `call` exits with podipc's exit codes (11: the server's handler
failed, RemoteError). Options come from the environment too (PODIPC_URL, PODIPC_TIMEOUT,
PODIPC_COMMAND, ...; channel options PODIPC_WAIT, PODIPC_MODE, PODIPC_MAX_MESSAGE_SIZE; over shm://
also PODIPC_CAPACITY, PODIPC_SPIN).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import click

import podipc
from podipc.address import Address
from podipc.cli import EXIT_CODES, HELP_WIDTH, SignalStop, podipc_errors, url_argument
from podipc.environment import variable_name
from podipc.options import Option
from podipc.rpc import RPC_OPTIONS

from .replying import Handler

COMMAND_ERROR_LINES = 5
"""How many of its last stderr lines a failed --command's error reply carries."""


class RequestReplyCommand(click.Command):
    """call, reply: their help ends with signals and exit codes."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Append signals and exit codes (computed when help is asked for)."""
        errors = ", ".join(
            f"{code} {cls.__name__}" for cls, code in sorted(EXIT_CODES.items(), key=lambda item: item[1])
        )
        text = (
            "Signals: SIGTERM (the kubelet's stop) or SIGINT stop `reply` cleanly, also as a container's PID 1: "
            "the requests under way are answered, every client is disconnected (their calls in flight raise "
            f"PeerGone), the socket file removed, the summary line printed; exit {128 + signal.SIGTERM} (SIGTERM) "
            f"or {128 + signal.SIGINT} (SIGINT). Exit codes: 0 done; 1 any other error; {errors}."
        )
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text("\b\n" + textwrap.fill(text, HELP_WIDTH))


class CommandFailed(Exception):
    """The --command of `podipc reply` exited non-zero; the client's RemoteError says how, and its stderr's end."""


def rpc_environment(address: Address) -> dict[str, str]:
    """Request/reply options set by PODIPC_* variables (wait, mode, max_message_size; shm:// capacity, spin too)
    and not by the URL's query."""
    options: tuple[Option, ...] = RPC_OPTIONS
    if address.scheme == "shm":
        from podipc.rpc.rings import RING_RPC_OPTIONS

        options = RING_RPC_OPTIONS
    names = ("wait", "mode", *(option.name for option in options))
    found = {}
    for name in names:
        value = os.environ.get(variable_name(name), "")
        if value.strip() and name not in address.options:
            found[name] = value
    return found


@click.command(cls=RequestReplyCommand)
@url_argument
@click.option("--data", "-d", "data", envvar="PODIPC_DATA", help="The request: this text (UTF-8).")
@click.option("--stdin", "from_stdin", is_flag=True, help="The request: all of standard input, as it is.")
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=None,
    envvar="PODIPC_TIMEOUT",
    help="Seconds to wait for the reply (default: no limit; the server must appear within the wait option).",
)
def call(url: Address, data: str | None, from_stdin: bool, timeout: float | None) -> None:
    """Send one request to the server at URL and print its reply (raw bytes) on stdout."""
    if (data is None) == (not from_stdin):
        raise click.UsageError("give the request: --data TEXT or --stdin")
    request = sys.stdin.buffer.read() if from_stdin else str(data).encode()
    with podipc_errors(), podipc.client(url.url, **rpc_environment(url)) as client:
        reply = client.call(request, timeout)
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()


@click.command(cls=RequestReplyCommand)
@url_argument
@click.option("--echo", is_flag=True, help="Answer each request with the request itself.")
@click.option(
    "--command",
    "command",
    envvar="PODIPC_COMMAND",
    help="Run this shell command per request: the request on its stdin, the reply is its stdout; "
    "a non-zero exit answers with an error (the client exits 11, RemoteError).",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    envvar="PODIPC_WORKERS",
    help="How many requests are handled at once (threads; 1: one at a time, in arrival order).",
)
def reply(url: Address, echo: bool, command: str | None, workers: int) -> None:
    """Answer requests at URL until stopped (SIGTERM/SIGINT); print a JSON summary line."""
    if echo == (command is not None):
        raise click.UsageError("give what answers: --echo or --command CMD")
    handler: Handler = bytes if echo else command_handler(str(command))
    started = time.monotonic()
    with SignalStop() as stop, podipc_errors(), podipc.server(url.url, **rpc_environment(url)) as server:
        stop.add(server)
        server.serve(handler, workers=workers)
    summary = {
        "role": "server",
        "url": url.url,
        "clients": server.clients,
        "calls": server.calls,
        "replied": server.replied,
        "failed": server.failed,
        "expired": server.expired,
        "rejected": server.rejected,
        "seconds": round(time.monotonic() - started, 6),
    }
    click.echo(json.dumps({**summary, **stop.fields()}, separators=(", ", ": ")))
    stop.exit()


def command_handler(command: str) -> Handler:
    """A handler running `command` in a shell per request (request on stdin, reply from stdout)."""

    def run(request: bytes) -> bytes:
        finished = subprocess.run(command, shell=True, input=request, capture_output=True, check=False)
        if finished.stderr:
            sys.stderr.buffer.write(finished.stderr)
            sys.stderr.buffer.flush()
        if finished.returncode != 0:
            said = finished.stderr.decode("utf-8", "replace").strip().splitlines()[-COMMAND_ERROR_LINES:]
            detail = f": {' | '.join(said)}" if said else ""
            raise CommandFailed(f"{shlex.quote(command)} exited with {finished.returncode}{detail}")
        return finished.stdout

    return run
