"""The `podipc` command: parse options, call the library, print. No channel logic lives here.

Every option can also come from the environment (PODIPC_...), because manifests set
roles by environment. Errors become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

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
from podipc.payloads import RateLimiter, StreamSummary, generated_messages, stdin_chunks

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


class ChannelFailure(click.ClickException):
    """A PodIPCError turned into one line on stderr and its exit code."""

    def __init__(self, error: PodIPCError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.exit_code = exit_code_of(error)

    def show(self, file: IO[Any] | None = None) -> None:
        """Print 'podipc: error: ...' on one line."""
        click.echo(f"podipc: error: {self.format_message()}", err=True)


@contextmanager
def podipc_errors() -> Iterator[None]:
    """Turn PodIPCError raised inside into a ChannelFailure for click."""
    try:
        yield
    except PodIPCError as error:
        raise ChannelFailure(error) from error


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


@main.command(name="channels")
@click.option("--json", "as_json", is_flag=True, envvar="PODIPC_JSON", help="One JSON object per channel.")
def channels_command(as_json: bool) -> None:
    """List every channel, whether it works on this host, and how to fix it when not."""
    rows = podipc.channels()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.__dict__))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("scheme", "usable", "max message (bytes)", "example", "why not / fix")
    for row in rows:
        table.add_row(
            row.scheme,
            "yes" if row.usable else "no",
            "" if row.max_message_size is None else f"{row.max_message_size:,}",
            row.example,
            row.reason,
        )
    Console(width=200).print(table)


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


@main.command(name="doctor")
@click.option("--json", "as_json", is_flag=True, envvar="PODIPC_JSON", help="Print the report as one JSON line.")
@click.option(
    "--require",
    "required",
    multiple=True,
    metavar="SCHEME",
    envvar="PODIPC_REQUIRE",
    help="Exit 3 when this channel (e.g. shm, mq) cannot work here; repeatable.",
)
@click.option(
    "--url",
    "urls",
    multiple=True,
    envvar="PODIPC_DOCTOR_URLS",
    help="A channel URL to check (path length, shared volume...); repeatable; PODIPC_URL is checked too.",
)
@click.option(
    "--serve",
    "serve_address",
    is_flag=False,
    flag_value="127.0.0.1:7099",
    default=None,
    metavar="[ADDRESS]",
    envvar="PODIPC_DOCTOR_SERVE",
    help="Publish this container's facts for a peer at ADDRESS ([HOST:]PORT, default 127.0.0.1:7099).",
)
@click.option(
    "--peer",
    "peer_address",
    is_flag=False,
    flag_value="127.0.0.1:7099",
    default=None,
    metavar="[ADDRESS]",
    envvar="PODIPC_DOCTOR_PEER",
    help="Compare with the container serving at ADDRESS (default 127.0.0.1:7099).",
)
@click.option(
    "--exchange",
    multiple=True,
    type=click.Path(file_okay=False),
    envvar="PODIPC_DOCTOR_EXCHANGE",
    help="Also publish/look in this directory (a volume both mount): compares pods sharing nothing else.",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    envvar="PODIPC_DOCTOR_WAIT",
    help="With --peer: seconds to look for the server.",
)
@click.option(
    "--serve-for",
    type=click.FloatRange(0),
    default=None,
    envvar="PODIPC_DOCTOR_SERVE_FOR",
    help="With --serve: stop after this many seconds (default: until stopped).",
)
@click.option("--once", is_flag=True, envvar="PODIPC_DOCTOR_ONCE", help="With --serve: stop after the first peer.")
def doctor(
    as_json: bool,
    required: tuple[str, ...],
    urls: tuple[str, ...],
    serve_address: str | None,
    peer_address: str | None,
    exchange: tuple[str, ...],
    wait: float,
    serve_for: float | None,
    once: bool,
) -> None:
    """Report what this pod shares, what each channel can do here, and how to fix what it cannot."""
    from podipc import doctor as checkup

    if serve_address and peer_address:
        raise click.UsageError("--serve and --peer exclude each other: run one in each container")
    try:
        rendezvous = checkup.parse_rendezvous(serve_address or peer_address or checkup.DEFAULT_ADDRESS)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serve/--peer") from exc
    report = checkup.examine(checkup.configured_urls(urls), required)
    if peer_address:
        report.peer = checkup.find_peer(report.facts, rendezvous, exchange, wait)
    if serve_address:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the published objects are withdrawn
        with checkup.DoctorServer(report.facts, rendezvous, exchange) as server:
            report.serving = {"address": str(rendezvous), "token": server.token, "published": server.published}
            print_doctor_report(report, as_json)
            served = server.serve(serve_for, once)
        if not as_json:
            click.echo(f"podipc doctor: served {served} peer(s) at {rendezvous}", err=True)
    else:
        print_doctor_report(report, as_json)
    if report.unmet:
        raise ChannelFailure(ChannelUnavailable("required channel unusable here: " + " | ".join(report.unmet)))
    if report.peer is not None and not report.peer.found:
        raise ChannelFailure(PeerTimeout(report.peer.problems[0]))


def print_doctor_report(report: Any, as_json: bool) -> None:
    """Print a doctor report as one JSON line or as tables."""
    if as_json:
        click.echo(json.dumps(report.as_dict(), separators=(",", ":")))
        return
    from rich.console import Console

    from podipc.doctor.render import render

    console = Console(width=None if sys.stdout.isatty() else 160)
    for part in render(report):
        console.print(part)


def _bench_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@main.command()
@click.option(
    "--channels",
    default="all",
    show_default=True,
    envvar=["PODIPC_BENCH_CHANNELS", "PODIPC_CHANNELS"],
    help="Comma-separated schemes to measure (tcp,udp,unix,mq,sysvmq,shm,file,zmq+tcp,zmq+ipc) or 'all'; "
    "peer names (raw-tcp, raw-ring, iceoryx2...) may be listed too.",
)
@click.option(
    "--sizes",
    default="64,4KiB,64KiB,1MiB",
    show_default=True,
    envvar=["PODIPC_BENCH_SIZES", "PODIPC_SIZES"],
    help="Comma-separated message sizes in bytes (suffixes KiB, MiB); at least 8 bytes each.",
)
@click.option(
    "--mode",
    "bench_mode",
    type=click.Choice(["latency", "throughput", "both"]),
    default="both",
    show_default=True,
    envvar=["PODIPC_BENCH_MODE"],
    help="Ping-pong round trips, one-way streaming, or both.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0.01),
    default=None,
    envvar=["PODIPC_BENCH_DURATION"],
    help="Seconds of measuring per cell (default 0.5; 0.08 with --quick).",
)
@click.option(
    "--idle",
    "idle_seconds",
    type=click.FloatRange(0),
    default=None,
    envvar=["PODIPC_BENCH_IDLE"],
    help="Seconds of the idle-consumer CPU probe, at the smallest size (default 1; 0.2 with --quick).",
)
@click.option("--quick", is_flag=True, envvar=["PODIPC_BENCH_QUICK"], help="Short cells: the whole run in seconds.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv", "markdown"]),
    default="table",
    show_default=True,
    envvar=["PODIPC_BENCH_FORMAT", "PODIPC_FORMAT"],
    help="Report format.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    envvar=["PODIPC_BENCH_OUTPUT", "PODIPC_OUTPUT"],
    help="Write the report to FILE instead of stdout.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    envvar=["PODIPC_BENCH_PLOT"],
    help="Also write a PNG plot (needs matplotlib: podipc[plot]).",
)
@click.option(
    "--peers",
    is_flag=True,
    envvar=["PODIPC_BENCH_PEERS"],
    help="Also measure raw primitives and other libraries (pyzmq, multiprocessing, faster-fifo, iceoryx2).",
)
@click.option(
    "--role",
    type=click.Choice(["local", "server", "client"]),
    default="local",
    show_default=True,
    envvar=["PODIPC_BENCH_ROLE", "PODIPC_ROLE"],
    help="local: start the peer process here; server/client: one per container of a pod.",
)
@click.option(
    "--control-host",
    default="127.0.0.1",
    show_default=True,
    envvar=["PODIPC_BENCH_CONTROL_HOST"],
    help="Address of the control connection (the server listens, the client connects).",
)
@click.option(
    "--control-port",
    type=click.IntRange(1, 65535),
    default=47700,
    show_default=True,
    envvar=["PODIPC_BENCH_CONTROL_PORT"],
    help="Port of the control connection (pod mode).",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    envvar=["PODIPC_BENCH_WAIT", "PODIPC_WAIT"],
    help="Seconds to wait for the other container.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default="",
    envvar=["PODIPC_BENCH_DIR"],
    help="Directory both containers share, for socket and spool paths (default: a new one in /dev/shm).",
)
@click.option("--quiet", "-q", is_flag=True, envvar=["PODIPC_BENCH_QUIET", "PODIPC_QUIET"], help="No progress bar.")
def bench(
    channels: str,
    sizes: str,
    bench_mode: str,
    duration: float | None,
    idle_seconds: float | None,
    quick: bool,
    output_format: str,
    output: str | None,
    plot_path: str | None,
    peers: bool,
    role: str,
    control_host: str,
    control_port: int,
    wait: float,
    directory: str,
    quiet: bool,
) -> None:
    """Compare channels inside one pod: latency, throughput and CPU per channel and message size."""
    from podipc.bench import report as bench_report
    from podipc.bench import runner
    from podipc.channel import parse_size

    try:
        chosen = list(podipc.address.SCHEMES) if channels.strip() == "all" else _bench_list(channels)
        plan = runner.Plan(
            channels=chosen,
            sizes=[parse_size(size) for size in _bench_list(sizes)],
            modes=list(runner.MODES) if bench_mode == "both" else [bench_mode],
            seconds=duration if duration is not None else (runner.QUICK_SECONDS if quick else runner.DEFAULT_SECONDS),
            idle_seconds=idle_seconds
            if idle_seconds is not None
            else (runner.QUICK_IDLE_SECONDS if quick else runner.DEFAULT_IDLE_SECONDS),
            quick=quick,
            peers=peers,
            role=role,
            control_host=control_host,
            control_port=control_port,
            wait=wait,
            directory=directory,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if role == "server":
        with podipc_errors():
            runner.run_server(plan, None if quiet else lambda line: click.echo(line, err=True))
        return
    with podipc_errors(), _bench_progress(quiet) as progress:
        result = runner.run(plan, progress)
    text = bench_report.render(result, output_format)
    if output:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        click.echo(text, nl=False)
    if plot_path:
        try:
            bench_report.plot(result, plot_path)
        except bench_report.PlotUnavailable as exc:
            raise click.ClickException(str(exc)) from exc


@contextmanager
def _bench_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal (and not --quiet); else no hook."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("bench", total=None)

        def update(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        yield update


if __name__ == "__main__":
    main()
