"""The shape of a bench run: the plan, its cells, the subjects, and what both sides of a cell share.

Used by the client side (podipc.bench.runner) and the server side (podipc.bench.server)
alike: opening the ends of a cell's links, the watchdog that bounds a cell, and the
constants both agree on.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from podipc.bench.control import DEFAULT_CONTROL_PORT
from podipc.bench.patterns import pattern_subjects
from podipc.bench.peers import LocalSubject, peer_subjects
from podipc.bench.spread import APIS, DEFAULT_CONFIDENCE_LEVEL, DEFAULT_MAX_REPEAT, MOST_REPEATS
from podipc.bench.stats import (
    SEQUENCE_SIZE,
)
from podipc.bench.subjects import (
    AsyncReceiver,
    AsyncSender,
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
    channel_name,
    parse_channel_name,
)
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
REPORT_SCHEMA = "podipc-bench/2"
ICEORYX_ROOT = "/tmp/iceoryx2"
BATCH_BYTES = 4 << 20
"""A batch holds at most this many bytes: --batch messages, fewer of the large sizes."""


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
    repeat: int = 1
    """Runs of every cell (with `confidence`: the fewest, at least 2; the CLI's default then is MIN_CONFIDENCE_RUNS)."""
    max_repeat: int | None = None
    """With `confidence`: the most runs of a cell (default DEFAULT_MAX_REPEAT)."""
    confidence: float | None = None
    """netperf's -I width: add runs until every key figure's confidence interval is at most this % of its mean."""
    confidence_level: float = DEFAULT_CONFIDENCE_LEVEL
    """netperf's -I level, percent."""
    api: str = "sync"
    """'async': the podipc.aio twin of every channel runs beside it (and zmq.asyncio with the peers)."""
    batch: int = 0
    """Messages per send_many / recv_many call of the batch twins (0: no batch twins)."""

    def __post_init__(self) -> None:
        for size in self.sizes:
            if size < SEQUENCE_SIZE:
                raise ValueError(f"size {size}: bench messages are at least {SEQUENCE_SIZE} bytes (sequence number)")
        catalog = Catalog()
        unknown = [name for name in self.channels if catalog.get(name) is None]
        if unknown:
            known = (*schemes(), *(peer.name for peer in peer_subjects()), *(s.name for s in pattern_subjects()))
            raise ValueError(
                f"unknown channel(s) or peer(s) {', '.join(unknown)}; known: {', '.join(known)} "
                "(a channel may carry URL options and an aio- or batch- prefix: aio-unix, file?sync=batch)"
            )
        bad_modes = [mode for mode in self.modes if mode not in MODES]
        if bad_modes:
            raise ValueError(f"unknown mode(s) {', '.join(bad_modes)}; known: {', '.join(MODES)}")
        if self.api not in APIS:
            raise ValueError(f"unknown api {self.api!r}; known: {', '.join(APIS)}")
        self._check_repeats()

    def _check_repeats(self) -> None:
        if self.confidence is not None:
            if self.max_repeat is None:
                self.max_repeat = max(DEFAULT_MAX_REPEAT, self.repeat)
            if not self.confidence > 0 or not 50 <= self.confidence_level < 100:
                raise ValueError("confidence: a level from 50 to below 100 percent and a width above 0 percent")
            if self.repeat < 2:
                raise ValueError("confidence needs at least 2 runs of every cell (--repeat 2 or more)")
        elif self.max_repeat is not None:
            raise ValueError("--max-repeat goes with --confidence (without it every cell runs --repeat times)")
        if not 1 <= self.repeat <= MOST_REPEATS or not self.repeat <= self.most_runs <= MOST_REPEATS:
            raise ValueError(f"repeat: from 1 to {MOST_REPEATS} runs, and max-repeat not below repeat")
        if self.batch < 0:
            raise ValueError("batch: messages per send_many call, 0 for none")

    @property
    def most_runs(self) -> int:
        """The most runs any cell gets."""
        return self.max_repeat if self.confidence is not None and self.max_repeat is not None else self.repeat

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
    run: int = 0
    """Which run of this subject, mode and size (0 first)."""
    batch: int = 0
    """Messages per send_many / recv_many call (batch subjects)."""

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


class Catalog:
    """Every subject by name: the peers, and channels by name as parse_channel_name() reads it (made on demand)."""

    def __init__(self) -> None:
        self.peers: dict[str, Subject] = {peer.name: peer for peer in peer_subjects()}
        self.patterns: dict[str, Subject] = {subject.name: subject for subject in pattern_subjects()}
        self.baselines = raw_baselines()
        self.made: dict[str, Subject] = {}

    def get(self, name: str) -> Subject | None:
        """The subject called `name`, or None when there is none."""
        if name in self.peers:
            return self.peers[name]
        if name in self.patterns:
            return self.patterns[name]
        subject = self.made.get(name)
        if subject is None:
            parsed = parse_channel_name(name)
            if parsed is None:
                return None
            scheme, query, api, batch = parsed
            if api == "async" or batch:
                baseline: str | None = channel_name(scheme, query)  # an asyncio or batch end against its plain twin
            else:
                baseline = self.baselines.get(scheme)
            subject = self.made[name] = ChannelSubject(scheme, query, api, batch, baseline)
        return subject

    def planned(self, plan: Plan) -> list[Subject]:
        """The subjects a plan measures, in order: each channel, its asyncio and batch twins; then the peers."""
        chosen: list[Subject] = []

        def add(name: str) -> None:
            subject = self.get(name)
            if subject is not None and subject not in chosen:
                chosen.append(subject)

        for name in plan.channels:
            add(name)
            subject = self.get(name)
            if isinstance(subject, ChannelSubject) and subject.api == "sync" and not subject.batch:
                if plan.api == "async":
                    add(channel_name(subject.scheme, subject.query, api="async"))
                if plan.batch:
                    add(channel_name(subject.scheme, subject.query, batch=True))
        if plan.peers:
            for peer in self.peers.values():
                if peer.api == "sync" or plan.api == "async":
                    add(peer.name)
        return chosen


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

    def async_sender(self, key: str) -> AsyncSender:
        """The asyncio sending end of link `key`."""
        return self.subject.open_async_sender(self.cell.resources, key, self.cell.size)

    def async_receiver(self, key: str) -> AsyncReceiver:
        """The asyncio receiving end of link `key`."""
        return self.subject.open_async_receiver(self.cell.resources, key, self.cell.size)


def abort_ends(sender: Sender | None, receiver: Receiver | None) -> None:
    """Free both ends after a failure, ignoring further errors."""
    if sender is not None:
        with contextlib.suppress(Exception):
            sender.abort()
    if receiver is not None:
        with contextlib.suppress(Exception):
            receiver.close()


def abort_async_ends(sender: AsyncSender | None, receiver: AsyncReceiver | None) -> None:
    """Free both asyncio ends at once after a failure (no loop needed), ignoring further errors."""
    for end in (sender, receiver):
        if end is not None:
            with contextlib.suppress(Exception):
                end.abort()
