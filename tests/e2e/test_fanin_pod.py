"""Fan-in in a real pod: two app containers (`podipc produce --name`) feed one collector (`consume --producers 2`).

k8s/patterns/fanin.yaml: every container must exit 0, and the collector's summary line must list
each producer with exactly the counts and SHA-256 that producer's own summary line reports.
"""

from __future__ import annotations

import pytest

from .pods import K8S_DIR, play

MANIFEST = K8S_DIR / "patterns" / "fanin.yaml"
EXIT_TIMEOUT_SECONDS = 120
APPS = ("app-a", "app-b")


@pytest.mark.timeout(240)
def test_the_collectors_summary_agrees_with_each_producers(podipc_image: str) -> None:
    with play(MANIFEST) as pods:
        for app in APPS:
            assert pods.wait(app, EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        assert pods.wait("collector", EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        collector = pods.summary("collector")
        produced = {app: pods.summary(app) for app in APPS}
    assert collector["role"] == "consumer", collector
    reported = {entry["name"]: entry for entry in collector["producers"]}
    assert sorted(reported) == sorted(APPS), collector
    for app, summary in produced.items():
        entry = reported[app]
        assert entry["ended"] == "end of stream", entry
        assert (entry["messages"], entry["bytes"], entry["sha256"]) == (
            summary["messages"],
            summary["bytes"],
            summary["sha256"],
        ), (entry, summary)
    assert collector["messages"] == sum(summary["messages"] for summary in produced.values())
