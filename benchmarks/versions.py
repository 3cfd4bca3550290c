"""This tree's podipc against another revision's, side by side: did a change cost speed? (issue 11: within 5 %)

    .venv/bin/python benchmarks/versions.py REVISION [--rounds 5] [--case shm:calls:64:20000 ...]

REVISION (any git revision, e.g. 91047ac) is checked out in a temporary worktree; each case
runs benchmarks/version_probe.py once per tree and round, alternating the trees (ABAB...,
the first tree swapped each round), with PYTHONPATH at that tree and the same interpreter,
so both measure the same loop. It prints, per case, each tree's median and range and the
ratio of medians (this tree's speed / REVISION's: above 1 is faster; for latency the ratio
is REVISION's p50 / this tree's). Modes (benchmarks/version_probe.py): throughput and latency
across processes, and calls: the per-call CPU cost of send + recv in one thread (the least
over many bursts), which is what a change to the call path costs, with the scheduler's noise
left out. Run it on a quiet machine: 2 vCPUs are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
PROBE = HERE / "version_probe.py"
DEFAULT_CASES = (
    "shm:calls:64:20000",
    "sysvmq:calls:64:20000",
    "mq:calls:64:20000",
    "shm:throughput:64:400000",
    "shm:throughput:1048576:4000",
    "shm:latency:64:20000",
    "sysvmq:throughput:64:400000",
    "mq:throughput:64:200000",
    "unix:throughput:64:400000",
    "tcp:throughput:64:400000",
)
URLS = {
    "shm": "shm:///podipc-versions-{pid}",
    "sysvmq": "sysvmq://podipc-versions-{pid}",
    "mq": "mq:///podipc-versions-{pid}",
    "unix": "unix://@podipc-versions-{pid}",
    "tcp": "tcp://127.0.0.1:{port}",
}


def checkout(revision: str, into: str) -> Path:
    """A detached worktree of `revision` under `into`."""
    path = Path(into) / "tree"
    subprocess.run(["git", "-C", str(TREE), "worktree", "add", "-q", "--detach", str(path), revision], check=True)
    return path


def probe(tree: Path, url: str, mode: str, size: int, count: int) -> float:
    """One probe run at `tree`: msg/s (throughput) or p50 microseconds (latency)."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(PROBE), url, mode, str(size), str(count)],
        env=environment,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the probe failed at {tree} for {url}:\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return float(figures[{"throughput": "rate", "latency": "p50_us", "calls": "call_ns"}[mode]])


def compare(old: Path, case: str, rounds: int) -> str:
    """One case, both trees alternated for `rounds` rounds; its line of figures."""
    scheme, mode, size_text, count_text = case.split(":")
    size, count = int(size_text), int(count_text)
    figures: dict[str, list[float]] = {"this": [], "old": []}
    for index in range(rounds):
        order = (("this", TREE), ("old", old)) if index % 2 == 0 else (("old", old), ("this", TREE))
        for name, tree in order:
            url = URLS[scheme].format(pid=f"{os.getpid()}-{index}-{name}", port=41000 + 2 * (index % 50))
            figures[name].append(probe(tree, url, mode, size, count))
    this, before = statistics.median(figures["this"]), statistics.median(figures["old"])
    ratio = this / before if mode == "throughput" else before / this
    unit = {"throughput": "msg/s", "latency": "µs p50", "calls": "ns/msg (send + recv)"}[mode]
    return (
        f"{scheme:7} {mode:10} {size:>8} B  this {this:>12,.1f} ({min(figures['this']):,.1f}..{max(figures['this']):,.1f})"
        f"  old {before:>12,.1f} ({min(figures['old']):,.1f}..{max(figures['old']):,.1f}) {unit}"
        f"  speed this/old {ratio:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", action="append", help="SCHEME:throughput|latency|calls:SIZE:COUNT (repeatable)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podipc-versions-") as scratch:
        old = checkout(arguments.revision, scratch)
        try:
            print(f"this tree ({TREE}) against {arguments.revision}, {arguments.rounds} rounds alternated", flush=True)
            for case in arguments.case or DEFAULT_CASES:
                print(compare(old, case, arguments.rounds), flush=True)
        finally:
            subprocess.run(["git", "-C", str(TREE), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
