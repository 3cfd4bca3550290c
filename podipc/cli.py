"""The `podipc` command: parse options, call the library, print. No channel logic lives here.

The core commands (produce, consume, run, channels, clean) are here; `bench` and
`doctor` live beside their libraries (podipc/bench/cli.py, podipc/doctor/cli.py) and are
imported only when used, so a missing optional package of theirs is one line naming
the extra to install, and `produce`/`consume` start without loading them.

Every option can also come from the environment (PODIPC_...), because manifests set
roles by environment. Errors become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, ClassVar

import click

import podipc
from podipc.address import Address, parse_address
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    EndOfStream,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    PodIPCError,
    ProtocolError,
    Timeout,
)
from podipc.extras import install_hint
from podipc.payloads import RateLimiter, StreamSummary, generated_messages, stdin_chunks
from podipc.tables import text_table
from podipc.transport import channel_table

EXIT_CODES: dict[type[PodIPCError], int] = {
    AddressError: 2,
    ChannelUnavailable: 3,
    MessageTooLarge: 4,
    PeerTimeout: 5,
    Timeout: 6,
    PeerGone: 7,
    ProtocolError: 8,
    ChannelClosed: 9,
    EndOfStream: 10,
}


def exit_code_of(error: PodIPCError) -> int:
    """The documented exit code for an error (1 for any other PodIPCError)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


class OneLineError(click.ClickException):
    """An error click prints as one line, 'podipc: error: ...', on stderr."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Print 'podipc: error: ...' on one line."""
        click.echo(f"podipc: error: {self.format_message()}", err=True)


class ChannelFailure(OneLineError):
    """A PodIPCError turned into one line on stderr and its exit code."""

    def __init__(self, error: PodIPCError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self._exit_code = exit_code_of(error)

    # click declares exit_code a ClassVar; ours depends on the error, so it is a property.
    @property
    def exit_code(self) -> int:
        """The documented exit code of the error (see EXIT_CODES)."""
        return self._exit_code

    @exit_code.setter
    def exit_code(self, code: int) -> None:
        self._exit_code = code


@contextmanager
def podipc_errors() -> Iterator[None]:
    """Turn PodIPCError raised inside into a ChannelFailure for click."""
    try:
        yield
    except PodIPCError as error:
        raise ChannelFailure(error) from error


@contextmanager
def optional_packages(command: str) -> Iterator[None]:
    """Turn a missing package that a podipc extra installs into one line naming that extra."""
    try:
        yield
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        hint = install_hint(package, command) if package else None
        if hint is None:
            raise
        raise OneLineError(f"podipc {command} needs the {package} package: {hint}") from error


class AddressParam(click.ParamType):  # type: ignore[type-arg]
    """A channel URL, checked when parsed."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Address:
        """Parse the URL or fail with the parser's message."""
        if isinstance(value, Address):
            return value
        try:
            return parse_address(str(value))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)


URL = AddressParam()


def print_summary(summary: StreamSummary, **extra: object) -> None:
    """Print the one JSON line of a finished (or failed) run on stdout."""
    click.echo(json.dumps(summary.as_dict(**extra), separators=(", ", ": ")))


class PodipcGroup(click.Group):
    """The podipc command group: the core commands, plus commands imported from their packages when used."""

    lazy_commands: ClassVar[dict[str, str]] = {"bench": "podipc.bench.cli:bench", "doctor": "podipc.doctor.cli:doctor"}
    """Command name -> 'module:attribute' of a click command (their modules import only click and core)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The core commands and the lazily imported ones, sorted."""
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A core command, or import a lazily registered one."""
        reference = self.lazy_commands.get(cmd_name)
        if reference is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = reference.partition(":")
        try:
            with optional_packages(cmd_name):
                command: click.Command = getattr(importlib.import_module(module_name), attribute)
        except OneLineError as missing:
            return _unavailable_command(cmd_name, missing)
        return command


def _unavailable_command(name: str, missing: OneLineError) -> click.Command:
    """A command that cannot load here: listed with the reason, and failing with it in one line when run."""

    def fail(**_: object) -> None:
        raise missing

    return click.Command(
        name,
        callback=fail,
        help=f"Unavailable here: {missing.message}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=PodipcGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(podipc.__version__, "--version", prog_name="podipc")
def main() -> None:
    """podipc: messages between the containers of one Kubernetes pod."""


def url_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    """The URL argument, also read from PODIPC_URL."""
    return click.argument("url", type=URL, envvar="PODIPC_URL")(function)


@main.command()
@url_argument
@click.option(
    "--count",
    "-n",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    envvar="PODIPC_COUNT",
    help="Messages to send (with --stdin: at most this many, 0 for no limit).",
)
@click.option(
    "--size",
    "-s",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    envvar="PODIPC_SIZE",
    help="Bytes per message; with --random the largest size; with --stdin the chunk size.",
)
@click.option(
    "--random",
    "randomize",
    is_flag=True,
    envvar="PODIPC_RANDOM",
    help="Random sizes (0..--size) and random bytes, drawn from --seed.",
)
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    envvar="PODIPC_STDIN",
    help="Send standard input, cut into messages of --size bytes.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    envvar="PODIPC_SEED",
    help="Seed of --random messages (the same seed gives the same stream).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0),
    default=0,
    envvar="PODIPC_RATE",
    help="Messages per second at most (0: as fast as the channel takes them).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=None,
    envvar="PODIPC_TIMEOUT",
    help="Seconds each send may wait for room before failing (default: no limit).",
)
def produce(
    url: Address,
    count: int,
    size: int,
    randomize: bool,
    from_stdin: bool,
    seed: int,
    rate: float,
    timeout: float | None,
) -> None:
    """Send messages to URL, then end the stream; print a JSON summary line."""
    if randomize and from_stdin:
        raise click.UsageError("--random and --stdin exclude each other")
    summary = StreamSummary("producer", url.url)
    started = time.monotonic()
    with podipc_errors(), podipc.producer(url.url) as channel:
        if from_stdin:
            if size == 0:
                raise click.UsageError("--stdin needs --size > 0 (the chunk size)")
            messages: Iterable[bytes] = stdin_chunks(sys.stdin.buffer, size)
            if count:
                messages = (chunk for _, chunk in zip(range(count), messages, strict=False))
        else:
            for skipped in generated_messages(channel.resumed_at, size, randomize, seed):
                summary.add(skipped)
            messages = generated_messages(count, size, randomize, seed, start=channel.resumed_at)
        send_all(channel, messages, summary, RateLimiter(rate), timeout)
    print_summary(summary, seconds=round(time.monotonic() - started, 6), resumed_at=channel.resumed_at)


def send_all(
    channel: podipc.Producer,
    messages: Iterable[bytes],
    summary: StreamSummary,
    limiter: RateLimiter,
    timeout: float | None,
) -> None:
    """Send every message, counting each one once it is handed to the channel."""
    send, add, wait = channel.send, summary.add, limiter.wait
    for message in messages:
        wait()
        send(message, timeout)
        add(message)


@main.command()
@url_argument
@click.option(
    "--count",
    "-n",
    type=click.IntRange(0),
    default=0,
    envvar="PODIPC_COUNT",
    help="Stop after this many messages (0: until the end of stream).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=None,
    envvar="PODIPC_TIMEOUT",
    help="Seconds to wait for each message before failing (default: no limit).",
)
@click.option(
    "--output",
    "-o",
    type=click.File("wb"),
    default=None,
    envvar="PODIPC_OUTPUT",
    help="Write the payloads, concatenated, to FILE ('-' for stdout; the summary then goes to stderr).",
)
def consume(url: Address, count: int, timeout: float | None, output: IO[bytes] | None) -> None:
    """Receive messages from URL until the end of stream; print a JSON summary line."""
    summary = StreamSummary("consumer", url.url)
    started = time.monotonic()
    channel = None
    try:
        with podipc_errors(), podipc.consumer(url.url) as channel:
            receive_all(channel, summary, count, timeout, output)
    except ChannelFailure as failure:
        extra = counters(channel)
        emit = print_summary if output is None or output.name != "<stdout>" else print_summary_to_stderr
        emit(summary, error=failure.format_message(), **extra)
        raise
    extra = counters(channel)
    emit = print_summary if output is None or output.name != "<stdout>" else print_summary_to_stderr
    emit(summary, seconds=round(time.monotonic() - started, 6), **extra)


def counters(channel: podipc.Consumer | None) -> dict[str, int]:
    """The consumer's non-zero loss and skip counters and its resume point, for the summary line."""
    if channel is None:
        return {}
    extra = {"resumed_at": channel.resumed_at}
    if channel.lost:
        extra["lost"] = channel.lost
    if channel.skipped:
        extra["skipped"] = channel.skipped
    return extra


def print_summary_to_stderr(summary: StreamSummary, **extra: object) -> None:
    """Print the JSON summary on stderr (when stdout carries the payloads)."""
    click.echo(json.dumps(summary.as_dict(**extra), separators=(", ", ": ")), err=True)


def receive_all(
    channel: podipc.Consumer, summary: StreamSummary, count: int, timeout: float | None, output: IO[bytes] | None
) -> None:
    """Receive until the end of stream (or `count` messages), digesting and optionally writing each."""
    recv, add = channel.recv, summary.add
    write = output.write if output is not None else None
    while not count or summary.messages < count:
        try:
            message = recv(timeout)
        except EndOfStream:
            return
        add(message)
        if write is not None:
            write(message)


CHANNEL_COLUMNS = ("scheme", "usable", "max message (bytes)", "example", "why not / fix")


@main.command(name="channels")
@click.option("--json", "as_json", is_flag=True, envvar="PODIPC_JSON", help="One JSON object per channel.")
@click.option(
    "--markdown",
    "as_markdown",
    is_flag=True,
    help="Print the README's channel table: what each channel declares, not what works on this host.",
)
def channels_command(as_json: bool, as_markdown: bool) -> None:
    """List every channel, whether it works on this host, and how to fix it when not."""
    if as_markdown:
        click.echo(channel_table(), nl=False)
        return
    rows = podipc.channels()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.__dict__))
        return
    cells = [
        (
            row.scheme,
            "yes" if row.usable else "no",
            "" if row.max_message_size is None else f"{row.max_message_size:,}",
            row.example,
            row.reason,
        )
        for row in rows
    ]
    click.echo(text_table(CHANNEL_COLUMNS, cells))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--role",
    type=click.Choice(["producer", "consumer"]),
    required=True,
    envvar="PODIPC_ROLE",
    help="Which side to run (PODIPC_ROLE in a manifest).",
)
@click.pass_context
def run(ctx: click.Context, role: str) -> None:
    """Run `produce` or `consume` by --role / PODIPC_ROLE, every other option from PODIPC_* variables."""
    command = produce if role == "producer" else consume
    with command.make_context(command.name or role, list(ctx.args), parent=ctx) as sub_context:
        command.invoke(sub_context)


@main.command()
@click.option("--dry-run", is_flag=True, envvar="PODIPC_DRY_RUN", help="List the leftovers without removing them.")
@click.option(
    "--dir",
    "directories",
    multiple=True,
    type=click.Path(file_okay=False),
    envvar="PODIPC_CLEAN_DIRS",
    help="Also look in this directory (a spool or socket emptyDir); /dev/shm is always searched.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per leftover.")
def clean(dry_run: bool, directories: tuple[str, ...], as_json: bool) -> None:
    """Remove what killed podipc processes left behind (queues, segments, semaphores, socket and lock files).

    Only what it can prove: objects a dead podipc process of this same user recorded for its
    channel, and only when no live side of that channel remains. Anything else at a presence
    path (another user's file, a FIFO, a link, an object it cannot prove) is refused, with why.
    """
    from podipc.clean import remove, survey

    found = survey(("/dev/shm", *directories))
    failures = 0
    for leftover in found.leftovers:
        action = "would remove" if dry_run else "removed"
        if not dry_run:
            try:
                if not remove(leftover):
                    action = "kept (its channel is alive again)"
            except PodIPCError as error:
                action, failures = f"failed: {error}", failures + 1
        if as_json:
            record = {"kind": leftover.kind, "name": leftover.name, "holder": leftover.holder}
            click.echo(json.dumps({**record, "action": action.split(":")[0].split(" (")[0]}))
        else:
            click.echo(f"{action}: {leftover.describe()}")
    for refusal in found.refused:
        if as_json:
            record = {"kind": refusal.kind, "name": refusal.name, "holder": "", "action": "refused"}
            click.echo(json.dumps({**record, "reason": refusal.reason}))
        else:
            click.echo(f"refused: {refusal.describe()}")
    if not found.leftovers and not found.refused and not as_json:
        click.echo("nothing to clean")
    if failures:
        raise click.ClickException(f"{failures} leftover(s) could not be removed")


if __name__ == "__main__":
    main()
