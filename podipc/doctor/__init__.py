"""podipc doctor: what this pod shares, what each channel can do here, and how to fix what it cannot.

Works from inside a container (no lsns, no docker inspect): facts come from /proc and
the mount table (`facts`), channels are judged against them (`verdict`), and a second
container running `podipc doctor --serve` (`server`) is compared by namespace ids and
by effect (`peer`). `examine()` is the whole local report; the CLI prints it as a table or JSON.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from podipc.doctor.facts import NAMESPACES, Facts, gather_facts
from podipc.doctor.peer import DEFAULT_ADDRESS, PeerReport, Rendezvous, find_peer, parse_rendezvous
from podipc.doctor.server import DoctorServer
from podipc.doctor.verdict import ChannelVerdict, UrlCheck, check_url, judge_channels, unmet_requirements

SCHEMA = "podipc.doctor/1"

_MOUNT = {
    "type": ["object", "null"],
    "required": ["path", "fstype", "source", "device", "root", "read_only", "memory_backed", "size", "free"],
    "properties": {
        "path": {"type": "string"},
        "fstype": {"type": "string"},
        "device": {"type": "string", "pattern": "^[0-9]+:[0-9]+$"},
        "memory_backed": {"type": "boolean"},
        "read_only": {"type": "boolean"},
        "size": {"type": ["integer", "null"]},
        "free": {"type": ["integer", "null"]},
    },
}
_SHARING = {
    "type": "object",
    "required": ["shared", "mine", "peer", "evidence"],
    "properties": {
        "shared": {"type": ["boolean", "null"]},
        "evidence": {"type": "array", "items": {"type": "string"}},
    },
}
_INT_OR_NULL = {"type": ["integer", "null"]}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "podipc doctor --json",
    "type": "object",
    "required": ["schema", "facts", "channels", "urls", "requirements", "peer", "serving"],
    "properties": {
        "schema": {"const": SCHEMA},
        "facts": {
            "type": "object",
            "required": ["hostname", "namespaces", "dev_shm", "volumes", "limits", "identity", "problems"],
            "properties": {
                "hostname": {"type": "string"},
                "namespaces": {
                    "type": "object",
                    "required": list(NAMESPACES),
                    "additionalProperties": _INT_OR_NULL,
                },
                "dev_shm": _MOUNT,
                "volumes": {"type": "array", "items": {**_MOUNT, "type": "object"}},
                "limits": {
                    "type": "object",
                    "required": ["mqueue", "rlimit_msgqueue", "sysv", "unix_path_max"],
                    "properties": {
                        "mqueue": {
                            "type": "object",
                            "required": ["msg_max", "msgsize_max", "queues_max"],
                            "additionalProperties": _INT_OR_NULL,
                        },
                        "rlimit_msgqueue": _INT_OR_NULL,
                        "sysv": {
                            "type": "object",
                            "required": ["msgmax", "msgmnb", "shmmax"],
                            "additionalProperties": _INT_OR_NULL,
                        },
                        "unix_path_max": {"type": "integer"},
                    },
                },
                "identity": {
                    "type": "object",
                    "required": ["uid", "gid", "groups", "umask", "capabilities"],
                    "properties": {
                        "uid": {"type": "integer"},
                        "gid": {"type": "integer"},
                        "groups": {"type": "array", "items": {"type": "integer"}},
                        "umask": {"type": "string", "pattern": "^[0-7]{4}$"},
                        "capabilities": {"type": "array", "items": {"type": "string", "pattern": "^CAP_"}},
                    },
                },
                "problems": {"type": "array", "items": {"type": "string"}},
            },
        },
        "channels": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "scheme",
                    "usable",
                    "max_message_size",
                    "limit_source",
                    "reason",
                    "fix",
                    "raise_limit",
                    "notes",
                ],
                "properties": {
                    "scheme": {"type": "string"},
                    "usable": {"type": "boolean"},
                    "max_message_size": _INT_OR_NULL,
                    "notes": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "urls": {
            "type": "array",
            "items": {"type": "object", "required": ["url", "ok", "problems"]},
        },
        "requirements": {
            "type": "object",
            "required": ["required", "unmet", "ok"],
            "properties": {"ok": {"type": "boolean"}},
        },
        "peer": {
            "type": ["object", "null"],
            "required": [
                "address",
                "found",
                "waited_seconds",
                "seen_via",
                "hostname",
                "namespaces",
                "dev_shm",
                "volumes",
                "problems",
            ],
            "properties": {
                "found": {"type": "boolean"},
                "seen_via": {"type": "array", "items": {"type": "string"}},
                "namespaces": {"type": "object", "required": list(NAMESPACES), "additionalProperties": _SHARING},
                "dev_shm": _SHARING,
                "volumes": {"type": "array", "items": {"type": "object", "required": ["path", "peer_path", "fstype"]}},
            },
        },
        "serving": {
            "type": ["object", "null"],
            "required": ["address", "token", "published"],
            "properties": {"published": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
    },
}
"""The JSON Schema of `podipc doctor --json` (also in docs/doctor.md)."""


@dataclass
class Report:
    """The whole doctor report: facts, channel verdicts, URL checks, requirements, and a peer comparison."""

    facts: Facts
    channels: list[ChannelVerdict]
    urls: list[UrlCheck]
    required: list[str] = field(default_factory=list)
    unmet: list[str] = field(default_factory=list)
    peer: PeerReport | None = None
    serving: dict[str, Any] | None = None
    """When serving: the address, the token, and each medium's 'ok' or why it could not be published."""

    @property
    def ok(self) -> bool:
        """True when every required channel works here."""
        return not self.unmet

    def as_dict(self) -> dict[str, Any]:
        """The JSON document described in docs/doctor.md."""
        return {
            "schema": SCHEMA,
            "facts": self.facts.as_dict(),
            "channels": [asdict(verdict) for verdict in self.channels],
            "urls": [asdict(check) for check in self.urls],
            "requirements": {"required": self.required, "unmet": self.unmet, "ok": self.ok},
            "peer": None if self.peer is None else self.peer.as_dict(),
            "serving": self.serving,
        }


def configured_urls(urls: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The URLs to check: those given, plus PODIPC_URL from the environment when set."""
    found = list(urls)
    from_environment = os.environ.get("PODIPC_URL")
    if from_environment and from_environment not in found:
        found.append(from_environment)
    return found


def examine(urls: tuple[str, ...] | list[str] = (), required: tuple[str, ...] | list[str] = ()) -> Report:
    """Gather facts, judge every channel and URL, and check the required channels."""
    facts = gather_facts()
    verdicts = judge_channels(facts)
    checks = [check_url(url, facts, verdicts) for url in urls]
    return Report(facts, verdicts, checks, list(required), unmet_requirements(verdicts, list(required), checks))


__all__ = [
    "DEFAULT_ADDRESS",
    "JSON_SCHEMA",
    "SCHEMA",
    "ChannelVerdict",
    "DoctorServer",
    "Facts",
    "PeerReport",
    "Rendezvous",
    "Report",
    "UrlCheck",
    "configured_urls",
    "examine",
    "find_peer",
    "gather_facts",
    "parse_rendezvous",
]
