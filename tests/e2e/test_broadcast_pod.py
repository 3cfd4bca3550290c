"""Broadcast in a real pod (k8s/patterns/broadcast.yaml): one producer, two shm:// subscribers.

Every container must exit 0; both subscribers' summaries must agree with the producer's
(messages, bytes, sha256, nothing lost), and the producer's must list both as having taken
every message.
"""

from __future__ import annotations

import pytest

from .pods import K8S_DIR, play

MANIFEST = K8S_DIR / "patterns" / "broadcast.yaml"
EXIT_TIMEOUT_SECONDS = 120
SUBSCRIBERS = ("subscriber-a", "subscriber-b")


@pytest.mark.timeout(240)
def test_both_subscribers_get_every_message_the_producer_sent(podipc_image: str) -> None:
    with play(MANIFEST) as pods:
        codes = {container: pods.wait(container, EXIT_TIMEOUT_SECONDS) for container in ("producer", *SUBSCRIBERS)}
        assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{pods.describe()}"
        produced = pods.summary("producer")
        consumed = {container: pods.summary(container) for container in SUBSCRIBERS}
    assert produced["role"] == "producer" and produced["messages"] > 0, produced
    for summary in consumed.values():
        assert summary["role"] == "consumer", summary
        assert (summary["messages"], summary["bytes"], summary["sha256"]) == (
            produced["messages"],
            produced["bytes"],
            produced["sha256"],
        ), (produced, summary)
        assert summary["lost"] == 0, summary
    delivered = sorted((entry["state"], entry["delivered"]) for entry in produced["subscribers"])
    assert delivered == [("ended", produced["messages"])] * 2, produced
    assert sorted(summary["slot"] for summary in consumed.values()) == [0, 1]
