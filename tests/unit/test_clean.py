"""`podipc clean`: removes exactly what dead podipc processes recorded, never what is alive or not podipc's."""

from __future__ import annotations

import os

import posix_ipc
import pytest
import sysv_ipc
from click.testing import CliRunner

from podipc.clean import find_leftovers, remove
from podipc.cli import main
from podipc.presence import Presence


def dead_presence(directory: str, token: str, role: str, objects: list[tuple[str, str]]) -> str:
    """A presence file as a SIGKILLed holder leaves it: present, unlocked, listing its objects."""
    holder = Presence(token, role, directory=directory)
    for kind, name in objects:
        holder.record(kind, name)
    path = holder.path
    os.close(holder._fd)  # the kernel drops the lock, as on SIGKILL; the file stays
    holder._fd = -1
    return path


def test_objects_of_a_dead_side_are_found_and_removed(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path)
    queue_name = f"/podipc-test-clean-{os.getpid()}"
    posix_ipc.MessageQueue(queue_name, posix_ipc.O_CREAT, mode=0o600).close()
    sysv_queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    socket_file = os.path.join(directory, "s.sock")
    open(socket_file, "w").close()
    unrelated = os.path.join(directory, "not-podipc.txt")
    open(unrelated, "w").close()
    presence = dead_presence(
        directory,
        "tok",
        "consumer",
        [("posix_mq", queue_name), ("sysv_mq", str(sysv_queue.key)), ("path", socket_file)],
    )

    found = find_leftovers([directory])
    assert {(item.kind, item.name) for item in found} == {
        ("posix_mq", queue_name),
        ("sysv_mq", str(sysv_queue.key)),
        ("path", socket_file),
        ("path", presence),
    }
    for item in found:
        remove(item)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(queue_name)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(sysv_queue.key)
    assert os.listdir(directory) == ["not-podipc.txt"]
    assert find_leftovers([directory]) == []


def test_nothing_is_touched_while_a_side_of_the_channel_lives(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path)
    dead_presence(directory, "tok", "consumer", [("path", os.path.join(directory, "x"))])
    live_producer = Presence("tok", "producer", directory=directory)
    live_other = Presence("other", "consumer", directory=directory)
    assert find_leftovers([directory]) == []
    live_producer.close()
    assert len(find_leftovers([directory])) == 2
    live_other.close()


def test_removing_an_object_already_gone_is_fine(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path)
    dead_presence(directory, "tok", "producer", [("posix_mq", "/podipc-test-clean-never-existed")])
    for item in find_leftovers([directory]):
        remove(item)
    assert os.listdir(directory) == []


def test_the_command_lists_on_dry_run_and_removes_otherwise(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path)
    leftover_file = os.path.join(directory, "left.sock")
    open(leftover_file, "w").close()
    dead_presence(directory, "tok", "consumer", [("path", leftover_file)])
    dry = CliRunner().invoke(main, ["clean", "--dry-run", "--dir", directory])
    assert dry.exit_code == 0 and f"would remove: path {leftover_file}" in dry.output
    assert os.path.exists(leftover_file)
    real = CliRunner().invoke(main, ["clean", "--dir", directory])
    assert real.exit_code == 0 and f"removed: path {leftover_file}" in real.output
    assert os.listdir(directory) == []
