"""Figures of a bench cell: latency percentiles, throughput with sequence checks, CPU time.

Latencies are collected as integer nanoseconds (`time.perf_counter_ns` differences) and
summarised in microseconds. Throughput is counted at the consumer; every message carries
its sequence number in its first 8 bytes (little endian), so loss, reordering and
duplication are counted, never guessed.
"""

from __future__ import annotations

import math
import os
import resource
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SEQUENCE = struct.Struct("<Q")
SEQUENCE_SIZE = SEQUENCE.size
MISSING_TRACK_LIMIT = 1_000_000
"""Gaps beyond this many missing sequence numbers are counted as lost without tracking late arrivals."""


def percentile(sorted_values: Sequence[float], fraction_percent: float) -> float:
    """The `fraction_percent` percentile of already sorted values, by linear interpolation."""
    if not sorted_values:
        raise ValueError("no values")
    position = (len(sorted_values) - 1) * fraction_percent / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1.0 - weight) + sorted_values[upper] * weight


@dataclass
class LatencySummary:
    """Round-trip times of one ping-pong cell, in microseconds."""

    round_trips: int
    lost: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    min_us: float
    mean_us: float

    @classmethod
    def from_nanoseconds(cls, samples: list[int], lost: int = 0) -> LatencySummary:
        """Summarise round-trip samples given in nanoseconds."""
        if not samples:
            raise ValueError("no round trip completed")
        ordered = sorted(samples)
        p50, p90, p99, p999 = (percentile(ordered, p) / 1000.0 for p in PERCENTILES)
        return cls(
            round_trips=len(ordered),
            lost=lost,
            p50_us=round(p50, 3),
            p90_us=round(p90, 3),
            p99_us=round(p99, 3),
            p999_us=round(p999, 3),
            max_us=round(ordered[-1] / 1000.0, 3),
            min_us=round(ordered[0] / 1000.0, 3),
            mean_us=round(sum(ordered) / len(ordered) / 1000.0, 3),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping."""
        return asdict(self)


@dataclass
class SequenceChecker:
    """Counts received, lost, reordered and duplicated messages from their sequence numbers.

    A message whose number is ahead of the next expected one opens a gap; the skipped
    numbers are remembered (up to MISSING_TRACK_LIMIT) so a late arrival counts as
    reordered and a second arrival as duplicated.
    """

    expected: int = 0
    received: int = 0
    reordered: int = 0
    duplicated: int = 0
    untracked_missing: int = 0
    missing: set[int] = field(default_factory=set)

    def add(self, sequence: int) -> None:
        """Account for one received sequence number."""
        self.received += 1
        expected = self.expected
        if sequence == expected:
            self.expected = expected + 1
        elif sequence > expected:
            self._gap(expected, sequence)
            self.expected = sequence + 1
        elif sequence in self.missing:
            self.missing.discard(sequence)
            self.reordered += 1
        else:
            self.duplicated += 1

    def add_run(self, count: int) -> None:
        """Account for `count` messages numbered expected, expected + 1, ... (checked by the caller)."""
        self.received += count
        self.expected += count

    def merge(self, checkers: Iterable[SequenceChecker]) -> None:
        """Add in the counts of checkers of separate sequences (one per producer of a fan-in): lost, reordered... sum."""
        for other in checkers:
            self.expected += other.expected
            self.received += other.received
            self.reordered += other.reordered
            self.duplicated += other.duplicated
            self.untracked_missing += len(other.missing) + other.untracked_missing

    def _gap(self, start: int, stop: int) -> None:
        room = MISSING_TRACK_LIMIT - len(self.missing)
        tracked = min(stop - start, max(room, 0))
        self.missing.update(range(start, start + tracked))
        self.untracked_missing += stop - start - tracked

    def lost(self, sent: int | None) -> int:
        """Messages never received: gaps still open plus the tail after the last one seen."""
        tail = max(0, (sent if sent is not None else self.expected) - self.expected)
        return len(self.missing) + self.untracked_missing + tail


@dataclass
class ThroughputSummary:
    """One-way streaming figures counted at the consumer."""

    sent: int | None
    received: int
    lost: int
    reordered: int
    duplicated: int
    sequence_checked: bool
    seconds: float
    messages_per_second: float
    megabytes_per_second: float

    @classmethod
    def build(
        cls, sent: int | None, checker: SequenceChecker, size: int, seconds: float, sequence_checked: bool
    ) -> ThroughputSummary:
        """Rates from `checker.received` messages of `size` bytes over `seconds`."""
        received = checker.received
        rate = received / seconds if seconds > 0 else 0.0
        return cls(
            sent=sent,
            received=received,
            lost=checker.lost(sent) if sequence_checked else max(0, (sent or received) - received),
            reordered=checker.reordered,
            duplicated=checker.duplicated,
            sequence_checked=sequence_checked,
            seconds=round(seconds, 6),
            messages_per_second=round(rate, 1),
            megabytes_per_second=round(rate * size / 1e6, 3),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping."""
        return asdict(self)


def cpu_seconds() -> float:
    """User plus system CPU seconds this process has used so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of_children() -> float:
    """User plus system CPU seconds of waited-for child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def core_fraction(cpu: float, wall: float) -> float:
    """CPU seconds as a fraction of one core over `wall` seconds (1.0: one core busy)."""
    return round(cpu / wall, 4) if wall > 0 else 0.0


def online_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))
