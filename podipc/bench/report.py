"""Turn a bench report (the JSON-ready mapping from podipc.bench.runner) into tables and a plot.

The bench reports figures; it does not judge them. The project's own pass/fail targets
live in the repository (benchmarks/targets.py), not in the package.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from podipc.tables import markdown_table, size_label

__all__ = ["find", "markdown_table", "plot", "render", "size_label"]


def find(report: dict[str, Any], subject: str, mode: str, size: int) -> dict[str, Any] | None:
    """The result record of one cell, or None when it was not planned."""
    for record in report["results"]:
        if record["subject"] == subject and record["mode"] == mode and record["size"] == size:
            return record  # type: ignore[no-any-return]
    return None


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
    "runs",
    "p50 range µs",
    "p50 vs baseline",
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
    "runs",
    "msg/s range",
    "msg/s vs baseline",
    "ticker lag p99 ms",
)


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction * 100:.0f} %"


def _runs(record: dict[str, Any]) -> str:
    """How many runs gave the figures, e.g. '5' or '4 of 5'."""
    statuses = (record.get("runs") or {}).get("status") or [record["status"]]
    ok = statuses.count("ok")
    return str(ok) if ok == len(statuses) else f"{ok} of {len(statuses)}"


def _range(record: dict[str, Any], figure: str, style: str) -> str:
    """'min..max' of a figure over the runs (blank for one run)."""
    spread = (record.get("spread") or {}).get(figure)
    if not spread or spread["n"] < 2:
        return ""
    return f"{spread['min']:{style}}..{spread['max']:{style}}"


def _ratio(record: dict[str, Any], figure: str) -> str:
    """The median paired ratio against the baseline, its range over the pairs, and the baseline's name."""
    ratio = (record.get("ratios") or {}).get(figure)
    if not ratio:
        return ""
    spread = f" ({ratio['min']:.2f}..{ratio['max']:.2f})" if ratio["n"] > 1 else ""
    return f"{ratio['median']:.2f}x{spread} {ratio['reference']}"


def _lag(record: dict[str, Any]) -> str:
    ticker = record.get("ticker")
    return "" if not ticker or ticker["lag_p99_ms"] is None else f"{ticker['lag_p99_ms']:.2f}"


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
                _runs(record),
                _range(record, "latency.p50_us", ".1f"),
                _ratio(record, "latency.p50_us"),
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
                _runs(record),
                _range(record, "throughput.messages_per_second", ",.0f"),
                _ratio(record, "throughput.messages_per_second"),
                _lag(record),
            ]
        )
    return rows


def asyncio_lines(report: dict[str, Any]) -> list[str]:
    """How each asyncio subject's receiver waited: on a readiness descriptor, or through a helper thread."""
    seen: dict[str, str] = {}
    for record in report["results"]:
        if record.get("api") == "async" and record.get("wakeup") and record["subject"] not in seen:
            seen[record["subject"]] = record["wakeup"]
    return [
        f"{subject}: "
        + (
            "waits on a readiness descriptor in the event loop (no thread hop per message)"
            if wakeup == "readiness"
            else "not on the async contract yet: podipc.aio runs its blocking calls on one helper thread"
        )
        for subject, wakeup in seen.items()
    ]


def repeat_lines(report: dict[str, Any]) -> list[str]:
    """What the figures of a repeated run are (nothing for a single run)."""
    plan = report["plan"]
    if plan.get("max_repeat", 1) <= 1:
        return []
    confidence = plan.get("confidence")
    runs = (
        f"{plan['repeat']} to {plan['max_repeat']} runs per cell, until the {confidence['level_percent']:g} % "
        f"confidence interval of each p50 and msg/s (and its ratio) was at most {confidence['width_percent']:g} % "
        "of the mean"
        if confidence
        else f"{plan['repeat']} runs per cell"
    )
    return [
        f"Repeated: {runs}; the subjects of each mode and size took turns (A B A B ...). Figures are medians over the "
        "runs (counts are totals); ranges are min..max over the runs; ratios against the baseline are medians of the "
        "ratios of runs made side by side, with their range."
    ]


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
    for line in [*asyncio_lines(report), *repeat_lines(report), *environment_lines(report)]:
        console.print(line, highlight=False)
    return buffer.getvalue()


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, latency and throughput tables, skipped peers."""
    parts = ["## Where it ran", "", *(f"- {line}" for line in [*repeat_lines(report), *environment_lines(report)]), ""]
    notes = Notes()
    if any(record["mode"] == "latency" for record in report["results"]):
        parts += ["## Latency (round trip, µs)", "", markdown_table(LATENCY_COLUMNS, latency_rows(report, notes)), ""]
    if any(record["mode"] == "throughput" for record in report["results"]):
        parts += [
            "## Throughput (one way, counted at the consumer)",
            "",
            markdown_table(THROUGHPUT_COLUMNS, throughput_rows(report, notes)),
            "",
        ]
    if notes.reasons:
        parts += ["Notes:", "", *(f"- {line}" for line in notes.lines()), ""]
    if asyncio_lines(report):
        parts += ["## asyncio ends", "", *(f"- {line}" for line in asyncio_lines(report)), ""]
    if report["skipped"]:
        parts += ["## Skipped", "", *(f"- {item['subject']}: {item['reason']}" for item in report["skipped"]), ""]
    return "\n".join(parts)


CSV_COLUMNS = (
    "subject",
    "kind",
    "api",
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
    "runs",
    "ratio_figure",
    "ratio_median",
    "ratio_min",
    "ratio_max",
    "wakeup",
    "ticker_lag_p99_ms",
)


def render_csv(report: dict[str, Any]) -> str:
    """One CSV row per cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in report["results"]:
        row: dict[str, Any] = {
            key: record.get(key) for key in ("subject", "kind", "api", "baseline", "mode", "size", "status", "reason")
        }
        row["runs"] = len((record.get("runs") or {}).get("status") or [record["status"]])
        row["wakeup"] = record.get("wakeup")
        if record.get("ticker"):
            row["ticker_lag_p99_ms"] = record["ticker"]["lag_p99_ms"]
        figure = "latency.p50_us" if record["mode"] == "latency" else "throughput.messages_per_second"
        ratio = (record.get("ratios") or {}).get(figure)
        if ratio:
            row.update(
                ratio_figure=figure, ratio_median=ratio["median"], ratio_min=ratio["min"], ratio_max=ratio["max"]
            )
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


def render_json(value: Any, indent: str = "") -> str:
    """JSON laid out for reading: nested objects and lists indented, a flat one (scalars only) on one line."""
    if isinstance(value, dict) and value and not _flat(value.values()):
        inner = indent + "  "
        items = ",\n".join(f"{inner}{json.dumps(key)}: {render_json(item, inner)}" for key, item in value.items())
        return f"{{\n{items}\n{indent}}}"
    if isinstance(value, list) and value and not _flat(value):
        inner = indent + "  "
        items = ",\n".join(f"{inner}{render_json(item, inner)}" for item in value)
        return f"[\n{items}\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def _flat(values: Any) -> bool:
    return all(not isinstance(value, (dict, list)) for value in values)


def render(report: dict[str, Any], output_format: str) -> str:
    """The report in one of: table, json, csv, markdown."""
    if output_format == "json":
        return render_json(report) + "\n"
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
