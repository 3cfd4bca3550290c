"""The work queue's small parts (podipc.work_queue): slot names, the pattern option and its refusals, the lock."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import podipc
from podipc.ownership import Trust
from podipc.presence import base_token, slot_path, slot_token
from podipc.queue import parse_pattern
from podipc.work_queue import consumers_lock, lock_path


def test_a_slot_token_names_its_channel_for_clean() -> None:
    assert slot_token("mq-jobs-1234abcd", 3) == "mq-jobs-1234abcd.slot3"
    assert base_token("mq-jobs-1234abcd.slot3") == "mq-jobs-1234abcd"
    assert base_token("mq-jobs-1234abcd") == "mq-jobs-1234abcd"
    assert base_token("mq-jobs-1234abcd.slotx") == "mq-jobs-1234abcd.slotx"
    assert slot_path("tok", 2, "/d") == "/d/podipc.presence.tok.slot2.consumer"
    assert slot_path("tok", 2, "/d", "producer") == "/d/podipc.presence.tok.slot2.producer"


def test_the_pattern_option_of_a_queue_is_pair_queue_or_fanin() -> None:
    assert parse_pattern(" Queue ") == "queue"
    assert parse_pattern("pair") == "pair"
    assert parse_pattern("FanIn") == "fanin"
    with pytest.raises(ValueError, match="pair, queue, fanin"):
        parse_pattern("broadcast")


@pytest.mark.parametrize("url", ["unix:///tmp/x.sock", "tcp://127.0.0.1:7000", "shm:///x", "file:///tmp/spool"])
def test_channels_without_a_work_queue_refuse_pattern_queue_naming_mq_and_sysvmq(url: str) -> None:
    with pytest.raises(podipc.AddressError, match=r"pattern=queue .* it runs over mq://, sysvmq://"):
        podipc.consumer(f"{url}?pattern=queue")
    with pytest.raises(podipc.AddressError, match="mq://, sysvmq://"):
        podipc.producer(url, pattern="queue")


def test_fanin_and_the_work_queue_do_not_mix() -> None:
    with pytest.raises(podipc.AddressError, match="needs pattern=fanin, not queue"):
        podipc.consumer("mq:///podipc-unit-wq", pattern="queue", producers=2)
    with pytest.raises(podipc.AddressError, match="choose one"):
        podipc.producer("sysvmq://podipc-unit-wq", pattern="queue", name="app")


def test_a_fanin_queue_is_podipcs_own_never_adopted() -> None:
    with pytest.raises(podipc.AddressError, match="adopt=true and pattern=fanin"):
        podipc.consumer("mq:///podipc-unit-wq", pattern="fanin", adopt=True)


def test_the_consumers_lock_excludes_and_survives_its_removal(tmp_path: Path) -> None:
    trust = Trust.for_mode(0o600)
    held = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with consumers_lock("tok", 0o600, trust, str(tmp_path)) as lock:
            held.set()
            release.wait(5)
            order.append("first")
            lock.remove()  # the last consumer leaving: a waiter must not count the unlinked file

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(5)
    releaser = threading.Timer(0.1, release.set)
    releaser.start()
    started = time.monotonic()
    with consumers_lock("tok", 0o600, trust, str(tmp_path)):
        order.append("second")
        assert os.path.exists(lock_path("tok", str(tmp_path)))  # locked on the file now at the path
    assert time.monotonic() - started >= 0.05
    thread.join(5)
    assert order == ["first", "second"]
