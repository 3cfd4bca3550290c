"""The base install (`pip install podipc`, no extras) runs the core channels and commands.

A wheel of this checkout, built with setuptools' backend (no warning allowed), goes into a
fresh venv that holds only the base dependencies: `pip install --no-index` fails there if the
package asks for anything more. The dependencies are copied from this interpreter's own
install (the files their RECORD lists), so the test needs no network. Then the core
commands run there across real processes: produce/consume over shm:// and mq://,
`podipc channels`, `podipc doctor --json`; optional features name the extra to install.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .harness import url_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "podipc")
OPTIONAL_PACKAGES = {"pyzmq", "rich", "psutil", "matplotlib", "faster-fifo", "iceoryx2"}
COMMAND_SECONDS = 120
BUILD_WHEEL = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"


@pytest.fixture(scope="module")
def base_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a new venv holding this checkout installed without extras."""
    where = tmp_path_factory.mktemp("base-install")
    wheel = build_wheel(copy_sources(where / "source"), where / "wheels")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=COMMAND_SECONDS)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=COMMAND_SECONDS,
        ).stdout.strip()
    )
    for name in base_dependencies():
        copy_distribution(name, site_packages)
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def copy_sources(source: Path) -> Path:
    """What a source distribution of this checkout holds, copied to `source`."""
    source.mkdir()
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(origin, source / name)
    return source


def build_wheel(source: Path, wheels: Path) -> Path:
    """Build the wheel with setuptools' PEP 517 backend; setuptools must not warn (e.g. about the license)."""
    wheels.mkdir()
    built = subprocess.run(
        [sys.executable, "-c", BUILD_WHEEL, str(wheels)],
        capture_output=True,
        text=True,
        cwd=source,
        timeout=COMMAND_SECONDS,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "Warning" not in built.stderr and "deprecated" not in built.stderr, built.stderr
    return wheels / built.stdout.strip().splitlines()[-1]


def base_dependencies() -> set[str]:
    """The distributions the base install needs: pyproject's dependencies and theirs (no extras)."""
    pending = list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    found: set[str] = set()
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name not in found:
            found.add(requirement.name)
            pending += importlib.metadata.requires(requirement.name) or []
    return found


def copy_distribution(name: str, site_packages: Path) -> None:
    """Install a distribution of this interpreter into another venv by copying the files its RECORD lists."""
    distribution = importlib.metadata.distribution(name)
    for file in distribution.files or []:
        origin = Path(str(distribution.locate_file(file)))
        if file.parts[0] == ".." or "__pycache__" in file.parts or not origin.is_file():
            continue  # console scripts outside site-packages, and bytecode, are not needed
        target = site_packages / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)


def podipc(python: Path, *arguments: str) -> list[str]:
    """argv that runs the venv's installed podipc."""
    return [str(python), "-m", "podipc", *arguments]


def run(python: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's podipc outside the checkout, so only the installed package can be imported."""
    return subprocess.run(
        podipc(python, *arguments),
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
        cwd=python.parent,
        env=clean_environment(),
    )


def clean_environment() -> dict[str, str]:
    """This environment without PYTHONPATH (nothing of the checkout may leak into the venv)."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_the_base_install_carries_no_optional_package(base_python: Path) -> None:
    listed = subprocess.run(
        [str(base_python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=True,
    )
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"podipc", "click", "posix-ipc", "sysv-ipc"} <= {name.replace("_", "-") for name in names}
    assert not names & OPTIONAL_PACKAGES, names & OPTIONAL_PACKAGES


def test_channels_lists_every_channel_and_zmq_as_unusable(base_python: Path) -> None:
    table = run(base_python, "channels")
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    rows = {row["scheme"]: row for row in map(json.loads, run(base_python, "channels", "--json").stdout.splitlines())}
    assert not rows["zmq+tcp"]["usable"] and not rows["zmq+ipc"]["usable"]
    assert "pip install 'podipc[zmq]'" in rows["zmq+tcp"]["reason"], rows["zmq+tcp"]
    assert rows["shm"]["usable"] and rows["mq"]["usable"], rows


@pytest.mark.parametrize("scheme", ["shm", "mq"])
def test_produce_and_consume_agree_across_processes(base_python: Path, scheme: str) -> None:
    url = url_for(scheme)
    consumer = subprocess.Popen(
        podipc(base_python, "consume", url, "--timeout", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=base_python.parent,
        env=clean_environment(),
    )
    try:
        produced = run(base_python, "produce", url, "--count", "500", "--random", "--size", "4000")
        consumed_out, consumed_err = consumer.communicate(timeout=COMMAND_SECONDS)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate()
    assert produced.returncode == 0, produced.stderr
    assert consumer.returncode == 0, consumed_err
    producer_line, consumer_line = (
        json.loads(produced.stdout.splitlines()[-1]),
        json.loads(consumed_out.splitlines()[-1]),
    )
    assert producer_line["messages"] == consumer_line["messages"] == 500
    assert producer_line["sha256"] == consumer_line["sha256"]


def test_doctor_json_runs_and_its_tables_name_the_extra(base_python: Path) -> None:
    report = run(base_python, "doctor", "--json")
    assert report.returncode == 0, report.stderr
    assert {verdict["scheme"] for verdict in json.loads(report.stdout)["channels"]} >= {"shm", "mq", "zmq+tcp"}
    tables = run(base_python, "doctor")
    assert tables.returncode != 0
    assert tables.stderr.strip().splitlines() == [
        "podipc: error: podipc doctor needs the rich package: pip install 'podipc[doctor]'"
    ]


def test_bench_without_its_extra_says_which_extra_to_install(base_python: Path) -> None:
    result = run(base_python, "bench", "--quick")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "podipc: error: podipc bench needs the rich package: pip install 'podipc[bench]'"
    ]
    assert result.stdout == ""
