"""The CLI parses, calls and prints: help, version, environment options, one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from podipc.cli import EXIT_CODES, consume, exit_code_of, main, produce, run
from podipc.environment import option_variables, options_from_environment, variable_name
from podipc.errors import AddressError, PeerGone, PeerTimeout, PodIPCError, Timeout
from podipc.extras import install_hint
from podipc.transport import transports


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port nothing listens on (the tests run in a private network namespace)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "command", [[], ["produce"], ["consume"], ["channels"], ["run"], ["clean"], ["bench"], ["doctor"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "podipc, version" in result.output


def test_a_bad_url_is_a_usage_error_without_traceback() -> None:
    result = CliRunner().invoke(main, ["produce", "tpc://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "did you mean 'tcp'" in result.output
    assert "Traceback" not in result.output


def test_a_bad_option_in_the_url_is_one_line_with_its_exit_code() -> None:
    result = CliRunner().invoke(main, ["consume", "tcp://127.0.0.1:1?depht=3"])
    assert result.exit_code == EXIT_CODES[AddressError]
    assert "podipc: error: AddressError: unknown option 'depht'" in result.stderr
    assert "Traceback" not in result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["error"].startswith("AddressError")


def test_options_come_from_the_environment() -> None:
    result = CliRunner().invoke(main, ["produce"], env={"PODIPC_URL": "bogus"})
    assert result.exit_code == 2 and "not a channel URL" in result.output


def test_run_dispatches_on_the_role_variable() -> None:
    result = CliRunner().invoke(main, ["run"], env={"PODIPC_ROLE": "consumer", "PODIPC_URL": "mq://nope"})
    assert result.exit_code == 2 and "three slashes" in result.output


def test_random_and_stdin_exclude_each_other() -> None:
    result = CliRunner().invoke(main, ["produce", "tcp://127.0.0.1:1", "--random", "--stdin"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_exit_codes_follow_the_error_class() -> None:
    assert exit_code_of(PeerTimeout("x")) == 5
    assert exit_code_of(Timeout("x")) == 6
    assert exit_code_of(PeerGone("x")) == 7
    assert exit_code_of(PodIPCError("x")) == 1


def test_channels_lists_every_scheme_as_json() -> None:
    result = CliRunner().invoke(main, ["channels", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["scheme"] for row in rows] == [
        "tcp",
        "udp",
        "unix",
        "mq",
        "sysvmq",
        "shm",
        "file",
        "zmq+tcp",
        "zmq+ipc",
    ]
    assert all(row["usable"] or row["reason"] for row in rows)


def without(package: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `podipc ARGUMENTS` in a process where `package` cannot be imported."""
    script = f"import sys; sys.modules[{package!r}] = None\nfrom podipc.cli import main\nmain(prog_name='podipc')\n"
    return subprocess.run(
        [sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("package", "arguments"),
    [
        ("rich", ["bench", "--quick", "--channels", "tcp", "--sizes", "64"]),
        ("rich", ["doctor"]),
    ],
)
def test_bench_and_doctor_without_an_optional_package_fail_in_one_line_naming_what_to_install(
    package: str, arguments: list[str]
) -> None:
    result = without(package, *arguments)

    command = arguments[0]
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr
        == f"podipc: error: podipc {command} needs the {package} package: {install_hint(package, command)}\n"
    )


def test_doctor_reads_its_facts_with_the_standard_library_alone() -> None:
    result = without("psutil", "doctor", "--json")

    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)["facts"]
    assert facts["identity"]["uid"] == os.geteuid() and facts["identity"]["gid"] == os.getegid()
    assert facts["dev_shm"]["size"] > 0 and facts["dev_shm"]["free"] is not None


def test_core_commands_work_without_the_optional_packages_of_bench_and_doctor() -> None:
    for package in ("rich", "psutil"):
        result = without(package, "channels")
        assert result.returncode == 0 and "tcp://127.0.0.1:7000" in result.stdout, result.stderr
        help_text = without(package, "--help").stdout
        assert "produce" in help_text and "doctor" in help_text


# --- channel options from the environment --------------------------------------------------


def test_channel_options_come_from_variables_of_the_urls_transport_and_the_query_wins() -> None:
    environ = {"PODIPC_WAIT": "7", "PODIPC_DEPTH": "4", "PODIPC_MODE": "", "PODIPC_CAPACITY": "1MiB"}
    assert options_from_environment("mq:///x", environ) == {"wait": "7", "depth": "4"}
    assert options_from_environment("mq:///x?wait=2", environ) == {"depth": "4"}
    assert options_from_environment("tcp://127.0.0.1:1", environ) == {"wait": "7"}  # tcp has no depth
    assert options_from_environment("shm:///x", environ) == {"wait": "7", "capacity": "1MiB"}


def test_every_transport_option_has_a_variable_that_no_command_option_uses() -> None:
    variables = option_variables()
    assert {"PODIPC_WAIT", "PODIPC_MODE", "PODIPC_DEPTH", "PODIPC_MAX_MESSAGE_SIZE"} <= set(variables)
    for transport in transports():
        for option in transport.options:
            assert variable_name(option.name) in variables
    for command in (produce, consume, run):
        for parameter in command.params:
            assert parameter.envvar not in variables, f"{command.name} --{parameter.name} shadows a channel option"


def test_a_wait_from_the_environment_applies(free_port: int) -> None:
    started = time.monotonic()
    result = CliRunner().invoke(main, ["consume", f"tcp://127.0.0.1:{free_port}"], env={"PODIPC_WAIT": "0.3"})
    assert result.exit_code == EXIT_CODES[PeerTimeout], result.output
    assert "wait=0.3s" in result.stderr
    assert time.monotonic() - started < 10


def test_the_urls_query_wins_over_the_environment(free_port: int) -> None:
    url = f"tcp://127.0.0.1:{free_port}?wait=0.2"
    result = CliRunner().invoke(main, ["consume", url], env={"PODIPC_WAIT": "not a number"})
    assert result.exit_code == EXIT_CODES[PeerTimeout], result.output
    result = CliRunner().invoke(main, ["consume", url.partition("?")[0]], env={"PODIPC_WAIT": "not a number"})
    assert result.exit_code == EXIT_CODES[AddressError]
    assert "option wait='not a number'" in result.stderr


# --- options of produce and consume --------------------------------------------------------


def test_serve_takes_no_count_or_timeout() -> None:
    for extra in (["--count", "3"], ["--timeout", "1"]):
        result = CliRunner().invoke(main, ["consume", "tcp://127.0.0.1:1", "--serve", *extra])
        assert result.exit_code == 2 and "--serve takes no --count or --timeout" in result.output


def test_raw_framing_needs_a_chunk_size() -> None:
    result = CliRunner().invoke(main, ["produce", "tcp://127.0.0.1:1", "--stdin", "--framing", "raw", "--size", "0"])
    assert result.exit_code == 2 and "--framing raw needs --size > 0" in result.output


@pytest.mark.parametrize("command", ["produce", "consume", "run"])
def test_help_documents_signals_exit_codes_and_channel_variables(command: str) -> None:
    text = CliRunner().invoke(main, [command, "--help"]).output
    assert "143 stopped by SIGTERM" in " ".join(text.split()) and "130 stopped by SIGINT" in " ".join(text.split())
    assert "PODIPC_WAIT" in text and "PODIPC_DEPTH" in text and "query option wins" in text


def test_the_readme_lists_the_exit_codes_the_help_gives() -> None:
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    for cls, code in EXIT_CODES.items():
        assert f"{code} `{cls.__name__}`" in readme, cls
    assert "143 stopped by SIGTERM" in readme and "130 stopped by SIGINT" in readme
