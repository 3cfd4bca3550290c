"""The CLI's whole life as a container runs it: SIGTERM/SIGINT mid-stream (also as PID 1), serving across
producer restarts, framing of standard input and output (issue 11).

Every command runs as its own process, started as tests/commands.py says. "As PID 1" runs it under
`unshare --pid --fork --mount-proc`, so it is the init of a fresh pid namespace, as a container's
ENTRYPOINT is: the kernel delivers no signal to such a process unless it handles it.

The schemes are those on the endpoint contract (tests/integration/test_lifecycle.py's
CONTRACT_SCHEMES): a transport that joins the contract joins these tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import podipc
from podipc.address import parse_address
from podipc.payloads import generated_messages
from podipc.transport import Capability, transport_for
from podipc.transports.spool.wire import DIRECTORY_MARKER, POSITION_NAME, parse_segment_name
from tests.commands import PODIPC, system_tool

from .harness import ABSTRACT_SUFFIX, CONTEXT, RELIABLE, leftovers, object_names, url_for, wait_until
from .test_lifecycle import CONTRACT_SCHEMES

pytestmark = pytest.mark.timeout(120)

STOP_SECONDS = 2.0
"""Issue 11: a signalled command exits within 2 s."""
STREAM_RATE = "2000"
"""Messages per second of the endless test streams: fast enough to be mid-stream, slow enough to count."""
ENDLESS = "1000000000"
"""--count of a stream that lasts until the test stops it."""
SIGTERM_EXIT = 128 + signal.SIGTERM
SIGINT_EXIT = 128 + signal.SIGINT


@pytest.fixture(params=CONTRACT_SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


class Command:
    """One podipc command in its own process (optionally as PID 1 of a new pid namespace), output in files."""

    def __init__(self, tmp: Path, name: str, *args: str, pid1: bool = False, stdin: Any = subprocess.DEVNULL) -> None:
        self.stdout_path, self.stderr_path = tmp / f"{name}.out", tmp / f"{name}.err"
        prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--"] if pid1 else []
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([*prefix, *PODIPC, *args], stdin=stdin, stdout=stdout, stderr=stderr)
        self.pid = self.process.pid
        if pid1:
            self.pid = self._init_of_new_namespace()

    def _init_of_new_namespace(self) -> int:
        """The host pid of unshare's child, once it is PID 1 of its namespace and running podipc."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        assert wait_until(lambda: children.read_text().split() != [], 10), "unshare started no child"
        child = int(children.read_text().split()[0])
        status = Path(f"/proc/{child}/status").read_text()
        ns_pids = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
        assert ns_pids[-1] == "1", f"the command is not PID 1 of its namespace: {ns_pids}"
        return child

    def handles(self, number: int = signal.SIGTERM) -> bool:
        """True once the podipc process has a handler for signal `number` (its SigCgt mask in /proc)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
        return bool(int(caught, 16) >> (number - 1) & 1)

    def signal(self, number: int = signal.SIGTERM) -> float:
        """Send a signal to the podipc process; returns when it was sent (time.monotonic())."""
        os.kill(self.pid, number)
        return time.monotonic()

    def wait(self, timeout: float = 60) -> int:
        """Its exit code (unshare passes its child's on)."""
        return self.process.wait(timeout)

    def exit_within(self, seconds: float, since: float) -> int:
        """Its exit code, asserting that it exited within `seconds` of `since`."""
        try:
            code = self.process.wait(seconds + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running {seconds + 5} s after the signal; stderr:\n{self.stderr()}") from None
        took = time.monotonic() - since
        assert took < seconds, f"exited {took:.2f} s after the signal (more than {seconds} s): {self.stderr()}"
        return code

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def summaries(self, stream: str = "stdout") -> list[dict[str, Any]]:
        """Every JSON line it printed on `stream`."""
        text = self.stdout() if stream == "stdout" else self.stderr()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def summary(self, stream: str = "stdout") -> dict[str, Any]:
        found = self.summaries(stream)
        assert found, f"no summary line; stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"
        return found[-1]

    def kill(self) -> None:
        """SIGKILL it (and, as PID 1, its unshare parent, whose --kill-child takes the namespace down too)."""
        if self.process.poll() is None:
            if self.pid != self.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[list[Command]]:
    """Commands a test starts; any still running at its end are killed."""
    started: list[Command] = []
    yield started
    for command in started:
        command.kill()


def start(commands: list[Command], tmp: Path, name: str, *args: str, **options: Any) -> Command:
    command = Command(tmp, name, *args, **options)
    commands.append(command)
    return command


def streaming(output: Path) -> None:
    """Wait until the consumer writing `output` has received something."""
    assert wait_until(lambda: output.exists() and output.stat().st_size > 0, 30), "the stream never started"


def nothing_left(url: str) -> None:
    """No object of the channel remains, and `podipc clean --dry-run` finds nothing of it."""
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)
    dry_run = subprocess.run([*PODIPC, "clean", "--dry-run"], capture_output=True, text=True, timeout=60, check=False)
    assert dry_run.returncode == 0, dry_run.stderr
    names = object_names(url)
    found = [line for line in dry_run.stdout.splitlines() if any(name in line for name in names)]
    assert not found, dry_run.stdout


def resumes_streams(scheme: str) -> bool:
    """True for a channel whose stream outlives its sides (file://: the spool keeps it, docs/reliability.md)."""
    return transport_for(scheme.removesuffix(ABSTRACT_SUFFIX)).has(Capability.RESUMABLE)


def is_stream_file(path: str) -> bool:
    """A file of a spool's stream itself (a segment, the consumer's position, the spool's marker), docs/wire/file.md."""
    name = os.path.basename(path)
    return parse_segment_name(name) is not None or name in (POSITION_NAME, DIRECTORY_MARKER)


def only_the_stream_left(url: str) -> None:
    """A resumable channel stopped mid-stream keeps its stream (segments, position), and nothing else:
    no presence file, no part segment; `podipc clean --dry-run` over the spool finds nothing to remove."""
    assert wait_until(lambda: not [name for name in leftovers(url) if not is_stream_file(name)], 5), leftovers(url)
    assert any(parse_segment_name(os.path.basename(name)) is not None for name in leftovers(url)), leftovers(url)
    spool = parse_address(url).path
    dry_run = subprocess.run([*PODIPC, "clean", "--dry-run", "--dir", spool], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert dry_run.returncode == 0, dry_run.stderr
    # what clean says of other processes' objects (/dev/shm is shared with whatever else runs here) is not ours
    ours = [line for line in dry_run.stdout.splitlines() if spool in line or any(n in line for n in object_names(url))]
    assert not ours, dry_run.stdout


def received_from(consumed: dict[str, Any], count: int) -> None:
    """`consumed` is exactly messages resumed_at..count-1 of produce's default stream (size 64, not random)."""
    start = consumed["resumed_at"]
    expected = hashlib.sha256(b"".join(generated_messages(count, 64, False, 0, start=start)))
    assert consumed["messages"] == count - start and consumed["sha256"] == expected.hexdigest(), consumed


def same_stream(produced: dict[str, Any], consumed: dict[str, Any]) -> None:
    assert produced["messages"] > 0
    for key in ("messages", "bytes", "sha256"):
        assert consumed[key] == produced[key], (produced, consumed)


def needs_unshare() -> None:
    if os.geteuid() != 0 or system_tool("unshare") is None:
        pytest.skip("PID 1 needs root and util-linux unshare (bash scripts/setup.sh installs it)")


PID1 = [pytest.param(False, id="process"), pytest.param(True, id="pid1")]


def streaming_pair(
    commands: list[Command],
    tmp: Path,
    scheme: str,
    *,
    producer_pid1: bool = False,
    consumer_pid1: bool = False,
    rate: str = STREAM_RATE,
) -> tuple[str, Path, Command, Command]:
    """(url, consumer's output file, consumer, producer) of an endless stream that has begun to flow (`rate`
    messages a second; "0": flat out, the producer mostly waits in send for room)."""
    if producer_pid1 or consumer_pid1:
        needs_unshare()
    url = url_for(scheme, wait=30)
    output = tmp / "received"
    consumer = start(commands, tmp, "consumer", "consume", url, "--output", str(output), pid1=consumer_pid1)
    producer = start(commands, tmp, "producer", "produce", url, "--count", ENDLESS, "--rate", rate,
                     pid1=producer_pid1)  # fmt: skip
    streaming(output)
    return url, output, consumer, producer


# --- SIGTERM mid-stream -------------------------------------------------------------------------


@pytest.mark.parametrize("pid1", PID1)
def test_sigterm_to_a_producer_mid_stream_ends_the_stream_and_both_summaries_agree(
    scheme: str, pid1: bool, tmp_path: Path, commands: list[Command]
) -> None:
    url, _, consumer, producer = streaming_pair(commands, tmp_path, scheme, producer_pid1=pid1)

    signalled = producer.signal(signal.SIGTERM)

    assert producer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, producer.stderr()
    assert consumer.wait(30) == 0, consumer.stderr()  # it saw the end of stream
    produced, consumed = producer.summary(), consumer.summary()
    assert produced["stopped_by"] == "SIGTERM" and "error" not in produced
    assert "stopped_by" not in consumed
    same_stream(produced, consumed)
    nothing_left(url)


@pytest.mark.parametrize("pid1", PID1)
def test_sigterm_to_a_consumer_mid_stream_prints_its_summary_and_removes_its_objects(
    scheme: str, pid1: bool, tmp_path: Path, commands: list[Command]
) -> None:
    url, output, consumer, producer = streaming_pair(commands, tmp_path, scheme, consumer_pid1=pid1)

    signalled = consumer.signal(signal.SIGTERM)

    assert consumer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, consumer.stderr()
    consumed = consumer.summary()
    assert consumed["stopped_by"] == "SIGTERM" and consumed["end_of_stream"] is False
    assert consumed["messages"] > 0 and "error" not in consumed
    assert len(output.read_bytes().splitlines()) >= consumed["messages"] - 1  # what it counted, it wrote
    assert producer.wait(30) == 7, producer.stderr()  # PeerGone: its consumer is gone
    assert "PeerGone" in producer.stderr()
    if resumes_streams(scheme):
        only_the_stream_left(url)
        the_kept_stream_resumes(commands, tmp_path, url, consumed["messages"])
    nothing_left(url)


RESUMED_COUNT = 100_000
"""--count of the producer that resumes a kept stream: more than the stopped producer sent (2000/s for seconds)."""


def the_kept_stream_resumes(commands: list[Command], tmp: Path, url: str, taken: int) -> None:
    """A restarted pair resumes a kept stream: the consumer after what its predecessor took, the producer at the end."""
    consumer = start(commands, tmp, "resumed-consumer", "consume", url)
    producer = start(commands, tmp, "resumed-producer", "produce", url, "--count", str(RESUMED_COUNT))
    assert producer.wait(60) == 0, producer.stderr()
    assert consumer.wait(60) == 0, consumer.stderr()
    produced, consumed = producer.summary(), consumer.summary()
    assert taken <= produced["resumed_at"] < RESUMED_COUNT, produced
    assert consumed["resumed_at"] == taken, consumed  # what the stopped consumer counted, it had committed
    received_from(consumed, RESUMED_COUNT)


@pytest.mark.parametrize("pid1", PID1)
def test_sigterm_to_both_sides_at_once_delivers_every_message_sent(
    scheme: str, pid1: bool, tmp_path: Path, commands: list[Command]
) -> None:
    """What `podman pod stop` / the kubelet does: SIGTERM to every container at the same moment."""
    url, _, consumer, producer = streaming_pair(commands, tmp_path, scheme, producer_pid1=pid1, consumer_pid1=pid1)

    signalled = consumer.signal(signal.SIGTERM)
    producer.signal(signal.SIGTERM)

    assert consumer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, consumer.stderr()
    assert producer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, producer.stderr()
    produced, consumed = producer.summary(), consumer.summary()
    assert consumed["end_of_stream"] is True, consumed  # the consumer drained up to the producer's end of stream
    same_stream(produced, consumed)
    nothing_left(url)


@pytest.mark.parametrize("scheme", [scheme for scheme in CONTRACT_SCHEMES if scheme in RELIABLE])  # udp: no room waits
def test_a_producer_signalled_while_its_send_waits_for_room_ends_the_stream_within_the_consumers_drain(
    scheme: str, tmp_path: Path, commands: list[Command]
) -> None:
    """Flat out, the producer is mostly inside send waiting for room when its SIGTERM comes, a moment after the
    consumer's (a kubelet's SIGTERMs are not simultaneous). Its close from the signal handler must not wait for
    the call gate that very send holds (mq and sysvmq did, until the consumer's drain ran out: PeerGone, exit 7)."""
    _, _, consumer, producer = streaming_pair(commands, tmp_path, scheme, rate="0")

    signalled = consumer.signal(signal.SIGTERM)
    time.sleep(0.3)
    producer.signal(signal.SIGTERM)

    assert consumer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, consumer.stderr()
    assert producer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, producer.stderr()
    produced, consumed = producer.summary(), consumer.summary()
    assert consumed["end_of_stream"] is True, consumed
    same_stream(produced, consumed)


def test_sigint_stops_with_its_own_exit_code(scheme: str, tmp_path: Path, commands: list[Command]) -> None:
    _, _, consumer, producer = streaming_pair(commands, tmp_path, scheme)

    signalled = producer.signal(signal.SIGINT)

    assert producer.exit_within(STOP_SECONDS, signalled) == SIGINT_EXIT, producer.stderr()
    assert consumer.wait(30) == 0
    assert producer.summary()["stopped_by"] == "SIGINT"
    same_stream(producer.summary(), consumer.summary())
    assert "Traceback" not in producer.stderr() + consumer.stderr()


# --- SIGTERM while waiting --------------------------------------------------------------------------


@pytest.mark.parametrize("pid1", PID1)
def test_a_consumer_waiting_for_its_producer_stops_at_once(
    scheme: str, pid1: bool, tmp_path: Path, commands: list[Command]
) -> None:
    if pid1:
        needs_unshare()
    url = url_for(scheme, wait=60)
    consumer = start(commands, tmp_path, "consumer", "consume", url, pid1=pid1)
    # a signal before the handlers exist would be a different test (as PID 1 it would be ignored)
    assert wait_until(consumer.handles, 30), consumer.stderr()
    time.sleep(0.5)  # opened and waiting

    signalled = consumer.signal(signal.SIGTERM)

    assert consumer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, consumer.stderr()
    assert consumer.summary()["messages"] == 0 and consumer.summary()["stopped_by"] == "SIGTERM"
    nothing_left(url)


def test_a_producer_whose_consumer_stopped_reading_still_stops_within_the_limit(
    scheme: str, tmp_path: Path, commands: list[Command]
) -> None:
    """Its end of stream cannot be taken (the channel is full): the stop gives up after --drain, with that error.

    udp:// never waits for room (the kernel drops what the consumer's buffer cannot hold; a consumer counts
    the gaps in `lost`): its producer goes on sending, and what it cannot get is the consumer's ack of the
    end of stream, so it stops the same way.
    """
    url = url_for(scheme, wait=30)
    with podipc.consumer(url) as stuck:
        size = min(65536, stuck.max_message_size)  # large messages fill the channel fast; mq, sysvmq take less
        # --drain 0.5: half the 2 s promise waits for the ack, the other half is the stop itself, under load too
        producer = start(commands, tmp_path, "producer", "produce", url, "--count", ENDLESS, "--size", str(size),
                         "--drain", "0.5")  # fmt: skip
        assert stuck.recv(timeout=30)  # attached; from now on it reads nothing
        time.sleep(1.5)  # the producer fills the channel and blocks in send (udp: and drops)

        signalled = producer.signal(signal.SIGTERM)

        assert producer.exit_within(STOP_SECONDS, signalled) == 6, producer.stderr()  # Timeout
        produced = producer.summary()
        assert produced["stopped_by"] == "SIGTERM" and produced["error"].startswith("Timeout")
        assert "podipc: error: Timeout" in producer.stderr()


def test_a_signal_stop_is_quiet_and_leaves_no_traceback_when_the_producer_is_pid1_and_stdin_is_idle(
    scheme: str, tmp_path: Path, commands: list[Command]
) -> None:
    """`tail -f app.log | podipc produce --stdin` as a container's PID 1: a signal ends it while it waits for input."""
    needs_unshare()
    url = url_for(scheme, wait=30)
    output = tmp_path / "received"
    read_end, write_end = os.pipe()
    consumer = start(commands, tmp_path, "consumer", "consume", url, "--output", str(output))
    producer = start(commands, tmp_path, "producer", "produce", url, "--stdin", pid1=True, stdin=read_end)
    os.close(read_end)
    try:
        os.write(write_end, b"one line\n")
        streaming(output)

        signalled = producer.signal(signal.SIGTERM)  # stdin stays open: only the signal can end it

        assert producer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, producer.stderr()
    finally:
        os.close(write_end)
    assert consumer.wait(30) == 0
    assert output.read_bytes() == b"one line\n"
    same_stream(producer.summary(), consumer.summary())
    assert "Traceback" not in producer.stderr()


# --- serving across producer sessions --------------------------------------------------------------


@pytest.mark.parametrize("pid1", PID1)
def test_serve_gives_each_producer_session_its_own_summary_until_sigterm(
    scheme: str, pid1: bool, tmp_path: Path, commands: list[Command]
) -> None:
    """A producer killed mid-stream ends its session with PeerGone; the next producer is the next session (on
    file://, whose spool keeps a stream, it resumes the killed one's where it stopped: docs/reliability.md)."""
    if pid1:
        needs_unshare()
    url = url_for(scheme)
    output = tmp_path / "received"
    server = start(commands, tmp_path, "server", "consume", url, "--serve", "--output", str(output), pid1=pid1)
    produced = []
    for session in range(3):
        producer = start(commands, tmp_path, f"producer{session}", "produce", url, "--count", str(100 * (session + 1)),
                         "--random", "--size", "2000", "--seed", str(session))  # fmt: skip
        assert producer.wait(60) == 0, producer.stderr()
        produced.append(producer.summary())
    assert wait_until(lambda: len(server.summaries()) == 3, 30)
    before = output.stat().st_size
    killed = start(commands, tmp_path, "killed", "produce", url, "--count", ENDLESS, "--rate", STREAM_RATE)
    assert wait_until(lambda: output.stat().st_size > before, 30), "the doomed producer never streamed"
    time.sleep(0.5)
    killed.process.kill()  # a producer that dies mid-stream: its session ends with PeerGone, serving goes on
    # the next producer starts once that session ended: on file:// one that resumes the spool's stream within the
    # peer monitor's 0.2 s continues the same session seamlessly (nothing lost, but no session of its own)
    assert wait_until(lambda: len(server.summaries()) == 4, 30), server.stdout() + server.stderr()
    resumes = resumes_streams(scheme)
    last_count = RESUMED_COUNT if resumes else 10
    last = start(commands, tmp_path, "last", "produce", url, "--count", str(last_count))
    assert last.wait(60) == 0, last.stderr()
    assert wait_until(lambda: len(server.summaries()) == 5, 30), server.stdout() + server.stderr()

    signalled = server.signal(signal.SIGTERM)

    assert server.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, server.stderr()
    *sessions, total = server.summaries()
    assert [line["session"] for line in sessions] == [1, 2, 3, 4, 5]
    for session_line, producer_line in zip(sessions[:3], produced, strict=True):
        same_stream(producer_line, session_line)
    assert sessions[3]["error"].startswith("PeerGone") and sessions[3]["messages"] > 0
    if resumes:  # file://: the spool kept the killed producer's stream; the next producer resumed it at its end
        assert last.summary()["resumed_at"] == sessions[4]["resumed_at"] == sessions[3]["messages"], sessions
        received_from(sessions[4], last_count)
    else:
        same_stream(last.summary(), sessions[4])
    assert "error" not in sessions[4]  # it ended with its end of stream
    assert total["sessions"] == 5 and total["stopped_by"] == "SIGTERM"
    assert total["messages"] == sum(line["messages"] for line in sessions)
    nothing_left(url)


def test_serve_picks_up_producers_that_start_back_to_back(scheme: str, tmp_path: Path, commands: list[Command]) -> None:
    """Each producer starts the moment the previous one exits: no session is lost, merged or split."""
    url = url_for(scheme)
    server = start(commands, tmp_path, "server", "consume", url, "--serve")
    produced = []
    for session in range(8):
        producer = start(commands, tmp_path, f"p{session}", "produce", url, "--count", "50", "--random", "--seed",
                         str(session))  # fmt: skip
        assert producer.wait(60) == 0, producer.stderr()
        produced.append(producer.summary())
    assert wait_until(lambda: len(server.summaries()) == 8, 30), server.stdout() + server.stderr()
    server.signal(signal.SIGTERM)
    assert server.wait(10) == SIGTERM_EXIT
    for session_line, producer_line in zip(server.summaries()[:-1], produced, strict=True):
        same_stream(producer_line, session_line)


def test_serve_stopped_with_its_producer_drains_the_session(
    scheme: str, tmp_path: Path, commands: list[Command]
) -> None:
    url = url_for(scheme)
    output = tmp_path / "received"
    server = start(commands, tmp_path, "server", "consume", url, "--serve", "--output", str(output))
    producer = start(commands, tmp_path, "producer", "produce", url, "--count", ENDLESS, "--rate", STREAM_RATE)
    streaming(output)

    signalled = server.signal(signal.SIGTERM)
    producer.signal(signal.SIGTERM)

    assert server.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, server.stderr()
    assert producer.exit_within(STOP_SECONDS, signalled) == SIGTERM_EXIT, producer.stderr()
    session, total = server.summaries()
    same_stream(producer.summary(), session)
    assert session["end_of_stream"] is True and total["sessions"] == 1
    nothing_left(url)


def test_the_library_serves_sessions_until_closed(scheme: str, tmp_path: Path, commands: list[Command]) -> None:
    url = url_for(scheme)
    received: list[list[bytes]] = []
    with podipc.serve(url) as sessions:
        start(commands, tmp_path, "p0", "produce", url, "--count", "5", "--size", "10")
        for inbox in sessions:
            received.append(list(inbox))
            if len(received) == 2:
                sessions.close()
            else:
                # between two sessions: it waits for the next one. (Started together, the second producer was
                # refused whenever it came while the first session streamed: one producer at a time, exit 3.)
                start(commands, tmp_path, "p1", "produce", url, "--count", "5", "--size", "11")
        assert sessions.opened == 2 and sessions.closed
    assert sorted([len(message) for message in session] for session in received) == [[10] * 5, [11] * 5]


# --- framing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["lines", "length", "raw"])
def test_produce_stdin_to_consume_output_round_trips_exactly(
    scheme: str, framing: str, tmp_path: Path, commands: list[Command]
) -> None:
    url = url_for(scheme)
    source = tmp_path / "source"
    generator = random.Random(framing)
    if framing == "lines":
        records = [
            json.dumps({"n": n, "text": generator.randbytes(generator.randint(0, 300)).hex()}) for n in range(3000)
        ]
        source.write_text("\n".join(records) + "\n\n")  # an empty last line too
    elif framing == "length":
        payloads = [generator.randbytes(generator.randint(0, 5000)) for _ in range(500)] + [b"", b"a\nb\n"]
        source.write_bytes(b"".join(len(payload).to_bytes(4, "big") + payload for payload in payloads))
    else:
        source.write_bytes(generator.randbytes(1_000_000))
    output = tmp_path / "output"
    consumer = start(commands, tmp_path, "consumer", "consume", url, "--output", str(output), "--framing", framing)
    with open(source, "rb") as stdin:
        producer = start(commands, tmp_path, "producer", "produce", url, "--stdin", "--framing", framing, stdin=stdin)
        assert producer.wait(60) == 0, producer.stderr()
    assert consumer.wait(60) == 0, consumer.stderr()
    assert output.read_bytes() == source.read_bytes()
    same_stream(producer.summary(), consumer.summary())
    if framing == "lines":
        assert producer.summary()["messages"] == 3001  # one message per line: the stdin default sends all of it


def test_a_tail_f_stdin_delivers_each_line_at_once(scheme: str, tmp_path: Path, commands: list[Command]) -> None:
    url = url_for(scheme)
    output = tmp_path / "output"
    read_end, write_end = os.pipe()
    consumer = start(commands, tmp_path, "consumer", "consume", url, "--output", str(output))
    producer = start(commands, tmp_path, "producer", "produce", url, "--stdin", stdin=read_end)
    os.close(read_end)
    try:
        os.write(write_end, b"warm up\n")
        streaming(output)  # both started and connected
        for line in (b"first", b"second"):
            written = time.monotonic()
            os.write(write_end, line + b"\n")  # and nothing more: the pipe stays open, like tail -f
            assert wait_until(lambda line=line: output.read_bytes().endswith(line + b"\n"), 5)
            assert time.monotonic() - written < 1.0, "a line waited for more input before it was sent"
    finally:
        os.close(write_end)
    assert producer.wait(30) == 0 and consumer.wait(30) == 0
    assert output.read_bytes() == b"warm up\nfirst\nsecond\n"


# --- the library's close_on_signals, as the CLI uses it ------------------------------------------------


def send_for(url: str, seconds: float, then_close: bool) -> None:
    """In another process: send for `seconds`, then end the stream (or keep sending until the consumer goes)."""
    with podipc.producer(url) as out:
        deadline = time.monotonic() + seconds
        index = 0
        while then_close is False or time.monotonic() < deadline:
            try:
                out.send(index.to_bytes(8, "big"))
            except podipc.PeerGone:
                out.abort()
                return
            index += 1
            time.sleep(0.001)


def test_a_draining_consumer_takes_the_end_of_stream_that_follows_the_signal(scheme: str) -> None:
    url = url_for(scheme, wait=30)
    sender = CONTEXT.Process(target=send_for, args=(url, 1.5, True))
    sender.start()
    count = 0
    with podipc.consumer(url) as inbox, podipc.close_on_signals(drain=5.0) as stop:
        stop.add(inbox)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        for _ in inbox:
            count += 1
    sender.join(10)
    assert stop.received == signal.SIGTERM and inbox.ended and count > 100  # drained to the end, not cut at 1 s


def test_a_draining_consumer_is_closed_when_the_drain_time_is_up(scheme: str) -> None:
    url = url_for(scheme, wait=30)
    sender = CONTEXT.Process(target=send_for, args=(url, 0, False))
    sender.start()
    with podipc.consumer(url) as inbox, podipc.close_on_signals(inbox, drain=0.5) as stop:
        assert inbox.recv(timeout=30)
        signalled = stop_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stopping and stop.sleep(0.1) is True
        for _ in inbox:  # ends with ChannelClosed (swallowed by close_on_signals) once the drain is over
            stop_at = time.monotonic()
    assert 0.4 < stop_at - signalled < STOP_SECONDS and not inbox.ended
    sender.join(10)
    assert sender.exitcode == 0


def test_the_stop_descriptor_wakes_a_wait_on_other_input() -> None:
    read_end, write_end = os.pipe()
    try:
        with podipc.close_on_signals() as stop:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            started = time.monotonic()
            ready = select.select([read_end, stop.fileno()], [], [], 10)[0]
            assert ready == [stop.fileno()] and time.monotonic() - started < STOP_SECONDS
            assert stop.sleep(10) is True  # returns at once once stopping
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
    finally:
        os.close(read_end)
        os.close(write_end)
