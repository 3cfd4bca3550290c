"""Fixtures the integration tests share."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def reap() -> Iterator[list[Any]]:
    """Processes to kill (SIGCONT first, in case a test stopped them) whatever the test's outcome."""
    started: list[Any] = []
    yield started
    for process in started:
        if process.is_alive():
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.join(5)
