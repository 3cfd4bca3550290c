"""Fixtures of the e2e tests: the podipc image, built once per session with images/build.sh.

Every test in tests/e2e/ is marked `e2e`; run them with `python -m pytest -m e2e tests/e2e`.
Tests that need the image take the `podipc_image` fixture (its value is the image name) and
play manifests with tests.e2e.pods.play().

The image is built right after collection when a selected test needs it, so that a cold
build (the mmdebstrap base, about a minute) does not count against any test's timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .pods import IMAGE, REPO_ROOT, podman_available

BUILD_SCRIPT = REPO_ROOT / "images" / "build.sh"
BUILD_TIMEOUT_SECONDS = 900
BUILD_RESULT = pytest.StashKey[str]()  # "" when built, else why not (a failure message)
NO_PODMAN = "podman is not installed (run .ci/podman-setup.sh, as CI does)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e as `e2e`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the image once, before the first test that needs it starts its clock."""
    if any("podipc_image" in getattr(item, "fixturenames", ()) for item in session.items) and podman_available():
        session.config.stash[BUILD_RESULT] = build_image()


def build_image() -> str:
    """Run images/build.sh; return "" on success, else its output."""
    started = time.monotonic()
    # The wheels must match the base's Python 3.11: build them with the interpreter running the tests.
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), "PODIPC_IMAGE": IMAGE}
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            env=env,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"images/build.sh did not finish within {BUILD_TIMEOUT_SECONDS} s"
    if result.returncode != 0:
        return f"images/build.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    sys.stderr.write(f"\n[e2e] {IMAGE} ready in {time.monotonic() - started:.1f} s\n")
    return ""


@pytest.fixture(scope="session")
def podipc_image(request: pytest.FixtureRequest) -> str:
    """The image localhost/podipc:dev, (re)built from this tree by images/build.sh once per session."""
    if not podman_available():
        pytest.skip(NO_PODMAN)
    stash = request.config.stash
    if BUILD_RESULT not in stash:
        stash[BUILD_RESULT] = build_image()
    if stash[BUILD_RESULT]:
        pytest.fail(stash[BUILD_RESULT], pytrace=False)
    return IMAGE
