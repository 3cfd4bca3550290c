"""Peer liveness through flock'd files: alive while held, gone after SIGKILL, absent after a clean leave."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import stat
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from podipc import presence as presence_module
from podipc.errors import ChannelUnavailable, PeerGone, PeerTimeout
from podipc.presence import (
    MONITOR_THREAD_NAME,
    PeerState,
    PeerTracker,
    Presence,
    declares,
    monitor_running,
    presence_path,
    probe,
    remove_if_gone,
)


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
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as stale:
        stale.write("123 gone\n")
    assert probe(path) is PeerState.GONE
    producer = Presence("token", "producer", directory=str(tmp_path))
    assert probe(path) is PeerState.ALIVE
    producer.close()


def test_a_dead_holders_file_locked_by_its_taker_is_never_seen_alive(tmp_path: Path) -> None:
    """A restarting consumer takes over its dead predecessor's file; the waiting producer must not attach to that."""
    directory = str(tmp_path)
    dead = Presence("token", "consumer", directory=directory)
    dead.abandon()
    producer = Presence("token", "producer", directory=directory)
    tracker = PeerTracker(producer)
    fd = os.open(dead.path, os.O_RDONLY)
    try:
        assert presence_module._lock_dead_file(fd, dead.path)  # a claimer, stalled between its lock and unlink
        assert producer.peer_state() is PeerState.GONE
        assert probe(dead.path) is PeerState.GONE
        assert not tracker.lost() and tracker.state is PeerState.GONE
        assert declares(dead.path, presence_module.TOMBSTONE)
    finally:
        os.close(fd)
    consumer = Presence("token", "consumer", directory=directory)
    assert producer.peer_state() is PeerState.ALIVE
    tracker.attach()
    assert not tracker.lost()
    consumer.close()
    producer.close()


def test_a_claimer_waits_out_another_claimers_long_takeover(tmp_path: Path) -> None:
    """Under load a taker may hold a dead file's lock longer than ALIVE_CONFIRM_SECONDS: not a live holder."""
    directory = str(tmp_path)
    dead = Presence("token", "consumer", directory=directory)
    dead.abandon()
    fd = os.open(dead.path, os.O_RDONLY)
    assert presence_module._lock_dead_file(fd, dead.path)
    threading.Timer(3 * presence_module.ALIVE_CONFIRM_SECONDS, lambda: (os.unlink(dead.path), os.close(fd))).start()
    started = time.monotonic()
    claimed = Presence("token", "consumer", directory=directory)
    assert time.monotonic() - started >= 2 * presence_module.ALIVE_CONFIRM_SECONDS
    assert probe(claimed.path) is PeerState.ALIVE and not declares(claimed.path, presence_module.TOMBSTONE)
    claimed.close()


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


# --- an atomic claim: at most one holder, however many start at once ---------------------

CLAIMERS = 30


def claim_at_once(directory: str, start: Any, results: Any, stop: Any) -> None:
    """Wait for the start signal, claim the producer role, report the outcome, hold it until told to stop."""
    start.wait()
    try:
        presence = Presence("token", "producer", directory=directory)
    except ChannelUnavailable as error:
        results.put(("refused", str(error)))
        return
    except BaseException as error:  # a traceback would be a defect
        results.put(("crashed", repr(error)))
        return
    results.put(("holder", os.getpid()))
    stop.wait(60)
    presence.close()


def race_claims(directory: str) -> list[tuple[str, object]]:
    """Start CLAIMERS processes, release them at the same instant, and collect what each got."""
    context = multiprocessing.get_context("fork")
    start, stop, results = context.Event(), context.Event(), context.Queue()
    claimers = [context.Process(target=claim_at_once, args=(directory, start, results, stop)) for _ in range(CLAIMERS)]
    for claimer in claimers:
        claimer.start()
    time.sleep(0.2)  # all of them blocked on the start event
    start.set()
    outcomes = [results.get(timeout=30) for _ in claimers]
    stop.set()
    for claimer in claimers:
        claimer.join(10)
    return outcomes


@pytest.mark.parametrize("before", ["nothing", "a dead holder's file"])
def test_thirty_simultaneous_claims_give_exactly_one_holder(tmp_path: Path, before: str) -> None:
    directory = str(tmp_path)
    for _ in range(3):
        if before != "nothing":
            Presence("token", "producer", directory=directory).abandon()
        outcomes = race_claims(directory)
        holders = [outcome for outcome in outcomes if outcome[0] == "holder"]
        refused = [outcome for outcome in outcomes if outcome[0] == "refused"]
        assert len(holders) == 1, outcomes
        assert len(refused) == CLAIMERS - 1, outcomes
        assert all("another producer is attached" in str(message) for _, message in refused), refused
        assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]
        assert probe(presence_path("token", "producer", directory)) is PeerState.ABSENT  # the holder left cleanly


# --- hostile things at a presence path: one-line ChannelUnavailable, never a hang -------------


def plant(kind: str, path: str, directory: Path) -> None:
    """Put a FIFO, a symlink, a directory or a world-readable file where a presence file belongs."""
    if kind == "fifo":
        os.mkfifo(path, 0o666)
    elif kind == "symlink":
        target = directory / "target"
        target.write_text("x")
        os.symlink(target, path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "w") as handle:
            handle.write("1 evil\n")
        os.chmod(path, 0o644)
        os.chown(path, OTHER_UID, OTHER_UID)


OTHER_UID = 4243  # no account needed: root may chown to any id
HOSTILE = [
    "fifo",
    "symlink",
    "directory",
    pytest.param(
        "another user's file",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root"),
    ),
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_something_hostile_at_our_path_refuses_the_claim_in_one_line(tmp_path: Path, kind: str) -> None:
    path = presence_path("token", "consumer", str(tmp_path))
    plant(kind, path, tmp_path)
    started = time.monotonic()
    with pytest.raises(ChannelUnavailable) as caught:
        Presence("token", "consumer", directory=str(tmp_path), handover_wait=2)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "\n" not in message and path in message and "owner uid" in message
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


@pytest.mark.parametrize("kind", HOSTILE)
def test_something_hostile_at_the_peers_path_is_reported_by_every_probe(tmp_path: Path, kind: str) -> None:
    directory = str(tmp_path)
    consumer = Presence("token", "consumer", directory=directory)
    plant(kind, consumer.peer_path, tmp_path)
    for attempt in (consumer.peer_state, lambda: probe(consumer.peer_path), lambda: PeerTracker(consumer)):
        with pytest.raises(ChannelUnavailable, match="owner uid"):
            attempt()
    assert declares(consumer.peer_path, "anything") is False
    assert remove_if_gone(consumer.peer_path) is False
    assert os.path.lexists(consumer.peer_path)
    consumer.leave(clean=True, peer_file_is_evidence=lambda: False)  # leaving never fails on it
    assert not os.path.exists(consumer.path)


def test_a_presence_file_shared_with_mode_0660_is_trusted_by_a_side_that_shares_the_group(tmp_path: Path) -> None:
    directory = str(tmp_path)
    producer = Presence("token", "producer", mode=0o660, directory=directory)
    consumer = Presence("token", "consumer", mode=0o660, directory=directory)
    assert consumer.peer_state() is PeerState.ALIVE and producer.peer_state() is PeerState.ALIVE
    producer.close()
    consumer.close()


def test_the_record_names_the_channel_for_clean(tmp_path: Path) -> None:
    presence = Presence("token", "consumer", directory=str(tmp_path), channel="mq:///jobs")
    presence.record("posix_mq", "/jobs")
    with open(presence.path) as record:
        assert record.read().splitlines()[1:] == ["channel mq:///jobs", "posix_mq /jobs"]
    presence.close()


# --- fork: a child never keeps its parent's liveness ---------------------------------------


def fork_then_wait(directory: str, ready: Any, grandchild: Any) -> None:
    """Claim the producer role, fork a long-lived child, and wait to be killed."""
    presence = Presence("token", "producer", directory=directory)
    child = os.fork()
    if child == 0:
        assert presence.inherited
        presence.close()  # in the child: frees nothing of the parent's
        time.sleep(60)
        os._exit(0)
    grandchild.value = child
    time.sleep(0.2)  # let the child's close() run: it must not have removed the file
    ready.set()
    signal.pause()


def test_a_forked_child_does_not_keep_its_dead_parents_presence_alive(tmp_path: Path) -> None:
    directory = str(tmp_path)
    context = multiprocessing.get_context("fork")
    ready, grandchild = context.Event(), context.Value("i", 0)
    parent = context.Process(target=fork_then_wait, args=(directory, ready, grandchild))
    parent.start()
    consumer = Presence("token", "consumer", directory=directory)
    try:
        assert ready.wait(10)
        assert consumer.peer_state() is PeerState.ALIVE  # the child's close() left the parent's file alone
        lost = threading.Event()
        consumer.watch(lost.set)
        os.kill(parent.pid or 0, signal.SIGKILL)
        killed_at = time.monotonic()
        assert lost.wait(2), "the parent's death went unseen while its child lives"
        assert time.monotonic() - killed_at < 2
        assert consumer.peer_state() is PeerState.GONE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild.value, signal.SIGKILL)
        parent.join(5)
        consumer.close()


# --- the peer-death monitor ----------------------------------------------------------------


def monitor_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == MONITOR_THREAD_NAME]


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def in_a_fresh_process(test: Callable[[], None]) -> None:
    """Run `test` in a forked child, where the process-wide peer monitor starts with nothing watched (the fork hook
    resets it), so claims about the monitor thread judge only this test's watches, not what other tests of this
    process (or a failed one's endpoints) still watch."""
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()

    def run() -> None:
        try:
            test()
            outcome.put(None)
        except BaseException:
            outcome.put(traceback.format_exc())

    child = context.Process(target=run)
    child.start()
    error = outcome.get(timeout=60)
    child.join(10)
    assert error is None, error


def hold_until_killed(directory: str, ready: Any) -> None:
    Presence("token", "producer", directory=directory)
    ready.set()
    signal.pause()


def test_the_watch_calls_back_once_within_two_seconds_of_a_peer_killed(tmp_path: Path) -> None:
    in_a_fresh_process(lambda: watch_a_peer_killed(str(tmp_path)))


def watch_a_peer_killed(directory: str) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=hold_until_killed, args=(directory, ready))
    holder.start()
    assert ready.wait(10)
    consumer = Presence("token", "consumer", directory=directory)
    calls: list[float] = []
    consumer.watch(lambda: calls.append(time.monotonic()))
    assert monitor_threads()
    time.sleep(0.5)
    assert calls == []  # alive: no call
    os.kill(holder.pid or 0, signal.SIGKILL)
    killed_at = time.monotonic()
    holder.join()
    assert wait_for(lambda: bool(calls), 2)
    assert calls[0] - killed_at < 2
    time.sleep(0.5)
    assert len(calls) == 1  # once
    assert wait_for(lambda: not monitor_threads(), 2), "the monitor keeps running with nothing to watch"
    consumer.close()


def test_a_peer_replaced_or_come_and_gone_between_probes_is_a_loss(tmp_path: Path) -> None:
    directory = str(tmp_path)
    consumer = Presence("token", "consumer", directory=directory)
    replaced, came_and_went = threading.Event(), threading.Event()
    first = Presence("token", "producer", directory=directory)
    consumer.watch(replaced.set)
    time.sleep(0.3)
    first.abandon()
    remove_if_gone(first.path)
    second = Presence("token", "producer", directory=directory)
    assert replaced.wait(2)
    second.close()
    consumer.watch(came_and_went.set)  # watching anew: nobody there yet
    quick = Presence("token", "producer", directory=directory)
    quick.abandon()  # came and died before the monitor ever probed it alive
    assert came_and_went.wait(2)
    consumer.close()


def test_a_producer_ending_an_earlier_stream_is_not_taken_for_the_next_consumers_producer(tmp_path: Path) -> None:
    """The next session of a serving consumer opens while the last producer waits for its end to be taken."""
    directory = str(tmp_path)
    ending = Presence("token", "producer", directory=directory)
    ending.declare_ending()
    consumer = Presence("token", "consumer", directory=directory)
    lost, replaced = threading.Event(), threading.Event()
    consumer.watch(lost.set)
    assert consumer.peer_state() is PeerState.ABSENT and not consumer.peer_seen
    time.sleep(0.5)  # the monitor probes it alive, ending, more than once
    ending.close()
    assert not lost.wait(0.6)  # its leaving is no producer of ours dying
    assert not consumer.peer_seen
    following = Presence("token", "producer", directory=directory)
    assert consumer.peer_state() is PeerState.ALIVE
    consumer.watch(replaced.set)
    following.declare_ending()  # seen before it ended: ours, and its death is a loss
    following.abandon()
    assert replaced.wait(2)
    consumer.close()


def test_unwatch_stops_the_calls_and_a_failing_callback_stops_nobody_elses(tmp_path: Path) -> None:
    in_a_fresh_process(lambda: unwatch_and_fail_a_callback(str(tmp_path)))


def unwatch_and_fail_a_callback(directory: str) -> None:
    producer = Presence("token", "producer", directory=directory)
    consumer = Presence("token", "consumer", directory=directory)
    other_producer = Presence("other", "producer", directory=directory)
    other_consumer = Presence("other", "consumer", directory=directory)
    unwatched: list[int] = []
    consumer.watch(lambda: unwatched.append(1))
    consumer.unwatch()
    consumer.unwatch()

    def fail() -> None:
        raise RuntimeError("a transport's bug")

    seen = threading.Event()
    producer.watch(fail)
    other_consumer.watch(seen.set)
    consumer.close()  # producer's peer leaves: its callback raises
    time.sleep(0.5)
    other_producer.abandon()
    assert seen.wait(2), "one failing callback stopped the monitor"
    assert unwatched == []
    producer.close()
    other_consumer.close()
    assert wait_for(lambda: not monitor_threads(), 2)


def test_no_monitor_thread_runs_until_something_is_watched_nor_in_a_forked_child(tmp_path: Path) -> None:
    in_a_fresh_process(lambda: watch_then_fork(str(tmp_path)))


def watch_then_fork(directory: str) -> None:
    producer = Presence("token", "producer", directory=directory)
    consumer = Presence("token", "consumer", directory=directory)
    assert wait_for(lambda: not monitor_threads(), 2)
    consumer.watch(lambda: None)
    assert monitor_running()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        threads = len(monitor_threads()) + (1 if monitor_running() else 0)
        os.write(writer, bytes([threads]))
        os._exit(0)
    os.close(writer)
    assert os.read(reader, 1) == b"\x00"
    os.close(reader)
    os.waitpid(child, 0)
    consumer.close()
    producer.close()
    assert wait_for(lambda: not monitor_running() and not monitor_threads(), 2)


def test_an_unclosed_watcher_finalized_by_a_collection_under_the_monitors_lock_leaves_without_a_hang(
    tmp_path: Path,
) -> None:
    in_a_fresh_process(lambda: finalize_a_watcher_under_the_monitors_lock(str(tmp_path)))


def finalize_a_watcher_under_the_monitors_lock(directory: str) -> None:
    """The monitor allocates under its lock (the copy of its list, a thread): any allocation may run a collection,
    which may finalize an endpoint nobody closed, whose presence then unwatches on this same thread."""
    producer = Presence("token", "producer", directory=directory)
    consumer = Presence("token", "consumer", directory=directory)
    consumer.watch(lambda: None)

    class Forgotten:
        """An endpoint dropped without close(), in a reference cycle: only a collection finalizes it."""

        def __init__(self) -> None:
            self.cycle = self

        def __del__(self) -> None:
            consumer.unwatch()

    done = threading.Event()

    def collect_under_the_lock() -> None:
        Forgotten()
        with presence_module._MONITOR._lock:
            gc.collect()
        done.set()

    threading.Thread(target=collect_under_the_lock, daemon=True).start()
    assert done.wait(5), "the unwatch of a finalized endpoint hung on the monitor's lock"
    consumer.close()
    producer.close()
