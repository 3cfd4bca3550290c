"""Who owns a UDP socket: the UIDs /proc/net/udp names for a port, and which of them udp:// may trust.

A port has no permissions; udp:// sends nothing to a port another user's socket holds and
ignores a HELLO from one (podipc.transports.udp's Trust paragraph). Another user: neither
this process's UID nor the owner of the peer's presence file (trusted by podipc.presence).
"""

from __future__ import annotations

import os
import socket
import sys

from podipc.presence import Presence, open_presence

PROC_NET_UDP = {socket.AF_INET: "/proc/net/udp", socket.AF_INET6: "/proc/net/udp6"}
"""Where Linux lists the UDP sockets of this network namespace, with the UID owning each."""
PROC_UID_FIELD = 7


def udp_socket_owners(family: socket.AddressFamily, host: str, port: int) -> list[int] | None:
    """The UIDs owning the UDP sockets of this network namespace bound to `host:port` (or any address, `port`).

    From /proc/net/udp (udp6 for IPv6); None when it cannot be read or `host` is not a numeric address.
    """
    try:
        wanted = socket.inet_pton(family, host)
        with open(PROC_NET_UDP[family], "rb") as table:
            lines = table.read().decode("ascii", "replace").splitlines()[1:]
    except (OSError, KeyError):
        return None
    wildcard = bytes(len(wanted))
    owners = []
    for line in lines:
        fields = line.split()
        if len(fields) <= PROC_UID_FIELD:
            continue
        address_hex, _, port_hex = fields[1].partition(":")
        try:
            bound = (proc_address(address_hex), int(port_hex, 16))
            uid = int(fields[PROC_UID_FIELD])
        except ValueError:
            continue
        if bound[1] == port and bound[0] in (wanted, wildcard):
            owners.append(uid)
    return owners


def proc_address(text: str) -> bytes:
    """An address as /proc/net/udp{,6} prints it (32-bit words in host byte order) as network-order bytes."""
    if len(text) not in (8, 32):
        raise ValueError(f"not an address: {text!r}")
    return b"".join(int(text[start : start + 8], 16).to_bytes(4, sys.byteorder) for start in range(0, len(text), 8))


def presence_owner(presence: Presence) -> int | None:
    """The UID owning the peer's presence file, when there is one (podipc.presence trusts it, or raises)."""
    fd = open_presence(presence.peer_path, presence.trust)
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)


def foreign_owner(presence: Presence, owners: list[int]) -> int | None:
    """The first of `owners` that is neither us nor the owner of the peer's (trusted) presence file; None if none."""
    trusted = {presence.trust.uid}
    if any(uid not in trusted for uid in owners):
        peer = presence_owner(presence)
        if peer is not None:
            trusted.add(peer)
    return next((uid for uid in owners if uid not in trusted), None)
