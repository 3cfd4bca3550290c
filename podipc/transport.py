"""What a transport is and can do, declared once: the descriptor every transport module exports.

Each module (or package) under podipc/transports/ defines one module-level
`TRANSPORT = Transport(...)`. Everything else reads these descriptors: the scheme
registry (`podipc.producer`/`consumer`), URL parsing, `podipc channels`, `doctor`,
`clean`, `bench` and the README's channel table. Nothing lists transports by hand, so
adding a transport is adding one module (README.md, "Development", shows one).

A descriptor module imports only the standard library, podipc's core and the packages
of the base install (posix_ipc, sysv_ipc). A transport that needs an optional package
(pyzmq) names it in `requires` and keeps that import in the module its endpoint classes
live in, which is loaded only when a producer or consumer of that transport is opened.
A missing optional package makes the transport "unavailable here: pip install
'podipc[zmq]'", never an ImportError.

Every way a transport can be unusable here has its fix in the descriptor
(`Transport.fixes()`): a missing package (`requires`), a kernel without the facility
(`kernel`), no writable /dev/shm (the PRESENCE_FILES and DATA_IN_DEV_SHM capabilities:
DEV_SHM_FIX), and whatever its own availability probe finds (`unusable_fix`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from podipc.errors import AddressError, ChannelUnavailable
from podipc.tables import markdown_table, size_label

if TYPE_CHECKING:
    from podipc.address import Address
    from podipc.consuming import Consumer
    from podipc.options import Option
    from podipc.ownership import Owner
    from podipc.producing import Producer

TRANSPORTS_PACKAGE = "podipc.transports"
DESCRIPTOR_NAME = "TRANSPORT"
DEV_SHM_FIX = "mount an emptyDir with medium: Memory at /dev/shm and a sizeLimit (e.g. 256Mi) in every container"
"""The fix when /dev/shm is missing, read-only or too small (the pod's containers share it through an emptyDir)."""
UNSPECIFIED_FIX = "as the reason says (the channel names its fix)"
OPTION_LIMIT_SOURCE = "the channel's max_message_size option"
OPTION_LIMIT_FIX = "raise the max_message_size option on both sides"
LOOPBACK = "127.0.0.1"


class AddressForm(enum.Enum):
    """How the part of a URL after `SCHEME://` names a channel (podipc.address parses each form)."""

    HOST_PORT = "HOST:PORT"
    """tcp://127.0.0.1:7000: an IP address (or localhost) and a port."""
    DIRECTORY = "/absolute/directory"
    """file:///shared/spool: an absolute directory path, on a volume both containers mount."""
    SOCKET_PATH = "/absolute/path.sock"
    """zmq+ipc:///shared/zmq.sock: the absolute path of a socket file (at most 107 bytes), on a shared volume."""
    SOCKET_PATH_OR_ABSTRACT = "/absolute/path.sock or @name"
    """unix:///shared/podipc.sock as SOCKET_PATH, or unix://@name: an abstract socket (no file, no volume)."""
    NAME = "/name"
    """mq:///name: one name (A-Z a-z 0-9 . _ -) after three slashes."""
    SYSV_KEY = "KEY"
    """sysvmq://KEY: a number (decimal or 0x hex) or a name hashed to one."""

    @property
    def names_path(self) -> bool:
        """True when the address is a path, which both containers must see: on a shared volume."""
        return self in (AddressForm.DIRECTORY, AddressForm.SOCKET_PATH, AddressForm.SOCKET_PATH_OR_ABSTRACT)

    @property
    def names_socket_file(self) -> bool:
        """True when the path is a socket file's (bounded by sun_path; its directory is what is shared)."""
        return self in (AddressForm.SOCKET_PATH, AddressForm.SOCKET_PATH_OR_ABSTRACT)


class Capability(enum.Enum):
    """Something a transport can do (or needs) that callers may ask about."""

    ZERO_COPY_RECEIVE = "zero-copy receive"
    """recv_view() always hands out the channel's own buffer without copying."""
    ZERO_COPY_SEND = "zero-copy send"
    """loan()/commit() write a message in place."""
    RESUMABLE = "resumable"
    """A restarted producer or consumer continues the same stream."""
    PRESENCE_FILES = "presence files in /dev/shm"
    """Peer liveness comes from podipc.presence files in /dev/shm, so it must be shared and writable."""
    DATA_IN_DEV_SHM = "messages in /dev/shm"
    """Messages live in /dev/shm: memory-backed is fast, and its size bounds the largest message."""
    READINESS_FD = "readiness fd"
    """Endpoints expose fileno() for selectors and event loops from a descriptor of the kernel object or the transport (no helper thread per message)."""


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
        try:
            return importlib.util.find_spec(self.module) is None
        except (ImportError, ValueError):
            return True

    def install_hint(self) -> str:
        """The command that installs it."""
        return f"pip install 'podipc[{self.extra}]'"

    def reason(self) -> str:
        """Why the transport is unusable while the package is missing."""
        return f"unavailable here: the {self.distribution} package is not installed"


@dataclass(frozen=True)
class KernelFacility:
    """A kernel facility a transport needs, known to be there by a file in /proc/sys."""

    name: str
    """What it is, e.g. 'POSIX message queues'."""
    sysctl: str
    """A /proc/sys file that exists exactly when the kernel has it, e.g. /proc/sys/fs/mqueue/msgsize_max."""
    config: str
    """The kernel option that provides it, e.g. CONFIG_POSIX_MQUEUE."""

    def reason(self) -> str:
        """Why the transport is unusable without it."""
        return f"no {self.name} here ({self.sysctl} is missing)"

    def fix(self) -> str:
        """How to get it."""
        return f"use a kernel with {self.config}"


@dataclass(frozen=True)
class ResourceLimit:
    """A per-user resource limit (getrlimit) that one channel with default options must fit in."""

    resource: str
    """Its name in the resource module, e.g. 'RLIMIT_MSGQUEUE'."""
    needed: Callable[[], tuple[int, str]]
    """What one default channel takes here: (bytes, how that is counted, e.g. 'one full queue (10 x 8192 bytes)')."""
    fix: str

    def problem(self, allowed: int | None) -> str | None:
        """Why a default channel does not fit when this limit is `allowed` (None: unlimited), else None."""
        needed, counted = self.needed()
        if allowed is None or allowed >= needed:
            return None
        return f"{self.resource} {allowed} bytes < {counted}"


@dataclass(frozen=True)
class ObjectKind:
    """A kind of object a transport creates, as its presence record names it, and how `podipc clean` removes one."""

    name: str
    """The KIND word of presence records (podipc.presence.Presence.record), e.g. 'posix_mq'."""
    description: str
    """What it is, e.g. 'POSIX message queue'."""
    remover: str
    """'module:function' taking the recorded name; raises FileNotFoundError (or the IPC package's
    ExistentialError) when the object is already gone. Imported only when something is removed."""
    owner: str = ""
    """'module:function' taking the recorded name and returning its podipc.ownership.Owner, None when
    it is gone (podipc clean removes only objects still ours). '': a file, which clean itself lstats."""

    def remove(self, name: str) -> None:
        """Remove one object of this kind by its recorded name."""
        module_name, _, attribute = self.remover.partition(":")
        getattr(importlib.import_module(module_name), attribute)(name)

    def owner_of(self, name: str) -> Owner | None:
        """Who owns the object of this kind named `name` now (None: it is gone); raises OSError or the
        IPC package's error when it cannot be told (e.g. we may not open it)."""
        module_name, _, attribute = self.owner.partition(":")
        owner: Owner | None = getattr(importlib.import_module(module_name), attribute)(name)
        return owner


def remove_path(path: str) -> None:
    """Remove a file (a socket file, a presence file, a temporary); a directory is left alone."""
    with contextlib.suppress(IsADirectoryError):
        os.unlink(path)


def no_objects(address: Address) -> tuple[tuple[str, str], ...]:
    """The channel_objects of a transport that creates none."""
    return ()


PATH_OBJECT = ObjectKind("path", "file", "podipc.transport:remove_path")
"""A file at an absolute path: socket files, and the presence files and temporaries clean itself finds."""


@dataclass(frozen=True)
class Temporaries:
    """Files a dead side may leave in its channel's directory that are never messages (clean removes them)."""

    presence_token: str
    """The token of the presence files this transport keeps in the channel's directory."""
    role: str
    """The role whose death leaves them."""
    prefix: str
    """Their names start with this."""


@dataclass(frozen=True)
class MessageLimit:
    """The largest message a transport carries with default options here, and where that comes from."""

    host_default: Callable[[], int]
    """Bytes, read now (e.g. from /proc/sys/fs/mqueue/msgsize_max)."""
    source: str
    """Where the limit comes from, as doctor says it."""
    fix: str
    """How to carry larger messages."""
    summary: str
    """The README table's words for it, e.g. '`fs.mqueue.msgsize_max` (8192 in a pod)'."""


def option_limit(default: int, source: str = OPTION_LIMIT_SOURCE, fix: str = OPTION_LIMIT_FIX) -> MessageLimit:
    """The limit of a transport whose largest message is its own max_message_size option (default in bytes)."""
    return MessageLimit(lambda: default, source, fix, f"{size_label(default)} (option)")


@dataclass(frozen=True)
class Example:
    """One URL form of a transport, as a row of the README's channel table."""

    url: str
    channel: str
    """What it is in a few words, e.g. 'abstract Unix socket'."""
    notes: str = ""


@dataclass(frozen=True, eq=False)
class Transport:
    """Everything podipc knows about one transport, declared by its module as TRANSPORT."""

    name: str
    """Short identifier, e.g. 'posix_mq'."""
    title: str
    """Human name, e.g. 'POSIX message queue'."""
    schemes: Mapping[str, AddressForm]
    """Its URL schemes, in listing order, each with its address form (zmq+tcp is HOST:PORT, zmq+ipc a path)."""
    producer: str
    """The producer class as 'module:Class', imported only when used."""
    consumer: str
    """The consumer class as 'module:Class'."""
    examples: tuple[Example, ...]
    """At least one per scheme; the first of a scheme is the one `podipc channels` shows."""
    reliable: bool
    ordered: bool
    limit: MessageLimit
    options: tuple[Option, ...]
    """The options this transport takes besides the common ones (wait, mode)."""
    capabilities: frozenset[Capability]
    availability: Callable[[], str | None]
    """None when usable here, else why not (and usually the fix); run only when `requires` are installed."""
    unusable_fix: str = UNSPECIFIED_FIX
    """The change that makes it usable when `availability` reports a problem."""
    objects: tuple[ObjectKind, ...] = ()
    """What it creates that a SIGKILLed side leaves behind, and how `podipc clean` removes it."""
    channel_objects: Callable[[Address], tuple[tuple[str, str], ...]] = no_objects
    """The (kind, name) of every object a side of the channel at this address creates (kinds from
    `objects`): all that `podipc clean` may remove for that channel, whatever a record names."""
    temporaries: Temporaries | None = None
    requires: tuple[Requirement, ...] = ()
    kernel: KernelFacility | None = None
    resource_limits: tuple[ResourceLimit, ...] = ()
    reliability_note: str = ""
    """For an unreliable transport, what may happen to messages (the README says it)."""
    port_protocol: str = "tcp"
    """For HOST:PORT schemes: the protocol of the port the consumer binds ('tcp' or 'udp')."""
    rank: int = 100
    """Order in listings and the README (lower first)."""
    fanin_consumer: str = ""
    """The consumer class of pattern=fanin (many named producers into one consumer) as 'module:Class';
    '' when the transport has none (it must then not declare the pattern option, unless `work_queue`)."""
    fanin_producer: str = ""
    """The producer class of a fan-in producer (name= or pattern=fanin) as 'module:Class', when it is not the
    transport's producer (the kernel queues tag their messages, podipc.queue_fanin)."""
    broadcast_producer: str = ""
    """The producer class of pattern=broadcast over a stream (one producer, N subscribers) as 'module:Class';
    '' when the transport has none (shm:// dispatches its own broadcast ring in its endpoint classes)."""
    broadcast_subscriber: str = ""
    """The subscriber (consumer) class of that pattern=broadcast, as 'module:Class'."""
    work_queue: bool = False
    """True when its endpoints take pattern=queue: one producer, many consumers sharing one queue
    (podipc.work_queue); they then declare the pattern option (pair or queue)."""

    def missing_requirement(self) -> Requirement | None:
        """The first required package that is not installed here, or None."""
        for requirement in self.requires:
            if requirement.missing():
                return requirement
        return None

    def problem(self) -> str | None:
        """None when usable here, else why not with the fix; never raises for a missing package or facility."""
        requirement = self.missing_requirement()
        if requirement is not None:
            return f"{requirement.reason()}: {requirement.install_hint()}"
        try:
            return self.availability()
        except ChannelUnavailable as exc:
            return str(exc)
        except Exception as exc:  # a broken check must not break a listing: report it
            return f"{self.name} availability check failed: {type(exc).__name__}: {exc}; report it as a podipc bug"

    def fixes(self) -> dict[str, str]:
        """Every way this transport can be unusable here -> the change that fixes it."""
        found = {requirement.reason(): requirement.install_hint() for requirement in self.requires}
        if self.kernel is not None:
            found[self.kernel.reason()] = self.kernel.fix()
        for limit in self.resource_limits:
            found[f"{limit.resource} is too small for one channel"] = limit.fix
        if self.needs_dev_shm:
            found["/dev/shm is missing, read-only or full"] = DEV_SHM_FIX
        found["its availability check fails"] = self.unusable_fix
        return found

    @property
    def needs_dev_shm(self) -> bool:
        """True when it cannot work without a writable /dev/shm shared by the pod's containers."""
        return bool(self.capabilities & {Capability.PRESENCE_FILES, Capability.DATA_IN_DEV_SHM})

    def has(self, capability: Capability) -> bool:
        """True when this transport has `capability`."""
        return capability in self.capabilities

    def example_for(self, scheme: str) -> str:
        """The example URL of one of its schemes."""
        return next(example.url for example in self.examples if example.url.startswith(f"{scheme}://"))

    def producer_class(self) -> type[Producer]:
        """Import and return the producer class; ChannelUnavailable naming the extra when a package is missing."""
        cls: type[Producer] = self._load(self.producer)
        return cls

    def consumer_class(self) -> type[Consumer]:
        """Import and return the consumer class; ChannelUnavailable naming the extra when a package is missing."""
        cls: type[Consumer] = self._load(self.consumer)
        return cls

    def fresh_url(
        self, scheme: str, name: str, path: Callable[[], str], free_port: Callable[[str], int] | None = None
    ) -> str:
        """A URL of `scheme` for a new channel: a name (a-z 0-9 . _ -), a path made by `path()`, or a loopback
        port from `free_port(port_protocol)`, as the scheme's address form needs."""
        form = self.schemes[scheme]
        if form is AddressForm.HOST_PORT:
            if free_port is None:
                raise ValueError(f"{scheme}:// needs a port: pass free_port")
            return f"{scheme}://{LOOPBACK}:{free_port(self.port_protocol)}"
        if form.names_path:
            return f"{scheme}://{path()}"
        if form is AddressForm.NAME:
            return f"{scheme}:///{name}"
        return f"{scheme}://{name}"

    def fanin_consumer_class(self) -> type[Consumer]:
        """Import and return the consumer class of pattern=fanin; AddressError naming the transports that have one."""
        if not self.fanin_consumer:
            raise AddressError(
                f"pattern=fanin (many producers into one consumer) is not supported by "
                f"{', '.join(s + '://' for s in self.schemes)}; it is by {', '.join(fanin_schemes())}"
            )
        cls: type[Consumer] = self._load(self.fanin_consumer)
        return cls

    def fanin_producer_class(self) -> type[Producer]:
        """Import and return the producer class of a fan-in producer (the transport's producer when it has none)."""
        if not self.fanin_producer:
            return self.producer_class()
        cls: type[Producer] = self._load(self.fanin_producer)
        return cls

    def broadcast_class(self, role: str) -> type[Producer] | type[Consumer] | None:
        """The broadcast producer (role 'producer') or subscriber class, imported; None when declared nowhere."""
        reference = self.broadcast_producer if role == "producer" else self.broadcast_subscriber
        return self._load(reference) if reference else None

    def _load(self, reference: str) -> Any:
        what = f"{self.title} ({', '.join(f'{scheme}://' for scheme in self.schemes)})"
        requirement = self.missing_requirement()
        if requirement is not None:
            raise ChannelUnavailable(f"{what}: {requirement.reason()}: {requirement.install_hint()}")
        module_name, _, attribute = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            for needed in self.requires:
                if (exc.name or "").split(".")[0] == needed.module:
                    raise ChannelUnavailable(
                        f"{what}: cannot load {needed.distribution} ({exc}): {needed.install_hint()}"
                    ) from exc
            raise
        return getattr(module, attribute)


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


def fanin_schemes() -> tuple[str, ...]:
    """Every URL scheme whose transport has a fan-in consumer (pattern=fanin), as 'scheme://'."""
    return tuple(
        f"{scheme}://" for transport in transports() if transport.fanin_consumer for scheme in transport.schemes
    )


def work_queue_schemes() -> tuple[str, ...]:
    """Every URL scheme whose transport has the work-queue pattern (pattern=queue), as 'scheme://'."""
    return tuple(f"{scheme}://" for transport in transports() if transport.work_queue for scheme in transport.schemes)


def find_transport(scheme: str) -> Transport | None:
    """The transport of a URL scheme, or None when no transport declares it."""
    for transport in transports():
        if scheme in transport.schemes:
            return transport
    return None


def transport_for(scheme: str) -> Transport:
    """The transport of a URL scheme; AddressError (with a suggestion) for an unknown one."""
    transport = find_transport(scheme)
    if transport is not None:
        return transport
    from podipc.address import suggest

    known = schemes()
    raise AddressError(f"unknown scheme {scheme!r}{suggest(scheme, known)}; known: {', '.join(known)}")


def object_kinds() -> dict[str, ObjectKind]:
    """Every kind of object a presence record may name (the transports' and PATH_OBJECT), by name."""
    kinds = {PATH_OBJECT.name: PATH_OBJECT}
    for transport in transports():
        for kind in transport.objects:
            if kinds.setdefault(kind.name, kind) != kind:
                raise RuntimeError(f"object kind {kind.name!r} is declared twice, differently ({transport.name})")
    return kinds


# --- the README's channel table ----------------------------------------------------------

TABLE_COLUMNS = ("URL", "channel", "reliable", "largest message here", "notes")


def _reliability(transport: Transport) -> str:
    if not transport.reliable:
        return f"**no**: {transport.reliability_note}" if transport.reliability_note else "**no**"
    return "yes, resumable" if transport.has(Capability.RESUMABLE) else "yes"


def _notes(transport: Transport, example: Example) -> str:
    notes = [example.notes] if example.notes else []
    if transport.has(Capability.ZERO_COPY_RECEIVE):
        notes.append("zero-copy `recv_view()`")
    notes += [f"needs `{requirement.install_hint()}`" for requirement in transport.requires]
    return "; ".join(notes)


def table_rows(listed: Iterable[Transport] | None = None) -> list[list[str]]:
    """One row per example URL of every transport: URL, channel, reliable, largest message, notes."""
    return [
        [
            f"`{example.url}`",
            example.channel,
            _reliability(transport),
            transport.limit.summary,
            _notes(transport, example),
        ]
        for transport in (transports() if listed is None else listed)
        for example in transport.examples
    ]


def channel_table(listed: Iterable[Transport] | None = None) -> str:
    """The README's channel table, as Markdown (README.md must contain exactly this)."""
    return markdown_table(TABLE_COLUMNS, table_rows(listed)) + "\n"
