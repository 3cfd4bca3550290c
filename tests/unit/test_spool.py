"""file:// spool: what is special to it — resuming after kill -9 on either side, atomic files, garbage, cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import podipc
from podipc.errors import (
    ChannelClosed,
    ChannelUnavailable,
    MessageTooLarge,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    Timeout,
)
from podipc.payloads import StreamSummary, generated_messages
from podipc.transports.spool.wire import (
    MAX_SEQUENCE,
    SpoolName,
    done_name,
    end_name,
    message_name,
    parse_spool_name,
    part_name,
    read_message_file,
)
from tests.commands import PODIPC

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


def highest_sequence(directory: Path) -> int:
    sequences = [parsed.sequence for parsed in map(parse_spool_name, spool_names(directory)) if parsed]
    return max(sequences, default=-1)


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


# --- names and records -------------------------------------------------------


@given(st.integers(min_value=0, max_value=MAX_SEQUENCE))
def test_sequenced_names_round_trip_and_sort_in_stream_order(sequence: int) -> None:
    assert parse_spool_name(message_name(sequence)) == SpoolName("message", sequence)
    assert parse_spool_name(done_name(sequence)) == SpoolName("done", sequence)
    assert parse_spool_name(end_name(sequence)) == SpoolName("end", sequence)
    assert parse_spool_name(part_name(sequence)) == SpoolName("part", -1)
    if sequence < MAX_SEQUENCE:
        assert message_name(sequence) < message_name(sequence + 1)


@given(st.text(max_size=60))
def test_name_decoder_accepts_only_twenty_ascii_digits(name: str) -> None:
    parsed = parse_spool_name(name)
    spool_prefixes = ("podipc.msg.", "podipc.done.", "podipc.end.", "podipc.part.", "podipc.presence.")
    if not name.startswith(spool_prefixes) and name != "podipc.directory":
        assert parsed is None  # never the spool's, so never removed
        return
    assert parsed is not None
    if parsed.kind in ("message", "done", "end"):
        digits = name.rsplit(".", 1)[1]
        assert re.fullmatch(r"[0-9]{20}", digits, flags=re.ASCII)
        assert 0 <= parsed.sequence <= MAX_SEQUENCE
    else:
        assert parsed.sequence == -1


@given(st.sampled_from(["podipc.msg.", "podipc.done.", "podipc.end."]), st.text(min_size=0, max_size=25))
def test_name_decoder_calls_malformed_sequences_malformed(prefix: str, digits: str) -> None:
    parsed = parse_spool_name(prefix + digits)
    valid = re.fullmatch(r"[0-9]{20}", digits, flags=re.ASCII) is not None
    assert (parsed is not None and parsed.kind != "malformed") == valid
    assert parsed is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=0, max_value=4000))
def test_record_decoder_returns_the_file_or_none_when_over_the_limit(content: bytes, limit: int) -> None:
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        file.seek(0)
        data, size = read_message_file(file.fileno(), limit)
    assert size == len(content)
    assert data == (content if len(content) <= limit else None)


def test_record_decoder_rejects_what_is_not_a_regular_file() -> None:
    reader, writer = os.pipe()
    try:
        os.write(writer, b"hello")
        assert read_message_file(reader, 1000)[0] is None
    finally:
        os.close(reader)
        os.close(writer)


# --- streams across processes ------------------------------------------------


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
    assert spool_names(spool) == []


@pytest.mark.parametrize(
    ("files", "resumed_at"),
    [
        ([done_name(3), done_name(4), message_name(5), end_name(6)], 5),  # killed between rename and unlink
        ([message_name(2), message_name(3), end_name(4)], 2),  # nothing committed yet in this spool
        ([done_name(5), end_name(6)], 6),  # every message taken, the end marker not yet
        ([end_name(7)], 7),  # killed after removing the last done file, before the end marker
    ],
)
def test_consumer_resumes_after_the_last_commit_found_in_the_spool(
    spool: Path, files: list[str], resumed_at: int
) -> None:
    spool.mkdir()
    for name in files:
        (spool / name).write_bytes(name.encode())
    with podipc.consumer(f"file://{spool}") as consumer:
        assert consumer.resumed_at == resumed_at
        received = list(consumer)
    assert received == [name.encode() for name in files if name.startswith("podipc.msg.")]
    assert consumer.skipped == 0
    assert spool_names(spool) == []


def test_producer_first_writes_into_the_spool_before_the_consumer_opens(spool: Path) -> None:
    url = f"file://{spool}"
    producer = start_python(PRODUCER_SCRIPT, url, 300, 0)
    assert producer.stdout is not None
    assert producer.stdout.readline().strip() == "sent"  # every message is on disk, no consumer yet
    assert len([name for name in spool_names(spool) if name.startswith("podipc.msg.")]) == 300
    with podipc.consumer(url) as consumer:
        received = list(consumer)
    assert producer.wait(20) == 0
    assert received == [indexed_message(index) for index in range(300)]
    assert not spool.exists()  # podipc made the directory, so podipc removed it


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


def test_part_files_are_invisible_to_the_consumer(spool: Path) -> None:
    spool.mkdir()
    (spool / part_name(0)).write_bytes(b"half a mess")
    with podipc.consumer(f"file://{spool}") as consumer, pytest.raises(Timeout):
        consumer.recv(timeout=0.3)
    os.rename(spool / part_name(0), spool / message_name(0))
    (spool / end_name(1)).touch()
    with podipc.consumer(f"file://{spool}") as consumer:
        assert list(consumer) == [b"half a mess"]


def test_restarted_producer_removes_stale_temporaries_and_resumes_numbering(spool: Path) -> None:
    spool.mkdir()
    for sequence in range(3):
        (spool / message_name(sequence)).write_bytes(b"%d" % sequence)
    (spool / part_name(3)).write_bytes(b"torn")
    (spool / "podipc.part.something-else").write_bytes(b"torn")
    with podipc.producer(f"file://{spool}") as producer:
        assert producer.resumed_at == 3
        assert not [name for name in spool_names(spool) if name.startswith("podipc.part.")]
        producer.send(b"3")
        consumer = start_python(
            "import sys, podipc\nprint([m.decode() for m in podipc.consumer(sys.argv[1])])", f"file://{spool}"
        )
    out, err = consumer.communicate(timeout=20)
    assert out.strip() == "['0', '1', '2', '3']", err


def test_producer_killed_mid_stream_three_times_then_restarted_gives_the_uninterrupted_digest(spool: Path) -> None:
    url = f"file://{spool}?restart_wait=20"
    produce = ["produce", url, "--count", "3000", "--random", "--size", "3000", "--seed", "11", "--rate", "4000"]
    consumer = start_cli("consume", url)
    for killed_after in (600, 1200, 1800):
        doomed = start_cli(*produce)
        wait_for(lambda bar=killed_after: highest_sequence(spool) >= bar, what=f"{killed_after} messages in the spool")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        assert highest_sequence(spool) < 2999, "the producer finished before it was killed"
    last = start_cli(*produce)
    produced, consumed = summary_of(last), summary_of(consumer)
    count, digest = expected_summary(3000, 3000, 11)
    assert 1800 <= int(produced["resumed_at"]) < 3000  # type: ignore[call-overload]
    assert (produced["messages"], produced["sha256"]) == (count, digest)
    assert (consumed["messages"], consumed["sha256"]) == (count, digest)
    assert spool_names(spool) == []


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
    stream = [name for name in spool_names(spool) if name.startswith(("podipc.msg.", "podipc.done."))]
    assert stream == [done_name(2)] + [message_name(index) for index in range(3, 10)]  # kept for a new consumer
    with podipc.consumer(url) as consumer:  # the end marker stayed too: the stream completes without the producer
        assert consumer.resumed_at == 3
        assert list(consumer) == [indexed_message(index) for index in range(3, 10)]
    assert not spool.exists()


def test_send_waits_while_depth_or_max_bytes_is_reached(spool: Path) -> None:
    with podipc.producer(f"file://{spool}?depth=2&max_bytes=1000") as producer:
        producer.send(b"x" * 600)
        with pytest.raises(Timeout, match="stayed full"):
            producer.send(b"x" * 600, timeout=0.2)  # over max_bytes
        producer.send(b"x" * 300)
        with pytest.raises(Timeout, match="stayed full"):
            producer.send(b"", timeout=0.2)  # over depth
        producer.abort()
    shutil.rmtree(spool)
    with podipc.producer(f"file://{spool}?max_bytes=10") as producer:
        producer.send(b"y" * 100)  # larger than max_bytes, but the spool is empty
        assert (spool / message_name(0)).read_bytes() == b"y" * 100
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
    assert not any(name.startswith("podipc.msg.") for name in spool_names(spool))


@pytest.mark.parametrize(
    ("files", "resumed_at"),
    [
        ([], 0),
        ([done_name(4)], 5),  # the consumer took everything
        ([done_name(4), message_name(5), message_name(6)], 7),
        ([done_name(3), done_name(4), message_name(5)], 6),
    ],
)
def test_restarted_producer_finds_the_next_sequence_number_in_the_spool(
    spool: Path, files: list[str], resumed_at: int
) -> None:
    spool.mkdir()
    for name in files:
        (spool / name).touch()
    with podipc.producer(f"file://{spool}") as producer:
        assert producer.resumed_at == resumed_at
        producer.send(b"next")
        assert (spool / message_name(resumed_at)).read_bytes() == b"next"
        producer.abort()


def test_producer_resume_point_is_exact_while_a_consumer_commits_concurrently(spool: Path) -> None:
    url = f"file://{spool}?restart_wait=30"
    with podipc.producer(url, depth=10000) as producer:
        for _ in range(10000):
            producer.send(b"")
        producer.abort()
    consumer = start_cli("consume", url, "--count", "10000")
    resume_points, during_drain = set(), 0
    while consumer.poll() is None:
        with podipc.producer(url) as producer:
            resume_points.add(producer.resumed_at)
            if any(name.startswith("podipc.msg.") for name in os.listdir(spool)):
                during_drain += 1
            producer.abort()
    assert summary_of(consumer)["messages"] == 10000
    assert resume_points == {10000}
    assert during_drain >= 3, "the consumer drained the spool before the producer could race it"


def test_restarted_producer_after_its_end_marker_only_waits_for_the_consumer(spool: Path) -> None:
    url = f"file://{spool}"
    with podipc.producer(url) as producer:
        producer.send(b"only")
        with pytest.raises(PeerTimeout):
            producer.close(timeout=0.2)  # the consumer never came; the end marker stays in the spool
    assert (spool / end_name(1)).exists()
    with podipc.producer(url) as producer:
        assert producer.resumed_at == 1
        with pytest.raises(ChannelClosed, match="already ended"):
            producer.send(b"more")
        consumer = start_python("import sys, podipc\nprint(list(podipc.consumer(sys.argv[1])))", url)
    out, err = consumer.communicate(timeout=20)
    assert out.strip() == "[b'only']", err


# --- garbage, leftovers, modes -----------------------------------------------


def test_garbage_files_are_skipped_counted_and_removed(spool: Path) -> None:
    spool.mkdir()
    (spool / "notes.txt").write_text("not ours, left alone")
    (spool / "podipc.sock").write_text("another channel's, left alone")
    (spool / "podipc.presence.spool.producer.123.456.tmp").touch()  # a producer killed while claiming
    (spool / message_name(0)).write_bytes(b"x" * 2048)  # over max_message_size
    os.mkfifo(spool / message_name(1))  # would block a careless reader
    os.symlink("/etc/hostname", spool / message_name(2))
    (spool / "podipc.msg.12").write_bytes(b"malformed name")
    (spool / message_name(3)).write_bytes(b"good")
    (spool / message_name(9)).write_bytes(b"after the end marker")
    (spool / end_name(4)).touch()
    with podipc.consumer(f"file://{spool}?max_message_size=1KiB") as consumer:
        assert list(consumer) == [b"good"]
        assert consumer.skipped == 5
    assert spool_names(spool) == ["notes.txt", "podipc.sock"]


def test_a_gap_before_the_end_marker_is_a_protocol_error(spool: Path) -> None:
    spool.mkdir()
    (spool / message_name(0)).write_bytes(b"zero")
    (spool / end_name(3)).touch()
    with podipc.consumer(f"file://{spool}?wait=0.3") as consumer:
        assert consumer.recv(timeout=5) == b"zero"
        with pytest.raises(ProtocolError, match="message 1 is missing"):
            consumer.recv(timeout=5)


@pytest.mark.parametrize("query", ["", "?fsync=true"])
def test_existing_directory_stays_empty_after_a_clean_run(spool: Path, query: str) -> None:
    spool.mkdir()
    url = f"file://{spool}{query}"
    producer = start_python(PRODUCER_SCRIPT, url, 50, 0)
    with podipc.consumer(url) as consumer:
        assert len(list(consumer)) == 50
    assert producer.wait(20) == 0
    assert spool.is_dir()
    assert spool_names(spool) == []


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
    assert modes[message_name(0)] == 0o660 and modes["podipc.presence.spool.producer"] == 0o660
    assert set(private.values()) == {0o600} and directory == 0o700


# --- plain peers per docs/wire/file.md ---------------------------------------


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
    url = f"file://{spool}"
    with podipc.producer(url) as producer, open(tmp_path / "plain.out", "w+") as output:
        plain = start_process([sys.executable, "-c", script_from_wire_doc("plain_consumer.py"), str(spool)], output)
        for message in MIXED_MESSAGES:
            producer.send(message)
    _, err = plain.communicate(timeout=20)
    assert plain.returncode == 0, err
    lines = (tmp_path / "plain.out").read_text().splitlines()
    assert [bytes.fromhex(line) for line in lines] == MIXED_MESSAGES
    assert spool_names(spool) == []


def test_digest_helper_matches_a_direct_sha256() -> None:
    count, digest = expected_summary(3, 10, 1)
    assert count == 3
    assert digest == hashlib.sha256(b"".join(generated_messages(3, 10, True, 1))).hexdigest()
