"""Trust checks: an object is used only when it is ours, or (with group sharing) our group's and closed to others."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import sysv_ipc

from podipc.errors import AddressError, ChannelUnavailable
from podipc.options import parse_mode
from podipc.ownership import Trust, check_path, check_sysv, grants_others, open_checked

ME = os.geteuid()
OTHER_UID, OTHER_GID = 4243, 4244  # ids with no account: root may chown to them
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def trust(share_group: bool = False, groups: frozenset[int] = frozenset({os.getegid()})) -> Trust:
    return Trust(ME, groups, share_group)


def test_our_own_object_is_trusted_whatever_its_mode() -> None:
    for mode in (0o600, 0o660, 0o604):
        assert trust().problem(ME, 0, mode) is None
    assert grants_others(0o604) and grants_others(0o601) and not grants_others(0o660)


def test_another_users_object_is_refused_without_group_sharing_with_the_owner_and_the_fix() -> None:
    reason = trust().problem(OTHER_UID, OTHER_GID, 0o660)
    assert reason is not None
    assert f"owner uid {OTHER_UID}" in reason and f"gid {OTHER_GID}" in reason and "mode 0660" in reason
    assert "mode=0660" in reason and "runAsGroup/fsGroup" in reason


def test_group_sharing_trusts_a_common_groups_object_closed_to_others_only() -> None:
    shared = trust(share_group=True, groups=frozenset({OTHER_GID, 10}))
    assert shared.problem(OTHER_UID, OTHER_GID, 0o660) is None
    assert shared.problem(OTHER_UID, OTHER_GID, 0o640) is None
    not_ours = shared.problem(OTHER_UID, 99, 0o660)
    assert not_ours is not None and "group is not one of ours" in not_ours
    open_to_all = shared.problem(OTHER_UID, OTHER_GID, 0o664)
    assert open_to_all is not None and "lets every user of the pod in" in open_to_all and "mode=0660" in open_to_all


def test_trust_for_mode_shares_a_group_only_when_the_mode_has_group_bits() -> None:
    assert not Trust.for_mode(0o600).share_group
    assert Trust.for_mode(0o660).share_group and Trust.for_mode(0o640).share_group
    assert Trust.for_mode(0o600).uid == ME and os.getegid() in Trust.for_mode(0o600).groups


def test_sysv_objects_need_owner_and_creator_ours_or_the_group_rule() -> None:
    check_sysv(trust(), "queue", ME, ME, 0, 0o600)
    with pytest.raises(ChannelUnavailable, match=f"created by uid {OTHER_UID}"):
        check_sysv(trust(), "queue", ME, OTHER_UID, 0, 0o600)  # given to us by its creator, who still controls it
    with pytest.raises(ChannelUnavailable, match="belongs to another user"):
        check_sysv(trust(), "queue", OTHER_UID, OTHER_UID, 0, 0o660)
    check_sysv(trust(share_group=True, groups=frozenset({OTHER_GID})), "queue", OTHER_UID, OTHER_UID, OTHER_GID, 0o660)
    with pytest.raises(ChannelUnavailable, match="every user"):
        check_sysv(trust(share_group=True, groups=frozenset({7})), "queue", OTHER_UID, OTHER_UID, 7, 0o666)


def test_a_real_sysv_queue_of_ours_passes() -> None:
    queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        check_sysv(Trust.for_mode(0o600), "queue", queue.uid, queue.cuid, queue.gid, queue.mode)
    finally:
        queue.remove()


def test_open_checked_opens_our_regular_file_and_refuses_o_creat(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    path.chmod(0o600)
    fd = open_checked(str(path), os.O_RDONLY, Trust.for_mode(0o600), "the file")
    try:
        assert os.read(fd, 1) == b"x"
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_checked(str(tmp_path / "missing"), os.O_RDONLY, Trust.for_mode(0o600), "the file")
    with pytest.raises(ValueError, match="O_CREAT"):
        open_checked(str(path), os.O_RDWR | os.O_CREAT, Trust.for_mode(0o600), "the file")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "socket"])
def test_open_checked_never_blocks_follows_or_opens_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "object")
    target = tmp_path / "target"
    target.write_text("x")
    target.chmod(0o600)
    if kind == "fifo":
        os.mkfifo(path, 0o600)  # an open without O_NONBLOCK would hang here
    elif kind == "symlink":
        os.symlink(target, path)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.close()
    expected = {"fifo": "FIFO", "symlink": "symbolic link", "directory": "directory", "socket": "socket"}[kind]
    with pytest.raises(ChannelUnavailable, match=f"the object is a {expected} .*not a regular file") as caught:
        open_checked(path, os.O_RDONLY, Trust.for_mode(0o600), "the object")
    assert "\n" not in str(caught.value)


@needs_root
def test_open_checked_names_the_owner_of_another_users_file(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.write_text("x")
    os.chown(path, OTHER_UID, OTHER_GID)
    for mode in (0o600, 0o644):
        path.chmod(mode)
        with pytest.raises(ChannelUnavailable, match=f"owner uid {OTHER_UID}, gid {OTHER_GID}, mode 0{mode:o}"):
            open_checked(str(path), os.O_RDONLY, Trust.for_mode(0o600), "the file")


@needs_root
def test_check_path_looks_at_the_link_itself_and_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()
    path.chmod(0o600)
    assert check_path(str(path), Trust.for_mode(0o600), "the socket", (stat.S_IFSOCK,)) is not None
    assert check_path(str(tmp_path / "none"), Trust.for_mode(0o600), "the socket", (stat.S_IFSOCK,)) is None
    os.lchown(path, OTHER_UID, OTHER_GID)
    with pytest.raises(ChannelUnavailable, match="belongs to another user"):
        check_path(str(path), Trust.for_mode(0o600), "the socket", (stat.S_IFSOCK,))
    link = tmp_path / "link.sock"
    os.symlink(path, link)
    with pytest.raises(ChannelUnavailable, match="symbolic link"):
        check_path(str(link), Trust.for_mode(0o600), "the socket", (stat.S_IFSOCK,))


@pytest.mark.parametrize("mode", ["0604", "0606", "0664", "0666", "0601", "0777"])
def test_the_mode_option_refuses_anything_for_other_users(mode: str) -> None:
    with pytest.raises(ValueError, match=r"lets every user of the pod in .*mode=0660"):
        parse_mode(mode)


def test_the_mode_option_accepts_private_and_group_modes() -> None:
    assert parse_mode("0600") == 0o600 and parse_mode("660") == 0o660 and parse_mode("0640") == 0o640


def test_a_mode_with_other_bits_in_a_url_is_an_address_error() -> None:
    import podipc

    with pytest.raises(AddressError, match=r"mode='0644'.*lets every user of the pod in"):
        podipc.consumer("mq:///podipc-test-mode?mode=0644")
