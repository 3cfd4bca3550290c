"""A work queue in a real pod: one producer (`podipc produce --consumers 2`) hands jobs to two workers
(`podipc consume 'mq:///...?pattern=queue'`) sharing one POSIX message queue.

k8s/patterns/queue.yaml: every container must exit 0, each worker must have ended at its own end
marker, and the workers' counts and bytes must add up to the producer's (each job went to exactly
one worker; the summaries carry counts, bytes and a digest per side, not the messages themselves,
so the multiset of jobs is checked by the integration tests: tests/integration/test_work_queue.py).
"""

from __future__ import annotations

import pytest

from .pods import K8S_DIR, play

MANIFEST = K8S_DIR / "patterns" / "queue.yaml"
EXIT_TIMEOUT_SECONDS = 120
WORKERS = ("worker-a", "worker-b")


@pytest.mark.timeout(240)
def test_the_workers_counts_add_up_to_the_producers(podipc_image: str) -> None:
    with play(MANIFEST) as pods:
        assert pods.wait("producer", EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        for worker in WORKERS:
            assert pods.wait(worker, EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        produced = pods.summary("producer")
        workers = {worker: pods.summary(worker) for worker in WORKERS}
    assert produced["role"] == "producer", produced
    for summary in workers.values():
        assert summary["role"] == "consumer", summary
    assert sum(summary["messages"] for summary in workers.values()) == produced["messages"] == 20000
    assert sum(summary["bytes"] for summary in workers.values()) == produced["bytes"]
