"""`podipc call` and `podipc reply` as processes: replies on stdout, exit codes, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from podipc.cli import EXIT_CODES
from podipc.errors import AddressError, PeerTimeout, RemoteError
from tests.commands import PODIPC
from tests.integration.harness import url_for


@contextmanager
def replying(url: str, *how: str) -> Iterator[subprocess.Popen[bytes]]:
    """`podipc reply URL ...` running (listening once a first call is answered); killed at the end if still there."""
    process = subprocess.Popen([*PODIPC, "reply", url, *how], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def call(url: str, *arguments: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `podipc call URL ...` to its end."""
    return subprocess.run([*PODIPC, "call", url, "--timeout", "20", *arguments], input=data, capture_output=True)


def stop(process: subprocess.Popen[bytes], number: int = signal.SIGTERM) -> tuple[int, dict[str, object], bytes]:
    """Signal a `podipc reply`; its exit code, its summary line and its stderr."""
    process.send_signal(number)
    out, err = process.communicate(timeout=10)
    return process.returncode, json.loads(out.decode().strip().splitlines()[-1]), err


def test_call_prints_the_echoed_reply_raw_and_reply_stops_on_sigterm_with_143() -> None:
    url = url_for("unix")
    path = url.removeprefix("unix://")
    with replying(url, "--echo") as server:
        first = call(url, "--data", "hello")
        assert (first.returncode, first.stdout) == (0, b"hello"), first.stderr
        binary = bytes(range(256)) * 3
        second = call(url, "--stdin", data=binary)
        assert (second.returncode, second.stdout) == (0, binary), second.stderr
        assert os.path.exists(path)
        code, summary, _ = stop(server)
    assert code == 128 + signal.SIGTERM
    assert summary["stopped_by"] == "SIGTERM"
    assert (summary["clients"], summary["calls"], summary["replied"]) == (2, 2, 2)
    assert not os.path.exists(path)


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_reply_command_answers_from_its_stdout_and_a_failing_command_exits_the_caller_with_11(scheme: str) -> None:
    url = url_for(scheme)
    with replying(url, "--command", "tr a-z A-Z") as server:
        upper = call(url, "--data", "shout")
        assert (upper.returncode, upper.stdout) == (0, b"SHOUT"), upper.stderr
        stop(server, signal.SIGINT)
    url = url_for(scheme)
    with replying(url, "--command", "echo no such thing >&2; exit 3") as server:
        failed = call(url, "--data", "x")
        code, summary, _ = stop(server)
    assert failed.returncode == EXIT_CODES[RemoteError] == 11
    assert failed.stdout == b""
    assert b"RemoteError: CommandFailed:" in failed.stderr and b"exited with 3: no such thing" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1
    assert (code, summary["failed"]) == (128 + signal.SIGTERM, 1)


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_sigterm_while_a_command_runs_answers_that_call_before_stopping(scheme: str, tmp_path: Path) -> None:
    url = url_for(scheme)
    running = tmp_path / "running"
    with replying(url, "--command", f"cat > /dev/null; touch {running}; sleep 1; printf 'in flight'") as server:
        assert call(url, "--data", "warm").returncode == 0
        running.unlink()
        caller = subprocess.Popen([*PODIPC, "call", url, "--data", "in flight"], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not running.exists() and time.monotonic() < deadline:  # the call is in the command now
            time.sleep(0.02)
        code, summary, _ = stop(server)
        out, _ = caller.communicate(timeout=10)
    assert (caller.returncode, out) == (0, b"in flight")
    assert code == 128 + signal.SIGTERM and summary["replied"] == 2


@pytest.mark.parametrize("scheme", ["unix-abstract", "shm"])
def test_call_with_no_server_exits_with_the_peer_timeout_code(scheme: str) -> None:
    started = time.monotonic()
    result = call(url_for(scheme, wait=0.3), "--data", "x")
    assert result.returncode == EXIT_CODES[PeerTimeout]
    assert result.stderr.decode().startswith("podipc: error: PeerTimeout: no server listening")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ((), "give the request: --data TEXT or --stdin"),
        (("--data", "x", "--stdin"), "give the request: --data TEXT or --stdin"),
    ],
)
def test_call_wants_exactly_one_request(arguments: tuple[str, ...], says: str) -> None:
    result = subprocess.run([*PODIPC, "call", "unix://@x", *arguments], capture_output=True, input=b"")
    assert result.returncode == 2 and says in result.stderr.decode()


def test_reply_wants_echo_or_a_command_and_a_request_reply_scheme() -> None:
    neither = subprocess.run([*PODIPC, "reply", "unix://@x"], capture_output=True)
    assert neither.returncode == 2 and "--echo or --command CMD" in neither.stderr.decode()
    queue = subprocess.run([*PODIPC, "reply", "mq:///x", "--echo"], capture_output=True)
    assert queue.returncode == EXIT_CODES[AddressError]
    assert "request/reply runs over unix://, tcp://" in queue.stderr.decode()
