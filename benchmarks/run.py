"""Run `podipc bench --peers` (and the pytest-benchmark hot paths) and write benchmarks/results/.

    python benchmarks/run.py            # full run: about 2-3 minutes on 2 cores
    python benchmarks/run.py --quick    # a smoke run in under a minute

Writes, in benchmarks/results/:
    bench.json       the report (schema: podipc/bench/schema.json), hardware included
    bench.md         the same as Markdown: where it ran, targets, latency and throughput
                     (also copied into the "Latest results" section of docs/bench.md)
    bench.png        latency percentiles and throughput per subject and size
    hot-paths-stats.json  pytest-benchmark statistics of framing and in-process send/receive
                          (min, median, mean, quartiles, ops, rounds per benchmark; no raw timings)
    hot-paths.txt         the same as the pytest-benchmark table
    hot-paths.json        pytest-benchmark's own output with every round's timing (tens of MB):
                          a local artefact, kept out of git by .gitignore
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_bench(quick: bool, duration: float | None = None) -> dict[str, object]:
    """`podipc bench --peers --format json`, written to results/bench.json; the report."""
    output = RESULTS / "bench.json"
    command = [
        sys.executable,
        "-m",
        "podipc",
        "bench",
        "--peers",
        "--format",
        "json",
        "--output",
        str(output),
        "--plot",
        str(RESULTS / "bench.png"),
    ]
    if quick:
        command.append("--quick")
    if duration is not None:
        command += ["--duration", str(duration)]
    subprocess.run(command, check=True, cwd=ROOT)
    report: dict[str, object] = json.loads(output.read_text())
    return report


def rerender() -> dict[str, object]:
    """The existing results/bench.json with its targets recomputed, and its plot redrawn."""
    from podipc.bench.report import add_targets, plot

    path = RESULTS / "bench.json"
    report = add_targets(json.loads(path.read_text()))
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, str(RESULTS / "bench.png"))
    return report


def write_markdown(report: dict[str, object]) -> None:
    """results/bench.md from the report."""
    from podipc.bench.report import render_markdown

    heading = "# podipc bench results\n\nWritten by `python benchmarks/run.py`; the machine may have been shared.\n\n"
    (RESULTS / "bench.md").write_text(heading + render_markdown(report))


DOCS = ROOT / "docs" / "bench.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_docs(report: dict[str, object]) -> None:
    """Replace the "Latest results" section of docs/bench.md with this run's targets, tables and plot."""
    from podipc.bench.report import render_markdown

    text = DOCS.read_text()
    if START not in text or END not in text:
        return
    body = render_markdown(report).replace("## ", "### ")
    section = (
        f"{START}\n![latency and throughput per subject and size](../benchmarks/results/bench.png)\n\n{body}\n{END}"
    )
    head, rest = text.split(START, 1)
    DOCS.write_text(head + section + rest.split(END, 1)[1])


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
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(completed.returncode)
    write_hot_path_statistics()


def main() -> int:
    """Parse options, run, write results, print the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells (podipc bench --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (podipc bench --duration)")
    parser.add_argument("--skip-hot-paths", action="store_true", help="do not run the pytest-benchmark suite")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="re-render bench.md, bench.png, docs and hot-paths-stats.json from the existing results (no measuring)",
    )
    arguments = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if arguments.render_only:
        report = rerender()
        write_markdown(report)
        update_docs(report)
        if RAW_HOT_PATHS.exists():
            write_hot_path_statistics()
        sys.stdout.write((RESULTS / "bench.md").read_text())
        return 0
    report = run_bench(arguments.quick, arguments.duration)
    write_markdown(report)
    update_docs(report)
    if not arguments.skip_hot_paths:
        run_hot_paths()
    sys.stdout.write((RESULTS / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
