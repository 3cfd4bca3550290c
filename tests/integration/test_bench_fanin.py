"""The bench's fan-in cells (podipc.bench.fanin): N producer processes into one consumer, every message accounted for."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import podipc
from podipc.bench.cells import free_port
from podipc.bench.fanin import FanIn, FanInReceiver, FanInSender, run_producer_helper
from podipc.bench.stats import SequenceChecker
from podipc.bench.subjects import CellPlace
from podipc.bench.workloads import CLOCK_CHECK_EVERY
from podipc.fanin import DIED, ENDED, ProducerSummary

SIZE = 64
SHARE = 100


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scheme", ["unix", "tcp", "mq", "sysvmq"])
def test_a_fanin_4_cell_runs_4_producer_processes_and_the_consumer_gets_every_message(
    scheme: str, tmp_path: Path
) -> None:
    subject = FanIn(scheme, 4)
    resources = subject.resources(CellPlace(f"t{os.getpid()}", 0, str(tmp_path)), free_port)
    receiver = subject.open_receiver(resources, "a", SIZE)
    assert isinstance(receiver, FanInReceiver)
    sender = subject.open_sender(resources, "a", SIZE)
    assert isinstance(sender, FanInSender)
    pids = {helper.process.pid for helper in sender.helpers}
    assert len(pids) == 3 and os.getpid() not in pids, "bench-0 here, three more producers in processes of their own"
    assert all(helper.process.poll() is None for helper in sender.helpers), "each waits, its producer open"
    streamed: dict[str, Any] = {}
    streaming = threading.Thread(
        target=lambda: streamed.update(result=sender.stream(SIZE, 30.0, 4 * SHARE)), daemon=True
    )
    streaming.start()
    checker = SequenceChecker()
    try:
        seconds, _ = receiver.drain(checker)
        senders = receiver.fanin.senders
    finally:
        receiver.close()
    streaming.join(30)
    sent, _ = streamed["result"]
    assert [helper.process.returncode for helper in sender.helpers] == [0, 0, 0]
    assert sent == checker.received == 4 * SHARE and seconds > 0
    assert (checker.lost(sent), checker.reordered, checker.duplicated) == (0, 0, 0)
    assert sorted((entry.name, entry.messages, entry.bytes, entry.ended) for entry in senders) == [
        (f"bench-{index}", SHARE, SHARE * SIZE, ENDED) for index in range(4)
    ]


@pytest.mark.timeout(60)
def test_a_producer_process_told_to_start_after_the_deadline_sends_one_round_and_reports_it() -> None:
    url = f"unix://@podipc-test-fanin-late-{os.getpid()}"
    orders, reports = io.StringIO(f"{SIZE} {time.monotonic() - 1.0!r} 1000000\n"), io.StringIO()
    with podipc.consumer(url, pattern="fanin", producers=1, wait=30) as consumer:
        helper = threading.Thread(target=run_producer_helper, args=(url, "late", 30.0, orders, reports), daemon=True)
        helper.start()
        received = sum(1 for _ in consumer)
        helper.join(30)
    ready, result = reports.getvalue().splitlines()
    assert ready == "ready"
    assert int(result.split()[0]) == received == 1 + CLOCK_CHECK_EVERY, "message 0, then one clock check's worth"


def test_the_sums_over_producers_count_one_producers_gap_as_lost_and_its_late_message_as_reordered() -> None:
    first, second = SequenceChecker(), SequenceChecker()
    for number in (0, 1, 2):
        first.add(number)
    for number in (0, 2, 3, 1):
        second.add(number)
    second.add(5)
    merged = SequenceChecker()
    merged.merge([first, second])
    assert (merged.received, merged.reordered, merged.duplicated) == (8, 1, 0)
    assert merged.lost(sent=3 + 7) == 2, "4 of the second's, and its tail 6"


def test_the_cell_fails_when_the_consumers_account_differs_from_what_was_received() -> None:
    def summary(name: str, messages: int, ended: str | None = ENDED) -> ProducerSummary:
        return ProducerSummary(name, messages, messages * SIZE, "", ended)

    received = {"bench-0": SequenceChecker(received=3), "bench-1": SequenceChecker(received=2)}
    channel = SimpleNamespace(
        recv=None, recv_from=lambda timeout=None: ("", b""), senders=[summary("bench-0", 3), summary("bench-1", 2)]
    )
    FanInReceiver(channel, 2, SIZE).check_account(received)  # type: ignore[arg-type]
    for senders, problem in [
        ([summary("bench-0", 3), summary("bench-1", 3)], "bench-1: the consumer counted 3"),
        ([summary("bench-0", 3), summary("bench-1", 2, DIED)], "bench-1 ended as 'died'"),
        ([summary("bench-0", 3)], "1 producers attached, not 2"),
    ]:
        channel.senders = senders
        with pytest.raises(RuntimeError, match=problem):
            FanInReceiver(channel, 2, SIZE).check_account(received)  # type: ignore[arg-type]
