"""file:// spool: what is special to it — the record format, resuming after kill -9 on either side, segments,
repair of a torn tail, sync levels, readiness without inotify, cleanup (across real processes)."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import podipc
from podipc.errors import (
    AddressError,
    ChannelClosed,
    ChannelUnavailable,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    Timeout,
)
from podipc.payloads import StreamSummary, generated_messages
from podipc.transports.spool import notify
from podipc.transports.spool.wire import (
    MAX_SEQUENCE,
    POSITION_NAME,
    POSITION_SIZE,
    SEGMENT_HEADER_SIZE,
    SLOT_OFFSETS,
    Position,
    SegmentHeader,
    decode_position,
    decode_segment_header,
    encode_position,
    encode_record,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
)
from tests.commands import PODIPC
from tests.spools import (
    END,
    MESSAGE,
    NEXT,
    STREAM_ID,
    highest_message,
    messages_in,
    messages_segment,
    offset_after,
    records_of,
    segments_of,
    stream_in,
    write_position,
    write_segment,
)
from tests.threads import cpu_seconds, started_since

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
WIRE_DOC = REPO / "docs" / "wire" / "file.md"
MIXED_MESSAGES = [b"", b"a", b"", b"\x00" * 3, os.urandom(4096), b"", bytes(range(256)) * 300, b"end"]

PRODUCER_SCRIPT = """
import sys, time, podipc
url, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
producer = podipc.producer(url)
for index in range(count):
    producer.send(index.to_bytes(4, "big") * (index % 7))
print("sent", flush=True)
time.sleep(hold)
producer.close()
"""

CONSUMER_SCRIPT = """
import sys, time, podipc
url, count, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
consumer = podipc.consumer(url)
with open(output, "ab") as out:
    for _ in range(count):
        message = consumer.recv()
        out.write(len(message).to_bytes(4, "big") + message)
        out.flush()
print("received", consumer.resumed_at, flush=True)
time.sleep(60)
"""


def indexed_message(index: int) -> bytes:
    return index.to_bytes(4, "big") * (index % 7)


STARTED: list[subprocess.Popen[str]] = []


def start_process(command: list[str], stdout: object = subprocess.PIPE) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)  # type: ignore[call-overload]
    STARTED.append(process)
    return process


def start_python(code: str, *args: object) -> subprocess.Popen[str]:
    return start_process([sys.executable, "-c", code, *map(str, args)])


def start_cli(*args: str) -> subprocess.Popen[str]:
    return start_process([*PODIPC, *args])


def summary_of(process: subprocess.Popen[str], timeout: float = 40) -> dict[str, object]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def wait_for(condition: object, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def spool_names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def expected_summary(count: int, size: int, seed: int) -> tuple[int, str]:
    summary = StreamSummary("expected", "")
    for message in generated_messages(count, size, True, seed):
        summary.add(message)
    return summary.messages, summary.digest.hexdigest()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture(autouse=True)
def reap_processes() -> Iterator[None]:
    """Kill what a test left running and close every pipe, also when the test failed."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.communicate()


# --- the format ----------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=MAX_SEQUENCE))
def test_segment_names_round_trip_and_sort_in_stream_order(sequence: int) -> None:
    assert parse_segment_name(segment_name(sequence)) == sequence
    if sequence < MAX_SEQUENCE:
        assert segment_name(sequence) < segment_name(sequence + 1)


@given(st.text(max_size=40))
def test_only_twenty_ascii_digits_name_a_segment(suffix: str) -> None:
    parsed = parse_segment_name("podipc.seg." + suffix)
    if re.fullmatch(r"[0-9]{20}", suffix, flags=re.ASCII) and int(suffix) <= MAX_SEQUENCE:
        assert parsed == int(suffix)
    else:
        assert parsed is None


class memory_file:
    """An anonymous memory file holding `content`, as a descriptor (the segment readers use pread)."""

    def __init__(self, content: bytes) -> None:
        self.fd = os.memfd_create("segment")
        os.write(self.fd, content)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**64 - 1), st.data())
def test_a_record_detects_any_changed_byte(payload: bytes, sequence: int, data: st.DataObject) -> None:
    header = SegmentHeader(sequence, STREAM_ID, 0)
    record = encode_record(MESSAGE, sequence, payload)
    damaged = bytearray(record)
    damaged[data.draw(st.integers(min_value=0, max_value=len(record) - 1))] ^= data.draw(st.integers(1, 255))
    for body, whole in ((record, True), (bytes(damaged), False)):
        with memory_file(encode_segment_header(header) + body) as fd:
            end = scan_segment(fd, header)
        assert (end.offset == SEGMENT_HEADER_SIZE + len(record)) == whole


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=2**64 - 1))
def test_segment_headers_round_trip_and_reject_damage(first: int, stream_id: int) -> None:
    header = SegmentHeader(first, stream_id, first // 3)
    data = encode_segment_header(header)
    assert len(data) == SEGMENT_HEADER_SIZE
    assert decode_segment_header(data) == header
    for index in range(40):  # every checked byte
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        assert decode_segment_header(bytes(damaged)) is None
    assert decode_segment_header(data[:-9]) is None


def test_the_newer_valid_position_slot_wins_and_a_torn_one_is_ignored() -> None:
    older = Position(5, STREAM_ID, 10, 0, 300, 250, 0)
    newer = older._replace(generation=6, next_sequence=11, offset=330, stream_offset=280)
    content = bytearray(POSITION_SIZE)
    content[SLOT_OFFSETS[0] : SLOT_OFFSETS[0] + 56] = encode_position(newer)
    content[SLOT_OFFSETS[1] : SLOT_OFFSETS[1] + 56] = encode_position(older)
    assert decode_position(bytes(content)) == newer
    content[SLOT_OFFSETS[0] + 20] ^= 1  # a commit torn by a kill in the middle of its store
    assert decode_position(bytes(content)) == older
    assert decode_position(bytes(POSITION_SIZE)) is None


# --- streams across processes ------------------------------------------------------------------


def test_consumer_first_keeps_order_and_boundaries_including_empty_messages(spool: Path) -> None:
    url = f"file://{spool}"
    with podipc.consumer(url) as consumer:
        producer = start_python(
            "import sys, podipc\n"
            "messages = [b'', b'a', b'', b'\\x00' * 3, bytes(range(256)) * 300, b'end']\n"
            "with podipc.producer(sys.argv[1]) as producer:\n"
            "    for message in messages:\n"
            "        producer.send(message)\n",
            url,
        )
        received = list(consumer)
    assert producer.wait(20) == 0
    assert received == [b"", b"a", b"", b"\x00" * 3, bytes(range(256)) * 300, b"end"]
    assert not spool.exists()  # podipc made the directory, so the last side out removed it


def test_producer_first_writes_into_the_spool_before_the_consumer_opens(spool: Path) -> None:
    url = f"file://{spool}"
    producer = start_python(PRODUCER_SCRIPT, url, 300, 0)
    assert producer.stdout is not None
    assert producer.stdout.readline().strip() == "sent"  # every message is in the spool, no consumer yet
    assert messages_in(spool) == [indexed_message(index) for index in range(300)]
    with podipc.consumer(url) as consumer:
        received = list(consumer)
    assert producer.wait(20) == 0
    assert received == [indexed_message(index) for index in range(300)]
    assert not spool.exists()


def test_large_messages_are_never_read_half_written(spool: Path) -> None:
    url = f"file://{spool}?depth=4"
    producer = start_python(
        "import sys, podipc\n"
        "with podipc.producer(sys.argv[1]) as producer:\n"
        "    for index in range(24):\n"
        "        producer.send(bytes([index]) * (1024 * 1024 + index))\n",
        url,
    )
    with podipc.consumer(url) as consumer:
        received = list(consumer)
    assert producer.wait(20) == 0
    assert [len(message) for message in received] == [1024 * 1024 + index for index in range(24)]
    assert all(message == bytes([index]) * len(message) for index, message in enumerate(received))


def test_segments_rotate_and_are_removed_once_taken_so_the_spool_stays_small(spool: Path) -> None:
    url = f"file://{spool}?segment_size=4KiB&depth=16"
    count, seen = 2000, {"segments": 0, "bytes": 0}
    producer = start_python(
        "import sys, podipc\n"
        "with podipc.producer(sys.argv[1]) as producer:\n"
        "    for index in range(int(sys.argv[2])):\n"
        "        producer.send(index.to_bytes(8, 'big') * 12)\n",
        url,
        count,
    )
    received = []
    with podipc.consumer(url) as consumer:
        for message in consumer:
            received.append(message)
            if len(received) % 50 == 0:
                names = spool_names(spool)
                sizes = [os.stat(spool / name).st_size for name in names if name.startswith("podipc.seg.")]
                seen["segments"] = max(seen["segments"], len(sizes))
                seen["bytes"] = max(seen["bytes"], sum(sizes))
    assert producer.wait(20) == 0
    assert received == [index.to_bytes(8, "big") * 12 for index in range(count)]
    # 2000 records of 116 bytes are 56 segments of 4 KiB; depth 16 keeps at most the one read and the one written
    assert seen["segments"] <= 3 and seen["bytes"] <= 3 * 4096, seen
    assert not spool.exists()


def test_a_restarted_producer_cuts_off_a_torn_record_and_resumes_numbering(spool: Path) -> None:
    data = messages_segment(0, [b"zero", b"one", b"two"])
    torn = encode_record(MESSAGE, 3, b"three, torn by a kill")[:17]
    write_segment(spool, 0, data + torn)
    with podipc.producer(f"file://{spool}") as producer:
        assert producer.resumed_at == 3
        assert (spool / segment_name(0)).stat().st_size == len(data)
        producer.send(b"three")
        consumer = start_python(
            "import sys, podipc\nprint([m.decode() for m in podipc.consumer(sys.argv[1])])", f"file://{spool}"
        )
    out, err = consumer.communicate(timeout=20)
    assert out.strip() == "['zero', 'one', 'two', 'three']", err


@pytest.mark.parametrize(
    ("segments", "resumed_at", "ended"),
    [
        ({}, 0, False),
        ({0: messages_segment(0, [b"a"] * 5)}, 5, False),
        ({0: messages_segment(0, [b"a"] * 5, NEXT)}, 5, False),  # killed between NEXT and the next segment
        ({0: messages_segment(0, [b"a"] * 5, NEXT), 5: messages_segment(5, [b"b"] * 2, stream_offset=145)}, 7, False),
        ({0: messages_segment(0, [b"a"] * 5, END)}, 5, True),
        ({0: messages_segment(0, [b"a"] * 2, NEXT), 2: b"PODIPCSG\x02"}, 2, False),  # a torn segment header
    ],
)
def test_restarted_producer_finds_where_the_stream_ends(
    spool: Path, segments: dict[int, bytes], resumed_at: int, ended: bool
) -> None:
    spool.mkdir()
    for first, data in segments.items():
        write_segment(spool, first, data)
    with podipc.producer(f"file://{spool}") as producer:
        assert producer.resumed_at == resumed_at
        if ended:
            with pytest.raises(ChannelClosed, match="already ended"):
                producer.send(b"more")
        else:
            producer.send(b"next")
        producer.abort()
    records = stream_in(spool)
    if not ended:
        assert records[-1] == (MESSAGE, resumed_at, b"next")
        messages = [sequence for kind, sequence, _ in records if kind == MESSAGE]
        assert messages == list(range(len(messages)))  # no gap, no repeat across segments


def test_producer_killed_mid_stream_three_times_then_restarted_gives_the_uninterrupted_digest(spool: Path) -> None:
    url = f"file://{spool}?restart_wait=20&segment_size=64KiB"
    produce = ["produce", url, "--count", "3000", "--random", "--size", "3000", "--seed", "11", "--rate", "4000"]
    consumer = start_cli("consume", url)
    for killed_after in (600, 1200, 1800):
        doomed = start_cli(*produce)
        wait_for(lambda bar=killed_after: highest_message(spool) >= bar, what=f"{killed_after} messages in the spool")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        assert highest_message(spool) < 2999, "the producer finished before it was killed"
    last = start_cli(*produce)
    produced, consumed = summary_of(last), summary_of(consumer)
    count, digest = expected_summary(3000, 3000, 11)
    assert 1800 <= int(produced["resumed_at"]) < 3000  # type: ignore[call-overload]
    assert (produced["messages"], produced["sha256"]) == (count, digest)
    assert (consumed["messages"], consumed["sha256"]) == (count, digest)
    assert not spool.exists()


def test_consumer_killed_between_receives_resumes_without_loss_or_duplicates(spool: Path, tmp_path: Path) -> None:
    url = f"file://{spool}?restart_wait=20"
    output = tmp_path / "received.bin"
    producer = start_python(PRODUCER_SCRIPT, url, 500, 0)
    first = start_python(CONSUMER_SCRIPT, url, 123, output)
    assert first.stdout is not None
    assert first.stdout.readline().split() == ["received", "0"]
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    with podipc.consumer(url) as consumer:
        assert consumer.resumed_at == 123
        rest = list(consumer)
    assert producer.wait(20) == 0
    data, before = output.read_bytes(), []
    while data:
        size = int.from_bytes(data[:4], "big")
        before.append(data[4 : 4 + size])
        data = data[4 + size :]
    assert before + rest == [indexed_message(index) for index in range(500)]
    assert not spool.exists()


@pytest.mark.parametrize(
    ("taken", "resumed_at"),
    [
        (3, 3),  # the usual: the stored offset leads to message 3
        (0, 0),  # a consumer that committed nothing yet
    ],
)
def test_consumer_resumes_at_its_committed_position(spool: Path, taken: int, resumed_at: int) -> None:
    messages = [b"m%d" % index for index in range(6)]
    write_segment(spool, 0, messages_segment(0, messages, END))
    if taken:
        write_position(spool, Position(9, STREAM_ID, taken, 0, offset_after(messages[:taken]), 0, 0))
    with podipc.consumer(f"file://{spool}") as consumer:
        assert consumer.resumed_at == resumed_at
        assert list(consumer) == messages[resumed_at:]
    assert spool_names(spool) == []


def test_a_position_past_what_survived_a_power_loss_skips_what_was_taken_when_it_comes_again(spool: Path) -> None:
    survived = [b"m0", b"m1", b"m2"]  # the consumer had taken m0..m4 (synced) when the power went
    write_segment(spool, 0, messages_segment(0, survived) + b"\x00" * 40)  # zeros where the rest was
    write_position(spool, Position(9, STREAM_ID, 5, 0, offset_after([b"m0"] * 5), 0, 0))
    url = f"file://{spool}?wait=20"
    with podipc.consumer(url) as consumer:
        assert consumer.try_recv() is None  # waits for the producer to repair the segment
        with podipc.producer(url) as producer:
            assert producer.resumed_at == 3  # the zeros cut off
            for index in range(3, 8):
                producer.send(b"m%d" % index)
            closer = threading.Thread(target=producer.close, args=(20,))
            closer.start()
            assert list(consumer) == [b"m5", b"m6", b"m7"]
            closer.join()
    assert spool_names(spool) == []


def test_an_end_below_a_position_a_power_loss_left_ahead_still_ends_the_stream(spool: Path) -> None:
    write_segment(spool, 0, messages_segment(0, [b"m0", b"m1", b"m2"], END))  # the producer ended after 3
    write_position(spool, Position(9, STREAM_ID, 5, 0, offset_after([b"m0"] * 5), 0, 0))  # 5 were taken
    with podipc.consumer(f"file://{spool}") as consumer:
        assert list(consumer) == []
        assert consumer.ended
    assert spool_names(spool) == []


def test_consumer_raises_peer_gone_soon_after_the_producer_is_killed(spool: Path) -> None:
    url = f"file://{spool}"
    producer = start_python(PRODUCER_SCRIPT, url, 5, 60)
    with podipc.consumer(url) as consumer:
        assert [consumer.recv(timeout=20) for _ in range(5)] == [indexed_message(index) for index in range(5)]
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
        killed_at = time.monotonic()
        with pytest.raises(PeerGone):
            consumer.recv(timeout=20)
        assert time.monotonic() - killed_at < 2


def test_a_torn_tail_left_by_a_killed_producer_is_waited_on_then_repaired_by_the_next(spool: Path) -> None:
    write_segment(spool, 0, messages_segment(0, [b"zero", b"one"]) + encode_record(MESSAGE, 2, b"two")[:-2])
    url = f"file://{spool}?wait=0.5"
    with podipc.consumer(url) as consumer:
        assert [consumer.recv(timeout=5), consumer.recv(timeout=5)] == [b"zero", b"one"]
        with pytest.raises(PeerTimeout):
            consumer.recv(timeout=5)
    producer = start_python(PRODUCER_SCRIPT, f"file://{spool}", 1, 0)  # resumes at 2, sends message 2 again
    with podipc.consumer(f"file://{spool}") as consumer:
        assert consumer.resumed_at == 2
        assert list(consumer) == [indexed_message(0)]
    assert producer.wait(20) == 0


def test_a_damaged_record_that_a_live_producer_leaves_is_a_protocol_error(spool: Path) -> None:
    url = f"file://{spool}?wait=20"
    with podipc.producer(url) as producer:
        for message in (b"first", b"second", b"third"):
            producer.send(message)
        segment = spool / segment_name(0)
        data = bytearray(segment.read_bytes())
        data[offset_after([b"first"]) + 22] ^= 0xFF  # a byte of "second" changes on the volume
        segment.write_bytes(bytes(data))
        with podipc.consumer(url) as consumer:
            assert consumer.recv(timeout=5) == b"first"
            started = time.monotonic()
            with pytest.raises(ProtocolError, match="damaged"):
                consumer.recv(timeout=20)
            assert 1.5 <= time.monotonic() - started < 6
        producer.abort()


def test_producer_blocked_on_a_full_spool_raises_peer_gone_when_the_consumer_dies(spool: Path, tmp_path: Path) -> None:
    url = f"file://{spool}?depth=4"
    consumer = start_python(CONSUMER_SCRIPT, url, 1, tmp_path / "out.bin")
    with podipc.producer(url) as producer:
        producer.send(b"first")
        assert consumer.stdout is not None
        assert consumer.stdout.readline().startswith("received")
        for _ in range(4):
            producer.send(b"fills the spool")
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(10)
        killed_at = time.monotonic()
        with pytest.raises(PeerGone):
            producer.send(b"no room", timeout=20)
        assert time.monotonic() - killed_at < 2
        producer.abort()


def test_consumer_leaving_mid_stream_fails_the_producer_close_but_a_new_consumer_finishes_it(spool: Path) -> None:
    url = f"file://{spool}"
    with podipc.producer(url) as producer:
        for index in range(10):
            producer.send(indexed_message(index))
        consumer = start_python(
            "import sys, podipc\nconsumer = podipc.consumer(sys.argv[1])\n"
            "print(*[consumer.recv(timeout=20).hex() for _ in range(3)])\nconsumer.close()",
            url,
        )
        out, err = consumer.communicate(timeout=20)
        assert out.split() == [indexed_message(index).hex() for index in range(1, 3)], err
        left_at = time.monotonic()
        with pytest.raises(PeerGone):
            producer.close(timeout=20)
        assert time.monotonic() - left_at < 2
    assert POSITION_NAME in spool_names(spool)  # kept for a new consumer, with the stream and its END record
    assert stream_in(spool)[-1] == (END, 10, b"")
    with podipc.consumer(url) as consumer:
        assert consumer.resumed_at == 3
        assert list(consumer) == [indexed_message(index) for index in range(3, 10)]
    assert not spool.exists()


def test_send_waits_while_depth_or_max_bytes_is_reached(spool: Path) -> None:
    with podipc.producer(f"file://{spool}?depth=2&max_bytes=1000") as producer:
        producer.send(b"x" * 600)
        with pytest.raises(Timeout, match="stayed full"):
            producer.send(b"x" * 600, timeout=0.2)  # 2 x (20 + 600) bytes of records > max_bytes
        producer.send(b"x" * 300)
        with pytest.raises(Timeout, match="stayed full"):
            producer.send(b"", timeout=0.2)  # over depth
        producer.abort()
    with podipc.producer(f"file://{spool.parent / 'big'}?max_bytes=10") as producer:
        producer.send(b"y" * 100)  # larger than max_bytes, but the spool is empty
        assert messages_in(spool.parent / "big") == [b"y" * 100]
        producer.abort()


def test_a_second_consumer_on_the_same_spool_is_refused(spool: Path) -> None:
    with podipc.consumer(f"file://{spool}") as consumer, pytest.raises(ChannelUnavailable, match="another consumer"):
        podipc.consumer(f"file://{spool}")
    assert consumer.closed


def test_consumer_without_producer_times_out_on_the_wait_option(spool: Path) -> None:
    with podipc.consumer(f"file://{spool}?wait=0.3") as consumer, pytest.raises(PeerTimeout):
        consumer.recv()
    with podipc.consumer(f"file://{spool}") as consumer, pytest.raises(Timeout):
        consumer.recv(timeout=0.2)


def test_producer_refuses_a_message_over_max_message_size(spool: Path) -> None:
    with podipc.producer(f"file://{spool}?max_message_size=1KiB") as producer:
        with pytest.raises(MessageTooLarge, match="1024"):
            producer.send(b"x" * 1025)
        producer.abort()
    assert messages_in(spool) == []


def test_a_consumer_skips_and_counts_records_over_its_own_limit(spool: Path) -> None:
    write_segment(spool, 0, messages_segment(0, [b"small", b"x" * 3000, b"", b"also small"], END))
    with podipc.consumer(f"file://{spool}?max_message_size=1KiB") as consumer:
        assert list(consumer) == [b"small", b"", b"also small"]
        assert consumer.skipped == 1


def test_producer_resume_point_is_exact_while_a_consumer_commits_concurrently(spool: Path) -> None:
    url = f"file://{spool}?restart_wait=30&segment_size=4KiB"
    with podipc.producer(url, depth=10000) as producer:
        for _ in range(10000):
            producer.send(b"")
        producer.abort()
    consumer = start_cli("consume", url, "--count", "10000")
    resume_points, during_drain = set(), 0
    while consumer.poll() is None:
        with podipc.producer(url) as producer:
            resume_points.add(producer.resumed_at)
            if len(segments_of(spool)) > 1:
                during_drain += 1
            producer.abort()
    assert summary_of(consumer)["messages"] == 10000
    assert resume_points == {10000}
    assert during_drain >= 3, "the consumer drained the spool before the producer could race it"


def test_restarted_producer_after_its_end_record_only_waits_for_the_consumer(spool: Path) -> None:
    url = f"file://{spool}"
    with podipc.producer(url) as producer:
        producer.send(b"only")
        with pytest.raises(Timeout):
            producer.close(timeout=0.2)  # the consumer never came; the END record stays in the spool
    assert stream_in(spool)[-1] == (END, 1, b"")
    with podipc.producer(url) as producer:
        assert producer.resumed_at == 1
        with pytest.raises(ChannelClosed, match="already ended"):
            producer.send(b"more")
        consumer = start_python("import sys, podipc\nprint(list(podipc.consumer(sys.argv[1])))", url)
    out, err = consumer.communicate(timeout=20)
    assert out.strip() == "[b'only']", err


# --- options, sync, readiness --------------------------------------------------------------------


@pytest.mark.parametrize("query", ["sync=sometimes", "fsync=true", "segment_size=100", "max_message_size=5GiB"])
def test_bad_spool_options_are_refused_with_one_line(spool: Path, query: str) -> None:
    with pytest.raises(AddressError) as caught:
        podipc.producer(f"file://{spool}?{query}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("level", ["always", "batch", "none"])
def test_every_sync_level_delivers_the_stream_and_leaves_the_directory_empty(spool: Path, level: str) -> None:
    spool.mkdir()
    url = f"file://{spool}?sync={level}&segment_size=4KiB"
    producer = start_python(PRODUCER_SCRIPT, url, 200, 0)
    with podipc.consumer(url) as consumer:
        assert list(consumer) == [indexed_message(index) for index in range(200)]
    assert producer.wait(20) == 0
    assert spool.is_dir()
    assert spool_names(spool) == []


def test_sync_batch_syncs_an_idle_producer_within_sync_delay(spool: Path) -> None:
    with podipc.producer(f"file://{spool}?sync=batch&sync_delay=0.2") as producer:
        batch = producer._batch  # type: ignore[attr-defined]
        producer.send(b"first")
        wait_for(lambda: batch.synced == batch.written, timeout=5, what="the first sync")
        producer.send(b"second")
        sent_at = time.monotonic()
        wait_for(lambda: batch.synced == batch.written, timeout=5, what="the sync of an idle producer")
        assert time.monotonic() - sent_at < 0.2 + 0.5  # sync_delay, and a generous margin for a loaded machine
        producer.abort()


def test_a_producer_dropped_while_its_sync_thread_syncs_is_collected_there(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync thread's reference may be the last one: the endpoint is then collected in that thread, and its
    close must not wait for the lock that thread holds around the sync (it did: found as a dropped producer
    never collected in a CI run, whose fdatasync took long under load)."""
    syncing, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        if threading.current_thread().name == "podipc-spool-sync":
            syncing.set()
            release.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    producer = podipc.producer(f"file://{spool}?sync=batch&sync_delay=0")
    producer.send(b"first")
    assert syncing.wait(5), "the sync thread never synced"
    dropped = weakref.ref(producer)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del producer
        release.set()
        wait_for(lambda: gc.collect() >= 0 and dropped() is None, timeout=5, what="the dropped producer collected")
    assert not any(thread.name == "podipc-spool-sync" and thread.is_alive() for thread in threading.enumerate())


def test_a_consumer_without_inotify_still_receives_by_polling(spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> int:
        raise OSError(24, "Too many open files (fs.inotify.max_user_instances)")

    monkeypatch.setattr(notify, "inotify_init", unavailable)
    url = f"file://{spool}"
    with podipc.consumer(url) as consumer:
        producer = start_python(PRODUCER_SCRIPT, url, 50, 0)
        assert list(consumer) == [indexed_message(index) for index in range(50)]
    assert producer.wait(20) == 0


def test_an_idle_consumer_sleeps_on_inotify(spool: Path) -> None:
    url = f"file://{spool}"
    earlier = threading.enumerate()
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        # this thread and those the two endpoints started: not what other tests may have left running
        ours = [threading.main_thread(), *started_since(earlier)]
        before = cpu_seconds(ours)
        with pytest.raises(Timeout):
            consumer.recv(timeout=1.0)
        assert cpu_seconds(ours) - before < 0.05
        producer.send(b"wakes it")
        assert consumer.recv(timeout=5) == b"wakes it"
        producer.abort()


# --- leftovers, modes, other formats ----------------------------------------------------------


def test_names_the_spool_does_not_use_are_never_touched(spool: Path) -> None:
    spool.mkdir()
    (spool / "notes.txt").write_text("not ours, left alone")
    (spool / "podipc.sock").write_text("another channel's, left alone")
    (spool / "podipc.seg.12").write_bytes(b"not a segment name")
    write_segment(spool, 0, messages_segment(0, [b"good"], END))
    with podipc.consumer(f"file://{spool}") as consumer:
        assert list(consumer) == [b"good"]
    assert spool_names(spool) == ["notes.txt", "podipc.seg.12", "podipc.sock"]


def test_a_spool_of_the_first_format_is_refused_not_mixed(spool: Path) -> None:
    spool.mkdir()
    (spool / "podipc.msg.00000000000000000000").write_bytes(b"an unread message of podipc 0.1")
    for side in (podipc.producer, podipc.consumer):
        with pytest.raises(ChannelUnavailable, match="first spool format"):
            side(f"file://{spool}")
    assert spool_names(spool) == ["podipc.msg.00000000000000000000"]


def test_files_and_directory_get_the_mode_option(spool: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        with podipc.producer(f"file://{spool}?mode=0660") as producer:
            producer.send(b"m")
            modes = {name: stat.S_IMODE(os.stat(spool / name).st_mode) for name in spool_names(spool)}
            producer.abort()
        with podipc.producer(f"file://{spool.parent / 'private'}") as producer:
            producer.send(b"m")
            private = {
                name: stat.S_IMODE(os.lstat(spool.parent / "private" / name).st_mode)
                for name in spool_names(spool.parent / "private")
            }
            directory = stat.S_IMODE(os.stat(spool.parent / "private").st_mode)
            producer.abort()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o770
    assert modes[segment_name(0)] == 0o660 and modes["podipc.presence.spool.producer"] == 0o660
    assert set(private.values()) == {0o600} and directory == 0o700


# --- plain peers per docs/wire/file.md ---------------------------------------------------------


def script_from_wire_doc(name: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", WIRE_DOC.read_text(), flags=re.DOTALL)
    matching = [block for block in blocks if block.startswith(f"# {name}\n")]
    assert len(matching) == 1, f"{name} not found in {WIRE_DOC}"
    return matching[0]


def test_plain_producer_from_the_wire_doc_feeds_a_podipc_consumer(spool: Path) -> None:
    spool.mkdir()  # an emptyDir mount
    plain = start_python(script_from_wire_doc("plain_producer.py"), spool, "first", "", "third message", "")
    with podipc.consumer(f"file://{spool}") as consumer:
        received = list(consumer)
    _, err = plain.communicate(timeout=20)
    assert plain.returncode == 0, err
    assert received == [b"first", b"", b"third message", b""]
    assert spool_names(spool) == []


def test_podipc_producer_feeds_the_plain_consumer_from_the_wire_doc(spool: Path, tmp_path: Path) -> None:
    url = f"file://{spool}?segment_size=8KiB"  # several segments: the plain consumer follows NEXT records
    with podipc.producer(url) as producer, open(tmp_path / "plain.out", "w+") as output:
        plain = start_process([sys.executable, "-c", script_from_wire_doc("plain_consumer.py"), str(spool)], output)
        for message in MIXED_MESSAGES * 3:
            producer.send(message)
    _, err = plain.communicate(timeout=20)
    assert plain.returncode == 0, err
    lines = (tmp_path / "plain.out").read_text().splitlines()
    assert [bytes.fromhex(line) for line in lines] == MIXED_MESSAGES * 3
    assert not spool.exists()


def test_the_plain_consumer_resumes_after_a_podipc_consumer_position(spool: Path, tmp_path: Path) -> None:
    url = f"file://{spool}?segment_size=4KiB"
    with podipc.producer(url) as producer:
        for index in range(300):
            producer.send(indexed_message(index))
        with pytest.raises(Timeout):
            producer.close(timeout=0.1)  # no consumer yet: the stream and its END record stay in the spool
    with podipc.consumer(url) as consumer:
        taken = [consumer.recv(timeout=5) for _ in range(120)]
    with open(tmp_path / "plain.out", "w+") as output:
        plain = start_process([sys.executable, "-c", script_from_wire_doc("plain_consumer.py"), str(spool)], output)
        _, err = plain.communicate(timeout=20)
    assert plain.returncode == 0, err
    rest = [bytes.fromhex(line) for line in (tmp_path / "plain.out").read_text().splitlines()]
    assert taken + rest == [indexed_message(index) for index in range(300)]
    assert spool_names(spool) == ["podipc.directory"]  # the plain consumer leaves podipc's marker


def test_digest_helper_matches_a_direct_sha256() -> None:
    count, digest = expected_summary(3, 10, 1)
    assert count == 3
    assert digest == hashlib.sha256(b"".join(generated_messages(3, 10, True, 1))).hexdigest()


def test_the_records_helper_reads_what_a_producer_wrote(spool: Path) -> None:
    with podipc.producer(f"file://{spool}") as producer:
        producer.send(b"one")
        producer.abort()
    assert records_of(spool / segment_name(0)) == [(MESSAGE, 0, b"one")]


def take_all(url: str, results: object) -> None:
    with podipc.consumer(url, wait=20) as consumer:
        results.put(len(list(consumer)))  # type: ignore[attr-defined]


def test_a_close_never_takes_a_consumer_that_just_took_the_end_for_gone(tmp_path: Path) -> None:
    """The consumer removes the END segment (the ack), then leaves: a close looking between the two must see the ack."""
    context = __import__("multiprocessing").get_context("fork")
    for round_number in range(40):
        url = f"file://{tmp_path}/s{round_number}?sync=always"
        results = context.Queue()
        consumer = context.Process(target=take_all, args=(url, results))
        consumer.start()
        with podipc.producer(url, wait=20) as producer:
            for _ in range(300):
                producer.send(b"x" * 64)
            producer.close(10)  # raised PeerGone now and then before the fix
        assert results.get(timeout=30) == 300
        consumer.join(10)


def test_a_side_moving_in_keeps_the_directory_that_the_side_leaving_made(spool: Path) -> None:
    """A serving consumer's next session opens the spool as the last producer leaves: the directory stays for it."""
    url = f"file://{spool}"
    consumer = podipc.consumer(url, wait=5)
    moving_in = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(moving_in, fcntl.LOCK_SH)  # what a side holds between opening the directory and claiming
        consumer.abort()  # the last side out: it would remove the directory it made
        assert spool.is_dir()
    finally:
        os.close(moving_in)
    producer = start_python(PRODUCER_SCRIPT, url, 3, 0)
    with podipc.consumer(url, wait=5) as again:
        received = list(again)
    assert producer.wait(20) == 0
    assert received == [indexed_message(index) for index in range(3)]
    assert not spool.exists()  # the last side out of the next stream removes it


def test_a_side_whose_directory_was_removed_as_it_opened_makes_it_again(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the leaving side removed the directory after this side opened it, before its lock."""
    from podipc.transports.spool.side import SpoolSide

    lock = SpoolSide._lock_directory_shared
    removed = []

    def removed_first(side: SpoolSide) -> None:
        if not removed:
            removed.append(True)
            for name in os.listdir(spool):
                os.unlink(spool / name)
            os.rmdir(spool)
        lock(side)

    producer = podipc.producer(f"file://{spool}")  # makes the directory
    producer.abort()
    monkeypatch.setattr(SpoolSide, "_lock_directory_shared", removed_first)
    with podipc.consumer(f"file://{spool}", wait=0.2) as consumer:
        assert removed and spool.is_dir()
        assert os.path.exists(consumer._presence.path)  # type: ignore[attr-defined]
        with pytest.raises(PeerTimeout):
            consumer.recv()
