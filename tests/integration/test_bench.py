"""podipc bench: complete reports over every channel, pod mode across two processes, skipped peers.

The project's timing targets are judged by benchmarks/targets.py from these reports and never
asserted here: this machine is shared. That they can be judged from a report is tested.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from benchmarks.targets import compute_targets
from podipc.bench.stats import LatencySummary, SequenceChecker, ThroughputSummary
from podipc.transport import schemes
from tests.commands import PODIPC

ROOT = Path(__file__).parents[2]
SCHEMA = json.loads((ROOT / "podipc" / "bench" / "schema.json").read_text())
TARGETS_SCHEMA = json.loads((ROOT / "benchmarks" / "targets.schema.json").read_text())
DEFAULT_SIZES = (64, 4096, 65536, 1 << 20)
LOSSY = {"udp", "raw-udp"}
ABSURD_MICROSECONDS = 10_000_000.0
ABSURD_MEGABYTES_PER_SECOND = 1_000_000.0
BENCH = [*PODIPC, "bench"]


def run_bench(*arguments: str, timeout: float = 120.0, prefix: list[str] | None = None) -> dict[str, Any]:
    """Run `podipc bench ... --format json` in a subprocess; the parsed report."""
    completed = subprocess.run(
        [*(prefix or BENCH), *arguments, "--format", "json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, Any] = json.loads(completed.stdout)
    jsonschema.validate(report, SCHEMA)
    return report


def judged(report: dict[str, Any]) -> list[dict[str, Any]]:
    """This project's targets judged from a report (benchmarks/targets.py), checked against their schema."""
    targets = compute_targets(report)
    jsonschema.validate({"report": "bench.json", "targets": targets}, TARGETS_SCHEMA)
    return targets


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def assert_sane(record: dict[str, Any]) -> None:
    """Figures of an ok cell: present, finite, ordered, neither negative nor absurd."""
    where = f"{record['subject']} {record['mode']} {record['size']}"
    assert record["cpu"] is not None, where
    for value in record["cpu"].values():
        assert math.isfinite(value) and value >= 0, where
    if record["mode"] == "latency":
        latency = record["latency"]
        assert latency["round_trips"] > 0, where
        ordered = [latency[key] for key in ("min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")]
        assert ordered == sorted(ordered), where
        assert 0 < latency["p50_us"] < ABSURD_MICROSECONDS, where
        assert latency["min_us"] <= latency["mean_us"] <= latency["max_us"], where
    else:
        flow = record["throughput"]
        assert flow["received"] > 0, where
        assert 0 < flow["megabytes_per_second"] < ABSURD_MEGABYTES_PER_SECOND, where
        assert flow["sequence_checked"], where
        if record["subject"] not in LOSSY:
            assert (flow["lost"], flow["reordered"], flow["duplicated"]) == (0, 0, 0), where
            assert flow["received"] == flow["sent"], where
        else:
            assert flow["received"] + flow["lost"] - flow["duplicated"] == flow["sent"], where


@pytest.mark.timeout(150)
def test_quick_run_over_every_channel_reports_every_cell_or_why_not() -> None:
    started = time.monotonic()
    report = run_bench("--quick", "--channels", "all")
    elapsed = time.monotonic() - started
    cells = {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}
    for scheme in schemes():
        for mode in ("latency", "throughput"):
            for size in DEFAULT_SIZES:
                record = cells.get((scheme, mode, size))
                assert record is not None, f"{scheme} {mode} {size} missing from the report"
                assert record["status"] != "error", f"{scheme} {mode} {size}: {record['reason']}"
                if record["status"] == "ok":
                    assert_sane(record)
                else:
                    assert record["reason"], f"{scheme} {mode} {size}: {record['status']} without a reason"
    assert cells[("udp", "latency", 1 << 20)]["status"] == "unsupported"
    assert "65496" in cells[("udp", "latency", 1 << 20)]["reason"]
    assert cells[("mq", "throughput", 65536)]["status"] == "unsupported"
    shm_idle = cells[("shm", "latency", 64)]["idle"]
    assert shm_idle is not None and shm_idle["seconds"] > 0
    targets = judged(report)
    assert {target["id"] for target in targets} >= {"shm-p50-vs-iceoryx2", "shm-idle-cpu", "tcp-p50-64"}
    assert report["environment"]["client"]["namespaces"]["ipc"] == report["environment"]["server"]["namespaces"]["ipc"]
    print(f"quick bench over every channel: {elapsed:.1f} s")


SIMULATE_MISSING = (
    "import importlib.util, sys\n"
    "real = importlib.util.find_spec\n"
    "importlib.util.find_spec = lambda name, *rest: None if name in ('iceoryx2', 'faster_fifo') else real(name, *rest)\n"
    "from podipc.cli import main\n"
    "sys.argv[0] = 'podipc'\n"
    "main()\n"
)


@pytest.mark.timeout(90)
def test_peers_run_beside_the_channel_and_missing_ones_are_skipped_with_the_reason() -> None:
    report = run_bench(
        "bench",
        "--channels",
        "tcp",
        "--peers",
        "--sizes",
        "64",
        "--mode",
        "both",
        "--quick",
        prefix=[sys.executable, "-c", SIMULATE_MISSING],
    )
    skipped = {item["subject"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {"iceoryx2", "faster-fifo"}
    assert "pip install 'podipc[peers]'" in skipped["iceoryx2"]
    subjects = {record["subject"]: record for record in report["results"] if record["mode"] == "latency"}
    for peer in (
        "raw-tcp",
        "raw-udp",
        "raw-unix",
        "raw-posix-mq",
        "raw-sysv-mq",
        "raw-ring",
        "pyzmq-tcp",
        "pyzmq-ipc",
        "mp-pipe",
        "mp-queue",
    ):
        assert subjects[peer]["status"] == "ok", f"{peer}: {subjects[peer]['reason']}"
        assert_sane(subjects[peer])
    assert subjects["iceoryx2"]["status"] == "skipped"
    for record in report["results"]:
        if record["status"] == "ok":
            assert_sane(record)
    tcp_target = next(target for target in judged(report) if target["id"] == "tcp-p50-64")
    assert tcp_target["ratio"] is not None and tcp_target["met"] in (True, False)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("first", ["server", "client"])
def test_pod_mode_server_and_client_in_two_processes_either_first(first: str, tmp_path: Path) -> None:
    port = str(free_port())
    server_command = [*BENCH, "--role", "server", "--control-port", port, "--wait", "30", "--quiet"]
    client_command = [
        *BENCH,
        "--role",
        "client",
        "--control-port",
        port,
        "--wait",
        "30",
        "--channels",
        "tcp,mq,shm",
        "--sizes",
        "64,4KiB",
        "--quick",
        "--peers",
        "--format",
        "json",
        "--dir",
        str(tmp_path),
        "--quiet",
    ]
    commands = [server_command, client_command] if first == "server" else [client_command, server_command]
    processes = []
    try:
        for command in commands:
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(1.0)
        outputs = {}
        for command, process in zip(commands, processes, strict=True):
            out, err = process.communicate(timeout=80)
            assert process.returncode == 0, err
            outputs["client" if command is client_command else "server"] = out
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    report = json.loads(outputs["client"])
    jsonschema.validate(report, SCHEMA)
    assert report["plan"]["mode"] == "pod"
    by_cell = {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}
    for scheme in ("tcp", "mq", "shm"):
        for mode in ("latency", "throughput"):
            for size in (64, 4096):
                record = by_cell[(scheme, mode, size)]
                assert record["status"] == "ok", record["reason"]
                assert_sane(record)
    skipped = {item["subject"]: item["reason"] for item in report["skipped"]}
    assert {"mp-pipe", "mp-queue", "faster-fifo"} <= set(skipped)
    assert "cannot cross containers" in skipped["mp-pipe"]
    assert by_cell[("raw-tcp", "latency", 64)]["status"] == "ok"
    assert report["environment"]["server"]["pid"] != report["environment"]["client"]["pid"]
    assert not os.listdir(tmp_path) or all(name.startswith("podipc.presence") for name in os.listdir(tmp_path))


def test_sequence_checker_counts_lost_reordered_and_duplicated() -> None:
    checker = SequenceChecker()
    for sequence in (0, 1, 3, 2, 2, 5, 6, 6):
        checker.add(sequence)
    assert (checker.received, checker.reordered, checker.duplicated) == (8, 1, 2)
    assert checker.lost(sent=9) == 3  # 4 never came, 7 and 8 neither (tail)
    summary = ThroughputSummary.build(9, checker, 1_000_000, 2.0, True)
    assert (summary.lost, summary.messages_per_second, summary.megabytes_per_second) == (3, 4.0, 4.0)


def test_latency_summary_percentiles_in_microseconds() -> None:
    summary = LatencySummary.from_nanoseconds([1000 * value for value in range(1, 1001)])
    assert (summary.min_us, summary.p50_us, summary.max_us, summary.round_trips) == (1.0, 500.5, 1000.0, 1000)
    assert summary.p90_us == pytest.approx(900.1)
    assert summary.p999_us == pytest.approx(999.001)
