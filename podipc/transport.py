"""What a transport is and can do, declared once: the descriptor every transport module exports.

Each module (or package) under podipc/transports/ defines one module-level
`TRANSPORT = Transport(...)`. Everything else reads these descriptors: the scheme
registry (`podipc.producer`/`consumer`), URL parsing, `podipc channels`, `doctor`,
`clean`, `bench` and the README's channel table. Nothing lists transports by hand, so
adding a transport is adding one module.

A descriptor module imports only the standard library, podipc's core and the packages
of the base install (posix_ipc, sysv_ipc). A transport that needs an optional package
(pyzmq) names it in `requires` and keeps that import in the module its endpoint classes
live in, which is loaded only when a producer or consumer of that transport is opened.
A missing optional package makes the transport "unavailable here: pip install
'podipc[zmq]'", never an ImportError.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from podipc.errors import AddressError, ChannelUnavailable

if TYPE_CHECKING:
    from podipc.channel import Consumer, Option, Producer

TRANSPORTS_PACKAGE = "podipc.transports"
DESCRIPTOR_NAME = "TRANSPORT"


class AddressForm(enum.Enum):
    """How the part of a URL after `SCHEME://` names a channel."""

    HOST_PORT = "HOST:PORT"
    """tcp://127.0.0.1:7000: an IP address (or localhost) and a port."""
    PATH = "/absolute/path"
    """unix:///shared/podipc.sock: an absolute path, usually on a shared volume."""
    PATH_OR_ABSTRACT = "/absolute/path or @name"
    """unix://@name as well as unix:///path: an abstract socket name after '@'."""
    NAME = "/name"
    """mq:///name: one name (A-Z a-z 0-9 . _ -) after three slashes."""
    SYSV_KEY = "KEY"
    """sysvmq://KEY: a number (decimal or 0x hex) or a name hashed to one."""


class Capability(enum.Enum):
    """Something a transport can do (or needs) that callers may ask about."""

    ZERO_COPY_RECEIVE = "zero-copy receive"
    """recv_view() hands out the channel's own buffer without copying."""
    ZERO_COPY_SEND = "zero-copy send"
    """loan()/commit() write a message in place."""
    RESUMABLE = "resumable"
    """A restarted producer or consumer continues the same stream."""
    SHARED_VOLUME = "needs a shared volume"
    """The address is a path on a volume both containers mount (an emptyDir)."""
    PRESENCE_FILES = "presence files in /dev/shm"
    """Peer liveness comes from podipc.presence files, so /dev/shm must be shared."""
    READINESS_FD = "readiness fd"
    """Endpoints expose fileno() for selectors and event loops."""


@dataclass(frozen=True)
class Requirement:
    """A Python package a transport needs beyond the base install."""

    module: str
    """The import name, e.g. 'zmq'."""
    distribution: str
    """The name on PyPI, e.g. 'pyzmq'."""
    extra: str
    """The podipc extra that installs it, e.g. 'zmq' (pip install 'podipc[zmq]')."""

    def missing(self) -> bool:
        """True when the package cannot be imported here."""
        return importlib.util.find_spec(self.module) is None

    def install_hint(self) -> str:
        """How to install it."""
        return f"pip install 'podipc[{self.extra}]' (the {self.distribution} package)"


@dataclass(frozen=True)
class MessageLimit:
    """The largest message a transport carries with default options here, and where that comes from."""

    host_default: Callable[[], int]
    """Bytes, read now (e.g. from /proc/sys/fs/mqueue/msgsize_max)."""
    source: str
    """Where the limit comes from, as MessageTooLarge and doctor say it."""
    fix: str
    """How to carry larger messages."""
    summary: str
    """The README table's words for it, e.g. '`fs.mqueue.msgsize_max` (8192 in a pod)'."""


@dataclass(frozen=True)
class Example:
    """One URL form of a transport, as a row of the README's channel table."""

    url: str
    channel: str
    """What it is in a few words, e.g. 'abstract Unix socket'."""
    notes: str = ""


@dataclass(frozen=True)
class Transport:
    """Everything podipc knows about one transport, declared by its module as TRANSPORT."""

    name: str
    """Short identifier, e.g. 'posix_mq'."""
    title: str
    """Human name, e.g. 'POSIX message queue'."""
    schemes: tuple[str, ...]
    address_form: AddressForm
    producer: str
    """The producer class as 'module:Class', imported only when used."""
    consumer: str
    """The consumer class as 'module:Class'."""
    examples: tuple[Example, ...]
    reliable: bool
    ordered: bool
    limit: MessageLimit
    options: tuple[Option, ...]
    """The options this transport takes besides the common ones (wait, mode)."""
    capabilities: frozenset[Capability]
    availability: Callable[[], str | None]
    """None when usable here, else why not and the fix (never raises for a missing facility)."""
    objects: tuple[str, ...] = ()
    """Kinds of objects it creates that `podipc clean` may have to remove (podipc.presence.OBJECT_KINDS)."""
    requires: tuple[Requirement, ...] = ()
    fixes: Mapping[str, str] = field(default_factory=dict)
    """Ways it can be unavailable (a short key) -> the change that fixes it, for doctor."""
    reliability_note: str = ""
    """For an unreliable transport, what may happen to messages (the README says it)."""
    rank: int = 100
    """Order in listings and the README (lower first)."""

    def missing_requirement(self) -> Requirement | None:
        """The first required package that is not installed here, or None."""
        for requirement in self.requires:
            if requirement.missing():
                return requirement
        return None

    def problem(self) -> str | None:
        """None when usable here, else why not with the fix; never raises."""
        requirement = self.missing_requirement()
        if requirement is not None:
            return f"unavailable here: {requirement.install_hint()}"
        try:
            return self.availability()
        except ChannelUnavailable as exc:
            return str(exc)

    def producer_class(self) -> type[Producer]:
        """Import and return the producer class; ChannelUnavailable naming the extra when a package is missing."""
        cls: type[Producer] = self._load(self.producer)
        return cls

    def consumer_class(self) -> type[Consumer]:
        """Import and return the consumer class; ChannelUnavailable naming the extra when a package is missing."""
        cls: type[Consumer] = self._load(self.consumer)
        return cls

    def has(self, capability: Capability) -> bool:
        """True when this transport has `capability`."""
        return capability in self.capabilities

    def _load(self, reference: str) -> Any:
        requirement = self.missing_requirement()
        if requirement is not None:
            raise ChannelUnavailable(f"{self.schemes[0]}:// is unavailable here: {requirement.install_hint()}")
        module_name, _, attribute = reference.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


@functools.cache
def transports() -> tuple[Transport, ...]:
    """Every transport podipc has, in listing order (discovered in podipc/transports/)."""
    package = importlib.import_module(TRANSPORTS_PACKAGE)
    found: list[Transport] = []
    for module_info in pkgutil.iter_modules(package.__path__, f"{TRANSPORTS_PACKAGE}."):
        if module_info.name.rsplit(".", 1)[1].startswith("_"):
            continue
        module = importlib.import_module(module_info.name)
        descriptor = getattr(module, DESCRIPTOR_NAME, None)
        if isinstance(descriptor, Transport):
            found.append(descriptor)
    found.sort(key=lambda transport: (transport.rank, transport.name))
    _check_unique_schemes(found)
    return tuple(found)


def _check_unique_schemes(found: list[Transport]) -> None:
    seen: dict[str, str] = {}
    for transport in found:
        for scheme in transport.schemes:
            if scheme in seen:
                raise RuntimeError(f"scheme {scheme!r} is declared by both {seen[scheme]} and {transport.name}")
            seen[scheme] = transport.name


def schemes() -> tuple[str, ...]:
    """Every URL scheme, in listing order."""
    return tuple(scheme for transport in transports() for scheme in transport.schemes)


def transport_for(scheme: str) -> Transport:
    """The transport of a URL scheme; AddressError (with a suggestion) for an unknown one."""
    for transport in transports():
        if scheme in transport.schemes:
            return transport
    from podipc.address import suggest

    known = schemes()
    raise AddressError(f"unknown scheme {scheme!r}{suggest(scheme, known)}; known: {', '.join(known)}")
