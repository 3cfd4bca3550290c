"""The transport descriptors: consistent with their classes, the source of the README's table, and
adding a transport is adding one module (a toy transport put on the package path is seen everywhere)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import podipc
import podipc.transports
from podipc import transport as transport_module
from podipc.address import parse_address
from podipc.cli import main
from podipc.doctor import examine
from podipc.presence import Presence
from podipc.transport import Transport, channel_table, schemes, transport_for, transports

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- channels:start", "<!-- channels:end -->"

TOY_TRANSPORT = '''\
"""toy:// - messages in a dict of this process: the whole of a transport, in one module."""

from __future__ import annotations

import collections

from podipc.consuming import Consumer

from podipc.options import Option, parse_count

from podipc.producing import Producer
from podipc.errors import EndOfStream, Timeout
from podipc.transport import AddressForm, Example, Transport, option_limit

BOXES: dict[str, collections.deque[bytes | None]] = collections.defaultdict(collections.deque)
OPTIONS = (Option("depth", parse_count, 8, "messages a box holds"),)


class ToyProducer(Producer):
    options = OPTIONS
    max_message_size = 1024

    def _send(self, view, deadline):
        BOXES[self.address.name].append(bytes(view))

    def _close(self, deadline):
        BOXES[self.address.name].append(None)

    def _abort(self):
        pass


class ToyConsumer(Consumer):
    options = OPTIONS
    max_message_size = 1024

    def _recv(self, deadline):
        box = BOXES[self.address.name]
        if not box:
            raise Timeout("the box is empty")
        message = box.popleft()
        if message is None:
            raise EndOfStream("the producer ended the stream")
        return message

    def _close(self):
        pass


TRANSPORT = Transport(
    name="toy",
    title="toy box",
    schemes={"toy": AddressForm.NAME},
    producer="podipc.transports.toy:ToyProducer",
    consumer="podipc.transports.toy:ToyConsumer",
    examples=(Example("toy:///box", "a box in this process", "for the test"),),
    reliable=True,
    ordered=True,
    limit=option_limit(1024),
    options=OPTIONS,
    capabilities=frozenset(),
    availability=lambda: None,
    rank=1000,
)
'''


@pytest.fixture
def toy_transport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Transport]:
    """A transport module written to a directory on podipc.transports' package path, and nothing else."""
    (tmp_path / "toy.py").write_text(TOY_TRANSPORT)
    monkeypatch.setattr(podipc.transports, "__path__", [*podipc.transports.__path__, str(tmp_path)])
    transports.cache_clear()
    try:
        yield transport_for("toy")
    finally:
        transports.cache_clear()
        sys.modules.pop("podipc.transports.toy", None)


def test_a_new_transport_module_is_all_it_takes_to_add_a_channel(toy_transport: Transport) -> None:
    assert schemes()[-1] == "toy"
    address = parse_address("toy:///inbox?depth=3")
    assert (address.scheme, address.name, address.options) == ("toy", "inbox", {"depth": "3"})
    with pytest.raises(podipc.AddressError, match="three slashes"):
        parse_address("toy://inbox")
    with pytest.raises(podipc.AddressError, match="did you mean 'toy'"):
        parse_address("tyo:///inbox")
    with podipc.producer("toy:///inbox", depth=3) as out:
        out.send(b"hello")
        out.send(b"")
    with podipc.consumer("toy:///inbox") as inbox:
        assert list(inbox) == [b"hello", b""]
    with pytest.raises(podipc.AddressError, match="known: depth, mode, wait"):
        podipc.producer("toy:///inbox?dpeth=3")


def test_a_new_transport_is_listed_judged_and_in_the_readme_table(toy_transport: Transport) -> None:
    listed = CliRunner().invoke(main, ["channels", "--json"])
    rows = {row["scheme"]: row for row in map(json.loads, listed.output.splitlines())}
    assert rows["toy"]["usable"] and rows["toy"]["max_message_size"] == 1024 and rows["toy"]["example"] == "toy:///box"
    verdict = next(verdict for verdict in examine().channels if verdict.scheme == "toy")
    assert verdict.usable and verdict.max_message_size == 1024
    assert "| `toy:///box` | a box in this process | yes | 1 KiB (option) | for the test |" in channel_table()


def test_readme_channel_table_is_the_one_the_descriptors_make() -> None:
    text = README.read_text()
    start = text.index("\n", text.index(TABLE_START)) + 1
    table = text[start : text.index(TABLE_END)]
    assert table == channel_table(), "README.md's channel table is stale: paste `podipc channels --markdown` there"


def test_channels_markdown_prints_the_readme_table() -> None:
    result = CliRunner().invoke(main, ["channels", "--markdown"])
    assert result.exit_code == 0 and result.output == channel_table()


@pytest.mark.parametrize("transport", transports(), ids=lambda transport: transport.name)
def test_descriptor_agrees_with_its_classes_and_examples(transport: Transport) -> None:
    producer, consumer = transport.producer_class(), transport.consumer_class()
    assert issubclass(producer, podipc.Producer) and issubclass(consumer, podipc.Consumer)
    assert producer.options == consumer.options == transport.options
    for scheme in transport.schemes:
        assert transport_for(scheme) is transport
        assert parse_address(transport.example_for(scheme)).scheme == scheme
    for example in transport.examples:
        assert parse_address(example.url).scheme in transport.schemes
    for kind in transport.objects:
        module_name, _, attribute = kind.remover.partition(":")
        assert callable(getattr(__import__(module_name, fromlist=[attribute]), attribute))
    assert transport.limit.host_default() > 0
    assert transport.unusable_fix and all(transport.fixes().values())


def test_every_way_to_be_unusable_has_its_fix() -> None:
    fixes = {transport.name: transport.fixes() for transport in transports()}
    assert fixes["zmq"]["unavailable here: the pyzmq package is not installed"] == "pip install 'podipc[zmq]'"
    assert "use a kernel with CONFIG_POSIX_MQUEUE" in fixes["posix_mq"].values()
    assert any("ulimit msgqueue" in fix for fix in fixes["posix_mq"].values())
    assert any("medium: Memory" in fix for fix in fixes["shm"].values())


def test_a_scheme_declared_twice_is_refused() -> None:
    tcp = transport_for("tcp")
    with pytest.raises(RuntimeError, match="'tcp' is declared by both tcp and tcp"):
        transport_module._check_unique_schemes([tcp, tcp])


def test_presence_records_and_clean_know_exactly_the_kinds_the_transports_declare(tmp_path: Path) -> None:
    declared = {kind.name for transport in transports() for kind in transport.objects}
    assert set(transport_module.object_kinds()) == declared | {"path"}
    assert {"posix_mq", "sysv_mq", "posix_shm", "posix_sem"} <= declared
    presence = Presence("token", "consumer", directory=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="kind must be one of"):
            presence.record("carrier_pigeon", "/coop")
    finally:
        presence.close()
