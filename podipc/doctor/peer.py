"""Compare two containers: which namespaces and volumes they share, by id and by effect.

`podipc doctor --serve` (podipc.doctor.server) publishes this container's facts under one rendezvous name,
derived from ADDRESS ([HOST:]PORT, default 127.0.0.1:7099), through every medium a
pod may or may not share, so the peer learns something even when the network is not
shared:

    medium                          proves, when the peer sees it
    tcp HOST:PORT                   net shared (when HOST is loopback)
    abstract Unix @podipc-doctor-PORT   net shared (abstract sockets belong to the net namespace)
    /dev/shm/podipc-doctor-PORT.json    the same /dev/shm
    SysV shm segment key 0x5044PPPP     ipc shared (PPPP = PORT in hex)
    POSIX queue /podipc-doctor-PORT     ipc shared
    DIR/podipc-doctor-PORT.json     nothing by itself: a volume both see (--exchange DIR), so two
                                    pods that share nothing can still compare namespace ids

`podipc doctor --peer ADDRESS` looks through all of them until one answers (bounded
by `wait`), compares namespace inode numbers (comparable across the containers of one
host), and checks each proof by effect. Either side may start first. The peer then
acknowledges through what it reached, so a server started with `once` can exit.

Every published copy carries one random token: a sighting counts as evidence only when
its token is the one of the newest publication (an object a killed server left behind
is not mistaken for a live one; the server removes stale copies when it starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from podipc.doctor.facts import DEV_SHM, NAMESPACES, Facts

DEFAULT_PORT = 7099
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
NAME_PREFIX = "podipc-doctor-"
SYSV_KEY_BASE = 0x50440000  # "PD" in the high bytes, the port in the low 16 bits
DOCUMENT_VERSION = 1
MAX_DOCUMENT_BYTES = 1 << 20
LENGTH = struct.Struct("!Q")
REQUEST_FACTS = b"FACTS\n"
REQUEST_DONE = b"DONE "
MAX_REQUEST_BYTES = 256
CONNECT_TIMEOUT_SECONDS = 0.5
CONNECTION_TIMEOUT_SECONDS = 2.0
POLL_SECONDS = 0.1
SETTLE_SECONDS = 1.0
"""After a first sighting, how long the peer keeps looking for the other media (the server publishes all at once)."""
PUBLISHED_FILE_MODE = 0o644  # facts are not secrets; a peer running as another uid must read them
QUEUE_MODE = 0o660
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class Rendezvous:
    """Where a doctor server publishes and a peer looks: one port names every medium."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    @property
    def name(self) -> str:
        """The base name of every published object."""
        return f"{NAME_PREFIX}{self.port}"

    @property
    def dev_shm_file(self) -> str:
        """The facts file in /dev/shm."""
        return os.path.join(DEV_SHM, f"{self.name}.json")

    @property
    def abstract_name(self) -> bytes:
        """The abstract Unix socket address (leading NUL)."""
        return b"\0" + self.name.encode()

    @property
    def queue_name(self) -> str:
        """The POSIX message queue name."""
        return f"/{self.name}"

    @property
    def sysv_key(self) -> int:
        """The SysV shared memory key."""
        return SYSV_KEY_BASE | self.port

    def exchange_file(self, directory: str) -> str:
        """The facts file in an exchange directory."""
        return os.path.join(directory, f"{self.name}.json")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_rendezvous(text: str) -> Rendezvous:
    """Parse ADDRESS: PORT, HOST:PORT or [IPv6]:PORT; raise ValueError with the expected form."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        host, _, port_text = text[1:].partition("]")
        port_text = port_text.removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or not host:
        raise ValueError(f"{text!r} is not [HOST:]PORT, e.g. {DEFAULT_ADDRESS}")
    return Rendezvous(host, int(port_text))


def encode_document(facts: Facts, token: str) -> bytes:
    """The published bytes: this container's facts, a token and the time of publication."""
    document = {"podipc_doctor": DOCUMENT_VERSION, "token": token, "published_at": time.time(),
                "facts": facts.as_dict()}  # fmt: skip
    return json.dumps(document, separators=(",", ":")).encode()


def decode_document(data: bytes) -> dict[str, Any] | None:
    """A published document, or None when the bytes are not one (never raises)."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or document.get("podipc_doctor") != DOCUMENT_VERSION:
        return None
    if not isinstance(document.get("token"), str) or not isinstance(document.get("facts"), dict):
        return None
    return document


def write_file_atomically(path: str, data: bytes, mode: int) -> None:
    """Write a file so that readers never see it half written."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def remove_file(path: str) -> None:
    """Unlink a file that may not be there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- looking for a server ----------------------------------------------------


@dataclass(frozen=True)
class Sighting:
    """One medium through which the peer saw a server, and what it published there (None: existence only)."""

    medium: str
    document: dict[str, Any] | None


def request(family: int, address: Any, line: bytes) -> bytes:
    """Send one request line on a fresh stream connection; return the whole answer (bounded)."""
    with socket.socket(family, socket.SOCK_STREAM) as connection:
        connection.settimeout(CONNECT_TIMEOUT_SECONDS)
        connection.connect(address)
        connection.settimeout(CONNECTION_TIMEOUT_SECONDS)
        connection.sendall(line)
        chunks, total = [], 0
        while total <= MAX_DOCUMENT_BYTES:
            chunk = connection.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)


def tcp_family(host: str) -> int:
    """AF_INET6 for an IPv6 literal, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def read_small_file(path: str) -> bytes:
    """A file's bytes, refusing anything larger than a published document can be."""
    with open(path, "rb") as file:
        return file.read(MAX_DOCUMENT_BYTES + 1)


def read_segment(key: int) -> bytes:
    """The document in a doctor server's SysV shared memory segment."""
    import sysv_ipc

    segment = sysv_ipc.SharedMemory(key)
    try:
        (length,) = LENGTH.unpack(segment.read(LENGTH.size, 0))
        if length > min(MAX_DOCUMENT_BYTES, segment.size - LENGTH.size):
            return b""
        return bytes(segment.read(length, LENGTH.size))
    finally:
        segment.detach()


def queue_exists(name: str) -> bool:
    """True when a POSIX queue of that name exists in this IPC namespace."""
    import posix_ipc

    try:
        posix_ipc.MessageQueue(name).close()
    except posix_ipc.ExistentialError:
        return False
    return True


def look(rendezvous: Rendezvous, exchange_dirs: tuple[str, ...]) -> list[Sighting]:
    """Look once through every medium; return what answered."""
    probes: list[tuple[str, Any]] = [
        (f"tcp {rendezvous}",
         lambda: request(tcp_family(rendezvous.host), (rendezvous.host, rendezvous.port), REQUEST_FACTS)),
        (f"abstract unix @{rendezvous.name}", lambda: request(socket.AF_UNIX, rendezvous.abstract_name, REQUEST_FACTS)),
        ("dev_shm", lambda: read_small_file(rendezvous.dev_shm_file)),
        ("sysv_shm", lambda: read_segment(rendezvous.sysv_key)),
    ]  # fmt: skip
    probes += [(f"exchange {directory}", lambda d=directory: read_small_file(rendezvous.exchange_file(d)))
               for directory in exchange_dirs]  # fmt: skip
    sightings = []
    for medium, probe in probes:
        try:
            document = decode_document(probe())
        except Exception:  # absent, refused, unreadable: not seen through this medium
            continue
        if document is not None:
            sightings.append(Sighting(medium, document))
    with contextlib.suppress(Exception):
        if queue_exists(rendezvous.queue_name):
            sightings.append(Sighting("posix_mq", None))
    return sightings


def wait_for_server(rendezvous: Rendezvous, exchange_dirs: tuple[str, ...], wait: float) -> list[Sighting]:
    """Look until a server answers (at most `wait` seconds), then once more after it settles."""
    deadline = time.monotonic() + wait
    while True:
        sightings = look(rendezvous, exchange_dirs)
        if any(sighting.document for sighting in sightings):
            break
        if time.monotonic() >= deadline:
            return sightings
        time.sleep(POLL_SECONDS)
    settle_until = time.monotonic() + SETTLE_SECONDS
    media = len(media_expected(rendezvous, exchange_dirs))
    while len(sightings) < media and time.monotonic() < settle_until:
        time.sleep(POLL_SECONDS)
        again = look(rendezvous, exchange_dirs)
        if len(again) > len(sightings):
            sightings = again
    return sightings


def media_expected(rendezvous: Rendezvous, exchange_dirs: tuple[str, ...]) -> list[str]:
    """Every medium a server publishes through when the whole pod is shared."""
    return [f"tcp {rendezvous}", f"abstract unix @{rendezvous.name}", "dev_shm", "sysv_shm", "posix_mq",
            *(f"exchange {directory}" for directory in exchange_dirs)]  # fmt: skip


ACKNOWLEDGE_ORDER = ("tcp ", "abstract ", "posix_mq", "dev_shm", "exchange ")
FILE_ACKNOWLEDGE_SECONDS = 1.0
"""How long a file acknowledgement may wait for the server to take it before the peer removes it again."""


def acknowledge(rendezvous: Rendezvous, sightings: list[Sighting], token: str) -> str | None:
    """Tell the server it was seen, through the first medium that takes it; return that medium (None: none did).

    One acknowledgement only, so a server started with `once` leaves nothing behind; sockets
    and the queue come first because they leave no file when the server has already gone.
    """
    line = REQUEST_DONE + token.encode() + b"\n"

    def rank(medium: str) -> int:
        return next((i for i, prefix in enumerate(ACKNOWLEDGE_ORDER) if medium.startswith(prefix)), -1)

    media = sorted((s.medium for s in sightings if rank(s.medium) >= 0), key=rank)
    for medium in media:
        try:
            send_acknowledgement(rendezvous, medium, line)
        except Exception:  # the server may be gone already; try the next medium
            continue
        return medium
    return None


def send_acknowledgement(rendezvous: Rendezvous, medium: str, line: bytes) -> None:
    """Acknowledge through one medium (raises when it cannot)."""
    if medium.startswith("tcp "):
        request(tcp_family(rendezvous.host), (rendezvous.host, rendezvous.port), line)
    elif medium.startswith("abstract "):
        request(socket.AF_UNIX, rendezvous.abstract_name, line)
    elif medium == "posix_mq":
        import posix_ipc

        queue = posix_ipc.MessageQueue(rendezvous.queue_name)
        try:
            queue.send(line, 0)
        finally:
            queue.close()
    else:
        path = rendezvous.dev_shm_file if medium == "dev_shm" else rendezvous.exchange_file(medium.split(" ", 1)[1])
        write_file_atomically(path + ".done", line, PUBLISHED_FILE_MODE)
        deadline = time.monotonic() + FILE_ACKNOWLEDGE_SECONDS
        while os.path.exists(path + ".done"):
            if time.monotonic() >= deadline:
                remove_file(path + ".done")  # nobody took it: the server has gone
                raise TimeoutError(f"no doctor server took {path}.done")
            time.sleep(POLL_SECONDS / 2)


# --- comparing ---------------------------------------------------------------


@dataclass(frozen=True)
class Sharing:
    """Whether one namespace (or /dev/shm) is shared with the peer, and why doctor thinks so."""

    shared: bool | None
    """None: could not tell."""
    mine: int | str | None
    peer: int | str | None
    evidence: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SharedVolume:
    """A volume both containers mount (same device and root), perhaps at different paths."""

    path: str
    peer_path: str
    fstype: str


@dataclass(frozen=True)
class PeerReport:
    """What doctor learned about the other container."""

    address: str
    found: bool
    waited_seconds: float
    seen_via: list[str]
    hostname: str | None
    namespaces: dict[str, Sharing]
    dev_shm: Sharing
    volumes: list[SharedVolume]
    problems: list[str]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the `peer` part of the documented schema)."""
        return asdict(self)


def effects(rendezvous: Rendezvous, seen: set[str]) -> dict[str, list[str]]:
    """Proofs by effect, per namespace (and 'dev_shm'), from the media through which the server was seen."""
    proofs: dict[str, list[str]] = {"net": [], "ipc": [], "dev_shm": []}
    if f"tcp {rendezvous}" in seen and rendezvous.host in LOOPBACK_HOSTS:
        proofs["net"].append(f"reached its loopback port {rendezvous}")
    if f"abstract unix @{rendezvous.name}" in seen:
        proofs["net"].append(f"reached its abstract Unix socket @{rendezvous.name}")
    if "sysv_shm" in seen:
        proofs["ipc"].append(f"saw its SysV shm segment 0x{rendezvous.sysv_key:08x}")
    if "posix_mq" in seen:
        proofs["ipc"].append(f"saw its POSIX queue {rendezvous.queue_name}")
    if "dev_shm" in seen:
        proofs["dev_shm"].append(f"saw its file {rendezvous.dev_shm_file}")
    return proofs


def decide(mine: int | str | None, peer: int | str | None, proofs: list[str] | None) -> Sharing:
    """Shared when the ids match; where an id is unknown, shared when proven by effect (None: cannot tell)."""
    if mine is not None and peer is not None:
        shared = mine == peer
        evidence = ["same id" if shared else "different ids", *(proofs or [])]
        if proofs and not shared:
            evidence.append("ids differ but effects say shared: ids win")
        return Sharing(shared, mine, peer, evidence)
    if proofs is None:
        return Sharing(None, mine, peer, ["id not readable on both sides"])
    return Sharing(bool(proofs), mine, peer, proofs or ["not seen through this namespace"])


def shared_volumes(mine: Facts, peer_facts: dict[str, Any]) -> list[SharedVolume]:
    """Volumes mounted in both containers (same device and root)."""
    theirs = {f"{volume.get('device')}{volume.get('root')}": volume for volume in peer_facts.get("volumes", [])
              if isinstance(volume, dict)}  # fmt: skip
    return [SharedVolume(volume.path, str(theirs[volume.identity].get("path")), volume.fstype)
            for volume in mine.volumes if volume.identity in theirs]  # fmt: skip


def compare(mine: Facts, rendezvous: Rendezvous, sightings: list[Sighting], waited: float) -> PeerReport:
    """Compare this container with the newest server seen."""
    documents = [sighting.document for sighting in sightings if sighting.document is not None]
    if not documents:
        return not_found(rendezvous, sightings, waited)
    newest = max(documents, key=lambda document: float(document.get("published_at", 0)))
    token = newest["token"]
    seen = {
        sighting.medium for sighting in sightings if sighting.document is None or sighting.document["token"] == token
    }
    peer_facts: dict[str, Any] = newest["facts"]
    peer_namespaces = peer_facts.get("namespaces", {})
    proofs = effects(rendezvous, seen)
    namespaces = {}
    for kind in NAMESPACES:
        namespaces[kind] = decide(mine.namespaces.get(kind), peer_namespaces.get(kind), proofs.get(kind))
    hostname = peer_facts.get("hostname")
    if hostname == mine.hostname:
        namespaces["uts"].evidence.append(f"same hostname {hostname!r}")
    peer_shm = peer_facts.get("dev_shm") or {}
    peer_shm_id = f"{peer_shm['device']}{peer_shm['root']}" if "device" in peer_shm else None
    dev_shm = decide(mine.dev_shm.identity if mine.dev_shm else None, peer_shm_id, proofs["dev_shm"])
    return PeerReport(
        address=str(rendezvous),
        found=True,
        waited_seconds=round(waited, 3),
        seen_via=sorted(seen),
        hostname=hostname,
        namespaces=namespaces,
        dev_shm=dev_shm,
        volumes=shared_volumes(mine, peer_facts),
        problems=[],
    )


def not_found(rendezvous: Rendezvous, sightings: list[Sighting], waited: float) -> PeerReport:
    """The report when no server answered: nothing can be compared."""
    unknown = {kind: Sharing(None, None, None, ["no server seen"]) for kind in NAMESPACES}
    problem = (
        f"no `podipc doctor --serve {rendezvous}` seen within {waited:.1f} s through loopback, abstract socket, "
        "/dev/shm, SysV or POSIX IPC: the two containers share none of these (different pods), or the server "
        "is not running; pass --exchange DIR (a volume both mount) on both sides to compare anyway"
    )
    return PeerReport(str(rendezvous), False, round(waited, 3), sorted(s.medium for s in sightings), None, unknown,
                      Sharing(None, None, None, ["no server seen"]), [], [problem])  # fmt: skip


def find_peer(
    mine: Facts, rendezvous: Rendezvous, exchange_dirs: tuple[str, ...] = (), wait: float = 30.0
) -> PeerReport:
    """Look for a doctor server for at most `wait` seconds, compare, and acknowledge it."""
    started = time.monotonic()
    sightings = wait_for_server(rendezvous, exchange_dirs, wait)
    report = compare(mine, rendezvous, sightings, time.monotonic() - started)
    if report.found:
        token = max((s.document for s in sightings if s.document), key=lambda d: float(d.get("published_at", 0)))[
            "token"
        ]
        acknowledge(rendezvous, sightings, token)
    return report
