"""The README's example sidecar runs as it says (issue 12): an aiohttp app logs every request to an asyncio
sidecar over podipc without blocking its loop, and the sidecar waits on two channels at once and outlives
the app's restarts. Every program is its own process, as in a pod: examples/web_app.py, examples/log_sidecar.py
and `podipc produce` for the second channel.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import PODIPC

from .harness import wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(port: int, path: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode()


class Program:
    """An example program in its own process, its output in files."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.stdout_path, self.stderr_path = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=stdout, stderr=stderr)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code (the program must stop on its own within `timeout`)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[list[Program]]:
    """The started programs; whatever a failed test left running is killed."""
    started: list[Program] = []
    yield started
    for program in started:
        program.kill()


def start(programs: list[Program], tmp: Path, name: str, *args: str) -> Program:
    program = Program(tmp, name, *args)
    programs.append(program)
    return program


def start_app(programs: list[Program], tmp: Path, name: str, logs: str, *extra: str) -> tuple[Program, int]:
    port = free_port()
    app = start(programs, tmp, name, str(EXAMPLES / "web_app.py"), "--port", str(port), "--logs", logs, *extra)

    def answers() -> bool:
        assert app.process.poll() is None, app.stderr()
        try:
            return get(port, "/health", timeout=1.0) == "ok\n"
        except OSError:
            return False

    assert wait_until(answers, 20), app.stderr()
    return app, port


def lines_of(sidecar: Program, name: str) -> list[str]:
    prefix = f"{name}: "
    return [line[len(prefix) :] for line in sidecar.stdout().splitlines() if line.startswith(prefix)]


def test_the_sidecar_gets_every_request_line_of_every_app_run_and_the_other_channel_s_lines(
    tmp_path: Path, programs: list[Program]
) -> None:
    tag = uuid.uuid4().hex[:8]
    web, jobs = f"unix://@podipc-example-web-{tag}", f"mq:///podipc-example-jobs-{tag}"
    sidecar = start(
        programs,
        tmp_path,
        "sidecar",
        str(EXAMPLES / "log_sidecar.py"),
        "--channel",
        f"web={web}",
        "--channel",
        f"jobs={jobs}",
    )
    sent: list[str] = []
    for run in range(2):  # the app restarts; the sidecar keeps running
        app, port = start_app(programs, tmp_path, f"app{run}", web)
        for number in range(30):
            path = f"/hello?name=run{run}-{number}"
            assert get(port, path) == f"hello run{run}-{number}\n"
            sent.append(f"GET {path} 200")
        assert app.stop() == 0, app.stderr()
        assert "'logged': 30, 'dropped': 0" in app.stderr()
    job_lines = [f"job {number} done" for number in range(20)]
    producer = subprocess.run(
        [*PODIPC, "produce", jobs, "--stdin"],
        input="\n".join(job_lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert producer.returncode == 0, producer.stderr
    assert wait_until(lambda: len(lines_of(sidecar, "web")) == 60 and len(lines_of(sidecar, "jobs")) == 20, 20)
    assert sidecar.stop() == 0, sidecar.stderr()

    web_lines = [re.sub(r" [0-9.]+ms$", "", line) for line in lines_of(sidecar, "web")]
    assert web_lines == sent  # every request, in order, across the app's two runs
    assert lines_of(sidecar, "jobs") == job_lines
    counts = json.loads(sidecar.stderr().splitlines()[-1])
    assert counts == {"web": {"lines": 60, "streams": 2}, "jobs": {"lines": 20, "streams": 1}}


def test_the_app_keeps_serving_while_its_sidecar_is_stopped_and_loses_no_line(
    tmp_path: Path, programs: list[Program]
) -> None:
    logs = f"mq:///podipc-example-web-{uuid.uuid4().hex[:8]}?depth=4"
    sidecar = start(programs, tmp_path, "sidecar", str(EXAMPLES / "log_sidecar.py"), "--channel", f"web={logs}")
    app, port = start_app(programs, tmp_path, "app", logs, "--send-timeout", "60")
    assert get(port, "/hello?name=first") == "hello first\n"
    assert wait_until(lambda: len(lines_of(sidecar, "web")) == 1, 20)

    sidecar.process.send_signal(signal.SIGSTOP)  # the sidecar lags: its queue (4 lines) fills up
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        requests = [pool.submit(get, port, f"/hello?name={number}", 60.0) for number in range(12)]
        assert wait_until(lambda: sum(request.done() for request in requests) >= 4, 20)
        # the requests beyond the queue's room wait for it; the loop goes on serving others
        assert get(port, "/health", timeout=10.0) == "ok\n"
        assert get(port, "/health", timeout=10.0) == "ok\n"
        assert not all(request.done() for request in requests)
        sidecar.process.send_signal(signal.SIGCONT)
        assert sorted(request.result(60) for request in requests) == sorted(f"hello {n}\n" for n in range(12))

    assert app.stop() == 0, app.stderr()
    assert "'logged': 13, 'dropped': 0" in app.stderr()
    assert wait_until(lambda: len(lines_of(sidecar, "web")) == 13, 20)
    assert sidecar.stop() == 0, sidecar.stderr()
    logged = sorted(re.sub(r" [0-9.]+ms$", "", line) for line in lines_of(sidecar, "web"))
    assert logged == sorted(["GET /hello?name=first 200", *(f"GET /hello?name={n} 200" for n in range(12))])


def test_the_readme_shows_the_examples_as_they_are() -> None:
    readme = README.read_text()
    section = readme.split("### An example sidecar", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2
    sources = "\n".join((EXAMPLES / name).read_text() for name in ("web_app.py", "log_sidecar.py"))
    for block in blocks:
        assert block in sources, f"the README shows code that is not in examples/:\n{block}"
