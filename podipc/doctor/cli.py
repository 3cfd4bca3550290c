"""The `podipc doctor` command: its options, then podipc.doctor does the work.

Registered on the main group by podipc.cli (imported when `doctor` is used). Only click
and podipc's core are imported here: the doctor and its tables (rich) load
inside the command, so a missing optional package is one line naming the extra that
installs it.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from typing import Any

import click

from podipc.cli import ChannelFailure, optional_packages
from podipc.errors import ChannelUnavailable, PeerTimeout


@click.command(name="doctor")
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
    if serve_address and peer_address:
        raise click.UsageError("--serve and --peer exclude each other: run one in each container")
    with optional_packages("doctor"):
        from podipc import doctor as checkup

        if not as_json:
            importlib.import_module("rich")  # the tables need it: say so before examining
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
