"""Turn a bench report (the JSON-ready mapping from podipc.bench.runner) into targets, tables and a plot.

Targets are ratios computed from the same run, each with its limit and whether it was
met; a target whose cells did not run says why instead (met is null).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

CHANNELS = ("tcp", "udp", "unix", "mq", "sysvmq", "shm", "file", "zmq+tcp", "zmq+ipc")
KERNEL_BACKED = ("tcp", "udp", "unix", "mq", "sysvmq")
SMALL_SIZE = 64
LARGE_SIZE = 65536
SMALL_LIMIT = 1.15
LARGE_LIMIT = 1.05
IDLE_LIMIT = 0.02


def size_label(size: int) -> str:
    """64 B, 4 KiB, 1 MiB..."""
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def find(report: dict[str, Any], subject: str, mode: str, size: int) -> dict[str, Any] | None:
    """The result record of one cell, or None when it was not planned."""
    for record in report["results"]:
        if record["subject"] == subject and record["mode"] == mode and record["size"] == size:
            return record  # type: ignore[no-any-return]
    return None


def _figure(report: dict[str, Any], subject: str, mode: str, size: int) -> tuple[float | None, str | None]:
    """(value, None) for a measured cell, else (None, why): p50 µs for latency, messages/s for throughput."""
    record = find(report, subject, mode, size)
    if record is None:
        hint = ""
        if subject in CHANNELS and subject not in report["plan"]["channels"]:
            hint = " (not in --channels)"
        elif subject not in CHANNELS and not report["plan"]["peers"]:
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
    for channel in KERNEL_BACKED:
        raw = {"tcp": "raw-tcp", "udp": "raw-udp", "unix": "raw-unix", "mq": "raw-posix-mq", "sysvmq": "raw-sysv-mq"}[
            channel
        ]
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


def add_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its "targets" section (computed from its own figures)."""
    report["targets"] = compute_targets(report)
    return report


# --- rendering ---------------------------------------------------------------------------

LATENCY_COLUMNS = (
    "subject",
    "size",
    "p50 µs",
    "p90 µs",
    "p99 µs",
    "p99.9 µs",
    "max µs",
    "mean µs",
    "round trips",
    "client CPU",
    "server CPU",
    "idle CPU",
)
THROUGHPUT_COLUMNS = (
    "subject",
    "size",
    "msg/s",
    "MB/s",
    "received",
    "lost",
    "reordered",
    "duplicated",
    "client CPU",
    "server CPU",
)


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction * 100:.0f} %"


class Notes:
    """Reasons cited by number under a table, each distinct reason once."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def cite(self, record: dict[str, Any]) -> str:
        """'status [n]' for a cell that has no figures."""
        reason = str(record["reason"])
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"{record['status']} [{self.reasons.index(reason) + 1}]"

    def lines(self) -> list[str]:
        """'[n] reason' lines."""
        return [f"[{number}] {reason}" for number, reason in enumerate(self.reasons, 1)]


def latency_rows(report: dict[str, Any], notes: Notes) -> list[list[str]]:
    """One row per latency cell (figures, or a cited reason in place of them)."""
    rows = []
    for record in report["results"]:
        if record["mode"] != "latency":
            continue
        head = [record["subject"], size_label(record["size"])]
        if record["status"] != "ok":
            rows.append([*head, notes.cite(record), *[""] * (len(LATENCY_COLUMNS) - 3)])
            continue
        latency, cpu, idle = record["latency"], record["cpu"], record["idle"]
        trips = str(latency["round_trips"]) + (f" ({latency['lost']} lost)" if latency["lost"] else "")
        rows.append(
            [
                *head,
                *(f"{latency[key]:.1f}" for key in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us")),
                trips,
                _percent(cpu["client_core_fraction"]),
                _percent(cpu["server_core_fraction"]),
                _percent(idle["core_fraction"]) if idle else "",
            ]
        )
    return rows


def throughput_rows(report: dict[str, Any], notes: Notes) -> list[list[str]]:
    """One row per throughput cell (figures, or a cited reason in place of them)."""
    rows = []
    for record in report["results"]:
        if record["mode"] != "throughput":
            continue
        head = [record["subject"], size_label(record["size"])]
        if record["status"] != "ok":
            rows.append([*head, notes.cite(record), *[""] * (len(THROUGHPUT_COLUMNS) - 3)])
            continue
        flow, cpu = record["throughput"], record["cpu"]
        rows.append(
            [
                *head,
                f"{flow['messages_per_second']:,.0f}",
                f"{flow['megabytes_per_second']:,.1f}",
                f"{flow['received']:,}",
                f"{flow['lost']:,}",
                f"{flow['reordered']:,}",
                f"{flow['duplicated']:,}",
                _percent(cpu["client_core_fraction"]),
                _percent(cpu["server_core_fraction"]),
            ]
        )
    return rows


TARGET_COLUMNS = ("target", "ratio", "limit", "met")


def target_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per target: its ratio and limit, met or missed, or why it could not be computed."""
    rows = []
    for target in report.get("targets", []):
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


def environment_lines(report: dict[str, Any]) -> list[str]:
    """A few lines saying where the run happened (hardware, kernel, versions, noise)."""
    client = report["environment"]["client"]
    server = report["environment"].get("server") or {}
    libraries = ", ".join(f"{name} {value}" for name, value in client["libraries"].items() if value)
    shared = [
        name
        for name, value in client["namespaces"].items()
        if value and value == server.get("namespaces", {}).get(name)
    ]
    shm = client.get("dev_shm") or {}
    return [
        f"CPU: {client['cpu_model']} ({client['cpus_usable']} usable of {client['cpu_count']}), "
        f"memory {round((client.get('memory_total_bytes') or 0) / 2**30)} GiB, load average {client['load_average']}",
        f"Kernel: {client['kernel']}; {client['python']}",
        f"Libraries: {libraries}",
        f"/dev/shm: {round(shm.get('total_bytes', 0) / 2**20)} MiB; mqueue {client['mqueue']}; "
        f"SysV msg {client['sysv_msg']}",
        f"Namespaces shared by client and server: {', '.join(shared) or 'none'}; mode {report['plan']['mode']}",
        f"Run: {report['started_at']}, {report['duration_seconds']} s, "
        f"{report['plan']['seconds_per_cell']} s per cell; command: {report['command']}",
    ]


def render_table(report: dict[str, Any]) -> str:
    """The report as rich tables (plain text)."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=220, force_terminal=False, color_system=None)
    notes = Notes()
    for title, columns, rows in (
        ("Latency (round trip)", LATENCY_COLUMNS, latency_rows(report, notes)),
        ("Throughput (one way, counted at the consumer)", THROUGHPUT_COLUMNS, throughput_rows(report, notes)),
        ("Targets", TARGET_COLUMNS, target_rows(report)),
    ):
        if not rows:
            continue
        table = Table(*columns, title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in notes.lines():
        console.print(line, highlight=False)
    for skipped in report["skipped"]:
        console.print(f"skipped {skipped['subject']}: {skipped['reason']}")
    for line in environment_lines(report):
        console.print(line, highlight=False)
    return buffer.getvalue()


def _markdown_table(columns: Iterable[str], rows: list[list[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, targets, latency and throughput tables, skipped peers."""
    parts = ["## Where it ran", "", *(f"- {line}" for line in environment_lines(report)), ""]
    if report.get("targets"):
        parts += ["## Targets", "", _markdown_table(TARGET_COLUMNS, target_rows(report)), ""]
    notes = Notes()
    if any(record["mode"] == "latency" for record in report["results"]):
        parts += ["## Latency (round trip, µs)", "", _markdown_table(LATENCY_COLUMNS, latency_rows(report, notes)), ""]
    if any(record["mode"] == "throughput" for record in report["results"]):
        parts += [
            "## Throughput (one way, counted at the consumer)",
            "",
            _markdown_table(THROUGHPUT_COLUMNS, throughput_rows(report, notes)),
            "",
        ]
    if notes.reasons:
        parts += ["Notes:", "", *(f"- {line}" for line in notes.lines()), ""]
    if report["skipped"]:
        parts += ["## Skipped", "", *(f"- {item['subject']}: {item['reason']}" for item in report["skipped"]), ""]
    return "\n".join(parts)


CSV_COLUMNS = (
    "subject",
    "kind",
    "baseline",
    "mode",
    "size",
    "status",
    "reason",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "max_us",
    "mean_us",
    "round_trips",
    "round_trips_lost",
    "messages_per_second",
    "megabytes_per_second",
    "sent",
    "received",
    "lost",
    "reordered",
    "duplicated",
    "client_cpu_seconds",
    "client_core_fraction",
    "server_cpu_seconds",
    "server_core_fraction",
    "idle_core_fraction",
)


def render_csv(report: dict[str, Any]) -> str:
    """One CSV row per cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in report["results"]:
        row: dict[str, Any] = {
            key: record[key] for key in ("subject", "kind", "baseline", "mode", "size", "status", "reason")
        }
        if record["latency"]:
            latency = dict(record["latency"])
            row["round_trips_lost"] = latency.pop("lost")
            row.update(latency)
        if record["throughput"]:
            row.update(record["throughput"])
        if record["cpu"]:
            row.update(
                client_cpu_seconds=record["cpu"]["client_seconds"],
                client_core_fraction=record["cpu"]["client_core_fraction"],
                server_cpu_seconds=record["cpu"]["server_seconds"],
                server_core_fraction=record["cpu"]["server_core_fraction"],
            )
        if record["idle"]:
            row["idle_core_fraction"] = record["idle"]["core_fraction"]
        writer.writerow(row)
    return buffer.getvalue()


def render(report: dict[str, Any], output_format: str) -> str:
    """The report in one of: table, json, csv, markdown."""
    if output_format == "json":
        return json.dumps(report, indent=2) + "\n"
    if output_format == "csv":
        return render_csv(report)
    if output_format == "markdown":
        return render_markdown(report)
    return render_table(report)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(report: dict[str, Any], path: str) -> None:
    """Write a PNG: latency percentiles (p50 bars, p99 marks) and throughput per subject and size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError as exc:
        raise PlotUnavailable("the plot needs matplotlib: pip install 'podipc[plot]'") from exc
    subjects = list(dict.fromkeys(record["subject"] for record in report["results"]))
    sizes = report["plan"]["sizes"]
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(max(10, len(subjects) * 0.9), 9))
    width = 0.8 / max(len(sizes), 1)
    positions = range(len(subjects))
    for offset, size in enumerate(sizes):
        xs = [position + (offset - (len(sizes) - 1) / 2) * width for position in positions]
        p50, p99, rates = [], [], []
        for subject in subjects:
            latency = find(report, subject, "latency", size)
            flow = find(report, subject, "throughput", size)
            ok_latency = latency is not None and latency["status"] == "ok"
            p50.append(latency["latency"]["p50_us"] if ok_latency and latency else 0)
            p99.append(latency["latency"]["p99_us"] if ok_latency and latency else float("nan"))
            ok_flow = flow is not None and flow["status"] == "ok"
            rates.append(flow["throughput"]["megabytes_per_second"] if ok_flow and flow else 0)
        top.bar(xs, p50, width, label=f"{size_label(size)} p50")
        top.scatter(xs, p99, marker="_", color="black", s=60, zorder=3)
        bottom.bar(xs, rates, width, label=size_label(size))
    for axis, label in ((top, "round trip µs (bar p50, dash p99)"), (bottom, "MB/s one way")):
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_xticks(list(positions))
        axis.set_xticklabels(subjects, rotation=30, ha="right")
        axis.legend(fontsize="small", ncol=len(sizes))
        axis.grid(axis="y", alpha=0.3)
    client = report["environment"]["client"]
    figure.suptitle(
        f"podipc bench {report['started_at']}: {client['cpu_model']}, {client['cpus_usable']} CPUs, "
        f"{client['kernel']}, {client['python']}",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
