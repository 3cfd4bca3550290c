"""pyproject.toml is the one source of the package's facts (extras, licence, version); results in git stay small."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.commands import needs_system_tool

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
FEATURE_EXTRAS = ("zmq", "bench", "doctor", "plot", "peers")
TOOL_EXTRAS = ("test", "dev")
CONTAINERFILE = (ROOT / "images" / "podipc" / "Containerfile").read_text()
BUILD_SCRIPT = (ROOT / "images" / "build.sh").read_text()
LARGEST_RESULTS_FILE = 1 << 20  # bytes: a results file in git is read in review


def names(requirements: list[str]) -> set[str]:
    return {Requirement(requirement).name.lower() for requirement in requirements}


def test_the_all_extra_is_every_feature_extra() -> None:
    assert set(EXTRAS) == {*FEATURE_EXTRAS, *TOOL_EXTRAS, "all"}
    wanted = {
        Requirement(item).name.lower(): str(Requirement(item)) for extra in FEATURE_EXTRAS for item in EXTRAS[extra]
    }
    assert {Requirement(item).name.lower(): str(Requirement(item)) for item in EXTRAS["all"]} == wanted


def test_the_base_install_leaves_every_optional_package_to_an_extra() -> None:
    assert not names(PROJECT["dependencies"]) & names([item for extra in FEATURE_EXTRAS for item in EXTRAS[extra]])
    assert "pyzmq" in names(EXTRAS["zmq"]) and "rich" in names(EXTRAS["bench"]) & names(EXTRAS["doctor"])


def test_the_licence_is_one_spdx_expression_with_its_full_text_and_the_image_says_the_same() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    assert f'org.opencontainers.image.licenses="{PROJECT["license"]}"' in CONTAINERFILE


def test_the_image_version_comes_from_pyproject_and_is_checked_against_the_wheel() -> None:
    declarations = re.findall(r"^ARG VERSION\b.*$", CONTAINERFILE, flags=re.MULTILINE)
    assert declarations == ["ARG VERSION", "ARG VERSION"], "no default: a stale one would label the image wrongly"
    assert '[ "$installed" = "$VERSION" ]' in CONTAINERFILE
    assert 'org.opencontainers.image.version="${VERSION}"' in CONTAINERFILE
    assert '--build-arg VERSION="$(project_version)"' in BUILD_SCRIPT
    assert '["project"]["version"]' in BUILD_SCRIPT.split("project_version() {", 1)[1].split("}", 1)[0]


def test_results_files_in_git_stay_small_enough_to_review() -> None:
    git = needs_system_tool("git", "git")
    listed = subprocess.run(
        [git, "ls-files", "-z", "benchmarks/results"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    tracked = [ROOT / name for name in listed.decode().split("\0") if name]
    assert tracked, "benchmarks/results/ holds the latest results"
    sizes = {path.name: path.stat().st_size for path in tracked if path.exists()}
    assert all(size < LARGEST_RESULTS_FILE for size in sizes.values()), sizes
