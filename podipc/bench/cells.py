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
from podipc.bench.peers import LocalSubject, peer_subjects
from podipc.bench.stats import (
    SEQUENCE_SIZE,
)
from podipc.bench.subjects import (
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
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


def abort_ends(sender: Sender | None, receiver: Receiver | None) -> None:
    """Free both ends after a failure, ignoring further errors."""
    if sender is not None:
        with contextlib.suppress(Exception):
            sender.abort()
    if receiver is not None:
        with contextlib.suppress(Exception):
            receiver.close()
