"""`podipc clean`: removes exactly what dead podipc processes of this user recorded for their channel,
never what is alive, another user's, outside the channel's own objects, or behind a link."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import posix_ipc
import pytest
import sysv_ipc
from click.testing import CliRunner

from podipc.address import parse_address
from podipc.clean import channel_objects, find_leftovers, remove, survey
from podipc.cli import main
from podipc.presence import Presence, presence_path
from tests.commands import PODIPC

OTHER_UID = 4243  # a user that exists nowhere: chown works for root without an account


def dead_presence(directory: str, url: str, role: str, objects: list[tuple[str, str]]) -> str:
    """A presence file as a SIGKILLed holder leaves it: present, unlocked, naming its channel and objects."""
    address = parse_address(url)
    holder = Presence(address.token, role, directory=directory, channel=address.location)
    for kind, name in objects:
        holder.record(kind, name)
    holder.abandon()  # the kernel drops the lock, as on SIGKILL; the file stays
    return holder.path


def bound_socket_file(path: str) -> str:
    """A socket file at `path`, as a killed unix:// consumer leaves it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.close()
    return path


def unique(word: str) -> str:
    return f"podipc-test-clean-{word}-{os.getpid()}-{time.monotonic_ns()}"


def test_objects_of_dead_channels_are_found_and_removed(tmp_path: Path) -> None:
    directory = str(tmp_path)
    mq_url = f"mq:///{unique('mq')}"
    queue_name = "/" + parse_address(mq_url).name
    posix_ipc.MessageQueue(queue_name, posix_ipc.O_CREX, mode=0o600).close()
    sysv_url = f"sysvmq://{unique('sysv')}"
    sysv_key = parse_address(sysv_url).key
    sysv_ipc.MessageQueue(sysv_key, sysv_ipc.IPC_CREX, mode=0o600)
    unix_url = f"unix://{directory}/s.sock"
    socket_file = bound_socket_file(f"{directory}/s.sock")
    unrelated = os.path.join(directory, "not-podipc.txt")
    open(unrelated, "w").close()
    presences = [
        dead_presence(directory, mq_url, "consumer", [("posix_mq", queue_name)]),
        dead_presence(directory, sysv_url, "consumer", [("sysv_mq", str(sysv_key))]),
        dead_presence(directory, unix_url, "consumer", [("path", socket_file)]),
    ]

    found = survey([directory])
    assert found.refused == []
    assert {(item.kind, item.name) for item in found.leftovers} == {
        ("posix_mq", queue_name),
        ("sysv_mq", str(sysv_key)),
        ("path", socket_file),
        *(("path", presence) for presence in presences),
    }
    assert all(remove(item) for item in found.leftovers)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(queue_name)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(sysv_key)
    assert os.listdir(directory) == ["not-podipc.txt"]
    assert find_leftovers([directory]) == []


def test_nothing_is_touched_while_a_side_of_the_channel_lives(tmp_path: Path) -> None:
    directory = str(tmp_path)
    url = f"unix://{directory}/x.sock"
    dead_presence(directory, url, "consumer", [("path", bound_socket_file(f"{directory}/x.sock"))])
    live_producer = Presence(parse_address(url).token, "producer", directory=directory)
    live_other = Presence("other", "consumer", directory=directory)
    assert survey([directory]).leftovers == [] and survey([directory]).refused == []
    live_producer.close()
    assert len(find_leftovers([directory])) == 2
    live_other.close()


def test_an_object_is_kept_when_its_channel_comes_back_between_survey_and_removal(tmp_path: Path) -> None:
    directory = str(tmp_path)
    url = f"unix://{directory}/x.sock"
    socket_file = bound_socket_file(f"{directory}/x.sock")
    dead_presence(directory, url, "consumer", [("path", socket_file)])
    found = find_leftovers([directory])
    restarted = Presence(parse_address(url).token, "producer", directory=directory)
    assert [remove(item) for item in found] == [False, False]
    assert os.path.exists(socket_file)
    restarted.close()


def test_removing_an_object_already_gone_is_fine(tmp_path: Path) -> None:
    directory = str(tmp_path)
    url = f"mq:///{unique('never')}"
    dead_presence(directory, url, "producer", [("posix_mq", "/" + parse_address(url).name)])
    for item in find_leftovers([directory]):
        assert remove(item)
    assert os.listdir(directory) == []


def test_the_command_lists_on_dry_run_and_removes_otherwise(tmp_path: Path) -> None:
    directory = str(tmp_path)
    leftover_file = bound_socket_file(os.path.join(directory, "left.sock"))
    dead_presence(directory, f"unix://{leftover_file}", "consumer", [("path", leftover_file)])
    dry = CliRunner().invoke(main, ["clean", "--dry-run", "--dir", directory])
    assert dry.exit_code == 0 and f"would remove: path {leftover_file}" in dry.output
    assert os.path.exists(leftover_file)
    real = CliRunner().invoke(main, ["clean", "--dir", directory])
    assert real.exit_code == 0 and f"removed: path {leftover_file}" in real.output
    assert os.listdir(directory) == []


def test_a_record_naming_objects_outside_its_channel_deletes_nothing_and_says_why(tmp_path: Path) -> None:
    """D1 by the same user: a presence file of ours naming an arbitrary path and someone's SysV queue."""
    directory = str(tmp_path)
    victim_file = tmp_path / "precious.txt"
    victim_file.write_text("keep me")
    victim_socket = bound_socket_file(f"{directory}/other.sock")
    victim_queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        presence = dead_presence(
            directory,
            f"mq:///{unique('evil')}",
            "producer",
            [("path", str(victim_file)), ("path", victim_socket), ("sysv_mq", str(victim_queue.key))],
        )
        result = CliRunner().invoke(main, ["clean", "--dir", directory])
        assert result.exit_code == 0, result.output
        assert result.output.count("not an object podipc creates for mq:///") == 3, result.output
        assert victim_file.read_text() == "keep me" and os.path.exists(victim_socket)
        sysv_ipc.MessageQueue(victim_queue.key)
        assert os.path.exists(presence), "the record stays: it is the evidence of what it names"
    finally:
        victim_queue.remove()


def test_a_record_without_a_matching_channel_line_deletes_no_object(tmp_path: Path) -> None:
    directory = str(tmp_path)
    socket_file = bound_socket_file(f"{directory}/s.sock")
    url = f"unix://{socket_file}"
    token = parse_address(url).token
    without = Presence(token, "consumer", directory=directory)  # no channel line, as an old podipc wrote
    without.record("path", socket_file)
    without.abandon()
    other = parse_address(f"unix://{directory}/t.sock")
    forged = Presence(other.token, "consumer", directory=directory, channel=url)  # a channel of another token
    forged.record("path", socket_file)
    forged.abandon()
    found = survey([directory])
    assert found.leftovers == []
    assert len(found.refused) == 2 and all("names no channel" in item.reason for item in found.refused)
    assert os.path.exists(socket_file)


def test_a_live_channel_spelled_differently_keeps_its_objects(tmp_path: Path) -> None:
    directory = str(tmp_path)
    key = 0x4D2 + os.getpid()
    queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        dead_presence(directory, f"sysvmq://{key}", "consumer", [("sysv_mq", str(key))])
        alias = parse_address(f"sysvmq://{key:#x}")
        live = Presence(alias.token, "consumer", directory=directory, channel=alias.location)
        found = survey([directory])
        assert [item.reason for item in found.refused] == ["a live channel uses it; left alone"]
        live.close()
        sysv_ipc.MessageQueue(key)
    finally:
        queue.remove()


def test_channel_objects_are_what_each_transport_creates() -> None:
    assert channel_objects(parse_address("mq:///jobs")) == {("posix_mq", "/jobs")}
    assert channel_objects(parse_address("sysvmq://0x10")) == {("sysv_mq", "16")}
    token = parse_address("shm:///ring").token
    assert channel_objects(parse_address("shm:///ring")) == {
        ("posix_shm", "/ring"),
        ("posix_sem", "/ring.data"),
        ("posix_sem", "/ring.space"),
        ("wake_fifo", f"/dev/shm/podipc.wake.{token}.data"),
        ("wake_fifo", f"/dev/shm/podipc.wake.{token}.space"),
        # a broadcast producer's per-subscriber FIFOs (pattern=broadcast, slots 0..63)
        *(("wake_fifo", f"/dev/shm/podipc.wake.{token}.data.{slot}") for slot in range(64)),
    }
    assert channel_objects(parse_address("unix:///run/a.sock")) == {("path", "/run/a.sock")}
    assert channel_objects(parse_address("zmq+ipc:///run/z.sock")) == {("path", "/run/z.sock")}
    for url in ("unix://@abstract", "tcp://127.0.0.1:7000", "udp://127.0.0.1:7000", "file:///spool"):
        assert channel_objects(parse_address(url)) == frozenset()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_objects_and_entries_of_another_user_are_refused(tmp_path: Path) -> None:
    directory = str(tmp_path)
    theirs = bound_socket_file(f"{directory}/theirs.sock")
    os.chown(theirs, OTHER_UID, OTHER_UID)
    dead_presence(directory, f"unix://{theirs}", "consumer", [("path", theirs)])
    mine = bound_socket_file(f"{directory}/mine.sock")
    foreign_entry = dead_presence(directory, f"unix://{mine}", "consumer", [("path", mine)])
    os.chown(foreign_entry, OTHER_UID, OTHER_UID)
    found = survey([directory])
    assert found.leftovers == []
    reasons = {item.name: item.reason for item in found.refused}
    assert reasons[theirs].startswith(f"not ours (owner uid {OTHER_UID}")
    assert "written by another user" in reasons[foreign_entry] and "as its owner" in reasons[foreign_entry]
    assert os.path.exists(theirs) and os.path.exists(mine)


def test_a_fifo_or_a_link_at_a_presence_path_is_reported_never_opened_or_followed(tmp_path: Path) -> None:
    directory = str(tmp_path)
    target = tmp_path / "target"
    target.write_text("keep me")
    fifo = presence_path("shm-data-d97c9aa9", "consumer", directory)
    os.mkfifo(fifo, 0o600)
    link = presence_path("mq-x-00000000", "producer", directory)
    os.symlink(target, link)
    started = time.monotonic()
    dry = subprocess.run(
        [*PODIPC, "clean", "--dry-run", "--dir", directory], capture_output=True, text=True, timeout=20
    )
    real = subprocess.run([*PODIPC, "clean", "--dir", directory], capture_output=True, text=True, timeout=20)
    assert time.monotonic() - started < 15
    for result in (dry, real):
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert f"refused: path {fifo}: it is a FIFO" in result.stdout
        assert f"refused: path {link}: it is a symbolic link" in result.stdout
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link) and target.read_text() == "keep me"


def test_every_transport_says_which_objects_a_channel_creates_and_who_owns_one() -> None:
    from podipc.transport import PATH_OBJECT, object_kinds, transports

    for transport in transports():
        declared = {kind.name for kind in transport.objects}
        for scheme in transport.schemes:
            example = next(example.url for example in transport.examples if example.url.startswith(f"{scheme}://"))
            address = parse_address(example.replace("KEY", "1234"))
            assert {kind for kind, _ in transport.channel_objects(address)} <= declared, transport.name
    for kind in object_kinds().values():
        if kind is not PATH_OBJECT:
            assert kind.owner, f"{kind.name} does not say who owns an object"
            assert (
                kind.owner_of("/podipc-test-never-created" if kind.name.startswith("posix") else "2147483000") is None
            )


def test_the_owner_of_an_object_of_ours_is_us() -> None:
    from podipc.transport import object_kinds

    name = f"/{unique('owner')}"
    posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600).close()
    sysv_queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        owners = [object_kinds()["posix_mq"].owner_of(name), object_kinds()["sysv_mq"].owner_of(str(sysv_queue.key))]
        assert [(owner.uid, owner.mode) for owner in owners if owner] == [(os.geteuid(), 0o600)] * 2
        assert owners[1] is not None and owners[1].creator == os.geteuid()
    finally:
        posix_ipc.unlink_message_queue(name)
        sysv_queue.remove()
