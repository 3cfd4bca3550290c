"""zmq+tcp:// and zmq+ipc:// - ZeroMQ PAIR sockets (fan-in: ROUTER and DEALER): the descriptor, importable without pyzmq.

The endpoints, their semantics and wire protocol are in podipc.transports.zmq.endpoints (a pair)
and podipc.transports.zmq.fanin (pattern=fanin), which import pyzmq and are loaded only when a
zmq channel is opened. Without pyzmq the
transport is "unavailable here: pip install 'podipc[zmq]'", never an ImportError.
"""

from __future__ import annotations

from podipc.options import Option, parse_count, parse_size
from podipc.stream import NAME_OPTION, PATTERN_OPTION, PRODUCERS_OPTION
from podipc.transport import (
    PATH_OBJECT,
    AddressForm,
    Capability,
    Example,
    Requirement,
    Transport,
    option_limit,
)

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_HIGH_WATER_MARK = 1000
LIMIT_SOURCE = "the zmq max_message_size option"
LIMIT_FIX = "raise it on both sides, e.g. ?max_message_size=256MiB"

OPTIONS = (
    Option("hwm", parse_count, DEFAULT_HIGH_WATER_MARK, "messages queued per direction before send blocks"),
    Option("max_message_size", parse_size, DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes (ZMQ_MAXMSGSIZE)"),
    PATTERN_OPTION,
    PRODUCERS_OPTION,
    NAME_OPTION,
)


def availability() -> str | None:
    """None when libzmq's ipc transport is usable here, else why not and the fix (needs pyzmq installed)."""
    import zmq

    if not zmq.has("ipc"):
        return f"libzmq {zmq.zmq_version()} lacks the ipc transport: zmq+ipc:// cannot work; use zmq+tcp://"
    return None


def host_max_message_size() -> int:
    """The default largest message: the max_message_size option's default (64 MiB)."""
    return DEFAULT_MAX_MESSAGE_SIZE


TRANSPORT = Transport(
    name="zmq",
    title="ZeroMQ PAIR sockets",
    schemes={"zmq+tcp": AddressForm.HOST_PORT, "zmq+ipc": AddressForm.SOCKET_PATH},
    producer="podipc.transports.zmq.endpoints:ZMQProducer",
    consumer="podipc.transports.zmq.endpoints:ZMQConsumer",
    fanin_consumer="podipc.transports.zmq.fanin:ZMQFanInConsumer",
    fanin_producer="podipc.transports.zmq.fanin:ZMQFanInProducer",
    examples=(
        Example("zmq+tcp://127.0.0.1:7002", "ZeroMQ (pyzmq) over TCP"),
        Example("zmq+ipc:///shared/zmq.sock", "ZeroMQ (pyzmq) over a socket file on an emptyDir"),
    ),
    reliable=True,
    ordered=True,
    limit=option_limit(DEFAULT_MAX_MESSAGE_SIZE, LIMIT_SOURCE, LIMIT_FIX),
    options=OPTIONS,
    capabilities=frozenset({Capability.PRESENCE_FILES}),
    availability=availability,
    unusable_fix="install a pyzmq built with a libzmq that has the ipc transport, or use zmq+tcp://",
    objects=(PATH_OBJECT,),
    channel_objects=lambda address: (("path", address.path),) if address.scheme == "zmq+ipc" else (),
    requires=(Requirement(module="zmq", distribution="pyzmq", extra="zmq"),),
    rank=80,
)
