"""Peer liveness through flock'd files: alive while held, gone after SIGKILL, absent after a clean leave."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat

import pytest

from podipc.errors import ChannelUnavailable, PeerGone, PeerTimeout
from podipc.presence import PeerState, Presence, presence_path, probe


def hold_presence(directory: str, ready: multiprocessing.synchronize.Event) -> None:
    Presence("token", "producer", directory=directory)
    ready.set()
    signal.pause()


def test_a_live_holder_is_alive_and_a_sigkilled_one_is_gone(tmp_path: pytest.TempPathFactory) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=hold_presence, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(10)
    consumer = Presence("token", "consumer", directory=str(tmp_path))
    assert consumer.peer_state() is PeerState.ALIVE
    os.kill(holder.pid or 0, signal.SIGKILL)
    holder.join()
    assert consumer.peer_state() is PeerState.GONE
    with pytest.raises(PeerGone, match="producer of test channel is gone"):
        consumer.check_peer("test channel")
    consumer.close()


def test_a_clean_leave_removes_the_file(tmp_path: pytest.TempPathFactory) -> None:
    producer = Presence("token", "producer", directory=str(tmp_path))
    consumer = Presence("token", "consumer", directory=str(tmp_path))
    assert consumer.peer_state() is PeerState.ALIVE
    producer.close()
    producer.close()
    assert consumer.peer_state() is PeerState.ABSENT
    consumer.close()
    assert os.listdir(tmp_path) == []


def test_a_second_holder_of_the_same_role_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    first = Presence("token", "consumer", directory=str(tmp_path))
    with pytest.raises(ChannelUnavailable, match="another consumer is attached"):
        Presence("token", "consumer", directory=str(tmp_path))
    first.close()


def test_a_stale_file_of_a_dead_holder_is_taken_over(tmp_path: pytest.TempPathFactory) -> None:
    path = presence_path("token", "producer", str(tmp_path))
    with open(path, "w") as stale:
        stale.write("123 gone\n")
    assert probe(path) is PeerState.GONE
    producer = Presence("token", "producer", directory=str(tmp_path))
    assert probe(path) is PeerState.ALIVE
    producer.close()


def test_files_are_created_0600_by_default_and_with_the_mode_asked(tmp_path: pytest.TempPathFactory) -> None:
    private = Presence("token", "producer", directory=str(tmp_path))
    shared = Presence("token", "consumer", mode=0o660, directory=str(tmp_path))
    assert stat.S_IMODE(os.stat(private.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared.path).st_mode) == 0o660
    private.close()
    shared.close()


def test_waiting_for_a_peer_that_never_comes_times_out(tmp_path: pytest.TempPathFactory) -> None:
    import time

    consumer = Presence("token", "consumer", directory=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="no producer appeared"):
        consumer.wait_for_peer(None, time.monotonic() + 0.2, "test channel")
    assert 0.15 < time.monotonic() - started < 2
    consumer.close()


def test_an_abandoned_presence_looks_gone_and_the_survivor_removes_it(tmp_path: pytest.TempPathFactory) -> None:
    from podipc.presence import remove_if_gone

    producer = Presence("token", "producer", directory=str(tmp_path))
    consumer = Presence("token", "consumer", directory=str(tmp_path))
    assert remove_if_gone(producer.path) is False  # held: never removed
    producer.abandon()
    producer.abandon()
    assert consumer.peer_state() is PeerState.GONE
    assert remove_if_gone(consumer.peer_path) is True
    assert consumer.peer_state() is PeerState.ABSENT
    consumer.close()
    assert os.listdir(tmp_path) == []


def test_a_restarted_producer_waits_until_the_dead_ones_consumer_has_left(tmp_path: pytest.TempPathFactory) -> None:
    import threading
    import time

    directory = str(tmp_path)
    dead = Presence("token", "producer", directory=directory)
    dead.abandon()
    consumer = Presence("token", "consumer", directory=directory)
    with pytest.raises(PeerTimeout, match="still attached"):
        Presence("token", "producer", directory=directory, handover_wait=0.2)
    threading.Timer(0.3, consumer.close).start()
    started = time.monotonic()
    restarted = Presence("token", "producer", directory=directory, handover_wait=10)
    assert 0.25 <= time.monotonic() - started < 5
    restarted.close()


def test_a_new_consumer_removes_a_dead_producers_file(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path)
    dead = Presence("token", "producer", directory=directory)
    dead.abandon()
    consumer = Presence("token", "consumer", directory=directory, handover_wait=10)
    assert consumer.peer_state() is PeerState.ABSENT
    consumer.close()
    assert os.listdir(tmp_path) == []


def test_a_declaration_is_read_by_the_peer_and_ignored_by_clean(tmp_path: pytest.TempPathFactory) -> None:
    from podipc.clean import find_leftovers
    from podipc.presence import declares

    producer = Presence("token", "producer", directory=str(tmp_path))
    producer.declare("start-of-stream")
    assert declares(producer.path, "start-of-stream")
    assert not declares(producer.path, "something-else")
    producer.abandon()
    assert [(item.kind, item.name) for item in find_leftovers([str(tmp_path)])] == [("path", producer.path)]


def test_leaving_cleanly_removes_our_file_and_an_abort_while_the_peer_lives_abandons_it(
    tmp_path: pytest.TempPathFactory,
) -> None:
    directory = str(tmp_path)
    producer = Presence("token", "producer", directory=directory)
    consumer = Presence("token", "consumer", directory=directory)
    producer.leave(clean=False, peer_file_is_evidence=lambda: False)
    assert consumer.peer_state() is PeerState.GONE  # the peer learns we came and went
    consumer.leave(clean=True, peer_file_is_evidence=lambda: False)
    assert os.listdir(tmp_path) == []  # our file, and the GONE one that is no evidence
