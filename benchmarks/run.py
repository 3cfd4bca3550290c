"""Run `podipc bench --peers` (and the pytest-benchmark hot paths) and write benchmarks/results/.

    python benchmarks/run.py            # full run: about 2-3 minutes on 2 cores
    python benchmarks/run.py --quick    # a smoke run in under a minute

Writes, in benchmarks/results/:
    bench.json       the report (schema: podipc/bench/schema.json), hardware included
    targets.json     this project's targets judged from it (benchmarks/targets.py; schema:
                     benchmarks/targets.schema.json); the README's targets table too
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: benchmarks.targets is importable

from benchmarks import targets as project_targets  # noqa: E402 - after the path is set

README = ROOT / "README.md"


def run_bench(quick: bool, duration: float | None = None) -> dict[str, Any]:
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
    report: dict[str, Any] = json.loads(output.read_text())
    return report


def rerender() -> dict[str, Any]:
    """The existing results/bench.json, its plot redrawn."""
    from podipc.bench.report import plot

    report: dict[str, Any] = json.loads((RESULTS / "bench.json").read_text())
    plot(report, str(RESULTS / "bench.png"))
    return report


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """This project's targets from the report, written to results/targets.json."""
    judged = project_targets.compute_targets(report)
    document = {"report": "bench.json", "targets": judged}
    (RESULTS / "targets.json").write_text(json.dumps(document, indent=2) + "\n")
    return judged


def results_markdown(report: dict[str, Any], judged: list[dict[str, Any]]) -> str:
    """The report as Markdown with the targets after where it ran."""
    from podipc.bench.report import render_markdown

    text = render_markdown(report)
    section = f"## Targets\n\n{project_targets.markdown(judged)}\n\n"
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


def update_readme(judged: list[dict[str, Any]]) -> None:
    """Replace the README's targets table (sizes a channel cannot carry left out)."""
    replace_between(README, README_START, README_END, project_targets.markdown(judged, applicable_only=True) + "\n")


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
    report = rerender() if arguments.render_only else run_bench(arguments.quick, arguments.duration)
    judged = judge(report)
    write_markdown(report, judged)
    update_docs(report, judged)
    update_readme(judged)
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
