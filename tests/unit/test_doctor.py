"""podipc doctor: reading the mount table and capabilities, judging channels, the peer exchange, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import sysv_ipc
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from podipc import transport as transport_module
from podipc.cli import main
from podipc.doctor import JSON_SCHEMA, examine
from podipc.doctor.facts import (
    Limits,
    Mount,
    decode_capabilities,
    gather_facts,
    is_volume,
    namespace_ids,
    parse_mountinfo,
)
from podipc.doctor.peer import (
    Rendezvous,
    decide,
    decode_document,
    encode_document,
    find_peer,
    parse_rendezvous,
)
from podipc.doctor.server import DoctorServer
from podipc.doctor.verdict import check_url, judge_channel, judge_channels, unmet_requirements
from podipc.transport import DEV_SHM_FIX, Requirement, transport_for
from tests.commands import needs_system_tool

pytestmark = pytest.mark.timeout(60)

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=123k
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=1024k
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:27 / /dev/shm rw,nosuid - tmpfs shm rw,size=65536k
31 27 254:0 /var/lib/volumes/shared/_data /shared\\040dir rw,relatime - ext4 /dev/vda rw
32 27 0:40 / /spool ro,relatime shared:5 - tmpfs tmpfs ro,size=1024k
33 27 254:0 /etc/hosts /etc/hosts rw - ext4 /dev/vda rw
"""
PORT = 7193  # this file's rendezvous port (loopback of the test host) and /dev/shm/podipc-doctor-7193.json


def mount(path: str = "/dev/shm", **changes: object) -> Mount:
    """A Mount with plausible defaults."""
    values: dict[str, object] = {"path": path, "fstype": "tmpfs", "source": "shm", "device": "0:39", "root": "/",
                                 "read_only": False, "memory_backed": True, "size": 64 << 20, "free": 64 << 20}  # fmt: skip
    values.update(changes)
    return Mount(**values)  # type: ignore[arg-type]


def test_mountinfo_keeps_the_topmost_mount_and_unescapes_spaces() -> None:
    table = parse_mountinfo(MOUNTINFO)

    assert table["/dev/shm"]["device"] == "0:27" and table["/dev/shm"]["source"] == "shm"
    assert table["/shared dir"]["root"] == "/var/lib/volumes/shared/_data"
    assert table["/spool"]["fstype"] == "tmpfs" and table["/spool"]["options"].startswith("ro")


def test_volumes_exclude_what_every_container_has(tmp_path: Path) -> None:
    table = parse_mountinfo(MOUNTINFO.replace("/spool", str(tmp_path)))

    volumes = [path for path, entry in table.items() if is_volume(path, entry)]

    assert volumes == [str(tmp_path)]  # not /proc, /dev, /dev/shm, /, /etc/hosts; "/shared dir" does not exist here


def test_capabilities_of_the_container_default_set_are_named() -> None:
    names = decode_capabilities(0x00000000A80425FB)

    assert names == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
                     "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_CHROOT",
                     "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]  # fmt: skip
    assert decode_capabilities(1 << 45) == ["CAP_45"]
    assert decode_capabilities(0) == []


@pytest.mark.parametrize("mask", [0xA80425FB, 0x1FFFFFFFFFF, 1 << 21, 0x5555555555])
def test_capability_names_agree_with_capsh(mask: int) -> None:
    capsh = needs_system_tool("capsh", "libcap2-bin")
    decoded = subprocess.run([capsh, f"--decode={mask:#x}"], capture_output=True, text=True, check=True).stdout

    assert decode_capabilities(mask) == decoded.strip().split("=", 1)[1].upper().split(",")


def test_facts_of_this_process_match_proc() -> None:
    facts = gather_facts()

    assert facts.namespaces == namespace_ids()
    assert facts.namespaces["net"] == int(os.readlink("/proc/self/ns/net").split("[")[1].rstrip("]"))
    assert facts.identity.uid == os.geteuid()
    assert facts.limits.mqueue["msgsize_max"] == int(Path("/proc/sys/fs/mqueue/msgsize_max").read_text())
    assert facts.limits.sysv["msgmax"] == int(Path("/proc/sys/kernel/msgmax").read_text())
    assert facts.dev_shm is not None and facts.dev_shm.memory_backed


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7099", Rendezvous("127.0.0.1", 7099)), ("0.0.0.0:7100", Rendezvous("0.0.0.0", 7100)),
     ("[::1]:7101", Rendezvous("::1", 7101))],
)  # fmt: skip
def test_rendezvous_address_forms(text: str, expected: Rendezvous) -> None:
    assert parse_rendezvous(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "70999", "127.0.0.1:0", "a:b", "[::1]"])
def test_bad_rendezvous_address_says_the_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"\[HOST:\]PORT"):
        parse_rendezvous(text)


@given(st.binary(max_size=512))
def test_garbage_is_never_a_published_document(data: bytes) -> None:
    document = decode_document(data)

    assert document is None or (isinstance(document["token"], str) and isinstance(document["facts"], dict))


def test_published_document_round_trips() -> None:
    facts = gather_facts()

    document = decode_document(encode_document(facts, "abc"))

    assert document is not None and document["token"] == "abc"
    assert document["facts"]["namespaces"] == facts.namespaces


@pytest.mark.parametrize(
    ("mine", "peer", "proofs", "shared"),
    [(1, 1, [], True), (1, 2, [], False), (1, 2, ["reached"], False), (None, 2, ["reached"], True),
     (None, 2, [], False), (None, None, None, None)],
)  # fmt: skip
def test_ids_decide_and_effects_decide_where_ids_are_unknown(
    mine: int | None, peer: int | None, proofs: list[str] | None, shared: bool | None
) -> None:
    assert decide(mine, peer, proofs).shared is shared


def test_missing_dev_shm_makes_shm_unusable_with_the_emptydir_fix() -> None:
    facts = replace(gather_facts(), dev_shm=None)

    verdict = judge_channel("shm", facts)

    assert not verdict.usable and verdict.fix == DEV_SHM_FIX and "medium: Memory" in verdict.fix


def test_disk_backed_dev_shm_is_noted_with_the_fix() -> None:
    facts = replace(gather_facts(), dev_shm=mount(fstype="ext4", memory_backed=False))

    verdict = judge_channel("shm", facts)

    if not verdict.usable:
        pytest.skip(f"shm:// unusable here: {verdict.reason}")
    assert any("not memory" in note and "medium: Memory" in note for note in verdict.notes)


def test_small_rlimit_msgqueue_makes_mq_unusable_with_the_ulimit_fix() -> None:
    facts = gather_facts()
    facts = replace(facts, limits=replace(facts.limits, rlimit_msgqueue=1000))

    verdict = judge_channel("mq", facts)

    assert not verdict.usable
    assert "RLIMIT_MSGQUEUE" in verdict.reason and "ulimit msgqueue" in verdict.fix


def test_missing_mqueue_sysctls_say_the_kernel_lacks_posix_queues() -> None:
    facts = replace(gather_facts(), limits=Limits({"msg_max": None, "msgsize_max": None, "queues_max": None}, None,
                                                  {"msgmax": 8192, "msgmnb": 16384, "shmmax": 1}))  # fmt: skip
    verdict = judge_channel("mq", facts)

    assert not verdict.usable and verdict.max_message_size is None


def replace_transport(monkeypatch: pytest.MonkeyPatch, scheme: str, **changes: object) -> None:
    """Make the transport of `scheme` look different (changes to its descriptor) for one test."""
    changed = replace(transport_for(scheme), **changes)
    listed = tuple(changed if scheme in item.schemes else item for item in transport_module.transports())
    monkeypatch.setattr(transport_module, "transports", lambda: listed)


def test_a_transport_whose_check_breaks_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str | None:
        raise RuntimeError("not written yet")

    replace_transport(monkeypatch, "tcp", availability=broken)

    verdict = judge_channel("tcp", gather_facts())

    assert not verdict.usable
    assert verdict.reason == "tcp availability check failed: RuntimeError: not written yet"
    assert verdict.fix == "report it as a podipc bug"


def test_a_transport_missing_a_package_names_the_extra_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    replace_transport(monkeypatch, "tcp", requires=(Requirement("not_a_module_here", "not-a-package", "extra"),))

    verdict = judge_channel("tcp", gather_facts())

    assert not verdict.usable and verdict.max_message_size is None
    assert verdict.reason == "unavailable here: the not-a-package package is not installed"
    assert verdict.fix == "pip install 'podipc[extra]'"


def test_long_socket_path_asks_for_a_shorter_one() -> None:
    facts = gather_facts()
    url = "unix:///" + "d" * 120 + ".sock"

    check = check_url(url, facts, judge_channels(facts))

    assert not check.ok
    assert any("shorter" in problem for problem in check.problems)


def test_socket_path_on_the_containers_own_disk_asks_for_a_shared_volume(tmp_path: Path) -> None:
    facts = replace(gather_facts(), volumes=[mount(str(tmp_path / "shared"), fstype="ext4", memory_backed=False)])
    (tmp_path / "shared").mkdir()
    verdicts = judge_channels(facts)

    on_volume = check_url(f"file://{tmp_path}/shared/spool", facts, verdicts)
    off_volume = check_url(f"file://{tmp_path}/own/spool", facts, verdicts)

    assert not any("own filesystem" in problem for problem in on_volume.problems)
    assert any("own filesystem" in problem and "emptyDir" in problem for problem in off_volume.problems)


def test_requirements_name_unknown_and_unusable_schemes() -> None:
    facts = gather_facts()
    verdicts = judge_channels(facts)
    unusable = [verdict.scheme for verdict in verdicts if not verdict.usable]

    unmet = unmet_requirements(verdicts, ["nope", *unusable[:1]], [])

    assert unmet[0].startswith("nope: not a podipc scheme")
    assert len(unmet) == 1 + len(unusable[:1])


def test_server_and_peer_in_one_namespace_share_everything_and_leave_nothing() -> None:
    facts = gather_facts()
    rendezvous = Rendezvous("127.0.0.1", PORT)
    with DoctorServer(facts, rendezvous) as server:
        served = threading.Thread(target=server.serve, kwargs={"duration": 20, "once": True})
        served.start()
        report = find_peer(facts, rendezvous, wait=10)
        served.join(20)
        assert server.acknowledgements == 1
    assert report.found
    assert {kind for kind, sharing in report.namespaces.items() if sharing.shared} == set(report.namespaces)
    assert report.dev_shm.shared is True
    assert set(report.seen_via) >= {"dev_shm", "sysv_shm", "posix_mq", f"tcp {rendezvous}"}
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"podipc-doctor-{PORT}")]
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(rendezvous.sysv_key)


def test_stale_publication_of_a_killed_server_is_replaced(tmp_path: Path) -> None:
    facts = gather_facts()
    rendezvous = Rendezvous("127.0.0.1", PORT)
    stale = encode_document(facts, "stale-token")
    Path(rendezvous.dev_shm_file).write_bytes(stale)
    segment = sysv_ipc.SharedMemory(rendezvous.sysv_key, sysv_ipc.IPC_CREX, size=64)
    segment.detach()
    try:
        with DoctorServer(facts, rendezvous, (str(tmp_path),)) as server:
            assert Path(rendezvous.dev_shm_file).read_bytes() == server.document
            assert set(server.published.values()) == {"ok"}, server.published
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rendezvous.dev_shm_file)
        with contextlib.suppress(sysv_ipc.ExistentialError):
            sysv_ipc.SharedMemory(rendezvous.sysv_key).remove()
    assert not os.path.exists(rendezvous.dev_shm_file)
    assert list(tmp_path.iterdir()) == []


def test_peer_ignores_garbage_where_the_server_would_publish(tmp_path: Path) -> None:
    rendezvous = Rendezvous("127.0.0.1", PORT)
    (tmp_path / f"podipc-doctor-{PORT}.json").write_bytes(b"\xff{not json" * 100)
    started = time.monotonic()

    report = find_peer(gather_facts(), rendezvous, (str(tmp_path),), wait=0.3)

    assert not report.found and time.monotonic() - started < 5
    assert "share none of these" in report.problems[0]


def test_json_report_follows_the_documented_schema() -> None:
    result = CliRunner().invoke(main, ["doctor", "--json", "--url", "unix:///tmp/podipc-doctor.sock"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    jsonschema.validate(document, JSON_SCHEMA)
    assert document["urls"][0]["url"] == "unix:///tmp/podipc-doctor.sock"
    assert [channel["scheme"] for channel in document["channels"]][:3] == ["tcp", "udp", "unix"]


def test_podipc_url_from_the_environment_is_checked_too() -> None:
    result = CliRunner().invoke(main, ["doctor", "--json"], env={"PODIPC_URL": "unix:///" + "x" * 120})

    assert [check["url"] for check in json.loads(result.output)["urls"]] == ["unix:///" + "x" * 120]


def test_require_of_an_unusable_channel_exits_3_and_says_why() -> None:
    result = CliRunner().invoke(main, ["doctor", "--require", "carrier-pigeon"])

    assert result.exit_code == 3
    assert "carrier-pigeon: not a podipc scheme" in result.output


def test_require_of_usable_channels_exits_0() -> None:
    usable = [verdict.scheme for verdict in examine().channels if verdict.usable]

    result = CliRunner().invoke(main, ["doctor", *(f"--require={scheme}" for scheme in usable)])

    assert result.exit_code == 0, result.output
    assert "required channels usable" in result.output


def test_serve_and_peer_together_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["doctor", "--serve", "--peer"])

    assert result.exit_code == 2 and "exclude each other" in result.output
