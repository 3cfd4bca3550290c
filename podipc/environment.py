"""Channel options from the environment: PODIPC_<OPTION> for every option of the URL's transport.

Manifests configure containers by environment, so every channel option can come from a
variable as well as from the URL's query: `PODIPC_WAIT=forever`, `PODIPC_DEPTH=64`,
`PODIPC_MODE=0660`. The names derive from the transports' descriptors (the common
options `wait` and `mode`, then the transport's own), upper-cased with the PODIPC_ prefix.

Precedence, highest first: a keyword argument in the library (`podipc.producer(url,
depth=8)`), the URL's query (`?depth=8`), the environment (`PODIPC_DEPTH=8`), the
option's default. Only the options of the URL's transport are read, so a variable meant
for another channel (PODIPC_DEPTH beside a tcp:// URL) is ignored; an empty value counts
as unset. The library itself never reads the environment: `podipc produce`/`consume`
call `options_from_environment()` and pass what it finds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from podipc.address import Address, parse_address
from podipc.options import COMMON_OPTIONS, Option
from podipc.transport import Transport, transport_for, transports

PREFIX = "PODIPC_"


def variable_name(option: str) -> str:
    """The environment variable of a channel option: 'max_message_size' -> 'PODIPC_MAX_MESSAGE_SIZE'."""
    return PREFIX + option.upper()


def transport_options(transport: Transport) -> tuple[Option, ...]:
    """Every option a transport's URLs take: the common ones (wait, mode), then its own."""
    return (*COMMON_OPTIONS, *transport.options)


def options_from_environment(url: str | Address, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The options of the URL's transport set in the environment and not given by the URL's query.

    Values are returned as text; the channel converts and checks them as it does the query's.
    """
    address = url if isinstance(url, Address) else parse_address(url)
    environ = os.environ if environ is None else environ
    found = {}
    for option in transport_options(transport_for(address.scheme)):
        value = environ.get(variable_name(option.name), "")
        if value.strip() and option.name not in address.options:
            found[option.name] = value
    return found


def option_variables() -> dict[str, tuple[str, ...]]:
    """Every channel option variable -> the schemes whose transport reads it (for help texts)."""
    readers: dict[str, list[str]] = {}
    for transport in transports():
        for option in transport_options(transport):
            readers.setdefault(variable_name(option.name), []).extend(transport.schemes)
    return {name: tuple(schemes) for name, schemes in readers.items()}
