"""A co-tenant against file:// (issue 10): a spool directory another user made, a forged segment or
position file, a link or FIFO where a spool file belongs, the volume's world-writable root: each is refused
with one line (exit 3) naming the owner; nothing of another user reaches the consumer unless the channel
shares a group on purpose (mode=0660); a consumer and `podipc clean` remove only what is provably theirs."""

from __future__ import annotations

import json
import sys

import pytest

from podipc.transports.spool.wire import END, MESSAGE, SegmentHeader, encode_record, encode_segment_header

from .cotenant import Pod, Tenants, User, assert_one_line_error

pytestmark = pytest.mark.timeout(180)

WAIT = 2
FORGED = (
    encode_segment_header(SegmentHeader(0, 0xBAD, 0)) + encode_record(MESSAGE, 0, b"forged") + encode_record(END, 1)
)
"""A whole, valid stream of one message, as a co-tenant would write it."""

WRITE_FILE = "import sys\nopen(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"


def plant(pod: Pod, user: User | None, path: str, content: bytes = FORGED, mode: str = "0644") -> None:
    """Write `content` to `path` in the pod as `user`, with `mode`."""
    written = pod.python(WRITE_FILE, path, content.hex(), user=user)
    assert written.returncode == 0, written.stderr
    assert pod.run(["chmod", mode, path], user=user).returncode == 0


def sides(url: str) -> list[list[str]]:
    return [["consume", f"{url}?wait={WAIT}"], ["produce", f"{url}?wait={WAIT}", "--count", "1"]]


def summary(stdout: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


# --- D3: a spool another user made, or forged files in ours --------------------------------------


@pytest.mark.parametrize("mode", ["0755", "0777", "0770"])
def test_d3_a_spool_directory_another_user_made_is_refused_and_her_stream_never_read(
    pod: Pod, tenants: Tenants, mode: str
) -> None:
    spool = f"{pod.volume}/spool"
    assert pod.run(["mkdir", "-m", mode, spool], user=tenants.mallory).returncode == 0
    plant(pod, tenants.mallory, f"{spool}/podipc.seg.{0:020d}")
    for args in sides(f"file://{spool}"):
        result = pod.podipc(*args, user=tenants.alice)
        line = assert_one_line_error(result, exit_code=3)
        assert "podipc-mallory" in line and spool in line, line
        assert '"messages": 1' not in result.stdout
    group = pod.podipc("consume", f"file://{spool}?wait={WAIT}&mode=0660", user=tenants.alice)
    line = assert_one_line_error(group, exit_code=3)  # her group is not alice's: group sharing refuses it too
    assert "podipc-mallory" in line, line
    assert pod.run(["test", "-f", f"{spool}/podipc.seg.{0:020d}"]).returncode == 0  # hers: never removed


@pytest.mark.parametrize("name", [f"podipc.seg.{0:020d}", "podipc.position"])
def test_d3_a_file_of_another_user_in_our_spool_is_refused_not_consumed(pod: Pod, tenants: Tenants, name: str) -> None:
    spool = f"{pod.volume}/alice"
    assert pod.run(["mkdir", "-m", "0700", spool], user=tenants.alice).returncode == 0
    plant(pod, None, f"{spool}/{name}", FORGED if name.startswith("podipc.seg.") else bytes(136))  # root writes it
    result = pod.podipc("consume", f"file://{spool}?wait={WAIT}", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert f"{spool}/{name}" in line and "uid 0 (root)" in line and "mode=0660" in line, line
    assert "forged" not in result.stdout
    assert pod.run(["test", "-f", f"{spool}/{name}"]).returncode == 0


@pytest.mark.parametrize("kind", ["a FIFO", "a symlink", "a directory"])
def test_d5_something_else_where_the_next_segment_belongs_is_one_line(pod: Pod, tenants: Tenants, kind: str) -> None:
    spool = f"{pod.volume}/alice"
    segment = f"{spool}/podipc.seg.{0:020d}"
    assert pod.run(["mkdir", "-m", "0700", spool], user=tenants.alice).returncode == 0
    make = {"a FIFO": ["mkfifo", segment], "a symlink": ["ln", "-s", "/etc/shadow", segment]}
    assert pod.run(make.get(kind, ["mkdir", segment]), user=tenants.alice).returncode == 0
    for args in sides(f"file://{spool}"):
        result = pod.podipc(*args, user=tenants.alice, timeout=WAIT + 20)
        line = assert_one_line_error(result, exit_code=3)
        assert segment in line, line


def test_d3_the_world_writable_root_of_the_volume_is_refused_as_a_spool(pod: Pod, tenants: Tenants) -> None:
    for args in sides(f"file://{pod.volume}"):
        result = pod.podipc(*args, user=tenants.alice)
        line = assert_one_line_error(result, exit_code=3)
        assert "lets every user of the pod write in it" in line and f"file://{pod.volume}/spool" in line, line


def test_d3_a_symlink_at_the_spool_path_is_never_followed(pod: Pod, tenants: Tenants) -> None:
    private = f"{pod.volume}/alice-private"
    assert pod.run(["mkdir", "-m", "0700", private], user=tenants.alice).returncode == 0
    assert pod.run(["ln", "-s", private, f"{pod.volume}/spool"], user=tenants.mallory).returncode == 0
    result = pod.podipc("produce", f"file://{pod.volume}/spool?wait={WAIT}", "--count", "1", user=tenants.alice)
    line = assert_one_line_error(result, exit_code=3)
    assert "symbolic link" in line and "podipc-mallory" in line, line
    assert pod.run(["ls", "-A", private]).stdout == ""  # nothing was written through her link


def test_group_sharing_lets_alice_and_bob_share_a_spool_and_keeps_mallory_out(pod: Pod, tenants: Tenants) -> None:
    assert pod.run(["mkdir", "-m", "0770", f"{pod.volume}/shared"], user=tenants.alice).returncode == 0  # stays
    url = f"file://{pod.volume}/shared?mode=0660&wait=20"
    consumer = pod.popen([sys.executable, "-m", "podipc", "consume", url], user=tenants.bob)
    produced = pod.podipc("produce", url, "--count", "50", "--random", "--seed", "3", user=tenants.alice)
    assert produced.returncode == 0, produced.stderr
    stdout, stderr = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, stderr
    assert summary(stdout)["sha256"] == summary(produced.stdout)["sha256"]
    # mallory (outside the group) can neither start a stream in it nor read one
    mallory = pod.podipc("produce", url.replace("wait=20", f"wait={WAIT}"), "--count", "1", user=tenants.mallory)
    line = assert_one_line_error(mallory, exit_code=3)
    assert "podipc-alice" in line, line


# --- D1: clean in a spool ----------------------------------------------------------------------


def test_d1_a_forged_spool_presence_file_makes_clean_remove_nothing(pod: Pod, tenants: Tenants) -> None:
    spool = pod.volume  # a directory mallory may write in too (1777)
    part = f"{spool}/podipc.part.{0:020d}"
    plant(pod, tenants.alice, part, b"alice's segment being started", "0600")
    plant(pod, tenants.mallory, f"{spool}/podipc.presence.spool.producer", b"1 evil 0\n", "0644")
    for user in (tenants.alice, None):
        result = pod.podipc("clean", "--json", "--dir", spool, user=user)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        entries = [json.loads(line) for line in result.stdout.splitlines()]
        assert not [entry for entry in entries if entry.get("action") == "removed"], entries
        refused = [entry for entry in entries if entry.get("action") == "refused"]
        assert any("podipc-mallory" in entry.get("reason", "") for entry in refused), entries
    result = pod.podipc("clean", "--json", "--dir", spool, user=tenants.mallory)  # hers to remove, not alice's part
    assert [json.loads(line)["name"] for line in result.stdout.splitlines() if '"removed"' in line] == [
        f"{spool}/podipc.presence.spool.producer"
    ]
    assert pod.run(["test", "-f", part]).returncode == 0
