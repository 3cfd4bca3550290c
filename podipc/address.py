"""Parse and format channel URLs into Address values.

Each transport declares its schemes and the address form of each
(podipc.transport.AddressForm), and the URL is parsed by that form:

    HOST:PORT                  tcp://127.0.0.1:7000, udp://..., zmq+tcp://...
    /absolute/directory        file:///shared/spool
    /absolute/path.sock        zmq+ipc:///shared/zmq.sock (at most 107 bytes)
    ... or @name               unix:///shared/podipc.sock, unix://@abstract-name
    /name                      mq:///name, shm:///name
    KEY                        sysvmq://1234, sysvmq://0x4d2, sysvmq://name (see _parse_sysv_key)

Query options (`?depth=10&mode=0660`) tune a channel; which options a channel
accepts is declared by the channel itself (see podipc.options.Option).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field

from podipc.errors import AddressError
from podipc.transport import AddressForm, find_transport, schemes

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
NAME_MAX = 255
SYSV_KEY_MAX = 0x7FFFFFFF
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
SYSV_DECIMAL_KEY = re.compile(r"0|[1-9][0-9]*")
"""A SysV KEY in decimal: no leading zero (so `0123` is a name, never octal), ASCII digits only."""
SYSV_HEX_KEY = re.compile(r"0[xX][0-9A-Fa-f]+")
"""A SysV KEY in hexadecimal: 0x or 0X, then hex digits."""


@dataclass(frozen=True)
class Address:
    """A parsed channel URL: which transport, where, and the raw query options."""

    url: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    name: str = ""
    key: int = 0
    abstract: bool = False
    options: dict[str, str] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """The URL without its query: what identifies the channel."""
        return self.url.split("?", 1)[0]

    @property
    def token(self) -> str:
        """A short filesystem-safe identifier of this channel, stable across processes."""
        readable = re.sub(r"[^A-Za-z0-9_-]+", "_", self.location.split("://", 1)[1]).strip("_")
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:8]
        return f"{self.scheme.replace('+', '_')}-{readable[:40]}-{digest}"


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def sysv_key_from_name(name: str) -> int:
    """Derive a SysV IPC key from a name: the first 31 bits of its SHA-256, never 0 (IPC_PRIVATE)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & SYSV_KEY_MAX
    return key or 1


def parse_address(url: str) -> Address:
    """Parse a channel URL; raise AddressError naming what is wrong and how to write it."""
    if not isinstance(url, str) or "://" not in url:
        raise AddressError(f"{url!r} is not a channel URL; expected SCHEME://..., e.g. tcp://127.0.0.1:7000")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    transport = find_transport(scheme)
    if transport is None:
        known = schemes()
        raise AddressError(f"unknown scheme {scheme!r} in {url!r}{suggest(scheme, known)}; known: {', '.join(known)}")
    location, _, query = rest.partition("?")
    options = _parse_query(url, query)
    form = transport.schemes[scheme]
    if form is AddressForm.HOST_PORT:
        host, port = _parse_host_port(url, location)
        return Address(url=url, scheme=scheme, host=host, port=port, options=options)
    if form is AddressForm.SOCKET_PATH_OR_ABSTRACT and location.startswith("@"):
        name = location[1:]
        _check_name(url, name, UNIX_PATH_MAX - 1)
        return Address(url=url, scheme=scheme, name=name, abstract=True, options=options)
    if form.names_path:
        path = _parse_path(url, location)
        if form.names_socket_file and len(path.encode()) > UNIX_PATH_MAX:
            raise AddressError(
                f"socket path {path!r} is {len(path.encode())} bytes; a Unix socket path holds at most "
                f"{UNIX_PATH_MAX} bytes: use a shorter path (or unix://@name)"
            )
        return Address(url=url, scheme=scheme, path=path, options=options)
    if form is AddressForm.NAME:
        if not location.startswith("/"):
            raise AddressError(f"{url!r}: expected {scheme}:///name (three slashes)")
        name = location[1:]
        _check_name(url, name, NAME_MAX - 1)
        return Address(url=url, scheme=scheme, name=name, options=options)
    return Address(url=url, scheme=scheme, name=location, key=_parse_sysv_key(url, scheme, location), options=options)


def _parse_query(url: str, query: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise AddressError(f"malformed query in {url!r}: {exc}") from exc
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise AddressError(f"option {key!r} given twice in {url!r}")
        options[key] = value
    return options


def _parse_host_port(url: str, location: str) -> tuple[str, int]:
    if location.startswith("["):
        host, _, port_text = location[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = location.rpartition(":")
    if not host or not port_text:
        raise AddressError(f"{url!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise AddressError(f"{url!r}: host {host!r} is not an IP address or 'localhost'") from exc
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise AddressError(f"{url!r}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _parse_path(url: str, location: str) -> str:
    if not location.startswith("/"):
        raise AddressError(f"{url!r}: expected an absolute path after '://', e.g. unix:///shared/podipc.sock")
    path = urllib.parse.unquote(location)
    if "\0" in path or path.rstrip("/") == "":
        raise AddressError(f"{url!r}: {path!r} is not a usable path")
    return path


def _check_name(url: str, name: str, limit: int) -> None:
    if not name or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise AddressError(f"{url!r}: name {name!r} must be 1+ characters from A-Z a-z 0-9 . _ -")
    if len(name) > limit:
        raise AddressError(f"{url!r}: name is {len(name)} characters; at most {limit}")


def _parse_sysv_key(url: str, scheme: str, text: str) -> int:
    """The key of sysvmq://KEY (docs/wire/sysvmq.md): decimal without a leading zero, 0x hex, else a hashed name.

    The grammar is one a C peer follows exactly with two patterns and strtol(KEY, NULL, 10 or 16);
    anything else (`0123`, `0o17`, `1_000`, `-5`) is a name, hashed by sysv_key_from_name.
    """
    if not text:
        raise AddressError(f"{url!r}: expected {scheme}://KEY (a number like 1234 or 0x4d2, or a name)")
    if SYSV_DECIMAL_KEY.fullmatch(text):
        key = int(text, 10)
    elif SYSV_HEX_KEY.fullmatch(text):
        key = int(text, 16)
    else:
        _check_name(url, text, NAME_MAX)
        return sysv_key_from_name(text)
    if not 1 <= key <= SYSV_KEY_MAX:
        raise AddressError(f"{url!r}: key {key} out of range 1..{SYSV_KEY_MAX} (0 is IPC_PRIVATE)")
    return key
