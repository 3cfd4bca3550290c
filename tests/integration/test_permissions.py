"""Permissions across users: objects are 0600 by default, never world-writable, and `mode=0660`
with a shared group lets two UIDs (two containers with different runAsUser) talk.

Each side runs in a forked child that drops root to its own UID (setgroups/setgid/setuid);
both share one GID, as a pod's containers do with runAsGroup/fsGroup. Directories the
channels use are 0770 root:GROUP, so only the channel's own objects decide.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import os
import shutil
import stat
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import sysv_ipc

import podipc
from podipc.address import parse_address
from podipc.presence import Presence
from podipc.transport import AddressForm, schemes, transport_for, transports

from .harness import ABSTRACT_SUFFIX, CONTEXT, INDEX, SOCKETS_ONLY, SideResult, leftovers, payload, wait_until

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching UIDs needs root"),
]

GROUP_ID = 4240
PRODUCER_UID, CONSUMER_UID = 4241, 4242
SIZES = [0, 1, 7, 100, 1000, 4000] * 20
FIX_WORDS = ("0660",)
GROUP_WORDS = ("fsGroup", "runAsGroup")


# From the transports' descriptors: a channel named by a path, a name or a key creates objects
# with `mode` (unix, mq, sysvmq, shm, file, zmq+ipc); one on a port creates none, but when it keeps
# presence files in /dev/shm to tell a dead peer (udp, zmq+tcp) those need mode=0660 across UIDs
# too. tcp and abstract unix sockets have no permissions at all.
def _on_a_port(scheme: str) -> bool:
    return transport_for(scheme).schemes[scheme] is AddressForm.HOST_PORT


PERMISSION_SCHEMES = tuple(scheme for scheme in schemes() if not _on_a_port(scheme))
PRESENCE_ONLY_SCHEMES = tuple(
    scheme for scheme in schemes() if _on_a_port(scheme) and transport_for(scheme).needs_dev_shm
)
NO_PERMISSION_SCHEMES = SOCKETS_ONLY
PORTS = itertools.count(19400 + (os.getpid() % 100) * 4)
NAMES = itertools.count()

# The channel modules are imported before forking, so that a child that dropped root
# needs no read access to anything new.
# (Python's own lazily imported codecs too: the interpreter may live where another UID cannot read.)
for _module in ["encodings.ascii", "encodings.latin_1"]:
    importlib.import_module(_module)
for _transport in transports():
    _transport.producer_class(), _transport.consumer_class()


@pytest.fixture
def shared_directory() -> Iterator[str]:
    """A short directory both UIDs can enter and write: 0770 root:GROUP_ID."""
    directory = tempfile.mkdtemp(prefix="pp", dir="/tmp")
    os.chown(directory, 0, GROUP_ID)
    os.chmod(directory, 0o770)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def url_of(scheme: str, directory: str, **options: object) -> str:
    """A fresh URL of `scheme` whose files (if any) live in `directory`."""
    unique = f"podipc-test-perm-{os.getpid()}-{next(NAMES)}"
    if scheme.endswith(ABSTRACT_SUFFIX):
        base = f"{scheme.removesuffix(ABSTRACT_SUFFIX)}://@{unique}"
    else:
        base = transport_for(scheme).fresh_url(
            scheme, unique, lambda: os.path.join(directory, "c"), lambda protocol: next(PORTS)
        )
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"{base}?{query}" if query else base


def become(uid: int) -> None:
    """Drop root for good: the shared group only, then the UID."""
    os.setgroups([GROUP_ID])
    os.setgid(GROUP_ID)
    os.setuid(uid)


def as_producer(uid: int, url: str, results: Any) -> None:
    """Send SIZES as `uid`; report a SideResult, any non-podipc exception as a 'Traceback'."""
    digest, count = hashlib.sha256(), 0
    try:
        become(uid)
        with podipc.producer(url) as channel:
            for index, size in enumerate(SIZES):
                message = payload(index, size)
                channel.send(message, timeout=20)
                digest.update(message)
                count += 1
            channel.close(20)
        results.put(SideResult(True, count, sum(SIZES), digest.hexdigest()))
    except podipc.PodIPCError as error:
        results.put(SideResult(False, count, 0, digest.hexdigest(), str(error), type(error).__name__))
    except BaseException:
        results.put(SideResult(False, count, 0, "", traceback.format_exc(), "Traceback"))


def as_consumer(uid: int, url: str, results: Any) -> None:
    """Receive to the end as `uid`; report a SideResult, any non-podipc exception as a 'Traceback'."""
    digest, count, total, out_of_order = hashlib.sha256(), 0, 0, 0
    try:
        become(uid)
        with podipc.consumer(url) as channel:
            while True:
                try:
                    message = channel.recv(20)
                except podipc.EndOfStream:
                    break
                if len(message) >= INDEX.size and INDEX.unpack_from(message)[0] < count:
                    out_of_order += 1
                digest.update(message)
                count += 1
                total += len(message)
        results.put(SideResult(True, count, total, digest.hexdigest(), out_of_order=out_of_order))
    except podipc.PodIPCError as error:
        results.put(SideResult(False, count, total, digest.hexdigest(), str(error), type(error).__name__))
    except BaseException:
        results.put(SideResult(False, count, total, "", traceback.format_exc(), "Traceback"))


def run_pair(url: str, visible: bool = True) -> tuple[SideResult, SideResult]:
    """Consumer (CONSUMER_UID) first, then producer (PRODUCER_UID) once the consumer's objects exist; both bounded
    in time.

    visible: the channel has objects to see (not tcp or abstract unix: there a short pause stands in). A fixed
    pause let a loaded machine start the producer after the consumer had given up waiting (wait=): the two never
    met, so neither could say it refused the other.
    """
    producer_results, consumer_results = CONTEXT.Queue(), CONTEXT.Queue()
    consumer = CONTEXT.Process(target=as_consumer, args=(CONSUMER_UID, url, consumer_results))
    producer = CONTEXT.Process(target=as_producer, args=(PRODUCER_UID, url, producer_results))
    consumer.start()
    if visible:
        wait_until(lambda: bool(leftovers(url)) or not consumer.is_alive(), 20)
    else:
        wait_until(lambda: False, 0.3)
    producer.start()
    try:
        produced = producer_results.get(timeout=40)
        consumed = consumer_results.get(timeout=40)
    finally:
        for process in (producer, consumer):
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    return produced, consumed


def assert_no_traceback(*sides: SideResult) -> None:
    for side in sides:
        assert side.error_type != "Traceback", side.error


def names_the_fix(message: str) -> bool:
    return all(word in message for word in FIX_WORDS) and any(word in message for word in GROUP_WORDS)


REFUSAL_CASES = [*PERMISSION_SCHEMES, *PRESENCE_ONLY_SCHEMES]


@pytest.mark.parametrize("scheme", REFUSAL_CASES)
def test_by_default_another_uid_is_refused_with_an_error_that_names_the_fix(scheme: str, shared_directory: str) -> None:
    url = url_of(scheme, shared_directory, wait=5)
    produced, consumed = run_pair(url)
    assert_no_traceback(produced, consumed)
    assert not produced.ok and not consumed.ok, (produced, consumed)
    assert produced.messages == 0 or consumed.messages == 0
    for side in (produced, consumed):
        assert side.error_type in ("ChannelUnavailable", "PeerTimeout", "PeerGone"), side
    refused = [side for side in (produced, consumed) if side.error_type == "ChannelUnavailable"]
    assert refused, f"neither side says it was refused: {produced.error!r} / {consumed.error!r}"
    for side in refused:
        assert names_the_fix(side.error), f"{scheme}: the refusal does not name the fix: {side.error!r}"
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


def hold_producer_presence(uid: int, url: str, seconds: float) -> None:
    """As `uid`, claim the producer's presence of `url` (as a producer does at open) and hold it `seconds`."""
    become(uid)
    presence = Presence(parse_address(url).token, "producer")
    time.sleep(seconds)
    presence.close()


# udp:// is not here: its consumer finds its producer by the HELLO's socket owner, not by a presence file, and
# ignores another user's HELLO (tests/hostile/test_udp_cotenant.py)
@pytest.mark.parametrize("scheme", ["mq", "sysvmq", "shm", "zmq+tcp", "zmq+ipc"])
def test_a_waiting_consumer_that_sees_another_uids_producer_says_it_refused_it_with_the_fix(
    scheme: str, shared_directory: str
) -> None:
    """The consumer's peer monitor meets the other UID's presence file: it reports that refusal, not a PeerGone that
    hides why (found as 'neither side says it was refused' in the test above)."""
    url = url_of(scheme, shared_directory, wait=30)
    consumer_results = CONTEXT.Queue()
    consumer = CONTEXT.Process(target=as_consumer, args=(CONSUMER_UID, url, consumer_results))
    consumer.start()
    opened = 1 if _on_a_port(scheme) else 2  # its presence, and its queue or segment or socket file
    assert wait_until(lambda: len(leftovers(url)) >= opened, 20), "the consumer never opened"
    producer = CONTEXT.Process(target=hold_producer_presence, args=(PRODUCER_UID, url, 5.0))
    producer.start()
    try:
        consumed = consumer_results.get(timeout=40)
    finally:
        for process in (producer, consumer):
            process.join(10)
    assert consumed.error_type == "ChannelUnavailable", consumed
    assert names_the_fix(consumed.error), consumed.error
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


@pytest.mark.parametrize("scheme", PERMISSION_SCHEMES + PRESENCE_ONLY_SCHEMES)
def test_mode_0660_with_a_shared_group_works_end_to_end_across_uids(scheme: str, shared_directory: str) -> None:
    url = url_of(scheme, shared_directory, mode="0660")
    produced, consumed = run_pair(url)
    assert_no_traceback(produced, consumed)
    assert produced.ok, produced.error
    assert consumed.ok, consumed.error
    if scheme != "udp":
        assert (consumed.messages, consumed.bytes, consumed.sha256) == (len(SIZES), sum(SIZES), produced.sha256)
    assert consumed.messages + consumed.lost == len(SIZES) and consumed.out_of_order == 0
    assert wait_until(lambda: not leftovers(url), 5), leftovers(url)


@pytest.mark.parametrize("scheme", NO_PERMISSION_SCHEMES)
def test_channels_without_filesystem_objects_work_across_uids_with_the_default_mode(
    scheme: str, shared_directory: str
) -> None:
    """tcp and abstract unix sockets have no permissions: any local UID may connect."""
    url = url_of(scheme, shared_directory)
    produced, consumed = run_pair(url, visible=False)
    assert_no_traceback(produced, consumed)
    assert produced.ok, produced.error
    assert consumed.ok, consumed.error
    assert (consumed.messages, consumed.sha256) == (len(SIZES), produced.sha256)


def open_and_list_modes(url: str) -> dict[str, tuple[int, bool]]:
    """Open both sides in this process and return the mode of every object they created."""
    address = parse_address(url)
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        producer.send(b"x", timeout=10)
        assert consumer.recv(timeout=10) == b"x"
        modes = {}
        paths = [path for path in leftovers(url) if path.startswith("/")]
        paths += [f"/dev/shm/{entry}" for entry in os.listdir("/dev/shm") if address.token in entry]
        if address.scheme == "file":
            paths.append(address.path)
        for path in set(paths):
            status = os.stat(path)
            modes[path] = (stat.S_IMODE(status.st_mode), stat.S_ISDIR(status.st_mode))
        if address.scheme == "sysvmq":
            modes[f"SysV queue {address.key:#x}"] = (sysv_ipc.MessageQueue(address.key).mode & 0o777, False)
        closing = threading.Thread(target=producer.close, args=(10,))
        closing.start()
        with pytest.raises(podipc.EndOfStream):
            consumer.recv(timeout=10)
        closing.join()
    return modes


@pytest.mark.parametrize("scheme", PERMISSION_SCHEMES + PRESENCE_ONLY_SCHEMES)
@pytest.mark.parametrize("mode", ["0600", "0660"])
def test_created_objects_have_the_mode_and_are_never_world_accessible(
    scheme: str, mode: str, shared_directory: str
) -> None:
    url = url_of(scheme, shared_directory) if mode == "0600" else url_of(scheme, shared_directory, mode=mode)
    modes = open_and_list_modes(url)
    assert modes, "no object found to check"
    for path, (found, is_directory) in modes.items():
        assert not found & 0o007, f"{path} is {found:04o}: world-accessible"
        if is_directory:
            assert found == int(mode, 8) | (int(mode, 8) & 0o444) >> 2, f"{path} is {found:04o}"
        else:
            assert found == int(mode, 8), f"{path} is {found:04o}, not {mode}"


def test_a_world_writable_mode_is_refused_with_the_fix() -> None:
    with pytest.raises(podipc.AddressError, match="0660"):
        podipc.consumer("mq:///podipc-test-perm-world?mode=0666")
