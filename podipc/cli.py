"""The `podipc` command: parse options, call the library, print. No channel logic lives here.

The core commands (produce, consume, run, channels, clean) are here; `bench` and
`doctor` live beside their libraries (podipc/bench/cli.py, podipc/doctor/cli.py) and are
imported only when used, so a missing optional package of theirs is one line naming
the extra to install, and `produce`/`consume` start without loading them.

Every option can also come from the environment (PODIPC_...), because manifests set
roles by environment; so can every channel option of the URL's transport (PODIPC_WAIT,
PODIPC_DEPTH...: podipc.environment; the URL's query wins). Errors become one line on
stderr and a non-zero exit code. SIGTERM and SIGINT stop produce/consume/run cleanly
(podipc.signals.close_on_signals): summary printed, stream ended, objects removed, exit
128 + the signal's number.

Why one module of ~770 lines: produce, consume and run share their options, summary
lines, framing, signal handling and exit codes, which are most of the file; split, each
command's module would import all of them back, and a reader of one command would open
three files to see its whole life.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import textwrap
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
    RemoteError,
    Timeout,
)
from podipc.extras import install_hint
from podipc.payloads import (
    READ_SIZE,
    Framing,
    MessageWriter,
    RateLimiter,
    StreamSummary,
    generated_messages,
    read_messages,
)
from podipc.signals import close_on_signals, signal_exit_code, signal_name
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
    RemoteError: 11,
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

    lazy_commands: ClassVar[dict[str, str]] = {
        "bench": "podipc.bench.cli:bench",
        "call": "podipc.rpc.cli:call",
        "doctor": "podipc.doctor.cli:doctor",
        "reply": "podipc.rpc.cli:reply",
    }
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


DRAIN_SECONDS = 1.0
"""After SIGTERM/SIGINT: how long a consumer keeps receiving for its producer's end of stream, and how long a
producer's close waits for the consumer to take it (the pod's grace period is longer; 2 s is the promise)."""
HELP_WIDTH = 92
SIGNALS_HELP = "\b\n" + textwrap.fill(
    "Signals: SIGTERM (the kubelet's stop) or SIGINT end it cleanly, also as a container's PID 1. "
    "A producer stops sending and ends the stream (the consumer gets everything sent, then the end of "
    f"stream); a consumer with a producer attached keeps receiving for up to --drain seconds (default "
    f"{DRAIN_SECONDS:g}) for that end of stream. Both remove what they created, print their summary line with "
    f'"stopped_by" and exit {128 + signal.SIGTERM} (SIGTERM) or {128 + signal.SIGINT} (SIGINT). '
    "A second signal stops at once.",
    HELP_WIDTH,
)


def exit_codes_help() -> str:
    """The exit codes, as the help of produce, consume and run lists them (README.md has the same list)."""
    errors = ", ".join(f"{code} {cls.__name__}" for cls, code in sorted(EXIT_CODES.items(), key=lambda item: item[1]))
    text = (
        f"Exit codes: 0 the stream ended (every message delivered); 1 any other error; {errors}; "
        f"{128 + signal.SIGINT} stopped by SIGINT, {128 + signal.SIGTERM} stopped by SIGTERM, cleanly (summary "
        "printed, stream ended, objects removed; a stop that itself failed exits with the code of its error)."
    )
    return "\b\n" + textwrap.fill(text, HELP_WIDTH)


def environment_help() -> str:
    """Which PODIPC_* variables set channel options, derived from the transports' descriptors."""
    from podipc.environment import option_variables
    from podipc.transport import schemes

    every = len(schemes())
    lines = ["\b", "Channel options also come from the environment, for the URL's transport only:"]
    for name, readers in sorted(option_variables().items()):
        lines.append(f"  {name:<26} {'every channel' if len(readers) == every else ', '.join(readers)}")
    lines.append("A URL query option wins over its variable (?wait=5 beats PODIPC_WAIT); empty means unset.")
    return "\n".join(lines)


class ChannelCommand(click.Command):
    """produce, consume, run: their help ends with signals, exit codes and the channel option variables."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Append signals, exit codes and environment (computed when help is asked for, not at import)."""
        for part in (SIGNALS_HELP, exit_codes_help(), environment_help()):
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(part)


def environment_options(address: Address) -> dict[str, str]:
    """The channel options PODIPC_* variables set for this URL's transport (the URL's query wins)."""
    from podipc.environment import options_from_environment

    return options_from_environment(address)


class SignalStop(close_on_signals):
    """close_on_signals for a command: its summary lines say whether a signal stopped it, and so does its exit code.

    A signal that comes after the summary was printed (the stream had ended) does not change the
    exit code: the code follows what the last summary line reported.
    """

    reported: int | None = None

    def fields(self, **extra: object) -> dict[str, object]:
        """The summary fields saying a signal stopped the command (nothing when none came); remembered for exit()."""
        self.reported = self.received
        if self.reported is None:
            return {}
        return {"stopped_by": signal_name(self.reported), **extra}

    def exit(self) -> None:
        """Exit with the code of the signal the summary reported, or with that of the error its stop raised."""
        if self.reported is None:
            return
        if self.errors:
            raise ChannelFailure(self.errors[0])
        sys.exit(signal_exit_code(self.reported))


FRAMING_OPTION = click.option(
    "--framing",
    type=click.Choice([framing.value for framing in Framing]),
    default=Framing.LINES.value,
    show_default=True,
    envvar="PODIPC_FRAMING",
    help="How --stdin is cut into messages and --output written: lines (one message per line, without its "
    "newline), length (4-byte big-endian length, then the bytes) or raw (what each read returns).",
)


SUBSCRIBERS_OPTION = click.option(
    "--subscribers",
    type=click.IntRange(1, 64),
    default=None,
    help="Broadcast on shm://, unix:// or tcp:// to N subscribers: adds pattern=broadcast&subscribers=N to URL "
    "(the producer waits for N before its first message; each subscriber joins a slot). PODIPC_PATTERN and "
    "PODIPC_SUBSCRIBERS do the same from the environment.",
)


def with_subscribers(url: Address, subscribers: int | None) -> Address:
    """`url` as a broadcast channel with `subscribers` slots (--subscribers), or as given when None."""
    if subscribers is None:
        return url
    options = {**url.options, "pattern": "broadcast", "subscribers": str(subscribers)}
    base = url.url.partition("?")[0]
    return parse_address(base + "?" + "&".join(f"{name}={value}" for name, value in options.items()))


def drain_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The --drain option (PODIPC_DRAIN): seconds a stop by signal may wait for the other side."""
    return click.option(
        "--drain",
        type=click.FloatRange(0),
        default=DRAIN_SECONDS,
        show_default=True,
        envvar="PODIPC_DRAIN",
        help=help_text,
    )


@main.command(cls=ChannelCommand)
@url_argument
@click.option(
    "--count",
    "-n",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    envvar="PODIPC_COUNT",
    help="Messages to send (with --stdin: at most this many when given; default there: all of standard input).",
)
@click.option(
    "--size",
    "-s",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    envvar="PODIPC_SIZE",
    help="Bytes per message; with --random the largest size; with --stdin --framing raw the largest chunk "
    f"(default there: {READ_SIZE}).",
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
    help="Send standard input, cut into messages by --framing; each is sent as soon as it is read.",
)
@FRAMING_OPTION
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
@click.option(
    "--name",
    default=None,
    help="Join a fan-in consumer (consume --producers N) under this name, unique among its live producers "
    "(unix://, tcp://, mq://, sysvmq://, zmq+ipc://, zmq+tcp://; the same as the URL option name= and PODIPC_NAME).",
)
@SUBSCRIBERS_OPTION
@click.option(
    "--consumers",
    type=click.IntRange(min=1),
    default=None,
    help="Work queue (mq:// and sysvmq://): wait until this many consumers (consume 'URL?pattern=queue') share "
    "the queue before the first message; implies pattern=queue (the URL option consumers= and PODIPC_CONSUMERS).",
)
@drain_option("After SIGTERM/SIGINT: seconds the end of stream may wait for the consumer to take it.")
@click.pass_context
def produce(
    ctx: click.Context,
    url: Address,
    count: int,
    size: int,
    randomize: bool,
    from_stdin: bool,
    framing: str,
    seed: int,
    rate: float,
    timeout: float | None,
    name: str | None,
    subscribers: int | None,
    consumers: int | None,
    drain: float,
) -> None:
    """Send messages to URL, then end the stream; print a JSON summary line."""
    url = with_subscribers(url, subscribers)
    if randomize and from_stdin:
        raise click.UsageError("--random and --stdin exclude each other")
    if from_stdin and framing == Framing.RAW.value and size == 0:
        raise click.UsageError("--framing raw needs --size > 0 (the largest chunk)")
    summary = StreamSummary("producer", url.url)
    started = time.monotonic()
    with SignalStop(close_timeout=drain) as stop:
        try:
            with podipc_errors():
                options: dict[str, object] = {**environment_options(url)}
                if name is not None:
                    options["name"] = name
                if consumers is not None:
                    options.update(pattern="queue", consumers=consumers)
                channel = podipc.producer(url.url, **options)
                with channel:
                    stop.add(channel)
                    if from_stdin:
                        chunk_size = size if given(ctx, "size") else READ_SIZE
                        limit = count if given(ctx, "count") else 0
                        messages = stdin_messages(channel, Framing(framing), chunk_size, limit, stop)
                    else:
                        for skipped in generated_messages(channel.resumed_at, size, randomize, seed):
                            summary.add(skipped)
                        messages = generated_messages(count, size, randomize, seed, start=channel.resumed_at)
                    send_all(channel, messages, summary, RateLimiter(rate, stop.sleep), timeout, stop)
        except ChannelFailure as failure:
            if stop.received is not None:
                print_summary(summary, error=failure.format_message(), **stop.fields())
            raise
    extra: dict[str, object] = {"seconds": round(time.monotonic() - started, 6), "resumed_at": channel.resumed_at}
    extra.update(channel.summary_fields())
    if stop.errors:
        extra["error"] = f"{type(stop.errors[0]).__name__}: {stop.errors[0]}"
    print_summary(summary, **extra, **stop.fields())
    stop.exit()


def given(ctx: click.Context, parameter: str) -> bool:
    """True when an option was given (on the command line or by its variable), not left at its default."""
    source = ctx.get_parameter_source(parameter)
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def stdin_messages(
    channel: podipc.Producer, framing: Framing, chunk_size: int, count: int, stop: SignalStop
) -> Iterator[bytes]:
    """Standard input framed as `framing`, at most `count` messages (0: all), ending early at a signal."""

    def too_large(size: int) -> MessageTooLarge:
        return MessageTooLarge(size, channel.max_message_size, channel.max_message_source, channel.max_message_fix)

    messages = read_messages(
        sys.stdin.buffer.fileno(),
        framing,
        chunk_size=min(chunk_size, channel.max_message_size),
        max_size=channel.max_message_size,
        too_large=too_large,
        stop_fd=stop.fileno(),
    )
    try:
        for index, message in enumerate(messages, 1):
            yield message
            if index == count:
                return
    except OSError as error:
        raise OneLineError(f"cannot read standard input: {error.strerror or error}") from error


def send_all(
    channel: podipc.Producer,
    messages: Iterable[bytes],
    summary: StreamSummary,
    limiter: RateLimiter,
    timeout: float | None,
    stop: SignalStop,
) -> None:
    """Send every message, counting each one once it is handed to the channel; end early (quietly) at a signal."""
    send, add, wait = channel.send, summary.add, limiter.wait
    try:
        for message in messages:
            wait()
            send(message, timeout)
            add(message)
    except ChannelClosed:
        if stop.received is None:
            raise


@main.command(cls=ChannelCommand)
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
    help="Write the payloads to FILE ('-' for stdout; the summary then goes to stderr), framed by --framing.",
)
@FRAMING_OPTION
@click.option(
    "--serve",
    is_flag=True,
    envvar="PODIPC_SERVE",
    help="Keep consuming across producer restarts: one summary line per producer session, waiting for the next "
    "forever; a signal ends serving (a last line counts every session).",
)
@click.option(
    "--producers",
    type=click.IntRange(0),
    default=None,
    help="Fan-in: take many named producers (produce --name) and end once this many ended their streams "
    "(0: until stopped); the summary line lists each producer (unix://, tcp://, mq://, sysvmq://, zmq+ipc://, zmq+tcp://; the same as the URL "
    "options pattern=fanin&producers=N, or PODIPC_PRODUCERS=N).",
)
@SUBSCRIBERS_OPTION
@drain_option("After SIGTERM/SIGINT: seconds to keep receiving for the producer's end of stream.")
def consume(
    url: Address,
    count: int,
    timeout: float | None,
    output: IO[bytes] | None,
    framing: str,
    serve: bool,
    producers: int | None,
    subscribers: int | None,
    drain: float,
) -> None:
    """Receive messages from URL until the end of stream; print a JSON summary line."""
    url = with_subscribers(url, subscribers)
    if serve and (count or timeout is not None):
        raise click.UsageError("--serve takes no --count or --timeout: it consumes every session until stopped")
    if serve and producers is not None:
        raise click.UsageError("--serve and --producers exclude each other: a fan-in consumer takes every producer")
    emit = print_summary if output is None or output.name != "<stdout>" else print_summary_to_stderr
    writer = MessageWriter(output, Framing(framing)) if output is not None else None
    with SignalStop(drain=drain) as stop:
        if serve:
            serve_sessions(url, writer, emit, stop)
        else:
            consume_stream(url, count, timeout, writer, emit, stop, producers)
    stop.exit()


Emit = Callable[..., None]


def consume_stream(
    url: Address,
    count: int,
    timeout: float | None,
    writer: MessageWriter | None,
    emit: Emit,
    stop: SignalStop,
    producers: int | None = None,
) -> None:
    """Consume one stream to its end (or `count` messages, or a signal) and print its summary.

    `producers`: fan-in (podipc.fanin), ending once that many producers ended their streams (0: never).
    """
    summary = StreamSummary("consumer", url.url)
    started = time.monotonic()
    channel = None
    ended = False
    options: dict[str, object] = {**environment_options(url)}
    if producers is not None:
        options.update(pattern="fanin", producers=producers)
    try:
        with podipc_errors():
            channel = podipc.consumer(url.url, **options)
            with channel:
                stop.add(channel)
                ended = receive_all(channel, summary, count, timeout, writer, stop)
    except ChannelFailure as failure:
        emit(summary, error=failure.format_message(), **counters(channel), **stop.fields(end_of_stream=ended))
        raise
    emit(
        summary,
        seconds=round(time.monotonic() - started, 6),
        **counters(channel),
        **stop.fields(end_of_stream=ended),
    )


SESSION_ERRORS = (PeerGone, ProtocolError)
"""What ends one producer's session under --serve without ending serving (a producer died or sent garbage)."""


def serve_sessions(url: Address, writer: MessageWriter | None, emit: Emit, stop: SignalStop) -> None:
    """Consume every producer session on `url` until a signal: one summary line per session, then a total."""
    from podipc.serving import serve

    total = StreamSummary("consumer", url.url)
    done = 0
    sessions = stop.add(serve(url.url, **environment_options(url)))
    try:
        with podipc_errors():
            for inbox in sessions:
                summary = StreamSummary("consumer", url.url)
                started = time.monotonic()
                ended, error = False, None
                try:
                    ended = receive_all(inbox, summary, 0, None, writer, stop)
                except PeerTimeout:
                    continue  # a wait the URL or PODIPC_WAIT set ran out with no producer: wait again
                except SESSION_ERRORS as failure:
                    error = f"{type(failure).__name__}: {failure}"
                if not ended and error is None and not summary.messages:
                    continue  # stopped while waiting for a producer: no session to report
                done += 1
                fields: dict[str, object] = {
                    "session": sessions.opened,
                    "seconds": round(time.monotonic() - started, 6),
                }
                if error is not None:
                    fields["error"] = error
                emit(summary, **fields, **counters(inbox), **stop.fields(end_of_stream=ended))
                total.messages += summary.messages
                total.bytes += summary.bytes
    except ChannelFailure as failure:
        emit_total(emit, total, done, error=failure.format_message(), **stop.fields())
        raise
    emit_total(emit, total, done, **stop.fields())


def emit_total(emit: Emit, total: StreamSummary, sessions: int, **extra: object) -> None:
    """The last line of --serve: every session counted (no digest: each session's line has its own)."""
    fields = total.as_dict(sessions=sessions, **extra)
    del fields["sha256"]
    emit_fields(emit, fields)


def emit_fields(emit: Emit, fields: dict[str, object]) -> None:
    """Print a ready dict as the summary line, on the stream `emit` uses."""
    click.echo(json.dumps(fields, separators=(", ", ": ")), err=emit is print_summary_to_stderr)


def counters(channel: podipc.Consumer | None) -> dict[str, object]:
    """The consumer's non-zero loss and skip counters, its resume point, (fan-in) its producers and its own
    summary fields (a broadcast subscriber's slot and loss), for the summary line."""
    if channel is None:
        return {}
    extra: dict[str, object] = {"resumed_at": channel.resumed_at}
    if channel.lost:
        extra["lost"] = channel.lost
    if channel.skipped:
        extra["skipped"] = channel.skipped
    extra.update(channel.summary_fields())
    return extra


def print_summary_to_stderr(summary: StreamSummary, **extra: object) -> None:
    """Print the JSON summary on stderr (when stdout carries the payloads)."""
    click.echo(json.dumps(summary.as_dict(**extra), separators=(", ", ": ")), err=True)


def receive_all(
    channel: podipc.Consumer,
    summary: StreamSummary,
    count: int,
    timeout: float | None,
    writer: MessageWriter | None,
    stop: SignalStop,
) -> bool:
    """Receive until the end of stream (True), `count` messages or a signal (False), digesting and writing each.

    With a writer, output is flushed whenever no message is waiting, so a reader of the
    output sees each message as soon as the channel has no other at once.
    """
    recv, add = channel.recv, summary.add
    try:
        if writer is None:
            while not count or summary.messages < count:
                add(recv(timeout))
            return False
        try_recv, write = channel.try_recv, writer.write
        while not count or summary.messages < count:
            message = try_recv()
            if message is None:
                writer.flush()
                message = recv(timeout)
            add(message)
            write(message)
        return False
    except EndOfStream:
        return True
    except ChannelClosed:
        if stop.received is None:
            raise
        return False
    finally:
        if writer is not None:
            flush_output(writer)


def flush_output(writer: MessageWriter) -> None:
    """Flush the output; a reader that went away is one line, not a traceback."""
    try:
        writer.flush()
    except OSError as error:
        raise OneLineError(f"cannot write the output: {error.strerror or error}") from error


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


@main.command(cls=ChannelCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
