"""Drive a bench: plan the cells, run the server side and the client side, collect the figures.

Two processes always take part, as two containers of a pod would: the *server* opens
its ends of each cell and echoes (latency) or streams (throughput); the *client*
plans, pings or counts, and writes the report. They agree over a control connection
(podipc.bench.control). In local mode the client starts the server as a subprocess
(`python -m podipc.bench serve`); in pod mode each runs in its own container
(`podipc bench --role server` / `--role client`), either first.

Peers built on multiprocessing objects (Pipe, Queue, faster-fifo) cannot cross
containers: the client runs their other side in a child process it starts itself
(local mode), and lists them as skipped in pod mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import podipc
from podipc.bench import facts
from podipc.bench.control import DEFAULT_CONTROL_PORT, PROTOCOL_VERSION, Control, ControlListener, connect
from podipc.bench.peers import LocalSubject, local_context, peer_subjects
from podipc.bench.stats import (
    SEQUENCE_SIZE,
    LatencySummary,
    SequenceChecker,
    ThroughputSummary,
    core_fraction,
)
from podipc.bench.subjects import (
    SHARED_PLACES,
    CellPlace,
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
)
from podipc.bench.workloads import Effort, drain, echo, idle, ping, stream
from podipc.errors import ChannelUnavailable, EndOfStream, MessageTooLarge, PodIPCError
from podipc.transport import schemes

DEFAULT_SIZES = (64, 4096, 65536, 1 << 20)
MODES = ("latency", "throughput")
DEFAULT_SECONDS = 0.5
QUICK_SECONDS = 0.08
DEFAULT_IDLE_SECONDS = 1.0
QUICK_IDLE_SECONDS = 0.2
MAX_ROUND_TRIPS = 200_000
MAX_STREAM_MESSAGES = 20_000_000
CELL_GRACE_SECONDS = 30.0
"""A cell that runs this much longer than planned is stopped and reported as an error."""
CONTROL_TIMEOUT_SECONDS = 60.0
SERVER_START_TIMEOUT_SECONDS = 30.0
REPORT_SCHEMA = "podipc-bench/1"
ICEORYX_ROOT = "/tmp/iceoryx2"


@dataclass
class Plan:
    """What to measure and how; every field has a command-line option."""

    channels: list[str] = field(default_factory=lambda: list(schemes()))
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seconds: float = DEFAULT_SECONDS
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    quick: bool = False
    peers: bool = False
    role: str = "local"  # local, server or client
    control_host: str = "127.0.0.1"
    control_port: int = DEFAULT_CONTROL_PORT
    wait: float = 60.0
    directory: str = ""
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        for size in self.sizes:
            if size < SEQUENCE_SIZE:
                raise ValueError(f"size {size}: bench messages are at least {SEQUENCE_SIZE} bytes (sequence number)")
        known = (*schemes(), *(peer.name for peer in peer_subjects()))
        unknown = [name for name in self.channels if name not in known]
        if unknown:
            raise ValueError(f"unknown channel(s) or peer(s) {', '.join(unknown)}; known: {', '.join(known)}")
        bad_modes = [mode for mode in self.modes if mode not in MODES]
        if bad_modes:
            raise ValueError(f"unknown mode(s) {', '.join(bad_modes)}; known: {', '.join(MODES)}")

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> Plan:
        """A plan with the short --quick durations."""
        return cls(seconds=QUICK_SECONDS, idle_seconds=QUICK_IDLE_SECONDS, quick=True, **overrides)


@dataclass
class Cell:
    """One measurement: a subject, a mode and a size, with its own addresses."""

    index: int
    subject: str
    mode: str
    size: int
    seconds: float
    idle_seconds: float
    resources: dict[str, str]

    @property
    def max_count(self) -> int:
        """The most round trips or messages this cell may run."""
        return MAX_ROUND_TRIPS if self.mode == "latency" else MAX_STREAM_MESSAGES

    @property
    def time_limit(self) -> float:
        """Seconds after which the cell is stopped as hung."""
        return CELL_GRACE_SECONDS + 3 * self.seconds + self.idle_seconds


def raw_baselines() -> dict[str, str]:
    """The raw peer doing each channel's job with no podipc layer, by scheme (the peers declare it)."""
    return {peer.baseline_of: peer.name for peer in peer_subjects() if peer.baseline_of is not None}


def all_subjects() -> dict[str, Subject]:
    """Every channel and every peer, by name."""
    subjects: dict[str, Subject] = {scheme: ChannelSubject(scheme) for scheme in schemes()}
    subjects.update({peer.name: peer for peer in peer_subjects()})
    return subjects


def free_port(kind: str) -> int:
    """A loopback port free right now (tcp or udp), chosen by the kernel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
    finally:
        sock.close()


# --- the watchdog ---------------------------------------------------------------------


class CellTimeout(Exception):
    """A cell ran past its time limit."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise CellTimeout in the main thread after `seconds` (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise CellTimeout(f"no progress within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(error: BaseException) -> str:
    """One line naming an error."""
    return f"{type(error).__name__}: {error}"


# --- the server side ---------------------------------------------------------------------


@dataclass
class Opener:
    """Opens ends of a cell's links, by name (resources) or from inherited objects."""

    subject: Subject
    cell: Cell
    links: dict[str, Any] | None = None

    def sender(self, key: str) -> Sender:
        """The sending end of link `key`."""
        if self.links is not None:
            assert isinstance(self.subject, LocalSubject)
            return self.subject.sender_from(self.links[key])
        return self.subject.open_sender(self.cell.resources, key, self.cell.size)

    def receiver(self, key: str) -> Receiver:
        """The receiving end of link `key`."""
        if self.links is not None:
            assert isinstance(self.subject, LocalSubject)
            return self.subject.receiver_from(self.links[key])
        return self.subject.open_receiver(self.cell.resources, key, self.cell.size)


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
    """Echo or stream; the count, wall and CPU seconds of this side."""
    if receiver is not None:
        count, effort = echo(receiver, sender, subject.lossy)
    else:
        count, effort = stream(sender, cell.size, cell.seconds, cell.max_count)
    return {"count": count, "wall": effort.wall, "cpu": effort.cpu}


def abort_ends(sender: Sender | None, receiver: Receiver | None) -> None:
    """Free both ends after a failure, ignoring further errors."""
    if sender is not None:
        with contextlib.suppress(Exception):
            sender.abort()
    if receiver is not None:
        with contextlib.suppress(Exception):
            receiver.close()


def serve_cell(control: Control, subjects: dict[str, Subject], cell: Cell) -> None:
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
    subjects = all_subjects()
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
    """Count the stream at the consumer."""
    checker = SequenceChecker()
    try:
        seconds, effort = drain(receiver, checker, cell.size >= SEQUENCE_SIZE, lossy)
    finally:
        receiver.close()
    return {"checker": checker, "seconds": seconds, "effort": effort}


def open_client_ends(opener: Opener) -> tuple[Sender | None, Receiver]:
    """Latency: send on a, receive on b. Throughput: receive on a."""
    if opener.cell.mode == "latency":
        sender = opener.sender("a")
        try:
            return sender, opener.receiver("b")
        except BaseException:
            sender.abort()
            raise
    return None, opener.receiver("a")


def run_client_side(subject: Subject, cell: Cell, sender: Sender | None, receiver: Receiver) -> dict[str, Any]:
    """Run this side's loop of the cell."""
    with watchdog(cell.time_limit):
        if sender is not None:
            return measure_latency(cell, sender, receiver, subject.lossy)
        return measure_throughput(cell, receiver, subject.lossy)


def cell_record(subject: Subject, cell: Cell, status: str, reason: str | None = None) -> dict[str, Any]:
    """The report entry of a cell, without figures yet."""
    return {
        "subject": subject.name,
        "kind": subject.kind,
        "baseline": raw_baselines().get(subject.name) if subject.kind == "channel" else None,
        "mode": cell.mode,
        "size": cell.size,
        "status": status,
        "reason": reason,
        "latency": None,
        "throughput": None,
        "cpu": None,
        "idle": None,
        "elapsed_seconds": 0.0,
    }


def fill_figures(record: dict[str, Any], cell: Cell, measured: dict[str, Any], server: dict[str, Any]) -> None:
    """Put the figures of a finished cell into its record."""
    effort: Effort = measured["effort"]
    server_wall, server_cpu = float(server.get("wall", 0.0)), float(server.get("cpu", 0.0))
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
        return cell_record(subject, cell, answer["status"], answer["reason"])
    try:
        sender, receiver = open_client_ends(Opener(subject, cell))
    except MessageTooLarge as exc:
        control.send("abort")
        return cell_record(subject, cell, "unsupported", str(exc))
    except ChannelUnavailable as exc:
        control.send("abort")
        return cell_record(subject, cell, "skipped", str(exc))
    except Exception as exc:  # reported in the cell
        control.send("abort")
        return cell_record(subject, cell, "error", f"client could not open: {describe(exc)}")
    control.send("go")
    record = cell_record(subject, cell, "ok")
    try:
        measured = run_client_side(subject, cell, sender, receiver)
    except Exception as exc:  # reported in the cell
        abort_ends(sender, receiver)
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
    record = cell_record(subject, cell, "ok")
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


def plan_cells(plan: Plan, subjects: dict[str, Subject]) -> list[tuple[Subject, Cell]]:
    """Every (subject, cell) of the plan, in report order, with fresh addresses for each."""
    place_directory = plan.directory
    cells: list[tuple[Subject, Cell]] = []
    chosen = [subjects[name] for name in plan.channels]
    if plan.peers:
        chosen += [subject for subject in subjects.values() if subject.kind != "channel" and subject not in chosen]
    smallest = min(plan.sizes)
    # every subject at one mode and size runs back to back, so a channel and its raw peer
    # see the same background load on a shared machine
    for mode in plan.modes:
        for size in plan.sizes:
            for subject in chosen:
                index = len(cells)
                place = CellPlace(plan.run_id, index, place_directory)
                cell = Cell(
                    index=index,
                    subject=subject.name,
                    mode=mode,
                    size=size,
                    seconds=plan.seconds,
                    idle_seconds=plan.idle_seconds if mode == "latency" and size == smallest else 0.0,
                    resources={},
                )
                cells.append((subject, cell))
                cell.resources = subject.resources(place, free_port) if subject.availability() is None else {}
    return cells


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


def run_client(plan: Plan, control: Control, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Run every cell of the plan against a connected server; the report as a JSON-ready mapping."""
    started = time.time()
    with shared_place_probes(plan) as probes:
        control.send("hello", protocol=PROTOCOL_VERSION, run_id=plan.run_id, directory=plan.directory, probes=probes)
        server_hello = control.recv(CONTROL_TIMEOUT_SECONDS, expect=("hello", "failed"))
    if server_hello["type"] == "failed":
        raise PodIPCError(f"bench server refused: {server_hello['reason']}")
    unshared = unshared_places(probes, server_hello.get("sees", {}))
    subjects = all_subjects()
    cells = plan_cells(plan, subjects)
    pod_mode = plan.role == "client"
    records = []
    skipped: dict[str, str] = {}
    for done_count, (subject, cell) in enumerate(cells):
        if progress is not None:
            progress(f"{subject.name} {cell.mode} {cell.size} B", done_count, len(cells))
        reason = skip_reason(subject, cell, pod_mode, unshared)
        if reason is not None:
            records.append(cell_record(subject, cell, *reason))
            if reason[0] == "skipped":
                skipped[subject.name] = reason[1]
            continue
        cell_started = time.perf_counter()
        if isinstance(subject, LocalSubject):
            record = run_local_cell(subject, cell)
        else:
            record = run_remote_cell(control, subject, cell)
        record["elapsed_seconds"] = round(time.perf_counter() - cell_started, 3)
        records.append(record)
    control.send("bye")
    if progress is not None:
        progress("done", len(cells), len(cells))
    return {
        "schema": REPORT_SCHEMA,
        "podipc_version": podipc.__version__,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_seconds": round(time.time() - started, 3),
        "command": " ".join(["podipc", *sys.argv[1:]]) if sys.argv else "podipc bench",
        "plan": {
            "channels": plan.channels,
            "peers": plan.peers,
            "sizes": plan.sizes,
            "modes": plan.modes,
            "seconds_per_cell": plan.seconds,
            "idle_seconds": plan.idle_seconds,
            "quick": plan.quick,
            "mode": "pod" if pod_mode else "local",
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
