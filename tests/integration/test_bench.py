"""podipc bench: complete reports over every channel, pod mode across two processes, skipped peers,
repeated runs taken in turns (medians, spread, paired ratios), asyncio endpoints beside the sync ones.

The project's timing targets are judged by benchmarks/targets.py from these reports and never
asserted here: this machine is shared. That they can be judged from a report is tested.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import podipc
from benchmarks.targets import compute_targets
from podipc.bench.numbering import NumberedBatch
from podipc.bench.spread import Spread, student_t_quantile
from podipc.bench.stats import LatencySummary, SequenceChecker, ThroughputSummary
from podipc.bench.workloads import check_batch
from podipc.errors import ChannelUnavailable
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


def run_bench(
    *arguments: str, timeout: float = 120.0, prefix: list[str] | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `podipc bench ... --format json` in a subprocess; the parsed report."""
    completed = subprocess.run(
        [*(prefix or BENCH), *arguments, "--format", "json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
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
    where = f"{record['subject']} {record['mode']} {record['size']}: {record}"  # the whole record, to tell which figure
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
    assert set(skipped) == {"iceoryx2", "iceoryx2-rpc", "faster-fifo"}
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


# --- repeated runs ------------------------------------------------------------------------


def by_cell(report: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The records of a report by (subject, mode, size)."""
    return {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}


def run_order(report: dict[str, Any], mode: str) -> list[tuple[str, int]]:
    """(subject, run number) of every run of a mode, in the order the runs happened."""
    runs = [
        (sequence, record["subject"], run)
        for record in report["results"]
        if record["mode"] == mode
        for sequence, run in zip(record["runs"]["sequence"], record["runs"]["run"], strict=True)
    ]
    return [(subject, run) for _, subject, run in sorted(runs)]


@pytest.mark.timeout(120)
def test_repeat_takes_turns_and_reports_medians_spread_and_ratios_of_side_by_side_runs() -> None:
    report = run_bench("--channels", "unix,raw-unix", "--sizes", "64", "--quick", "--repeat", "3")
    assert (report["plan"]["repeat"], report["plan"]["max_repeat"]) == (3, 3)
    for mode in ("latency", "throughput"):
        assert run_order(report, mode) == [(subject, run) for run in range(3) for subject in ("unix", "raw-unix")]
    cells = by_cell(report)
    for mode, figure in (("latency", "latency.p50_us"), ("throughput", "throughput.messages_per_second")):
        unix, raw = cells[("unix", mode, 64)], cells[("raw-unix", mode, 64)]
        for record in (unix, raw):
            assert record["status"] == "ok", record["reason"]
            assert_sane(record)
            values = record["runs"][figure]
            assert len(values) == 3 and record["runs"]["status"] == ["ok"] * 3
            group, key = figure.split(".")
            assert record[group][key] == pytest.approx(statistics.median(values), rel=1e-5)
            spread = record["spread"][figure]
            assert spread["n"] == 3 and spread["min"] <= spread["median"] <= spread["max"]
            assert spread["ci_low"] <= spread["mean"] <= spread["ci_high"]
        paired = [value / base for value, base in zip(unix["runs"][figure], raw["runs"][figure], strict=True)]
        ratio = unix["ratios"][figure]
        assert ratio["reference"] == "raw-unix" and ratio["values"] == pytest.approx(paired, rel=1e-4)
        assert ratio["median"] == pytest.approx(statistics.median(paired), rel=1e-4)
    latency = cells[("unix", "latency", 64)]
    assert latency["latency"]["round_trips"] == sum(latency["runs"]["latency.round_trips"])
    flow = cells[("unix", "throughput", 64)]["throughput"]
    assert flow["received"] == flow["sent"] == sum(cells[("unix", "throughput", 64)]["runs"]["throughput.received"])
    target = next(target for target in judged(report) if target["id"] == "unix-p50-64")
    paired = [
        value / base
        for value, base in zip(
            latency["runs"]["latency.p50_us"], cells[("raw-unix", "latency", 64)]["runs"]["latency.p50_us"], strict=True
        )
    ]
    assert target["pairs"] == 3 and target["ratio"] == pytest.approx(statistics.median(paired), rel=1e-3)
    assert target["ratio_min"] <= target["ratio"] <= target["ratio_max"]


@pytest.mark.timeout(120)
def test_confidence_stops_once_the_interval_is_narrow_enough_or_at_the_most_runs() -> None:
    settled = run_bench(
        "--channels", "unix", "--sizes", "64", "--mode", "latency", "--quick",
        "--confidence", "50,1000", "--repeat", "3", "--max-repeat", "5",
    )  # fmt: skip
    assert settled["plan"]["confidence"] == {"level_percent": 50.0, "width_percent": 1000.0}
    record = by_cell(settled)[("unix", "latency", 64)]
    assert record["runs"]["run"] == [0, 1, 2]
    assert record["spread"]["latency.p50_us"]["ci_width_percent"] <= 1000.0
    unsettled = run_bench(
        "--channels", "unix", "--sizes", "64", "--mode", "latency", "--quick",
        "--confidence", "99.9,0.000001", "--repeat", "2", "--max-repeat", "3",
    )  # fmt: skip
    assert by_cell(unsettled)[("unix", "latency", 64)]["runs"]["run"] == [0, 1, 2]


def test_bad_repeat_options_fail_in_one_line() -> None:
    for arguments, expected in (
        (["--max-repeat", "4"], "--max-repeat goes with --confidence"),
        (["--confidence", "lots"], "LEVEL[,WIDTH]"),
        (["--confidence", "99,5", "--repeat", "1"], "at least 2 runs"),
        (["--channels", "aio-nope"], "unknown channel(s) or peer(s) aio-nope"),
    ):
        completed = subprocess.run(
            [*BENCH, "--quick", *arguments], capture_output=True, text=True, timeout=60, check=False
        )
        assert completed.returncode == 2, completed.stderr
        assert expected in completed.stderr and "Traceback" not in completed.stderr, completed.stderr


def test_t_quantiles_and_spread_match_the_tables() -> None:
    for probability, freedom, table in ((0.975, 4, 2.776), (0.995, 2, 9.925), (0.995, 29, 2.756), (0.95, 10, 1.812)):
        assert student_t_quantile(probability, freedom) == pytest.approx(table, abs=5e-4)
    spread = Spread.of([10.0, 12.0, 11.0, 13.0], level=95.0)
    assert (spread.n, spread.median, spread.min, spread.max, spread.mean) == (4, 11.5, 10.0, 13.0, 11.5)
    half = 3.182 * statistics.stdev([10.0, 12.0, 11.0, 13.0]) / 2
    assert spread.ci_low == pytest.approx(11.5 - half, abs=1e-3)
    assert spread.ci_width_percent == pytest.approx(200 * half / 11.5, abs=1e-2)
    single = Spread.of([5.0])
    assert (single.median, single.stdev, single.ci_low, single.ci_width_percent) == (5.0, None, None, None)


# --- asyncio endpoints --------------------------------------------------------------------


def waits_on(scheme: str) -> str:
    """How podipc.aio waits on a channel here: 'readiness' when its consumer has fileno(), else 'helper thread'."""
    consumer = podipc.consumer(f"{scheme}:///podipc-bench-probe-{uuid.uuid4().hex[:8]}", wait=1)
    try:
        consumer.fileno()
    except ChannelUnavailable:
        return "helper thread"
    finally:
        consumer.close()
    return "readiness"


@pytest.mark.timeout(150)
def test_api_async_measures_the_aio_twins_beside_the_sync_ends_and_zmq_asyncio() -> None:
    report = run_bench(
        "--api", "async", "--channels", "unix,mq,pyzmq-ipc,pyzmq-asyncio-ipc", "--sizes", "64", "--quick",
        timeout=140,
    )  # fmt: skip
    assert report["plan"]["api"] == "async"
    cells = by_cell(report)
    for scheme in ("unix", "mq"):
        for mode in ("latency", "throughput"):
            sync, aio = cells[(scheme, mode, 64)], cells[(f"aio-{scheme}", mode, 64)]
            for record in (sync, aio):
                assert record["status"] == "ok", record["reason"]
                assert_sane(record)
            assert (sync["api"], aio["api"], aio["baseline"]) == ("sync", "async", scheme)
            figure = "latency.p50_us" if mode == "latency" else "throughput.messages_per_second"
            assert aio["ratios"][figure]["reference"] == scheme
        ticker = cells[(f"aio-{scheme}", "throughput", 64)]["ticker"]
        assert ticker["ticks"] >= 1 and ticker["lag_p99_ms"] >= 0 and ticker["lag_max_ms"] >= ticker["lag_p50_ms"]
        assert cells[(f"aio-{scheme}", "latency", 64)]["idle"]["core_fraction"] >= 0
    assert cells[("aio-unix", "latency", 64)]["wakeup"] == "readiness"
    assert cells[("aio-mq", "throughput", 64)]["wakeup"] == waits_on("mq")
    zmq_asyncio = cells[("pyzmq-asyncio-ipc", "throughput", 64)]
    assert zmq_asyncio["status"] == "ok", zmq_asyncio["reason"]
    assert_sane(zmq_asyncio)
    assert (zmq_asyncio["wakeup"], zmq_asyncio["baseline"]) == ("readiness", "pyzmq-ipc")
    targets = {target["id"]: target for target in judged(report)}
    for target_id in (
        "aio-unix-throughput-vs-sync",
        "aio-mq-throughput-vs-sync",
        "aio-unix-throughput-vs-zmq-asyncio",
        "aio-unix-p50-vs-sync",
        "aio-unix-ticker-lag",
        "aio-unix-idle-cpu",
    ):
        assert targets[target_id]["met"] in (True, False), targets[target_id]
    mq_note = targets["aio-mq-throughput-vs-sync"]["note"]
    assert (mq_note is not None and "helper thread" in mq_note) == (waits_on("mq") == "helper thread")
    assert "(tcp not in --channels)" in targets["aio-tcp-throughput-vs-sync"]["reason"]


# --- batches ------------------------------------------------------------------------------

BATCH_SHIM = """
import podipc
from podipc.errors import EndOfStream

if not hasattr(podipc.Producer, "send_many"):
    def send_many(self, messages, timeout=None):
        for message in messages:
            self.send(message, timeout)

    def recv_many(self, most, timeout=None):
        batch = [self.recv(timeout)]
        try:
            while len(batch) < most:
                message = self.try_recv()
                if message is None:
                    break
                batch.append(message)
        except EndOfStream:
            pass
        return batch

    podipc.Producer.send_many = send_many
    podipc.Consumer.recv_many = recv_many
"""


@pytest.mark.timeout(120)
def test_batch_cells_move_lists_of_messages_and_check_every_sequence_number(tmp_path: Path) -> None:
    # send_many/recv_many come with issue 13; a stand-in made of send/try_recv exercises the cells until then
    (tmp_path / "sitecustomize.py").write_text(BATCH_SHIM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    report = run_bench("--channels", "unix,shm", "--batch", "16", "--sizes", "64,4KiB", "--quick", env=env)
    cells = by_cell(report)
    assert report["plan"]["batch"] == 16
    for scheme in ("unix", "shm"):
        assert (f"batch-{scheme}", "latency", 64) not in cells  # batches are measured one way only
        for size in (64, 4096):
            record = cells[(f"batch-{scheme}", "throughput", size)]
            assert record["status"] == "ok", record["reason"]
            assert_sane(record)
            assert record["baseline"] == scheme
            assert record["ratios"]["throughput.messages_per_second"]["reference"] == scheme


NO_BATCH_SHIM = """
import podipc

for endpoint in (podipc.Producer, podipc.Consumer):
    for name in ("send_many", "recv_many"):
        if name in vars(endpoint):
            delattr(endpoint, name)
"""


def test_batch_cells_say_why_not_where_podipc_has_no_send_many(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_BATCH_SHIM)  # podipc before issue 13, whatever this one has
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    report = run_bench(
        "--channels", "unix", "--batch", "8", "--sizes", "64", "--mode", "throughput", "--quick", env=env
    )  # fmt: skip
    record = by_cell(report)[("batch-unix", "throughput", 64)]
    assert record["status"] == "skipped" and "send_many" in record["reason"], record
    assert {"subject": "batch-unix", "reason": record["reason"]} in report["skipped"]
    assert by_cell(report)[("unix", "throughput", 64)]["status"] == "ok"


def test_batch_check_counts_a_run_of_numbers_at_once_and_falls_back_for_anything_else() -> None:
    def numbered(*numbers: int) -> list[bytes]:
        return [struct.pack("<Q", number) + bytes(56) for number in numbers]

    checker = SequenceChecker()
    check_batch(checker, numbered(0, 1, 2, 3), 64)
    check_batch(checker, numbered(4, 6, 5, 5), 64)
    check_batch(checker, numbered(7), 64)
    assert (checker.received, checker.expected, checker.reordered, checker.duplicated) == (9, 8, 1, 1)
    assert checker.lost(sent=8) == 0


def test_a_whole_run_of_256_is_checked_against_the_senders_bytes_and_a_changed_byte_falls_back() -> None:
    def numbered(first: int, count: int) -> list[bytes]:
        return [struct.pack("<Q", number) + bytes(56) for number in range(first, first + count)]

    checker = SequenceChecker(expected=256 * 1000)
    check_batch(checker, numbered(256 * 1000, 512), 64)  # whole runs: one comparison with the expected bytes
    damaged = numbered(256 * 1002, 256)
    damaged[3] = damaged[3][:40] + b"!" + damaged[3][41:]  # past the number: only the whole-batch compare sees it
    check_batch(checker, damaged, 64)  # falls back to the numbers, which are all there
    assert (checker.received, checker.expected, checker.reordered, checker.duplicated) == (768, 256 * 1003, 0, 0)


@pytest.mark.parametrize("size", [8, 16, 64])
@pytest.mark.parametrize("count", [1, 100, 256, 512])
def test_numbering_by_byte_planes_writes_what_plain_numbering_writes(size: int, count: int) -> None:
    planes, plain = NumberedBatch(size, count), NumberedBatch(size, count)
    firsts = [0, 256, 7, 2**16 - 256, 2**16, 2**40, 2**40 + 256, 2**40 + 3, *range(0, 256 * 300, 256), 0]
    for first in firsts:
        buffers = planes.number(first, count)
        pack_into = struct.Struct("<Q").pack_into
        for index, buffer in enumerate(plain.buffers):
            pack_into(buffer, 0, first + index)
        assert planes.data == plain.data, first
        assert [struct.unpack_from("<Q", buffer)[0] for buffer in buffers] == list(range(first, first + count))


@pytest.mark.timeout(120)
def test_request_reply_cells_measure_round_trips_beside_their_raw_socket_baselines() -> None:
    report = run_bench(
        "--quick", "--channels", "rpc-unix,raw-unix,rpc-tcp,raw-tcp", "--sizes", "64,65536", "--mode", "both"
    )
    cells = {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}
    for scheme in ("unix", "tcp"):
        for size in (64, 65536):
            record = cells[(f"rpc-{scheme}", "latency", size)]
            assert record["status"] == "ok", record["reason"]
            assert_sane(record)
            assert record["baseline"] == f"raw-{scheme}"
            assert record["ratios"]["latency.p50_us"]["median"] > 0, record
        assert (f"rpc-{scheme}", "throughput", 64) not in cells, "request/reply is measured in round trips only"


@pytest.mark.timeout(120)
def test_request_reply_over_shm_is_measured_beside_iceoryx2_request_response_and_judged_against_it() -> None:
    report = run_bench(
        "--quick", "--channels", "rpc-shm,iceoryx2-rpc,raw-ring", "--sizes", "64,65536", "--mode", "both"
    )
    cells = {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}
    for size in (64, 65536):
        for subject in ("rpc-shm", "iceoryx2-rpc"):
            record = cells[(subject, "latency", size)]
            assert record["status"] == "ok", record["reason"]
            assert_sane(record)
        assert cells[("rpc-shm", "latency", size)]["baseline"] == "raw-ring"
    for subject in ("rpc-shm", "iceoryx2-rpc"):
        assert (subject, "throughput", 64) not in cells, "request/reply is measured in round trips only"
    target = next(target for target in judged(report) if target["id"] == "rpc-shm-p50-vs-iceoryx2-rpc")
    assert target["ratio"] is not None and target["met"] in (True, False)


@pytest.mark.timeout(120)
def test_fanin_cells_measure_n_producer_processes_into_one_consumer_beside_one_producer() -> None:
    channels = ["fanin-unix-1", "fanin-unix-2", "fanin-unix-4", "fanin-tcp-1", "fanin-tcp-4"]
    report = run_bench("--quick", "--channels", ",".join(channels), "--sizes", "64", "--mode", "both")
    cells = {(record["subject"], record["mode"], record["size"]): record for record in report["results"]}
    for name in channels:
        record = cells[(name, "throughput", 64)]
        assert record["status"] == "ok", record["reason"]
        flow = record["throughput"]
        assert flow["received"] == flow["sent"] > 0, record
        assert (flow["lost"], flow["reordered"], flow["duplicated"]) == (0, 0, 0), "each producer's order is checked"
        assert (name, "latency", 64) not in cells, "fan-in is measured one way only"
    assert cells[("fanin-unix-4", "throughput", 64)]["baseline"] == "fanin-unix-1"
    assert cells[("fanin-tcp-4", "throughput", 64)]["baseline"] == "fanin-tcp-1"
    targets = {entry["id"]: entry for entry in judged(report)}
    for target_id in ("fanin-unix-4-vs-1-producer", "fanin-tcp-4-vs-1-producer"):
        assert targets[target_id]["ratio"] is not None and targets[target_id]["ratio"] > 0, targets[target_id]
