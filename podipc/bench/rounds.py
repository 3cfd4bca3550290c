"""Runs in rounds: every subject of one mode and size takes its turn, round after round (A B A B ...).

A *group* is one mode and size with every subject the plan measures. Round k runs each
subject of the group once, in the same order, so run k of a channel and run k of its
baseline ran side by side; their ratio is taken per round (podipc.bench.spread). A group
runs `--repeat` rounds, or with `--confidence` more until every key figure and key ratio
of the group is settled (or `--max-repeat` rounds ran). Outcomes that cannot change
(skipped: not available here; unsupported: the size does not fit) are not repeated.

The report keeps one record per subject, mode and size: its figures over the ok runs
(counts summed, everything else the median), the spread of its main figures, the paired
ratios against its baseline, and the runs themselves as columns (one list per figure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from podipc.bench.spread import Spread, combine, paired_ratios, run_columns, spread_of
from podipc.bench.subjects import Subject

FIGURE_GROUPS = ("latency", "throughput", "cpu", "idle", "ticker")
"""The figures objects of a run (each None when it does not apply)."""
SPREAD_FIGURES = {
    "latency": (
        "latency.p50_us",
        "latency.p99_us",
        "latency.p999_us",
        "cpu.client_core_fraction",
        "cpu.server_core_fraction",
        "idle.core_fraction",
    ),
    "throughput": (
        "throughput.messages_per_second",
        "cpu.client_core_fraction",
        "cpu.server_core_fraction",
        "ticker.lag_p99_ms",
    ),
}
"""The figures whose spread over the runs a record gives, by mode (every run's figures are in its run columns)."""
RATIO_FIGURES = {
    "latency": ("latency.p50_us", "latency.p99_us"),
    "throughput": ("throughput.messages_per_second",),
}
"""The figures whose paired ratio against the subject's baseline the report gives, by mode."""
KEY_FIGURES = {"latency": "latency.p50_us", "throughput": "throughput.messages_per_second"}
"""What --confidence waits to settle in every record of a group (and its ratio against the baseline)."""
FINAL_STATUSES = frozenset({"skipped", "unsupported"})
"""Outcomes another run would not change."""


@dataclass
class Group:
    """One mode and size, with the subjects measured in it, in their order within a round."""

    mode: str
    size: int
    subjects: list[Subject]


def plan_groups(subjects: Sequence[Subject], modes: Sequence[str], sizes: Sequence[int]) -> list[Group]:
    """Every (mode, size) in report order, each with the subjects measured in that mode."""
    return [
        Group(mode, size, [subject for subject in subjects if mode in subject.modes])
        for mode in modes
        for size in sizes
        if any(mode in subject.modes for subject in subjects)
    ]


def record_from_runs(
    subject: Subject, mode: str, size: int, runs: list[dict[str, Any]], level: float
) -> dict[str, Any]:
    """The report entry of a subject, mode and size from its runs (ratios are added by add_ratios)."""
    ok = [run for run in runs if run["status"] == "ok"]
    if ok:
        status = "ok"
        failed = [run for run in runs if run["status"] != "ok"]
        reason = f"{len(failed)} of {len(runs)} runs failed, first: {failed[0]['reason']}" if failed else None
    else:
        status, reason = runs[-1]["status"], runs[-1]["reason"]
    record: dict[str, Any] = {
        "subject": subject.name,
        "kind": subject.kind,
        "api": subject.api,
        "baseline": subject.baseline,
        "mode": mode,
        "size": size,
        "status": status,
        "reason": reason,
    }
    for group in FIGURE_GROUPS:
        parts = [run[group] for run in ok if run[group] is not None]
        record[group] = combine(parts) if parts else None
    record["wakeup"] = next((run["wakeup"] for run in runs if run["wakeup"] is not None), None)
    record["elapsed_seconds"] = round(sum(run["elapsed_seconds"] for run in runs), 3)
    spreads = ((figure, spread_of(ok, figure, level)) for figure in SPREAD_FIGURES[mode])
    record["spread"] = {figure: spread.as_dict() for figure, spread in spreads if spread is not None}
    record["ratios"] = {}
    record["runs"] = run_columns(runs)
    return record


def add_ratios(records: Sequence[dict[str, Any]], level: float) -> None:
    """Give each record of one group its paired ratios against its baseline (when the baseline ran in the group)."""
    by_subject = {record["subject"]: record for record in records}
    for record in records:
        reference = by_subject.get(record["baseline"] or "")
        if record["status"] != "ok" or reference is None or reference["status"] != "ok":
            continue
        for figure in RATIO_FIGURES[record["mode"]]:
            values = paired_ratios(record["runs"], reference["runs"], figure)
            if values:
                record["ratios"][figure] = ratio_entry(reference["subject"], values, level)


def ratio_entry(reference: str, values: Sequence[float], level: float) -> dict[str, Any]:
    """A paired ratio's report entry: the reference, each pair's ratio, and their spread."""
    return {
        "reference": reference,
        "values": [round(value, 5) for value in values],
        **Spread.of(values, level).as_dict(),
    }


def group_settled(records: Sequence[Mapping[str, Any]], width_percent: float) -> bool:
    """True when every ok record's key figure, and its key ratio if it has one, has a narrow enough interval."""
    for record in records:
        if record["status"] != "ok":
            continue
        key = KEY_FIGURES[record["mode"]]
        for entry in (record["spread"].get(key), record["ratios"].get(key)):
            if entry is not None and not _settled(entry, width_percent):
                return False
        if key not in record["spread"]:
            return False
    return True


def _settled(entry: Mapping[str, Any], width_percent: float) -> bool:
    width = entry.get("ci_width_percent")
    return width is not None and width <= width_percent
