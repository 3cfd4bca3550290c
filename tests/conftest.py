"""The suite's rules under CI: no essential test skips, no xfail, and never fewer tests than the committed floor.

Under CI=true (.ci/run sets it):
- a skipped test fails unless it is marked `optional`: only what the README declares optional
  may be missing (README, Development). Outside CI a missing tool still skips, naming what
  installs it, so a developer can run what their machine has.
- an xfail-marked test fails: a test that fails sometimes found a bug (no flaky tests).
- a whole-suite run (no paths given: pyproject's testpaths) that collects fewer tests than
  tests/collected-minimum fails: a test file that stopped being collected, or a module that
  skipped itself, would otherwise pass unnoticed. Counted before -m/-k deselect, so
  `-m "not e2e"` is checked too. Raise the floor with
  `python -m pytest --collect-only -q --write-collected-minimum`.
Optional tests that skipped are listed at the end of every run.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_ci_rules.py runs these rules on small suites of its own

CI_VALUES = ("true", "1", "yes")
FLOOR_FILE_INI = "collected_minimum_file"
FLOOR_FILE_DEFAULT = "tests/collected-minimum"
WHOLE_SUITE_COUNT = pytest.StashKey[int]()
OPTIONAL_SKIPS = pytest.StashKey[list[str]]()


def running_in_ci() -> bool:
    """True when the environment says CI (CI=true, as .ci/run and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def pytest_addoption(parser: pytest.Parser) -> None:
    """The floor file's location, and the option that rewrites it."""
    parser.addini(
        FLOOR_FILE_INI, "file holding the fewest tests a whole-suite run may collect", default=FLOOR_FILE_DEFAULT
    )
    parser.addoption(
        "--write-collected-minimum",
        action="store_true",
        help="write the number of tests this whole-suite run collected to the collected-minimum file",
    )


def floor_file(config: pytest.Config) -> Path:
    """The collected-minimum file, relative to the rootdir."""
    return config.rootpath / str(config.getini(FLOOR_FILE_INI))


def read_floor(config: pytest.Config) -> int:
    """The committed floor (0 when the file is missing)."""
    path = floor_file(config)
    try:
        return int(path.read_text().split()[0])
    except FileNotFoundError:
        return 0
    except (ValueError, IndexError) as exc:
        raise pytest.UsageError(f"{path} must hold one number, the fewest tests a whole-suite run collects") from exc


def is_whole_suite(config: pytest.Config) -> bool:
    """True when no paths were given, so pyproject's testpaths were collected."""
    return config.args_source is pytest.Config.ArgsSource.TESTPATHS


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Count the whole suite before -m/-k deselect anything; write the floor when asked."""
    if not is_whole_suite(config):
        if config.getoption("write_collected_minimum"):
            raise pytest.UsageError("--write-collected-minimum needs a whole-suite run: give no paths")
        return
    config.stash[WHOLE_SUITE_COUNT] = len(items)
    if config.getoption("write_collected_minimum"):
        floor_file(config).write_text(f"{len(items)}\n")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Under CI a module that skips itself (importorskip, allow_module_level) fails instead."""
    report = yield
    if report.skipped and running_in_ci():
        report.outcome = "failed"
        report.longrepr = (
            f"skipped at collection under CI=true; only tests marked optional may skip: {reason_of(report)}"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI an essential test's skip, or any xfail, is a failure; optional skips are remembered for the summary."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("optional") is not None:
        item.config.stash.setdefault(OPTIONAL_SKIPS, []).append(f"{item.nodeid}: {reason_of(report)}")
        return report
    if not running_in_ci():
        return report
    if hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"xfail is not allowed under CI=true (a test that fails sometimes found a bug): {report.wasxfail}"
        )
    elif report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            "an essential test skipped under CI=true; only tests marked optional (README, Development) "
            f"may skip: {reason_of(report)}"
        )
    return report


def reason_of(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skip report carries."""
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def floor_shortfall(config: pytest.Config) -> str:
    """Why a whole-suite run under CI collected too few tests, or ''."""
    if WHOLE_SUITE_COUNT not in config.stash or not running_in_ci():
        return ""
    collected, floor = config.stash[WHOLE_SUITE_COUNT], read_floor(config)
    if collected >= floor:
        return ""
    return (
        f"the whole suite collected {collected} tests, fewer than the {floor} in {floor_file(config).name}: "
        "a test file or module stopped being collected (find it, or lower the floor in the same commit that removes tests)"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when the whole suite collected fewer tests than the floor."""
    if floor_shortfall(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """List the optional tests that skipped, and the whole-suite count against the floor."""
    skipped = config.stash.get(OPTIONAL_SKIPS, [])
    if skipped:
        terminalreporter.section(f"optional tests skipped ({len(skipped)}; README: Development)", sep="-")
        for line in skipped:
            terminalreporter.line(line)
    if WHOLE_SUITE_COUNT not in config.stash:
        return
    collected, floor = config.stash[WHOLE_SUITE_COUNT], read_floor(config)
    shortfall = floor_shortfall(config)
    if shortfall:
        terminalreporter.section("collected-minimum", sep="-", red=True, bold=True)
        terminalreporter.line(f"FAILED: {shortfall}", red=True)
    elif collected > floor:
        terminalreporter.line(
            f"whole suite: {collected} tests collected, floor {floor} ({floor_file(config).name}); "
            "raise it: python -m pytest --collect-only -q --write-collected-minimum"
        )
    else:
        terminalreporter.line(f"whole suite: {collected} tests collected, floor {floor} ({floor_file(config).name})")
