"""The `podipc bench` command: its options, then podipc.bench does the work.

Registered on the main group by podipc.cli (imported when `bench` is used). Only click
and podipc's core are imported here: rich (the progress bar and the table) and the
bench itself load inside the command, so a missing optional package is one line
naming the extra that installs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from podipc.bench.spread import (
    APIS,
    DEFAULT_CONFIDENCE_LEVEL,
    DEFAULT_CONFIDENCE_WIDTH,
    DEFAULT_MAX_REPEAT,
    MIN_CONFIDENCE_RUNS,
    MOST_REPEATS,
)
from podipc.cli import optional_packages, podipc_errors
from podipc.options import parse_size
from podipc.transport import schemes


def _bench_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@click.command()
@click.option(
    "--channels",
    default="all",
    show_default=True,
    envvar=["PODIPC_BENCH_CHANNELS", "PODIPC_CHANNELS"],
    help="Comma-separated schemes to measure (those `podipc channels` lists) or 'all'; "
    "peer names (raw-tcp, raw-ring, iceoryx2...) may be listed too, and channels with URL options "
    "(file?sync=batch) or the aio-/batch- prefix (aio-unix); rpc-unix and rpc-tcp measure request/reply "
    "round trips (latency cells, against raw-unix/raw-tcp); fanin-unix-, fanin-tcp-, fanin-mq-, fanin-sysvmq-, fanin-zmq+ipc-, fanin-zmq+tcp-1/2/4 "
    "measure fan-in "
    "(throughput cells: N producer processes into one consumer, its aggregate msg/s against fanin-unix-1 or "
    "fanin-tcp-1); broadcast-shm-1/2/4 and broadcast-unix-1/2/4 measure one "
    "of 1, 2 or 4 broadcast subscribers (throughput cells, against shm or unix); their peers pyzmq-fanin-1/2/4 "
    "(PUSH processes into one PULL), pyzmq-broadcast-1/2/4 and iceoryx2-broadcast-1/2/4 (one of N subscriber "
    "processes); queue-mq-1/2/4, queue-sysvmq-1/2/4 (pattern=queue) and pyzmq-queue-1/2/4 (PUSH to N PULL) measure "
    "one producer into N consumer processes (aggregate msg/s, each message taken once).",
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
    "--repeat",
    type=click.IntRange(1, MOST_REPEATS),
    default=None,
    envvar=["PODIPC_BENCH_REPEAT"],
    help="Runs of every cell, the subjects of a mode and size taking turns (A B A B); figures are medians, "
    "ratios medians of side-by-side pairs (default 1; with --confidence the fewest runs, default 3).",
)
@click.option(
    "--confidence",
    "confidence",
    default=None,
    metavar="LEVEL[,WIDTH]",
    envvar=["PODIPC_BENCH_CONFIDENCE"],
    help="netperf's -I: add runs until the LEVEL % confidence interval of every key figure and ratio is at most "
    "WIDTH % of its mean (default width 10), or --max-repeat runs were made. E.g. 99,5.",
)
@click.option(
    "--max-repeat",
    type=click.IntRange(2, MOST_REPEATS),
    default=None,
    envvar=["PODIPC_BENCH_MAX_REPEAT"],
    help=f"With --confidence: the most runs of a cell (netperf's -i; default {DEFAULT_MAX_REPEAT}).",
)
@click.option(
    "--api",
    type=click.Choice(list(APIS)),
    default="sync",
    show_default=True,
    envvar=["PODIPC_BENCH_API"],
    help="async: also measure each channel's podipc.aio endpoints (aio-SCHEME) in an asyncio loop beside the sync "
    "ones, and zmq.asyncio with --peers.",
)
@click.option(
    "--batch",
    type=click.IntRange(0),
    default=0,
    envvar=["PODIPC_BENCH_BATCH"],
    help="Also measure each channel's send_many/recv_many (batch-SCHEME, one way) with this many messages per call "
    "(fewer above 4 MiB a batch); 0: not.",
)
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
    repeat: int | None,
    confidence: str | None,
    max_repeat: int | None,
    api: str,
    batch: int,
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
    with optional_packages("bench"):
        from podipc.bench import report as bench_report
        from podipc.bench import runner

        if output_format == "table" or _wants_progress(quiet):
            importlib.import_module("rich")  # the table and the progress bar need it: say so before measuring
    try:
        width, level = _confidence(confidence)
        chosen = [name for item in _bench_list(channels) for name in (schemes() if item == "all" else [item])]
        plan = runner.Plan(
            channels=chosen,
            sizes=[parse_size(size) for size in _bench_list(sizes)],
            modes=list(runner.MODES) if bench_mode == "both" else [bench_mode],
            seconds=duration if duration is not None else (runner.QUICK_SECONDS if quick else runner.DEFAULT_SECONDS),
            idle_seconds=idle_seconds
            if idle_seconds is not None
            else (runner.QUICK_IDLE_SECONDS if quick else runner.DEFAULT_IDLE_SECONDS),
            quick=quick,
            repeat=repeat if repeat is not None else (MIN_CONFIDENCE_RUNS if confidence else 1),
            max_repeat=max_repeat,
            confidence=width,
            confidence_level=level,
            api=api,
            batch=batch,
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


def _confidence(text: str | None) -> tuple[float | None, float]:
    """(width, level) from --confidence LEVEL[,WIDTH] (netperf's -I); (None, level) without it."""
    if not text:
        return None, DEFAULT_CONFIDENCE_LEVEL
    level, _, width = text.partition(",")
    try:
        return (float(width) if width else DEFAULT_CONFIDENCE_WIDTH), float(level)
    except ValueError:
        raise ValueError(f"--confidence {text!r}: LEVEL[,WIDTH] in percent, e.g. 99,5") from None


def _wants_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def _bench_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal (and not --quiet); else no hook."""
    if not _wants_progress(quiet):
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
