"""tests/conftest.py's rules, run on small suites of their own: under CI only optional tests skip, no xfail, a floor."""

from __future__ import annotations

import pytest

HOOKS = (
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_make_collect_report",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
)
SUITE = """
import pytest

def test_runs():
    pass

def test_needs_a_missing_tool():
    pytest.skip("frobnicate is not installed")

@pytest.mark.optional
def test_needs_an_optional_thing():
    pytest.skip("the optional thing is missing")

@pytest.mark.slow
def test_deselected_by_marker():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with the repository's rules as its conftest, a `suite/` testpath and a floor file."""
    pytester.makeconftest(f"from tests.conftest import {', '.join(HOOKS)}\n")
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        testpaths = ["suite"]
        collected_minimum_file = "floor"
        markers = ["optional: may skip", "slow: deselected in one test"]
        """
    )
    pytester.mkdir("suite")
    (pytester.path / "suite" / "test_things.py").write_text(SUITE)
    (pytester.path / "floor").write_text("4\n")
    return pytester


def test_outside_ci_a_missing_tool_skips(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest()
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*optional tests skipped (1*", "*test_needs_an_optional_thing: the optional thing*"])


def test_under_ci_an_essential_skip_fails_and_an_optional_one_is_listed(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest()
    result.assert_outcomes(passed=2, skipped=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*essential test skipped under CI=true*frobnicate is not installed*", "*optional tests skipped (1*"]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_under_ci_an_xfail_fails(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    suite.makepyfile(
        test_flaky="import pytest\n\n@pytest.mark.xfail(strict=False)\ndef test_flaky():\n    assert False\n"
    )
    result = suite.runpytest("test_flaky.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*xfail is not allowed under CI=true*"])


def test_under_ci_a_module_that_skips_itself_fails(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    suite.makepyfile(test_gone="import pytest\n\npytest.importorskip('no_such_module_here')\n")
    result = suite.runpytest("test_gone.py")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*skipped at collection under CI=true*no_such_module_here*"])


def test_under_ci_a_whole_suite_below_the_floor_fails_counted_before_deselection(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    (suite.path / "suite" / "test_things.py").write_text(SUITE.replace("@pytest.mark.optional", "@pytest.mark.skip"))
    (suite.path / "floor").write_text("3\n")
    at_the_floor = suite.runpytest("-m", "not slow", "-k", "not needs")
    at_the_floor.assert_outcomes(passed=1)
    assert at_the_floor.ret == pytest.ExitCode.OK
    at_the_floor.stdout.fnmatch_lines(["*whole suite: 4 tests collected, floor 3*raise it*"])

    (suite.path / "floor").write_text("5\n")
    below = suite.runpytest("-m", "not slow", "-k", "not needs")
    below.assert_outcomes(passed=1)
    assert below.ret == pytest.ExitCode.TESTS_FAILED
    below.stdout.fnmatch_lines(["*the whole suite collected 4 tests, fewer than the 5 in floor*"])

    one_file = suite.runpytest("suite/test_things.py", "-k", "runs")
    assert one_file.ret == pytest.ExitCode.OK, "a run of chosen paths is not held to the floor"


def test_write_collected_minimum_records_the_whole_suite(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    (suite.path / "floor").write_text("1\n")
    result = suite.runpytest("--collect-only", "-q", "-m", "not slow", "--write-collected-minimum")
    assert result.ret == pytest.ExitCode.OK
    assert (suite.path / "floor").read_text() == "4\n"
    assert suite.runpytest("suite", "--collect-only", "--write-collected-minimum").ret == pytest.ExitCode.USAGE_ERROR
