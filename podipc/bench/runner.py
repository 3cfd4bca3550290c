"""Drive a bench: plan the cells, run the server side and the client side, collect the figures.

Two processes always take part, as two containers of a pod would: the *server* opens
its ends of each cell and echoes (latency) or streams (throughput); the *client*
plans, pings or counts, and writes the report. They agree over a control connection
(podipc.bench.control). In local mode the client starts the server as a subprocess
(`python -m podipc.bench serve`); in pod mode each runs in its own container
(`podipc bench --role server` / `--role client`), either first. The plan and its cells
are podipc.bench.cells, the server side podipc.bench.server; this is the client side.

Peers built on multiprocessing objects (Pipe, Queue, faster-fifo) cannot cross
containers: the client runs their other side in a child process it starts itself
(local mode), and lists them as skipped in pod mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from itertools import count
from typing import Any

import podipc
from podipc.bench import aio, facts
from podipc.bench.cells import (
    BATCH_BYTES,
    CONTROL_TIMEOUT_SECONDS,
    DEFAULT_IDLE_SECONDS,
    DEFAULT_SECONDS,
    ICEORYX_ROOT,
    MODES,
    QUICK_IDLE_SECONDS,
    QUICK_SECONDS,
    REPORT_SCHEMA,
    SERVER_START_TIMEOUT_SECONDS,
    Catalog,
    Cell,
    CellTimeout,
    Opener,
    Plan,
    abort_async_ends,
    abort_ends,
    describe,
    free_port,
    watchdog,
)
from podipc.bench.control import PROTOCOL_VERSION, Control, connect
from podipc.bench.fanin import FanInReceiver
from podipc.bench.pattern_peers import PatternReceiver
from podipc.bench.peers import LocalSubject, local_context
from podipc.bench.rounds import FINAL_STATUSES, Group, add_ratios, group_settled, plan_groups, record_from_runs
from podipc.bench.server import open_server_ends, run_server_side, serve_forever_once
from podipc.bench.stats import (
    SEQUENCE_SIZE,
    LatencySummary,
    SequenceChecker,
    ThroughputSummary,
    core_fraction,
)
from podipc.bench.subjects import (
    SHARED_PLACES,
    AsyncReceiver,
    AsyncSender,
    BatchReceiver,
    CellPlace,
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
)
from podipc.bench.workloads import Effort, drain, drain_batches, idle, ping
from podipc.errors import ChannelUnavailable, EndOfStream, MessageTooLarge, PodIPCError

__all__ = [
    "DEFAULT_IDLE_SECONDS",
    "DEFAULT_SECONDS",
    "MODES",
    "QUICK_IDLE_SECONDS",
    "QUICK_SECONDS",
    "Plan",
    "run",
    "run_server",
]

# --- the client side ---------------------------------------------------------------------


def measure_latency(cell: Cell, sender: Sender, receiver: Receiver, lossy: bool) -> dict[str, Any]:
    """Idle probe (when planned), ping-pong, then end both streams."""
    idle_effort = idle(receiver, cell.idle_seconds) if cell.idle_seconds > 0 else None
    samples, lost, effort = ping(sender, receiver, cell.size, cell.seconds, cell.max_count)
    sender.close()
    with contextlib.suppress(EndOfStream, TimeoutError):
        while True:
            receiver.recv()
    receiver.close()
    return {"samples": samples, "lost": lost, "effort": effort, "idle": idle_effort}


def measure_throughput(cell: Cell, receiver: Receiver, lossy: bool) -> dict[str, Any]:
    """Count the stream at the consumer (in batches of recv_many for batch subjects, per producer for fan-in)."""
    checker = SequenceChecker()
    try:
        if isinstance(receiver, BatchReceiver):
            seconds, effort = drain_batches(receiver, checker, cell.size, max(cell.batch, 1), lossy)
        elif isinstance(receiver, FanInReceiver | PatternReceiver):
            seconds, effort = receiver.drain(checker)
        else:
            seconds, effort = drain(receiver, checker, cell.size >= SEQUENCE_SIZE, lossy)
    finally:
        receiver.close()
    return {"checker": checker, "seconds": seconds, "effort": effort}


Ends = tuple[Sender | None, Receiver] | tuple[AsyncSender | None, AsyncReceiver]


def open_client_ends(opener: Opener) -> Ends:
    """Latency: send on a, receive on b. Throughput: receive on a. Asyncio ends for subjects with api 'async'."""
    if opener.subject.api == "async":
        return _open_async_client_ends(opener)
    if opener.cell.mode == "latency":
        sender = opener.sender("a")
        try:
            return sender, opener.receiver("b")
        except BaseException:
            sender.abort()
            raise
    return None, opener.receiver("a")


def _open_async_client_ends(opener: Opener) -> tuple[AsyncSender | None, AsyncReceiver]:
    if opener.cell.mode == "latency":
        sender = opener.async_sender("a")
        try:
            return sender, opener.async_receiver("b")
        except BaseException:
            sender.abort()
            raise
    return None, opener.async_receiver("a")


def abort_client_ends(subject: Subject, sender: Any, receiver: Any) -> None:
    """Free the client's ends after a failure."""
    if subject.api == "async":
        abort_async_ends(sender, receiver)
    else:
        abort_ends(sender, receiver)


def run_client_side(subject: Subject, cell: Cell, sender: Any, receiver: Any) -> dict[str, Any]:
    """Run this side's loop of the cell (in an asyncio loop of its own for asyncio subjects)."""
    with watchdog(cell.time_limit):
        if subject.api == "async":
            return asyncio.run(_measure_async(subject, cell, sender, receiver))
        if sender is not None:
            return measure_latency(cell, sender, receiver, subject.lossy)
        return measure_throughput(cell, receiver, subject.lossy)


async def _measure_async(
    subject: Subject, cell: Cell, sender: AsyncSender | None, receiver: AsyncReceiver
) -> dict[str, Any]:
    if sender is not None:
        return await aio.measure_latency(sender, receiver, cell.size, cell.seconds, cell.max_count, cell.idle_seconds)
    return await aio.measure_throughput(receiver, cell.size, subject.lossy)


def run_record(status: str, reason: str | None = None) -> dict[str, Any]:
    """One run of a cell, without figures yet (podipc.bench.rounds merges the runs of a subject, mode and size)."""
    return {
        "run": 0,
        "sequence": 0,
        "status": status,
        "reason": reason,
        "latency": None,
        "throughput": None,
        "cpu": None,
        "idle": None,
        "ticker": None,
        "wakeup": None,
        "elapsed_seconds": 0.0,
    }


def fill_figures(record: dict[str, Any], cell: Cell, measured: dict[str, Any], server: dict[str, Any]) -> None:
    """Put the figures of a finished cell into its run record."""
    effort: Effort = measured["effort"]
    server_wall, server_cpu = float(server.get("wall", 0.0)), float(server.get("cpu", 0.0))
    record["wakeup"] = measured.get("wakeup")
    if cell.mode == "latency":
        if not measured["samples"]:
            record.update(status="error", reason="no round trip completed")
            return
        record["latency"] = LatencySummary.from_nanoseconds(measured["samples"], measured["lost"]).as_dict()
        idle_effort: Effort | None = measured["idle"]
        if idle_effort is not None:
            record["idle"] = {
                "seconds": round(idle_effort.wall, 4),
                "cpu_seconds": round(idle_effort.cpu, 4),
                "core_fraction": core_fraction(idle_effort.cpu, idle_effort.wall),
            }
    else:
        record["throughput"] = ThroughputSummary.build(
            int(server.get("count", 0)), measured["checker"], cell.size, measured["seconds"], cell.size >= SEQUENCE_SIZE
        ).as_dict()
        record["ticker"] = measured.get("ticker")
    record["cpu"] = {
        "client_seconds": round(effort.cpu, 4),
        "client_wall_seconds": round(effort.wall, 4),
        "client_core_fraction": core_fraction(effort.cpu, effort.wall),
        "server_seconds": round(server_cpu, 4),
        "server_wall_seconds": round(server_wall, 4),
        "server_core_fraction": core_fraction(server_cpu, server_wall),
    }


def run_remote_cell(control: Control, subject: Subject, cell: Cell) -> dict[str, Any]:
    """One cell whose other side runs in the server."""
    control.send("cell", cell=asdict(cell))
    answer = control.recv(CONTROL_TIMEOUT_SECONDS, expect=("ready", "failed"))
    if answer["type"] == "failed":
        return run_record(answer["status"], answer["reason"])
    try:
        sender, receiver = open_client_ends(Opener(subject, cell))
    except MessageTooLarge as exc:
        control.send("abort")
        return run_record("unsupported", str(exc))
    except ChannelUnavailable as exc:
        control.send("abort")
        return run_record("skipped", str(exc))
    except Exception as exc:  # reported in the cell
        control.send("abort")
        return run_record("error", f"client could not open: {describe(exc)}")
    control.send("go")
    record = run_record("ok")
    try:
        measured = run_client_side(subject, cell, sender, receiver)
    except Exception as exc:  # reported in the cell
        abort_client_ends(subject, sender, receiver)
        record.update(status="error", reason=f"client: {describe(exc)}")
        measured = None
    done = control.recv(cell.time_limit + CONTROL_TIMEOUT_SECONDS, expect=("done",))
    subject.cleanup(cell.resources)
    if done.get("error"):
        record.update(status="error", reason=done["error"] if measured else f"{record['reason']}; {done['error']}")
        return record
    if measured is not None:
        fill_figures(record, cell, measured, done)
    return record


def _local_child(subject: LocalSubject, cell: Cell, links: dict[str, Any], results: Any) -> None:
    """The other side of a parent/child peer, in the child process."""
    try:
        sender, receiver = open_server_ends(Opener(subject, cell, links))
        results.send({"error": None, **run_server_side(subject, cell, sender, receiver)})
    except Exception as exc:  # sent to the parent
        results.send({"error": f"child: {describe(exc)}", "count": 0, "wall": 0.0, "cpu": 0.0})


def run_local_cell(subject: LocalSubject, cell: Cell) -> dict[str, Any]:
    """One cell whose other side is a child process started here (multiprocessing peers)."""
    context = local_context()
    links = subject.create_links(context, cell.size)
    results_reader, results_writer = context.Pipe(duplex=False)
    child = context.Process(target=_local_child, args=(subject, cell, links, results_writer), daemon=True)
    child.start()
    record = run_record("ok")
    measured = None
    try:
        sender, receiver = open_client_ends(Opener(subject, cell, links))
        measured = run_client_side(subject, cell, sender, receiver)
        if not results_reader.poll(cell.time_limit):
            raise CellTimeout("the child process did not report")
        done = results_reader.recv()
    except Exception as exc:  # reported in the cell
        record.update(status="error", reason=f"client: {describe(exc)}")
        done = {}
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    if done.get("error"):
        record.update(status="error", reason=done["error"])
    elif measured is not None and record["status"] == "ok":
        fill_figures(record, cell, measured, done)
    return record


# --- planning and the whole run ---------------------------------------------------------


class CellMaker:
    """Makes the cells of a run: each with its own index, addresses and names."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.smallest = min(plan.sizes)
        self.indexes = count()

    def make(self, subject: Subject, group: Group, run: int) -> Cell:
        """Cell `run` of `subject` in `group`, with fresh resources."""
        plan = self.plan
        index = next(self.indexes)
        batched = isinstance(subject, ChannelSubject) and subject.batch
        cell = Cell(
            index=index,
            subject=subject.name,
            mode=group.mode,
            size=group.size,
            seconds=plan.seconds,
            idle_seconds=plan.idle_seconds if group.mode == "latency" and group.size == self.smallest else 0.0,
            resources={},
            run=run,
            batch=min(plan.batch, max(1, BATCH_BYTES // group.size)) if batched else 0,
        )
        place = CellPlace(plan.run_id, index, plan.directory)
        cell.resources = subject.resources(place, free_port) if subject.availability() is None else {}
        return cell


def skip_reason(subject: Subject, cell: Cell, pod_mode: bool, unshared: dict[str, str]) -> tuple[str, str] | None:
    """(status, reason) when a cell cannot run here, before involving the server."""
    problem = subject.availability()
    if problem:
        return "skipped", problem
    missing = sorted(place for place in subject.shared_places if place in unshared)
    if missing:
        return "skipped", "; ".join(unshared[place] for place in missing)
    if subject.local_only and pod_mode:
        return "skipped", "needs a parent and child process (multiprocessing objects); cannot cross containers"
    too_large = subject.size_problem(cell.size)
    if too_large:
        return "unsupported", too_large
    return None


@contextlib.contextmanager
def shared_place_probes(plan: Plan) -> Iterator[dict[str, str]]:
    """Create a probe file in each place a subject may need shared; yield {place: probe path}; remove them."""
    directories = {"directory": plan.directory, "dev_shm": "/dev/shm", "iceoryx2": ICEORYX_ROOT}
    probes: dict[str, str] = {}
    try:
        for place, directory in directories.items():
            path = os.path.join(directory, f"podipc-bench-probe-{plan.run_id}")
            with contextlib.suppress(OSError):
                os.makedirs(directory, exist_ok=True)
                with open(path, "w") as probe:
                    probe.write("podipc bench: is this directory shared with the server?\n")
                probes[place] = path
        yield probes
    finally:
        for path in probes.values():
            with contextlib.suppress(OSError):
                os.unlink(path)


def unshared_places(probes: dict[str, str], sees: dict[str, bool]) -> dict[str, str]:
    """{place: why it is a problem} for each probed place the server does not see."""
    return {
        place: f"{SHARED_PLACES[place]} is not shared by client and server ({os.path.dirname(path)} differs); "
        "mount a volume both containers share there"
        for place, path in probes.items()
        if not sees.get(place, False)
    }


ProgressHook = Callable[[str, int, int], None]
"""Called before each cell with (description, cells done, cells in all)."""


class Session:
    """The client's side of one bench run: the plan, the server, and the order cells ran in."""

    def __init__(self, plan: Plan, control: Control, unshared: dict[str, str], progress: ProgressHook | None) -> None:
        self.plan = plan
        self.control = control
        self.unshared = unshared
        self.progress = progress
        self.pod_mode = plan.role == "client"
        self.cells = CellMaker(plan)
        self.sequence = count()
        self.done = 0
        self.expected = 0

    def run_group(self, group: Group) -> list[dict[str, Any]]:
        """Round after round of the group's subjects, until enough runs; one record per subject."""
        plan = self.plan
        runs: dict[str, list[dict[str, Any]]] = {subject.name: [] for subject in group.subjects}
        for round_number in range(plan.most_runs):
            for subject in group.subjects:
                earlier = runs[subject.name]
                if earlier and earlier[-1]["status"] in FINAL_STATUSES:
                    self.expected -= round_number < plan.repeat  # counted in the estimate, never run
                    continue
                earlier.append(self.run_cell(subject, self.cells.make(subject, group, round_number)))
            records = self.records(group, runs)
            rounds_run = round_number + 1
            if rounds_run >= plan.repeat and (plan.confidence is None or group_settled(records, plan.confidence)):
                return records
            if rounds_run >= plan.repeat:  # one more round than the estimate counted
                self.expected += sum(
                    runs[subject.name][-1]["status"] not in FINAL_STATUSES for subject in group.subjects
                )
        return records

    def records(self, group: Group, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The group's records from the runs so far, with their paired ratios."""
        level = self.plan.confidence_level
        records = [
            record_from_runs(subject, group.mode, group.size, runs[subject.name], level) for subject in group.subjects
        ]
        add_ratios(records, level)
        return records

    def run_cell(self, subject: Subject, cell: Cell) -> dict[str, Any]:
        """One run of one cell (or why it cannot run), numbered in the order runs happened."""
        if self.progress is not None:
            label = f"{subject.name} {cell.mode} {cell.size} B" + (
                f" #{cell.run + 1}" if self.plan.most_runs > 1 else ""
            )
            self.progress(label, self.done, max(self.expected, self.done + 1))
        reason = skip_reason(subject, cell, self.pod_mode, self.unshared)
        if reason is not None:
            record = run_record(*reason)
        else:
            started = time.perf_counter()
            if isinstance(subject, LocalSubject):
                record = run_local_cell(subject, cell)
            else:
                record = run_remote_cell(self.control, subject, cell)
            record["elapsed_seconds"] = round(time.perf_counter() - started, 3)
        record.update(run=cell.run, sequence=next(self.sequence))
        self.done += 1
        return record


def run_client(plan: Plan, control: Control, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Run every cell of the plan against a connected server; the report as a JSON-ready mapping."""
    started = time.time()
    with shared_place_probes(plan) as probes:
        control.send("hello", protocol=PROTOCOL_VERSION, run_id=plan.run_id, directory=plan.directory, probes=probes)
        server_hello = control.recv(CONTROL_TIMEOUT_SECONDS, expect=("hello", "failed"))
    if server_hello["type"] == "failed":
        raise PodIPCError(f"bench server refused: {server_hello['reason']}")
    session = Session(plan, control, unshared_places(probes, server_hello.get("sees", {})), progress)
    groups = plan_groups(Catalog().planned(plan), plan.modes, plan.sizes)
    session.expected = sum(len(group.subjects) for group in groups) * plan.repeat
    records = [record for group in groups for record in session.run_group(group)]
    control.send("bye")
    if progress is not None:
        progress("done", session.done, session.done)
    skipped = {record["subject"]: record["reason"] for record in records if record["status"] == "skipped"}
    return {
        "schema": REPORT_SCHEMA,
        "podipc_version": podipc.__version__,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_seconds": round(time.time() - started, 3),
        "command": " ".join(["podipc", *sys.argv[1:]]) if sys.argv else "podipc bench",
        "plan": {
            "channels": plan.channels,
            "peers": plan.peers,
            "api": plan.api,
            "batch": plan.batch,
            "sizes": plan.sizes,
            "modes": plan.modes,
            "seconds_per_cell": plan.seconds,
            "idle_seconds": plan.idle_seconds,
            "repeat": plan.repeat,
            "ci_level_percent": plan.confidence_level,
            "max_repeat": plan.most_runs,
            "confidence": None
            if plan.confidence is None
            else {"level_percent": plan.confidence_level, "width_percent": plan.confidence},
            "quick": plan.quick,
            "mode": "pod" if session.pod_mode else "local",
            "run_id": plan.run_id,
        },
        "environment": {"client": facts.collect(), "server": server_hello.get("facts", {})},
        "skipped": [{"subject": name, "reason": reason} for name, reason in skipped.items()],
        "results": records,
    }


def start_local_server(wait: float) -> tuple[subprocess.Popen[str], int]:
    """Start `python -m podipc.bench serve` on a free loopback port; the process and its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "podipc.bench", "serve", "--host", "127.0.0.1", "--port", "0", "--wait", str(wait)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening "):
        process.kill()
        process.wait()
        raise PodIPCError(f"the local bench server did not start (said {line.strip()!r})")
    return process, int(line.split()[1])


@contextlib.contextmanager
def bench_directory(plan: Plan) -> Iterator[str]:
    """The directory for socket and spool paths: the plan's, or a fresh one in /dev/shm removed afterwards."""
    if plan.directory:
        os.makedirs(plan.directory, exist_ok=True)
        yield plan.directory
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    directory = os.path.join(base, f"podipc-bench-{plan.run_id}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(plan: Plan, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Run the bench as planned (local or pod client) and return the report (figures; no judging)."""
    with bench_directory(plan) as directory:
        plan.directory = directory
        if plan.role == "client":
            control = connect(plan.control_host, plan.control_port, plan.wait)
            try:
                report = run_client(plan, control, progress)
            finally:
                control.close()
        else:
            process, port = start_local_server(SERVER_START_TIMEOUT_SECONDS)
            try:
                control = connect("127.0.0.1", port, SERVER_START_TIMEOUT_SECONDS)
                try:
                    report = run_client(plan, control, progress)
                finally:
                    control.close()
                process.wait(timeout=CONTROL_TIMEOUT_SECONDS)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    return report


def run_server(plan: Plan, announce: Callable[[str], None] | None = None) -> None:
    """Pod mode, server side: listen on the control port and serve one client."""

    def listening(port: int) -> None:
        if announce is not None:
            announce(f"podipc bench server listening on {plan.control_host}:{port}")

    serve_forever_once(plan.control_host, plan.control_port, plan.wait, listening)
