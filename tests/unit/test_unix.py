"""unix://: what is special to the Unix stream channel (socket files, abstract names), across real processes."""

from __future__ import annotations

import itertools
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import podipc
from podipc.address import parse_address
from podipc.options import resolve_options
from podipc.transports.unix import UnixProducer
from tests.unit.test_tcp import (
    assert_a_stranger_is_dropped_though_a_copy_of_its_connection_lives,
    assert_blocked_producer_sees_consumer_killed,
    assert_consumer_sees_producer_killed,
    assert_frame_length_garbage_is_protocol_error,
    assert_garbage_connection_is_rejected_and_reported,
    assert_partial_frame_then_timeout_keeps_position,
    assert_second_producer_is_refused,
    cli_round_trip,
    plain_consumer_receives_from_podipc,
    podipc_consumer_receives_from_plain_producer,
)

pytestmark = pytest.mark.timeout(60)

NAMES = itertools.count()

KILLED_CONSUMER = """
import sys, podipc
channel = podipc.consumer(sys.argv[1])
print("listening", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for socket files (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="podipc-test-stream-", dir="/tmp"))
    yield directory
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()


def abstract_name() -> str:
    return f"podipc-test-stream-{os.getpid()}-{next(NAMES)}"


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_cli_round_trip_over_a_socket_file_removes_the_file(socket_dir: Path, consumer_first: bool) -> None:
    path = socket_dir / "s.sock"
    cli_round_trip(f"unix://{path}", consumer_first)
    assert not path.exists()
    assert list(socket_dir.iterdir()) == []


def test_cli_round_trip_over_an_abstract_socket() -> None:
    cli_round_trip(f"unix://@{abstract_name()}", consumer_first=True)


def test_socket_file_has_mode_0600_by_default_and_the_mode_option_otherwise(socket_dir: Path) -> None:
    path = socket_dir / "m.sock"
    with podipc.consumer(f"unix://{path}"):
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.exists()
    with podipc.consumer(f"unix://{path}?mode=0660"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert not path.exists()


def test_stale_socket_file_of_a_killed_consumer_is_replaced(socket_dir: Path) -> None:
    path = socket_dir / "stale.sock"
    url = f"unix://{path}"
    victim = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline() == b"listening\n"
    finally:
        victim.kill()
        victim.wait()
    assert stat.S_ISSOCK(path.lstat().st_mode), "the killed consumer should have left its socket file"
    cli_round_trip(url, consumer_first=True, count=50)
    assert not path.exists()


def test_live_socket_file_is_refused(socket_dir: Path) -> None:
    url = f"unix://{socket_dir / 'live.sock'}"
    with podipc.consumer(url), pytest.raises(podipc.ChannelUnavailable, match="another consumer listens"):
        podipc.consumer(url)


def test_second_consumer_on_an_abstract_name_is_refused() -> None:
    url = f"unix://@{abstract_name()}"
    with podipc.consumer(url), pytest.raises(podipc.ChannelUnavailable, match="another consumer listens"):
        podipc.consumer(url)


def test_a_regular_file_at_the_path_is_not_replaced(socket_dir: Path) -> None:
    path = socket_dir / "data.sock"
    path.write_bytes(b"precious")
    with pytest.raises(podipc.ChannelUnavailable, match="not a socket"):
        podipc.consumer(f"unix://{path}")
    assert path.read_bytes() == b"precious"
    path.unlink()


def test_missing_directory_is_channel_unavailable_with_the_fix(socket_dir: Path) -> None:
    with pytest.raises(podipc.ChannelUnavailable, match="emptyDir"):
        podipc.consumer(f"unix://{socket_dir}/missing/s.sock")


def test_closing_the_consumer_removes_only_its_own_socket_file(socket_dir: Path) -> None:
    path = socket_dir / "own.sock"
    consumer = podipc.consumer(f"unix://{path}")
    path.unlink()
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    consumer.close()
    assert path.exists(), "another socket at the path must survive"
    other.close()
    path.unlink()


def test_killed_producer_mid_stream_is_peer_gone_within_two_seconds(socket_dir: Path) -> None:
    assert_consumer_sees_producer_killed(f"unix://{socket_dir / 'k.sock'}", 1 << 20)


def test_killed_consumer_unblocks_a_blocked_producer_with_peer_gone() -> None:
    assert_blocked_producer_sees_consumer_killed(f"unix://@{abstract_name()}")


def test_partial_frame_before_a_timeout_does_not_corrupt_the_next_recv(socket_dir: Path) -> None:
    path = socket_dir / "p.sock"
    assert_partial_frame_then_timeout_keeps_position(f"unix://{path}", socket.AF_UNIX, str(path))


def test_garbage_connection_is_rejected_and_named_in_peer_timeout() -> None:
    name = abstract_name()
    assert_garbage_connection_is_rejected_and_reported(f"unix://@{name}?wait=1", socket.AF_UNIX, "\0" + name)


def test_a_stranger_is_dropped_though_a_forked_child_holds_a_copy_of_its_connection() -> None:
    name = abstract_name()
    assert_a_stranger_is_dropped_though_a_copy_of_its_connection_lives(f"unix://@{name}", socket.AF_UNIX, "\0" + name)


def test_huge_frame_length_from_a_raw_peer_is_protocol_error(socket_dir: Path) -> None:
    path = socket_dir / "g.sock"
    assert_frame_length_garbage_is_protocol_error(f"unix://{path}", socket.AF_UNIX, str(path))


def test_second_producer_is_refused(socket_dir: Path) -> None:
    assert_second_producer_is_refused(f"unix://{socket_dir / 'two.sock'}")


NOBODY_PRODUCER = """
import os, sys, podipc, podipc.transport
podipc.transport.transports()  # every transport module loaded while the interpreter's files are readable
os.setgid(65534)
os.setuid(65534)
try:
    podipc.producer(sys.argv[1]).send(b"x")
except podipc.ChannelUnavailable as error:
    print(error)
"""


def test_producer_of_another_user_is_told_to_share_a_group(socket_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the producer as another user")
    socket_dir.chmod(0o755)
    url = f"unix://{socket_dir / 'perm.sock'}?wait=2"
    with podipc.consumer(url):
        outsider = subprocess.run(
            [sys.executable, "-c", NOBODY_PRODUCER, url], capture_output=True, timeout=30, check=False
        )
    assert b"mode=0660" in outsider.stdout, outsider.stderr.decode()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_plain_socket_consumer_from_the_docs_takes_podipc_messages(socket_dir: Path, abstract: bool) -> None:
    target = f"@{abstract_name()}" if abstract else str(socket_dir / "plain.sock")

    def listening() -> bool:
        if not abstract:
            return os.path.exists(target)
        with open("/proc/net/unix") as table:
            return any(line.rstrip().endswith(target) for line in table)

    plain_consumer_receives_from_podipc(f"unix://{target}", ["unix", target], listening)
    assert not os.path.exists(socket_dir / "plain.sock")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_podipc_consumer_takes_the_plain_producer_script_from_the_docs(socket_dir: Path, abstract: bool) -> None:
    target = f"@{abstract_name()}" if abstract else str(socket_dir / "plain.sock")
    podipc_consumer_receives_from_plain_producer(f"unix://{target}", ["unix", target])


def test_producer_waits_for_a_consumer_that_starts_later(socket_dir: Path) -> None:
    path = socket_dir / "late.sock"
    url = f"unix://{path}"
    late = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, podipc\ntime.sleep(1)\nwith podipc.consumer(sys.argv[1]) as c:\n    print(list(c))",
            url,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        started = time.monotonic()
        with podipc.producer(url) as channel:
            channel.send(b"late")
        assert time.monotonic() - started >= 0.9
        out, _ = late.communicate(timeout=20)
        assert out.strip() == b"[b'late']"
    finally:
        late.kill()
        late.wait()


def test_availability_and_host_limit() -> None:
    from podipc.transports import unix

    assert unix.availability() is None
    assert unix.host_max_message_size() == 64 * 1024 * 1024


class ExpectingAnotherListener(UnixProducer):
    """A producer that checked the socket file as if it belonged to another user than the one listening."""

    def _check_socket_file(self, path: str) -> None:
        super()._check_socket_file(path)
        if self._expected_listener is not None:
            self._expected_listener += 1


def test_a_listener_that_is_not_the_socket_files_owner_gets_no_message(socket_dir: Path) -> None:
    url = f"unix://{socket_dir / 'swapped.sock'}?wait=5"
    with podipc.consumer(url) as consumer:
        address = parse_address(url)
        producer = ExpectingAnotherListener(address, resolve_options(address, UnixProducer.options, {}))
        try:
            with pytest.raises(podipc.ChannelUnavailable, match="someone replaced the file"):
                producer.send(b"secret")
        finally:
            producer.abort()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)


def test_a_socket_file_writable_by_every_user_is_refused_by_the_producer(socket_dir: Path) -> None:
    path = socket_dir / "open.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    path.chmod(0o777)
    producer = podipc.producer(f"unix://{path}?wait=2")
    try:
        with pytest.raises(podipc.ChannelUnavailable, match=r"lets every user of the pod connect.*mode 0777"):
            producer.send(b"x")
    finally:
        producer.abort()
        listener.close()
