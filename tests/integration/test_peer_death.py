"""Peers that die: a SIGKILLed producer or consumer is noticed within 2 seconds on every channel,
and a fresh pair on the same URL recovers whatever the dead ones left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import podipc

from .harness import CONTEXT, RELIABLE, SCHEMES, Pair, leftovers, payload, url_for, wait_until

pytestmark = pytest.mark.timeout(120)
DETECTION_LIMIT_SECONDS = 2.0


def steady_producer(url: str, sent: object) -> None:
    """Send a message every 5 ms until killed."""
    with podipc.producer(url) as channel:
        index = 0
        while True:
            channel.send(payload(index, 100))
            index += 1
            sent.value = index  # type: ignore[attr-defined]
            time.sleep(0.005)


def stalled_consumer(url: str, received: object) -> None:
    """Receive 10 messages, then stop reading (so the producer fills the channel) until killed."""
    with podipc.consumer(url) as channel:
        for _ in range(10):
            channel.recv()
        received.value = 10  # type: ignore[attr-defined]
        signal.pause()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_killed_producer_is_noticed_by_the_consumer_within_two_seconds(scheme: str) -> None:
    url = url_for(scheme)
    sent = CONTEXT.Value("q", 0)
    producer = CONTEXT.Process(target=steady_producer, args=(url, sent))
    with podipc.consumer(url) as consumer:
        producer.start()
        try:
            for _ in range(50):
                consumer.recv(timeout=30)
            os.kill(producer.pid or 0, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises((podipc.PeerGone, podipc.Timeout)) as caught:
                while True:
                    consumer.recv(timeout=10)
            detected_after = time.monotonic() - killed_at
        finally:
            producer.kill()
            producer.join()
    print(f"\npeer-death {scheme:14} killed producer noticed by the consumer after {detected_after:.3f} s")
    assert isinstance(caught.value, podipc.PeerGone), f"{type(caught.value).__name__}: {caught.value}"
    assert detected_after < DETECTION_LIMIT_SECONDS, f"{scheme}: noticed after {detected_after:.2f} s"


@pytest.mark.parametrize("scheme", RELIABLE)
def test_a_killed_consumer_unblocks_a_producer_waiting_on_a_full_channel(scheme: str) -> None:
    url = url_for(scheme, depth=8) if scheme == "file" else url_for(scheme)
    received = CONTEXT.Value("q", 0)
    consumer = CONTEXT.Process(target=stalled_consumer, args=(url, received))
    consumer.start()
    killed_at: list[float] = []

    def kill_when_stalled() -> None:
        wait_until(lambda: received.value == 10, 30)
        time.sleep(1.0)
        os.kill(consumer.pid or 0, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_when_stalled)
    try:
        producer = podipc.producer(url)
        killer.start()
        size = min(4096, producer.max_message_size)
        with pytest.raises(podipc.PeerGone):
            for index in range(2_000_000):
                producer.send(payload(index, size), timeout=30)
        noticed_at = time.monotonic()
        producer.abort()
    finally:
        killer.join()
        consumer.kill()
        consumer.join()
    assert killed_at, "the consumer was never killed"
    print(
        f"\npeer-death {scheme:14} killed consumer noticed by the blocked producer after {noticed_at - killed_at[0]:.3f} s"
    )
    assert noticed_at - killed_at[0] < DETECTION_LIMIT_SECONDS, (
        f"{scheme}: noticed after {noticed_at - killed_at[0]:.2f} s"
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_new_pair_recovers_what_a_killed_pair_left_behind(scheme: str) -> None:
    url = url_for(scheme)
    sent = CONTEXT.Value("q", 0)
    received = CONTEXT.Value("q", 0)
    consumer = CONTEXT.Process(target=stalled_consumer, args=(url, received))
    producer = CONTEXT.Process(target=steady_producer, args=(url, sent))
    consumer.start()
    producer.start()
    try:
        assert wait_until(lambda: received.value == 10 and sent.value > 12, 30)
    finally:
        for process in (producer, consumer):
            process.kill()
            process.join()
    produced, consumed = Pair(url, [64] * 300, pace=0.0005 if scheme == "udp" else 0.0).run(timeout=60)
    assert produced.ok, produced.error
    assert consumed.ok, consumed.error
    if scheme != "file":
        assert (consumed.messages + consumed.lost, consumed.sha256 if not consumed.lost else produced.sha256) == (
            300,
            produced.sha256,
        )
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)
