"""Fan-in throughput (issue 14): the bench cells fanin-SCHEME-1/2/4, with the consumer's messages per CPU-second.

    .venv/bin/python benchmarks/fanin.py [--size 64] [--scheme unix] [--repeat 5] [--seconds 0.5]

Runs `podipc bench --channels fanin-SCHEME-1,fanin-SCHEME-2,fanin-SCHEME-4 --mode throughput`
(podipc.bench.fanin: N producer processes, each streaming its share as fast as it can, into
one fan-in consumer that checks every producer's sequence) and prints, per cell, the
aggregate msg/s (median over the runs) and the consumer's messages per CPU-second it used:
on a machine with fewer cores than producers + 1 the wall-clock rate also measures how the
kernel shares the CPUs, the second figure does not. Then the paired ratio of 4 producers
to 1, judged against issue 14's target (>= 0.9x), as benchmarks/targets.py judges it.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from podipc.bench.cells import DEFAULT_SECONDS, Plan
from podipc.bench.fanin import FANIN_PRODUCERS, FANIN_SCHEMES
from podipc.bench.runner import run
from podipc.bench.spread import figures_by_run

TARGET_RATIO = 0.9
RATE = "throughput.messages_per_second"
CONSUMER_SHARE = "cpu.client_core_fraction"


def consumer_rate_per_cpu_second(record: dict[str, Any]) -> float:
    """Median over the runs of messages per CPU-second of the consumer (msg/s over its core fraction)."""
    rates, shares = figures_by_run(record["runs"], RATE), figures_by_run(record["runs"], CONSUMER_SHARE)
    per_cpu = [rate / shares[run] for run, rate in rates.items() if shares.get(run)]
    return statistics.median(per_cpu) if per_cpu else 0.0


def main() -> None:
    """Run the fan-in cells and print their figures and the 4-vs-1 verdict."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--scheme", choices=FANIN_SCHEMES, default="unix")
    parser.add_argument("--repeat", type=int, default=5, help="runs of every cell, taken in turns")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="seconds each producer streams")
    arguments = parser.parse_args()
    names = [f"fanin-{arguments.scheme}-{count}" for count in FANIN_PRODUCERS]
    plan = Plan(
        channels=names,
        sizes=[arguments.size],
        modes=["throughput"],
        seconds=arguments.seconds,
        repeat=arguments.repeat,
    )
    records = {record["subject"]: record for record in run(plan)["results"]}
    for name in names:
        record = records[name]
        if record["status"] != "ok":
            print(f"{name}: {record['status']}: {record['reason']}")
            continue
        print(
            f"{name} {arguments.size} B: {record['throughput']['messages_per_second']:,.0f} msg/s, "
            f"{consumer_rate_per_cpu_second(record):,.0f} msg per consumer CPU-second"
        )
    ratio = records[names[-1]].get("ratios", {}).get(RATE)
    if ratio is None:
        print("4 producers / 1 producer: not computed (a cell did not run)")
        return
    verdict = "met" if ratio["median"] >= TARGET_RATIO else "NOT met"
    print(
        f"4 producers / 1 producer = {ratio['median']:.2f} (paired runs {ratio['min']:.2f}..{ratio['max']:.2f}; "
        f"target >= {TARGET_RATIO}): {verdict}"
    )


if __name__ == "__main__":
    main()
