"""The demos of k8s/demos/ and the bench Job of k8s/bench/, run as real pods."""

from __future__ import annotations

import pytest

from podipc.transport import schemes

from .pods import K8S_DIR, PlayedPods, play

DEMOS = K8S_DIR / "demos"
EXIT_TIMEOUT_SECONDS = 120
PEER_TIMEOUT_EXIT_CODE = 5  # podipc.cli.EXIT_CODES[PeerTimeout]


def exit_codes(pods: PlayedPods, *containers: str, timeout: float = EXIT_TIMEOUT_SECONDS) -> dict[str, int]:
    return {container: pods.wait(container, timeout) for container in containers}


def assert_pair_agrees(pods: PlayedPods, producer: str, consumer: str, messages: int) -> None:
    codes = exit_codes(pods, consumer, producer)
    assert codes == {consumer: 0, producer: 0}, f"exit codes {codes}\n{pods.describe()}"
    produced, consumed = pods.summary(producer), pods.summary(consumer)
    assert produced["messages"] == consumed["messages"] == messages, (produced, consumed)
    assert produced["sha256"] == consumed["sha256"], (produced, consumed)
    assert produced["bytes"] == consumed["bytes"], (produced, consumed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("late", ["consumer", "producer"], ids=["producer-first", "consumer-first"])
def test_mq_demo_delivers_500_random_messages_whichever_side_starts_first(podipc_image: str, late: str) -> None:
    with play(DEMOS / "mq-queue.yaml", start_delay={late: 2}) as pods:
        assert_pair_agrees(pods, "producer", "consumer", 500)


@pytest.mark.timeout(120)
def test_spool_demo_reader_gets_every_file_the_writer_drops(podipc_image: str) -> None:
    with play(DEMOS / "file-spool.yaml") as pods:
        assert_pair_agrees(pods, "writer", "reader", 1000)


@pytest.mark.timeout(120)
def test_web_style_pair_talks_over_the_pods_localhost(podipc_image: str) -> None:
    with play(DEMOS / "tcp-localhost.yaml") as pods:
        assert_pair_agrees(pods, "app", "collector", 500)
        assert pods.summary("app")["seconds"] >= 1.5  # paced at 250 events/s, not a burst


@pytest.mark.timeout(120)
def test_isolation_demo_consumers_cannot_reach_the_other_pod(podipc_image: str) -> None:
    with play(DEMOS / "isolation.yaml") as pods:
        consumers = [f"{scheme}-consumer" for scheme in ("tcp", "mq", "shm")]
        producers = [f"{scheme}-producer" for scheme in ("tcp", "mq", "shm")]
        codes = exit_codes(pods, *consumers, *producers)
        logs = {container: pods.logs(container) for container in consumers}
        summaries = {container: pods.summary(container) for container in consumers}
        description = pods.describe()
    assert codes == dict.fromkeys(consumers + producers, PEER_TIMEOUT_EXIT_CODE), f"{codes}\n{description}"
    for consumer in consumers:
        assert "podipc: error: PeerTimeout: no producer" in logs[consumer], logs[consumer]
        assert summaries[consumer]["messages"] == 0
        assert summaries[consumer]["error"].startswith("PeerTimeout"), summaries[consumer]


@pytest.mark.timeout(300)
def test_bench_job_reports_every_channel_in_the_client_log(podipc_image: str) -> None:
    quick = {"PODIPC_BENCH_QUICK": "true", "PODIPC_BENCH_SIZES": "64,4KiB"}
    with play(K8S_DIR / "bench" / "bench-job.yaml", env={"*": quick}) as pods:
        codes = exit_codes(pods, "client", "server", timeout=240)
        report = pods.logs("client")
        description = pods.describe()
    assert codes == {"client": 0, "server": 0}, f"{codes}\n{description}"
    for scheme in schemes():
        assert f"| {scheme} | 64 B |" in report, f"no {scheme} row in the report:\n{report}"
