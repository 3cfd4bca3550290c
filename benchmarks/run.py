"""Run `podipc bench` (every channel, peers, asyncio, batches, spool durability, repeated) and the hot paths.

    python benchmarks/run.py                 # everything the README and docs/bench.md show, in one run
    python benchmarks/run.py --quick         # a smoke run of the same plan (short cells, 2 runs each)
    python benchmarks/run.py --render-only   # re-render from the existing results (no measuring)

The bench runs every cell `--repeat` times (default 5), the subjects of each mode and size
taking turns (A B A B ...), so every ratio is a median of runs made side by side; with
`--confidence 99,5` it adds runs (up to `--max-repeat`) until the figures settle, as
netperf's -I/-i do. Plan: every channel, `file?sync=batch` and `file?sync=always` (issue
13's durable spool), `--peers` (raw primitives and libraries), `--api async` (the podipc.aio
twin of every channel and zmq.asyncio), `--batch 256` (send_many/recv_many; cells whose
channel lacks them say so). On 2 quiet cores the default takes about 30-40 minutes.

Writes, in benchmarks/results/:
    bench.json       the report (schema: podipc/bench/schema.json), hardware included
    targets.json     this project's targets judged from it (benchmarks/targets.py; schema:
                     benchmarks/targets.schema.json), including "no regression" targets
                     against the bench.json this run replaces; the README's targets table too
    bench.md         the same as Markdown: where it ran, targets, latency and throughput
                     (also copied into the "Latest results" section of docs/bench.md)
    bench.png        latency percentiles and throughput per subject and size
    hot-paths-stats.json  pytest-benchmark statistics of framing and in-process send/receive
                          (min, median, mean, quartiles, ops, rounds per benchmark; no raw timings)
    hot-paths.txt         the same as the pytest-benchmark table
    hot-paths.json        pytest-benchmark's own output with every round's timing:
                          a local artefact, kept out of git by .gitignore
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: benchmarks.targets is importable

from benchmarks import targets as project_targets  # noqa: E402 - after the path is set

README = ROOT / "README.md"


SPOOL_VARIANTS = ("file?sync=batch", "file?sync=always")
"""Issue 13: the spool at each durability level it is judged at (skipped, with the reason, where file:// lacks it)."""
PATTERN_CELLS = (
    "rpc-unix",
    "rpc-tcp",
    "rpc-shm",
    "fanin-unix-1",
    "fanin-unix-2",
    "fanin-unix-4",
    "fanin-tcp-1",
    "fanin-tcp-2",
    "fanin-tcp-4",
    "fanin-mq-1",
    "fanin-mq-2",
    "fanin-mq-4",
    "fanin-sysvmq-1",
    "fanin-sysvmq-2",
    "fanin-sysvmq-4",
    "broadcast-shm-1",
    "broadcast-shm-2",
    "broadcast-shm-4",
    "broadcast-unix-1",
    "broadcast-unix-2",
    "broadcast-unix-4",
)
"""Issue 14: request/reply round trips, beside the raw ping-pong of the same socket (rpc-shm beside iceoryx2's
request-response, a peer: --peers measures it); fan-in of 1, 2, 4 producer
processes over unix://, tcp://, mq:// and sysvmq://;
shm:// and unix:// broadcast to 1, 2 and 4 subscribers (throughput cells), beside one consumer of the same scheme."""
PATTERN_PEER_CELLS = (
    *(f"pyzmq-fanin-{count}" for count in (1, 4)),
    *(f"{peer}-broadcast-{count}" for peer in ("iceoryx2", "pyzmq") for count in (1, 4)),
    *(f"{queue}-{count}" for queue in ("queue-mq", "queue-sysvmq", "pyzmq-queue") for count in (1, 4)),
)
"""Issue 14: the patterns' peers (pyzmq, iceoryx2) and the work queues (podipc.bench.pattern_peers), 1 and 4 each."""
DEFAULT_REPEAT = 5
QUICK_REPEAT = 2
BATCH = 256


def bench_command(arguments: argparse.Namespace, output: Path) -> list[str]:
    """The `podipc bench` command line of a full run."""
    command = [
        sys.executable,
        "-m",
        "podipc",
        "bench",
        "--channels",
        ",".join(("all", *SPOOL_VARIANTS, *PATTERN_CELLS, *PATTERN_PEER_CELLS)),
        "--peers",
        "--api",
        "async",
        "--batch",
        str(BATCH),
        "--repeat",
        str(arguments.repeat or (QUICK_REPEAT if arguments.quick else DEFAULT_REPEAT)),
        "--format",
        "json",
        "--output",
        str(output),
        "--plot",
        str(RESULTS / "bench.png"),
    ]
    if arguments.quick:
        command.append("--quick")
    if arguments.duration is not None:
        command += ["--duration", str(arguments.duration)]
    if arguments.confidence:
        command += ["--confidence", arguments.confidence]
    if arguments.max_repeat is not None:
        command += ["--max-repeat", str(arguments.max_repeat)]
    return command


def run_bench(arguments: argparse.Namespace) -> dict[str, Any]:
    """The full `podipc bench`, written to results/bench.json; the report."""
    output = RESULTS / "bench.json"
    subprocess.run(bench_command(arguments, output), check=True, cwd=ROOT)
    report: dict[str, Any] = json.loads(output.read_text())
    return report


def previous_report(path: Path) -> dict[str, Any] | None:
    """The report this run replaces (for the no-regression targets), or None when there is none."""
    if not path.exists():
        return None
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def rerender() -> dict[str, Any]:
    """The existing results/bench.json, its plot redrawn."""
    from podipc.bench.report import plot

    report: dict[str, Any] = json.loads((RESULTS / "bench.json").read_text())
    plot(report, str(RESULTS / "bench.png"))
    return report


def judge(report: dict[str, Any], previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """This project's targets from the report, written to results/targets.json."""
    judged = project_targets.compute_targets(report, previous)
    document = {"report": "bench.json", "targets": judged}
    (RESULTS / "targets.json").write_text(json.dumps(document, indent=2) + "\n")
    return judged


def results_markdown(report: dict[str, Any], judged: list[dict[str, Any]]) -> str:
    """The report as Markdown with the targets after where it ran."""
    from podipc.bench.report import render_markdown

    text = render_markdown(report)
    notes = "".join(f"- {note}\n" for note in project_targets.notes(judged))
    section = (
        f"## Targets\n\n{TARGETS_LEGEND}\n\n{project_targets.markdown(judged)}\n\n{notes}{chr(10) if notes else ''}"
    )
    head, latency, rest = text.partition("## Latency")
    return head + section + latency + rest


def write_markdown(report: dict[str, Any], judged: list[dict[str, Any]]) -> None:
    """results/bench.md from the report and its targets."""
    heading = "# podipc bench results\n\nWritten by `python benchmarks/run.py`; the machine may have been shared.\n\n"
    (RESULTS / "bench.md").write_text(heading + results_markdown(report, judged))


DOCS = ROOT / "docs" / "bench.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def replace_between(path: Path, start: str, end: str, body: str) -> None:
    """Replace what lies between the markers start and end in a file (left alone without them)."""
    text = path.read_text()
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{body}{end}{rest.split(end, 1)[1]}")


def update_docs(report: dict[str, Any], judged: list[dict[str, Any]]) -> None:
    """Replace the "Latest results" section of docs/bench.md with this run's targets, tables and plot."""
    body = results_markdown(report, judged).replace("## ", "### ")
    plot = "![latency and throughput per subject and size](../benchmarks/results/bench.png)"
    replace_between(DOCS, START, END, f"{plot}\n\n{body}\n")


README_START, README_END = "<!-- targets:start -->", "<!-- targets:end -->"


TARGETS_LEGEND = (
    "ratio: the median of the ratios of runs made side by side (run k of the subject with run k of the "
    "reference); range: the smallest and largest of those ratios."
)


def update_readme(report: dict[str, Any], judged: list[dict[str, Any]]) -> None:
    """Replace the README's targets table (sizes a channel cannot carry left out) and the line that says how it was run."""
    plan = report["plan"]
    runs = f"medians of {plan.get('repeat', 1)} paired runs" if plan.get("max_repeat", 1) > 1 else "one run"
    head = (
        f"Latest run on this project's machine ({report['environment']['client']['cpus_usable']} CPUs, "
        f"`python benchmarks/run.py`, {plan['seconds_per_cell']} s per cell; {runs}, side by side; "
        "sizes a channel cannot carry are left out):\n\n"
    )
    notes = "".join(f"- {note}\n" for note in project_targets.notes(judged))
    table = project_targets.markdown(judged, applicable_only=True)
    replace_between(README, README_START, README_END, f"{head}{table}\n{chr(10) + notes if notes else ''}")


RAW_HOT_PATHS = RESULTS / "hot-paths.json"
HOT_PATH_STATISTICS = RESULTS / "hot-paths-stats.json"


def write_hot_path_statistics() -> None:
    """results/hot-paths-stats.json: pytest-benchmark's JSON without the per-round timings and CPU flags."""
    report = json.loads(RAW_HOT_PATHS.read_text())
    report["machine_info"].get("cpu", {}).pop("flags", None)
    for benchmark in report["benchmarks"]:
        benchmark["stats"].pop("data", None)
    HOT_PATH_STATISTICS.write_text(json.dumps(report, indent=2) + "\n")


def run_hot_paths() -> None:
    """The pytest-benchmark suite: raw figures to results/hot-paths.json, statistics and the table beside it."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-max-time=0.5",
            "--benchmark-columns=min,median,mean,ops,rounds",
            f"--benchmark-json={RAW_HOT_PATHS}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    (RESULTS / "hot-paths.txt").write_text(completed.stdout)
    if RAW_HOT_PATHS.exists():
        write_hot_path_statistics()  # of the benchmarks that ran, even when some failed
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(completed.returncode)


def main() -> int:
    """Parse options, run, write results, print the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells and 2 runs each (podipc bench --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (podipc bench --duration)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"runs of every cell (default {DEFAULT_REPEAT}; --quick {QUICK_REPEAT})",
    )
    parser.add_argument("--confidence", default=None, help="LEVEL[,WIDTH]: podipc bench --confidence (netperf's -I)")
    parser.add_argument("--max-repeat", type=int, default=None, help="with --confidence: the most runs of a cell")
    parser.add_argument("--skip-hot-paths", action="store_true", help="do not run the pytest-benchmark suite")
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="the report to judge regressions against (default: the bench.json this run replaces)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="re-render bench.md, bench.png, docs and hot-paths-stats.json from the existing results (no measuring)",
    )
    arguments = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous_path = arguments.previous or (RESULTS / "bench.json")
    previous = None if arguments.render_only and arguments.previous is None else previous_report(previous_path)
    report = rerender() if arguments.render_only else run_bench(arguments)
    judged = judge(report, previous)
    write_markdown(report, judged)
    update_docs(report, judged)
    update_readme(report, judged)
    if arguments.render_only:
        if RAW_HOT_PATHS.exists():
            write_hot_path_statistics()
        sys.stdout.write((RESULTS / "bench.md").read_text())
        return 0
    if not arguments.skip_hot_paths:
        run_hot_paths()
    sys.stdout.write((RESULTS / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
