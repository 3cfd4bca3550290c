"""The server side of a bench: open this side of each cell, echo (latency) or stream (throughput).

In local mode the client starts it as `python -m podipc.bench serve`; in pod mode it is
`podipc bench --role server` in the other container. One client session, then it returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import podipc
from podipc.bench import facts
from podipc.bench.cells import CONTROL_TIMEOUT_SECONDS, Catalog, Cell, Opener, abort_ends, describe, watchdog
from podipc.bench.control import PROTOCOL_VERSION, Control, ControlListener
from podipc.bench.fanin import FanInSender
from podipc.bench.pattern_peers import PatternSender
from podipc.bench.subjects import (
    BatchSender,
    Receiver,
    Sender,
    Subject,
)
from podipc.bench.workloads import echo, stream, stream_batches
from podipc.errors import ChannelUnavailable, MessageTooLarge


def open_server_ends(opener: Opener) -> tuple[Sender, Receiver | None]:
    """Latency: receive on a, send on b. Throughput: send on a."""
    if opener.cell.mode == "latency":
        receiver = opener.receiver("a")
        try:
            return opener.sender("b"), receiver
        except BaseException:
            receiver.close()
            raise
    return opener.sender("a"), None


def run_server_side(subject: Subject, cell: Cell, sender: Sender, receiver: Receiver | None) -> dict[str, Any]:
    """Echo or stream (every producer of a fan-in cell); the count, wall and CPU seconds of this side."""
    if receiver is not None:
        count, effort = echo(receiver, sender, subject.lossy)
    elif isinstance(sender, FanInSender | PatternSender):
        count, effort = sender.stream(cell.size, cell.seconds, cell.max_count)
    elif isinstance(sender, BatchSender):
        count, effort = stream_batches(sender, cell.size, cell.seconds, cell.max_count, max(cell.batch, 1))
    else:
        count, effort = stream(sender, cell.size, cell.seconds, cell.max_count)
    return {"count": count, "wall": effort.wall, "cpu": effort.cpu}


def serve_cell(control: Control, subjects: Catalog, cell: Cell) -> None:
    """Open this side of one cell, wait for go, run it, report done."""
    subject = subjects.get(cell.subject)
    if subject is None:
        control.send("failed", status="error", reason=f"the server does not know {cell.subject!r}")
        return
    try:
        sender, receiver = open_server_ends(Opener(subject, cell))
    except MessageTooLarge as exc:
        control.send("failed", status="unsupported", reason=str(exc))
        subject.cleanup(cell.resources)
        return
    except ChannelUnavailable as exc:
        control.send("failed", status="skipped", reason=str(exc))
        subject.cleanup(cell.resources)
        return
    except Exception as exc:  # every failure is reported in the cell, the run goes on
        control.send("failed", status="error", reason=f"server could not open: {describe(exc)}")
        subject.cleanup(cell.resources)
        return
    control.send("ready")
    if control.recv(CONTROL_TIMEOUT_SECONDS, expect=("go", "abort"))["type"] == "abort":
        abort_ends(sender, receiver)
        subject.cleanup(cell.resources)
        return
    try:
        with watchdog(cell.time_limit + 5):
            result = run_server_side(subject, cell, sender, receiver)
    except Exception as exc:  # reported to the client
        abort_ends(sender, receiver)
        subject.cleanup(cell.resources)
        control.send("done", count=0, wall=0.0, cpu=0.0, error=f"server: {describe(exc)}")
        return
    control.send("done", error=None, **result)


def serve(control: Control) -> None:
    """Serve one client session: hello, cells until bye."""
    hello = control.recv(CONTROL_TIMEOUT_SECONDS, expect=("hello",))
    if hello.get("protocol") != PROTOCOL_VERSION:
        control.send("failed", status="error", reason=f"protocol {hello.get('protocol')} != {PROTOCOL_VERSION}")
        return
    probes = hello.get("probes") or {}
    sees = {place: os.path.exists(path) for place, path in probes.items() if isinstance(path, str)}
    control.send("hello", facts=facts.collect(), podipc=podipc.__version__, sees=sees)
    subjects = Catalog()
    while True:
        message = control.recv(None, expect=("cell", "bye"))
        if message["type"] == "bye":
            return
        serve_cell(control, subjects, Cell(**message["cell"]))


def serve_forever_once(host: str, port: int, wait: float, on_listening: Callable[[int], None] | None = None) -> None:
    """Listen on host:port, serve one client, return."""
    listener = ControlListener(host, port)
    try:
        if on_listening is not None:
            on_listening(listener.port)
        control = listener.accept(wait)
    finally:
        listener.close()
    try:
        serve(control)
    finally:
        control.close()
