"""The project's own pass/fail targets, judged from a `podipc bench --format json` report.

The podipc package reports figures; this repository judges them. benchmarks/run.py
writes the targets of its latest run to benchmarks/results/targets.json (schema:
benchmarks/targets.schema.json), into results/bench.md, docs/bench.md and the README.

A target compares a subject with a reference measured in the same run. Its ratio is the
median of the ratios of the runs the two made side by side (run k with run k; `podipc
bench --repeat N` makes N such pairs), never the ratio of two medians taken apart; the
range of those paired ratios is kept beside it. A few targets are absolute (a CPU share,
a ticker's lag, a rate): their value is the median over the runs. A target whose cells
did not run says why instead (met is null). Targets on asyncio subjects whose channel is
not on the async contract yet say so (they run through podipc.aio's helper thread).

The targets come from the issues: the shm and kernel-channel targets of the first
benchmarks, issue 12 (asyncio endpoints) and issue 13 (small messages at full speed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from podipc.bench.cells import raw_baselines
from podipc.bench.report import find, markdown_table, size_label
from podipc.bench.spread import figures_by_run, paired_ratios, run_columns
from podipc.bench.subjects import HELPER_THREAD
from podipc.transport import schemes

KERNEL_BACKED = ("tcp", "udp", "unix", "mq", "sysvmq")
"""The channels this project holds to its raw primitive's speed (each has a raw baseline peer)."""
SMALL_SIZE = 64
LARGE_SIZE = 65536
SMALL_LIMIT = 1.15
LARGE_LIMIT = 1.05
SMALL_LIMITS = {("tcp", "latency"): 1.1, ("unix", "latency"): 1.1, ("udp", "throughput"): 1.0}
"""Issue 13: tcp and unix round trips at 64 B <= 1.1x raw; udp as many msg/s as raw UDP."""
IDLE_LIMIT = 0.02
LATENCY = "latency.p50_us"
RATE = "throughput.messages_per_second"
ASYNC_THROUGHPUT_CHANNELS = ("shm", "unix", "tcp", "mq")
"""Issue 12: async consumer throughput at 64 B >= 0.5x sync on these, ticker and idle CPU measured on them."""
ASYNC_VS_ZMQ_CHANNELS = ("shm", "unix")
"""Issue 12: >= 2x zmq.asyncio PULL (over ipc, the local transport) on these."""
ASYNC_LATENCY_CHANNELS = ("unix", "tcp")
"""Issue 12: async round-trip p50 at 64 B <= 1.5x the sync round trip on these."""
ZMQ_PEER_OF = {"tcp": "pyzmq-tcp", "unix": "pyzmq-ipc"}
"""Issue 13: tcp and unix one-way msg/s at 64 B >= 1.0x pyzmq over the same transport."""
TICKER_LAG_LIMIT_MS = 5.0
ASYNC_IDLE_LIMIT = 0.01
BATCH_RATE_TARGET = 10_000_000.0
"""Issue 13: shm:// with send_many/recv_many >= 10M msg/s at 64 B."""
SPOOL_BATCH = "file?sync=batch"
SPOOL_ALWAYS = "file?sync=always"


@dataclass(frozen=True)
class Comparison:
    """What a ratio target compares: `subject` over `reference` in `figure` at `size` (reference over subject if inverse)."""

    subject: str
    reference: str
    figure: str
    size: int
    inverse: bool = False

    @property
    def mode(self) -> str:
        """latency or throughput, from the figure."""
        return "latency" if self.figure.startswith(("latency.", "idle.")) else "throughput"


def runs_of(record: dict[str, Any]) -> dict[str, list[Any]]:
    """The run columns of a record (a report of schema 1 has none: the record is its one run)."""
    runs: dict[str, list[Any]] | None = record.get("runs")
    return runs if runs is not None else run_columns([dict(record, run=0, sequence=0)])


def median_of(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _record(report: dict[str, Any], subject: str, mode: str, size: int) -> tuple[dict[str, Any] | None, str | None]:
    """(an ok record, None), or (None, why it cannot be judged)."""
    record = find(report, subject, mode, size)
    if record is None:
        plan = report["plan"]
        channel = subject.removeprefix("aio-").removeprefix("batch-")
        hint = ""
        if subject.startswith("aio-") and plan.get("api", "sync") != "async":
            hint = " (run with --api async)"
        elif subject.startswith("batch-") and not plan.get("batch"):
            hint = " (run with --batch N)"
        elif channel.partition("?")[0] in schemes():
            if channel not in plan["channels"]:
                hint = f" ({channel} not in --channels)"
            elif size not in plan["sizes"] or mode not in plan["modes"]:
                hint = " (not in --sizes/--mode)"
        elif not plan["peers"] and subject not in plan["channels"]:
            hint = " (run with --peers)"
        elif size not in plan["sizes"] or mode not in plan["modes"]:
            hint = " (not in --sizes/--mode)"
        return None, f"not computed: {subject} {mode} at {size_label(size)} was not measured{hint}"
    if record["status"] == "unsupported":
        return None, f"not applicable: {record['reason']}"
    if record["status"] != "ok":
        return None, f"not computed: {subject} {mode} at {size_label(size)}: {record['status']}: {record['reason']}"
    return record, None


def _median_figure(record: dict[str, Any], figure: str) -> float | None:
    values = list(figures_by_run(runs_of(record), figure).values())
    return round(median_of(values), 6) if values else None


def _note(*records: dict[str, Any] | None) -> str | None:
    """Say when an asyncio subject ran through podipc.aio's helper thread (its channel has no readiness fd yet)."""
    slow = [record["subject"] for record in records if record is not None and record.get("wakeup") == HELPER_THREAD]
    if not slow:
        return None
    return f"{', '.join(slow)}: not on the async contract yet, runs through podipc.aio's helper thread"


def target(
    target_id: str,
    description: str,
    comparison: str,
    limit: float | None,
    *,
    value: float | None = None,
    reference: float | None = None,
    ratios: list[float] | None = None,
    reason: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One judged target: the median of the paired `ratios` (or value / reference) against its limit."""
    ratio = low = high = None
    if ratios:
        ratio, low, high = median_of(ratios), min(ratios), max(ratios)
    elif value is not None and reference:
        ratio = low = high = value / reference
    met = None
    if ratio is not None:
        reason = None
        if limit is None:
            reason = "no limit: reported beside the target it goes with"
        else:
            met = ratio <= limit if comparison == "<=" else ratio >= limit
    return {
        "id": target_id,
        "description": description,
        "value": value,
        "reference": reference,
        "ratio": None if ratio is None else round(ratio, 4),
        "ratio_min": None if low is None else round(low, 4),
        "ratio_max": None if high is None else round(high, 4),
        "pairs": len(ratios) if ratios else (1 if ratio is not None else 0),
        "comparison": comparison,
        "limit": limit,
        "met": met,
        "reason": reason,
        "note": note,
    }


def ratio_target(
    report: dict[str, Any],
    target_id: str,
    description: str,
    compared: Comparison,
    limit: float | None,
    comparison: str,
) -> dict[str, Any]:
    """A target on the paired ratio of two subjects measured side by side."""
    record, why = _record(report, compared.subject, compared.mode, compared.size)
    base, why_base = _record(report, compared.reference, compared.mode, compared.size)
    note = _note(record, base)
    if record is None or base is None:
        return target(target_id, description, comparison, limit, reason=why or why_base, note=note)
    ratios = paired_ratios(runs_of(record), runs_of(base), compared.figure, compared.inverse)
    value, reference = _median_figure(record, compared.figure), _median_figure(base, compared.figure)
    if not ratios:
        why = f"not computed: no run of {compared.subject} and {compared.reference} made side by side was ok in both"
        return target(
            target_id, description, comparison, limit, value=value, reference=reference, reason=why, note=note
        )
    return target(target_id, description, comparison, limit, value=value, reference=reference, ratios=ratios, note=note)


def absolute_target(
    report: dict[str, Any],
    target_id: str,
    description: str,
    place: tuple[str, str, int],
    figure: str,
    unit: float,
    limit: float,
    comparison: str,
) -> dict[str, Any]:
    """A target on one subject's figure (median over its runs) in units of `unit`."""
    subject, mode, size = place
    record, why = _record(report, subject, mode, size)
    if record is None:
        return target(target_id, description, comparison, limit, reason=why)
    values = list(figures_by_run(runs_of(record), figure).values())
    if not values:
        why = f"not computed: {subject} {mode} at {size_label(size)} has no {figure}"
        if figure.startswith("idle."):
            why += " (idle probe at the smallest size only; --idle 0 turns it off)"
        return target(target_id, description, comparison, limit, reason=why, note=_note(record))
    ratios = [value / unit for value in values]  # one per run: the range shows how far the runs strayed
    value = round(median_of(values), 6)
    return target(
        target_id, description, comparison, limit, value=value, reference=unit, ratios=ratios, note=_note(record)
    )


def compute_targets(report: dict[str, Any], previous: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every target of the project, computed from this run's figures (and, given the previous run's, regressions)."""
    targets = [
        *_shm_targets(report),
        *_kernel_targets(report),
        *_asyncio_targets(report),
        *_small_message_targets(report),
        *_pattern_targets(report),
        *_pattern_peer_targets(report),
    ]
    if previous is not None:
        targets += regression_targets(report, previous)
    return targets


def _shm_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield ratio_target(
        report,
        "shm-p50-vs-iceoryx2",
        "shm:// round-trip p50 at 64 B <= 0.5x iceoryx2's",
        Comparison("shm", "iceoryx2", LATENCY, SMALL_SIZE),
        0.5,
        "<=",
    )
    yield ratio_target(
        report,
        "shm-p50-vs-ring",
        "shm:// round-trip p50 at 64 B <= 1.2x the raw busy-poll ring's",
        Comparison("shm", "raw-ring", LATENCY, SMALL_SIZE),
        1.2,
        "<=",
    )
    smallest = min(report["plan"]["sizes"])
    yield absolute_target(
        report,
        "shm-idle-cpu",
        f"shm:// idle consumer <= {IDLE_LIMIT * 100:g} % of a core",
        ("shm", "latency", smallest),
        "idle.core_fraction",
        1.0,
        IDLE_LIMIT,
        "<=",
    )
    yield ratio_target(
        report,
        "shm-throughput-vs-iceoryx2",
        "shm:// one-way throughput at 1 MiB >= iceoryx2's",
        Comparison("shm", "iceoryx2", RATE, 1 << 20),
        1.0,
        ">=",
    )


def _kernel_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    large_sizes = sorted(size for size in report["plan"]["sizes"] if size >= LARGE_SIZE) or [LARGE_SIZE]
    baselines = raw_baselines()
    for channel in KERNEL_BACKED:
        raw = baselines[channel]
        for size in (SMALL_SIZE, *large_sizes):
            label = size_label(size)
            latency_limit = SMALL_LIMITS.get((channel, "latency"), SMALL_LIMIT) if size == SMALL_SIZE else LARGE_LIMIT
            yield ratio_target(
                report,
                f"{channel}-p50-{size}",
                f"{channel}:// round-trip p50 at {label} <= {latency_limit}x {raw}",
                Comparison(channel, raw, LATENCY, size),
                latency_limit,
                "<=",
            )
            rate_limit = SMALL_LIMITS.get((channel, "throughput"), SMALL_LIMIT) if size == SMALL_SIZE else LARGE_LIMIT
            yield ratio_target(
                report,
                f"{channel}-throughput-{size}",
                f"{channel}:// time per message at {label} <= {rate_limit}x {raw} ({raw} msg/s over {channel}'s)",
                Comparison(channel, raw, RATE, size, inverse=True),
                rate_limit,
                "<=",
            )


def _asyncio_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Issue 12: podipc.aio beside the sync endpoints and zmq.asyncio, the loop's ticker, an idle async consumer."""
    for channel in ASYNC_THROUGHPUT_CHANNELS:
        yield ratio_target(
            report,
            f"aio-{channel}-throughput-vs-sync",
            f"aio-{channel} consumer msg/s at 64 B >= 0.5x {channel}:// sync",
            Comparison(f"aio-{channel}", channel, RATE, SMALL_SIZE),
            0.5,
            ">=",
        )
    for channel in ASYNC_VS_ZMQ_CHANNELS:
        yield ratio_target(
            report,
            f"aio-{channel}-throughput-vs-zmq-asyncio",
            f"aio-{channel} consumer msg/s at 64 B >= 2x a zmq.asyncio PULL (pyzmq-asyncio-ipc)",
            Comparison(f"aio-{channel}", "pyzmq-asyncio-ipc", RATE, SMALL_SIZE),
            2.0,
            ">=",
        )
    for channel in ASYNC_LATENCY_CHANNELS:
        yield ratio_target(
            report,
            f"aio-{channel}-p50-vs-sync",
            f"aio-{channel} round-trip p50 at 64 B <= 1.5x {channel}:// sync",
            Comparison(f"aio-{channel}", channel, LATENCY, SMALL_SIZE),
            1.5,
            "<=",
        )
    for channel in ASYNC_THROUGHPUT_CHANNELS:
        yield absolute_target(
            report,
            f"aio-{channel}-ticker-lag",
            f"a 1 ms ticker beside aio-{channel} consuming 64 B at full rate: lag p99 < {TICKER_LAG_LIMIT_MS:g} ms",
            (f"aio-{channel}", "throughput", SMALL_SIZE),
            "ticker.lag_p99_ms",
            1.0,
            TICKER_LAG_LIMIT_MS,
            "<=",
        )
    smallest = min(report["plan"]["sizes"])
    for channel in ASYNC_THROUGHPUT_CHANNELS:
        yield absolute_target(
            report,
            f"aio-{channel}-idle-cpu",
            f"an idle aio-{channel} consumer <= {ASYNC_IDLE_LIMIT * 100:g} % of a core",
            (f"aio-{channel}", "latency", smallest),
            "idle.core_fraction",
            1.0,
            ASYNC_IDLE_LIMIT,
            "<=",
        )


def _small_message_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Issue 13: stream channels against pyzmq, a fast durable spool, batches on shm."""
    for channel, peer in ZMQ_PEER_OF.items():
        yield ratio_target(
            report,
            f"{channel}-throughput-vs-pyzmq",
            f"{channel}:// one-way msg/s at 64 B >= 1.0x {peer}",
            Comparison(channel, peer, RATE, SMALL_SIZE),
            1.0,
            ">=",
        )
    yield ratio_target(
        report,
        "file-sync-batch-throughput-vs-raw-unix",
        f"{SPOOL_BATCH} one-way msg/s at 64 B >= 0.5x raw-unix",
        Comparison(SPOOL_BATCH, "raw-unix", RATE, SMALL_SIZE),
        0.5,
        ">=",
    )
    yield ratio_target(
        report,
        "file-sync-always-throughput-vs-raw-unix",
        f"{SPOOL_ALWAYS} one-way msg/s at 64 B beside it, over raw-unix's",
        Comparison(SPOOL_ALWAYS, "raw-unix", RATE, SMALL_SIZE),
        None,
        ">=",
    )
    yield absolute_target(
        report,
        "batch-shm-throughput",
        f"shm:// with send_many/recv_many >= {BATCH_RATE_TARGET / 1e6:g}M msg/s at 64 B (ratio: msg/s over 10M)",
        ("batch-shm", "throughput", SMALL_SIZE),
        RATE,
        BATCH_RATE_TARGET,
        1.0,
        ">=",
    )


REGRESSION_LIMIT = 0.05
"""Issue 13: nothing of today's regresses by more than 5 %."""
LARGEST_SIZE = 1 << 20


def _pattern_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Issue 14: a request/reply round trip over unix:// against a raw Unix-socket ping-pong (tcp:// reported),
    over shm:// against iceoryx2's request-response (and beside the raw ring);
    fan-in of 4 producer processes against one over unix:// (tcp:// reported); shm:// broadcast's per-subscriber rate at 1 MiB against one consumer's
    (4 subscribers judged, 1 and 2 reported); unix:// broadcast's beside one unix:// consumer (reported)."""
    yield ratio_target(
        report,
        "rpc-unix-p50-vs-raw-unix",
        "request/reply round-trip p50 at 64 B over unix:// <= 1.2x a raw Unix-socket ping-pong",
        Comparison("rpc-unix", "raw-unix", LATENCY, SMALL_SIZE),
        1.2,
        "<=",
    )
    for subscribers in (1, 2, 4):
        yield ratio_target(
            report,
            f"broadcast-shm-{subscribers}-per-subscriber-vs-shm",
            f"shm:// broadcast to {subscribers} subscriber(s): per-subscriber msg/s at 1 MiB "
            + (">= 0.8x the single-consumer shm:// figure" if subscribers == 4 else "beside single-consumer shm://"),
            Comparison(f"broadcast-shm-{subscribers}", "shm", RATE, LARGEST_SIZE),
            0.8 if subscribers == 4 else None,
            ">=",
        )
    for subscribers in (1, 2, 4):
        yield ratio_target(
            report,
            f"broadcast-unix-{subscribers}-per-subscriber-vs-unix",
            f"unix:// broadcast to {subscribers} subscriber(s): per-subscriber msg/s at 1 MiB beside one unix:// consumer",
            Comparison(f"broadcast-unix-{subscribers}", "unix", RATE, LARGEST_SIZE),
            None,
            ">=",
        )
    yield ratio_target(
        report,
        "fanin-unix-4-vs-1-producer",
        "fan-in of 4 producers into one consumer over unix://: aggregate msg/s at 64 B >= 0.9x one producer's",
        Comparison("fanin-unix-4", "fanin-unix-1", RATE, SMALL_SIZE),
        0.9,
        ">=",
    )
    yield ratio_target(
        report,
        "fanin-tcp-4-vs-1-producer",
        "fan-in of 4 producers into one consumer over tcp://: aggregate msg/s at 64 B beside one producer's",
        Comparison("fanin-tcp-4", "fanin-tcp-1", RATE, SMALL_SIZE),
        None,
        ">=",
    )
    for scheme in ("mq", "sysvmq"):
        yield ratio_target(
            report,
            f"fanin-{scheme}-4-vs-1-producer",
            f"fan-in of 4 producers into one consumer over {scheme}://: aggregate msg/s at 64 B >= 0.9x one producer's",
            Comparison(f"fanin-{scheme}-4", f"fanin-{scheme}-1", RATE, SMALL_SIZE),
            0.9,
            ">=",
        )
    yield ratio_target(
        report,
        "rpc-shm-p50-vs-iceoryx2-rpc",
        "request/reply round-trip p50 at 64 B over shm:// <= 0.5x iceoryx2's request-response",
        Comparison("rpc-shm", "iceoryx2-rpc", LATENCY, SMALL_SIZE),
        0.5,
        "<=",
    )
    yield ratio_target(
        report,
        "rpc-shm-p50-vs-raw-ring",
        "request/reply round-trip p50 at 64 B over shm:// beside the raw busy-poll ring's ping-pong",
        Comparison("rpc-shm", "raw-ring", LATENCY, SMALL_SIZE),
        None,
        "<=",
    )
    yield ratio_target(
        report,
        "rpc-tcp-p50-vs-raw-tcp",
        "request/reply round-trip p50 at 64 B over tcp:// beside a raw TCP ping-pong",
        Comparison("rpc-tcp", "raw-tcp", LATENCY, SMALL_SIZE),
        None,
        "<=",
    )


PATTERN_PEER_COMPARISONS = (
    ("fanin-unix-4", "pyzmq-fanin-4", SMALL_SIZE, "fan-in of 4 producer processes over unix://"),
    ("broadcast-shm-4", "iceoryx2-broadcast-4", LARGEST_SIZE, "shm:// broadcast, per subscriber of 4"),
    ("broadcast-shm-4", "pyzmq-broadcast-4", LARGEST_SIZE, "shm:// broadcast, per subscriber of 4"),
    ("queue-mq-4", "pyzmq-queue-4", SMALL_SIZE, "mq:// work queue into 4 consumer processes"),
)
"""Issue 14: (podipc cell, its peer, size, what) of each pattern compared with pyzmq's or iceoryx2's (reported)."""


def _pattern_peer_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Issue 14: each pattern's msg/s against its pyzmq or iceoryx2 peer (podipc.bench.pattern_peers), reported."""
    for subject, peer, size, what in PATTERN_PEER_COMPARISONS:
        yield ratio_target(
            report,
            f"{subject}-vs-{peer}",
            f"{what}: msg/s at {'64 B' if size == SMALL_SIZE else '1 MiB'} beside {peer}",
            Comparison(subject, peer, RATE, size),
            None,
            ">=",
        )


def _paired_median(report: dict[str, Any], compared: Comparison) -> tuple[float | None, str | None]:
    """The median paired ratio of a comparison in one report, or (None, why not)."""
    record, why = _record(report, compared.subject, compared.mode, compared.size)
    base, why_base = _record(report, compared.reference, compared.mode, compared.size)
    if record is None or base is None:
        return None, why or why_base
    ratios = paired_ratios(runs_of(record), runs_of(base), compared.figure, compared.inverse)
    return (median_of(ratios), None) if ratios else (None, "not computed: no pair of runs was ok in both")


def _plain_channels_with_baselines(report: dict[str, Any], size: int) -> list[tuple[str, str]]:
    """(channel, its raw baseline) for each plain channel (no options, sync) measured one way at `size`."""
    return [
        (record["subject"], record["baseline"])
        for record in report["results"]
        if record["mode"] == "throughput"
        and record["size"] == size
        and record["kind"] == "channel"
        and record.get("api", "sync") == "sync"
        and record["subject"] in schemes()
        and record["baseline"]
    ]


def regression_targets(report: dict[str, Any], previous: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13: this run's ratios against the previous run's, each within REGRESSION_LIMIT.

    Ratios to a peer measured in the same run, not raw figures, so a change of machine or
    load between the two runs cancels out: shm's round trip against iceoryx2 and the raw
    ring, and every channel's 1 MiB throughput against its baseline.
    """
    comparisons = [
        (
            "shm-p50-vs-iceoryx2",
            "shm:// p50 over iceoryx2's at 64 B",
            Comparison("shm", "iceoryx2", LATENCY, SMALL_SIZE),
        ),
        ("shm-p50-vs-ring", "shm:// p50 over raw-ring's at 64 B", Comparison("shm", "raw-ring", LATENCY, SMALL_SIZE)),
    ]
    for subject, baseline in _plain_channels_with_baselines(report, LARGEST_SIZE):
        comparisons.append(
            (
                f"{subject}-throughput-{LARGEST_SIZE}-vs-{baseline}",
                f"{subject}:// msg/s over {baseline}'s at 1 MiB",
                Comparison(subject, baseline, RATE, LARGEST_SIZE),
            )
        )
    targets = []
    for target_id, what, compared in comparisons:
        now, why = _paired_median(report, compared)
        before, why_before = _paired_median(previous, compared)
        lower_is_better = compared.figure == LATENCY
        limit = 1.0 + REGRESSION_LIMIT if lower_is_better else 1.0 - REGRESSION_LIMIT
        description = (
            f"no regression: {what}, this run over the previous one {'<=' if lower_is_better else '>='} {limit:g}"
        )
        reason = why or (None if why_before is None else f"no previous figure: {why_before}")
        targets.append(
            target(
                f"regression-{target_id}",
                description,
                "<=" if lower_is_better else ">=",
                limit,
                value=None if now is None else round(now, 6),
                reference=None if before is None else round(before, 6),
                reason=reason,
            )
        )
    return targets


TARGET_COLUMNS = ("target", "ratio", "range", "limit", "met")


def target_rows(targets: list[dict[str, Any]]) -> list[list[str]]:
    """One row per target: its ratio, the range of its pairs and its limit, met or missed, or why not computed."""
    rows = []
    for entry in targets:
        note = " (helper thread)" if entry.get("note") else ""
        limit = "" if entry["limit"] is None else f"{entry['comparison']} {entry['limit']:g}"
        if entry["ratio"] is None:
            rows.append([entry["description"], "n/a", "", limit, str(entry["reason"]) + note])
            continue
        spread = f"{entry['ratio_min']:.3f}..{entry['ratio_max']:.3f}" if entry.get("pairs", 1) > 1 else ""
        verdict = "reported" if entry["met"] is None else ("met" if entry["met"] else "MISSED")
        rows.append([entry["description"], f"{entry['ratio']:.3f}", spread, limit, verdict + note])
    return rows


def markdown(targets: list[dict[str, Any]], applicable_only: bool = False) -> str:
    """The targets as a Markdown table; applicable_only leaves out sizes a channel cannot carry."""
    rows = [
        row
        for entry, row in zip(targets, target_rows(targets), strict=True)
        if not (applicable_only and str(entry["reason"] or "").startswith("not applicable"))
    ]
    return markdown_table(TARGET_COLUMNS, rows)


def notes(targets: list[dict[str, Any]]) -> list[str]:
    """The distinct notes of the targets (which asyncio subjects ran through the helper thread)."""
    return list(dict.fromkeys(entry["note"] for entry in targets if entry.get("note")))
