"""Load: many messages through every reliable channel, nothing lost, reordered or corrupted, memory bounded.

CI runs PODIPC_STRESS_COUNT messages (20,000 by default). The full run, of these pairs and of the
multi-party patterns (test_stress_patterns.py), is
`PODIPC_STRESS_COUNT=1000000 .venv/bin/python -m pytest -m stress -s tests/integration/test_stress.py
tests/integration/test_stress_patterns.py`, which prints one line of figures per channel and per pattern.
"""

from __future__ import annotations

import pytest

from .harness import RELIABLE, Pair, leftovers, url_for, wait_until
from .load import COUNT, PEAK_MEMORY_LIMIT_KIB, CyclingSizes

pytestmark = [pytest.mark.stress, pytest.mark.timeout(3600)]


@pytest.mark.parametrize("scheme", RELIABLE)
def test_many_messages_arrive_complete_in_order_with_bounded_memory(scheme: str) -> None:
    url = url_for(scheme)
    produced, consumed = Pair(url, CyclingSizes(COUNT)).run(timeout=3000)  # type: ignore[arg-type]
    assert produced.ok, produced.error
    assert consumed.ok, consumed.error
    assert (consumed.messages, consumed.bytes, consumed.sha256) == (COUNT, produced.bytes, produced.sha256)
    assert consumed.out_of_order == 0
    rate = COUNT / consumed.seconds if consumed.seconds else 0
    print(
        f"\nstress {scheme:14} {COUNT:>9} messages  lost 0  reordered 0  sha256 ok  "
        f"{rate:>9.0f} msg/s  peak RSS producer {produced.peak_rss_kib / 1024:.0f} MiB "
        f"consumer {consumed.peak_rss_kib / 1024:.0f} MiB"
    )
    assert produced.peak_rss_kib < PEAK_MEMORY_LIMIT_KIB and consumed.peak_rss_kib < PEAK_MEMORY_LIMIT_KIB
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)
