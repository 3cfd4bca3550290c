"""The project's own pass/fail targets, judged from a `podipc bench --format json` report.

The podipc package reports figures; this repository judges them. benchmarks/run.py
writes the targets of its latest run to benchmarks/results/targets.json (schema:
benchmarks/targets.schema.json), into results/bench.md, docs/bench.md and the README.

Targets are ratios computed from one run, each with its limit and whether it was met;
a target whose cells did not run says why instead (met is null).
"""

from __future__ import annotations

from typing import Any

from podipc.bench.cells import raw_baselines
from podipc.bench.report import find, markdown_table, size_label
from podipc.transport import schemes

KERNEL_BACKED = ("tcp", "udp", "unix", "mq", "sysvmq")
"""The channels this project holds to its raw primitive's speed (each has a raw baseline peer)."""
SMALL_SIZE = 64
LARGE_SIZE = 65536
SMALL_LIMIT = 1.15
LARGE_LIMIT = 1.05
IDLE_LIMIT = 0.02


def _figure(report: dict[str, Any], subject: str, mode: str, size: int) -> tuple[float | None, str | None]:
    """(value, None) for a measured cell, else (None, why): p50 µs for latency, messages/s for throughput."""
    record = find(report, subject, mode, size)
    if record is None:
        hint = ""
        channels = schemes()
        if subject in channels and subject not in report["plan"]["channels"]:
            hint = " (not in --channels)"
        elif subject not in channels and not report["plan"]["peers"]:
            hint = " (run with --peers)"
        elif size not in report["plan"]["sizes"] or mode not in report["plan"]["modes"]:
            hint = " (not in --sizes/--mode)"
        return None, f"not computed: {subject} {mode} at {size_label(size)} was not measured{hint}"
    if record["status"] == "unsupported":
        return None, f"not applicable: {record['reason']}"
    if record["status"] != "ok":
        return None, f"not computed: {subject} {mode} at {size_label(size)}: {record['status']}: {record['reason']}"
    if mode == "latency":
        return float(record["latency"]["p50_us"]), None
    return float(record["throughput"]["messages_per_second"]), None


def _target(
    target_id: str,
    description: str,
    value: float | None,
    reference: float | None,
    limit: float,
    comparison: str,
    reason: str | None,
) -> dict[str, Any]:
    ratio = None
    met = None
    if value is not None and reference is not None and reference > 0:
        ratio = round(value / reference, 4)
        met = ratio <= limit if comparison == "<=" else ratio >= limit
        reason = None
    return {
        "id": target_id,
        "description": description,
        "value": value,
        "reference": reference,
        "ratio": ratio,
        "comparison": comparison,
        "limit": limit,
        "met": met,
        "reason": reason,
    }


def _ratio_target(
    report: dict[str, Any],
    target_id: str,
    description: str,
    subject: str,
    reference: str,
    mode: str,
    size: int,
    limit: float,
    comparison: str,
    inverse: bool = False,
) -> dict[str, Any]:
    value, why = _figure(report, subject, mode, size)
    base, why_base = _figure(report, reference, mode, size)
    if inverse and value and base:
        value, base = base, value  # time per message: the reference's rate over the subject's
    return _target(target_id, description, value, base, limit, comparison, why or why_base)


def compute_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the project, computed from this run's figures."""
    targets = [
        _ratio_target(
            report,
            "shm-p50-vs-iceoryx2",
            "shm:// round-trip p50 at 64 B <= 0.5x iceoryx2's",
            "shm",
            "iceoryx2",
            "latency",
            SMALL_SIZE,
            0.5,
            "<=",
        ),
        _ratio_target(
            report,
            "shm-p50-vs-ring",
            "shm:// round-trip p50 at 64 B <= 1.2x the raw busy-poll ring's",
            "shm",
            "raw-ring",
            "latency",
            SMALL_SIZE,
            1.2,
            "<=",
        ),
        _idle_target(report),
        _ratio_target(
            report,
            "shm-throughput-vs-iceoryx2",
            "shm:// one-way throughput at 1 MiB >= iceoryx2's",
            "shm",
            "iceoryx2",
            "throughput",
            1 << 20,
            1.0,
            ">=",
        ),
    ]
    large_sizes = sorted(size for size in report["plan"]["sizes"] if size >= LARGE_SIZE) or [LARGE_SIZE]
    baselines = raw_baselines()
    for channel in KERNEL_BACKED:
        raw = baselines[channel]
        for size, limit in [(SMALL_SIZE, SMALL_LIMIT), *((size, LARGE_LIMIT) for size in large_sizes)]:
            label = size_label(size)
            targets.append(
                _ratio_target(
                    report,
                    f"{channel}-p50-{size}",
                    f"{channel}:// round-trip p50 at {label} <= {limit}x {raw}",
                    channel,
                    raw,
                    "latency",
                    size,
                    limit,
                    "<=",
                )
            )
            targets.append(
                _ratio_target(
                    report,
                    f"{channel}-throughput-{size}",
                    f"{channel}:// time per message at {label} <= {limit}x {raw} ({raw} msg/s over {channel}'s)",
                    channel,
                    raw,
                    "throughput",
                    size,
                    limit,
                    "<=",
                    inverse=True,
                )
            )
    return targets


def _idle_target(report: dict[str, Any]) -> dict[str, Any]:
    description = "shm:// idle consumer <= 2 % of a core"
    size = min(report["plan"]["sizes"])
    record = find(report, "shm", "latency", size)
    if record is None or record["status"] != "ok" or record.get("idle") is None:
        why = (
            "not computed: shm latency at the smallest size was not measured"
            if record is None
            else f"not computed: {record['reason'] or 'no idle probe (--idle 0)'}"
        )
        return _target("shm-idle-cpu", description, None, None, IDLE_LIMIT, "<=", why)
    fraction = float(record["idle"]["core_fraction"])
    result = _target("shm-idle-cpu", description, fraction, 1.0, IDLE_LIMIT, "<=", None)
    return result


TARGET_COLUMNS = ("target", "ratio", "limit", "met")


def target_rows(targets: list[dict[str, Any]]) -> list[list[str]]:
    """One row per target: its ratio and limit, met or missed, or why it could not be computed."""
    rows = []
    for target in targets:
        if target["met"] is None:
            rows.append(
                [
                    target["description"],
                    "n/a",
                    f"{target['comparison']} {target['limit']}",
                    str(target["reason"]),
                ]
            )
        else:
            rows.append(
                [
                    target["description"],
                    f"{target['ratio']:.3f}",
                    f"{target['comparison']} {target['limit']}",
                    "met" if target["met"] else "MISSED",
                ]
            )
    return rows


def markdown(targets: list[dict[str, Any]], applicable_only: bool = False) -> str:
    """The targets as a Markdown table; applicable_only leaves out sizes a channel cannot carry."""
    rows = [
        row
        for target, row in zip(targets, target_rows(targets), strict=True)
        if not (applicable_only and str(target["reason"] or "").startswith("not applicable"))
    ]
    return markdown_table(TARGET_COLUMNS, rows)
