"""Render a doctor Report as rich tables for people (the CLI prints them; `--json` skips this)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from podipc.doctor import Report
from podipc.doctor.facts import NAMESPACES, Mount
from podipc.doctor.peer import PeerReport, Sharing


def size_text(size: int | None) -> str:
    """Bytes as a short binary size: 64.0 MiB."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def shared_text(sharing: Sharing | None) -> Text:
    """yes / no / ? coloured."""
    if sharing is None or sharing.shared is None:
        return Text("?", style="yellow")
    return Text("yes", style="green") if sharing.shared else Text("no", style="red")


def identity_table(report: Report) -> Table:
    """Who this container is and where it runs."""
    facts, identity = report.facts, report.facts.identity
    table = Table(title="this container", show_header=False)
    table.add_row("hostname", facts.hostname)
    table.add_row("uid / gid", f"{identity.uid} / {identity.gid}")
    table.add_row("groups", " ".join(map(str, identity.groups)) or "-")
    table.add_row("umask", identity.umask)
    capabilities = [name.removeprefix("CAP_").lower() for name in identity.capabilities]
    table.add_row("capabilities", f"{len(capabilities)}: {' '.join(capabilities)}" if capabilities else "none")
    for problem in facts.problems:
        table.add_row("problem", Text(problem, style="yellow"))
    return table


def namespace_table(report: Report) -> Table:
    """Namespace ids, and with a peer, which are shared and why."""
    peer = report.peer
    columns = ["namespace", "id"] + (["peer id", "shared", "evidence"] if peer else [])
    table = Table(*columns, title="namespaces" + (f" (peer {peer.address})" if peer else ""))
    for kind in NAMESPACES:
        row: list[RenderableType] = [kind, str(report.facts.namespaces.get(kind) or "?")]
        if peer is not None:
            sharing = peer.namespaces[kind]
            row += [str(sharing.peer or "?"), shared_text(sharing), "; ".join(sharing.evidence)]
        table.add_row(*row)
    return table


def mount_row(mount: Mount, shared: RenderableType | None) -> list[RenderableType]:
    """One row of the volumes table."""
    kind = "memory (tmpfs)" if mount.memory_backed else f"disk ({mount.fstype})"
    row: list[RenderableType] = [mount.path, kind, size_text(mount.size), size_text(mount.free),
                                 "ro" if mount.read_only else "rw"]  # fmt: skip
    return row if shared is None else [*row, shared]


def volume_table(report: Report) -> Table:
    """/dev/shm and the volumes (emptyDir, hostPath...) of this container."""
    peer = report.peer
    columns = ["mount", "backed by", "size", "free", "mode"] + (["shared with peer"] if peer else [])
    table = Table(*columns, title="/dev/shm and volumes")
    dev_shm = report.facts.dev_shm
    if dev_shm is None:
        table.add_row("/dev/shm", Text("missing", style="red"), "", "", "", *([""] if peer else []))
    else:
        table.add_row(*mount_row(dev_shm, shared_text(peer.dev_shm) if peer else None))
    shared_paths = {volume.path: volume.peer_path for volume in peer.volumes} if peer else {}
    for mount in report.facts.volumes:
        mark: RenderableType | None = None
        if peer is not None:
            mark = Text(f"yes (at {shared_paths[mount.path]})", style="green") if mount.path in shared_paths else "no"
        table.add_row(*mount_row(mount, mark))
    return table


def limit_rows(report: Report) -> Iterator[tuple[str, str, str]]:
    """(name, value, where it comes from) for every kernel limit doctor reads."""
    limits = report.facts.limits
    for name, value in limits.mqueue.items():
        yield f"fs.mqueue.{name}", "?" if value is None else str(value), f"/proc/sys/fs/mqueue/{name}"
    rlimit = "unlimited" if limits.rlimit_msgqueue is None else f"{limits.rlimit_msgqueue} bytes"
    yield "RLIMIT_MSGQUEUE", rlimit, "getrlimit (bytes of POSIX queues per user)"
    for name, value in limits.sysv.items():
        yield f"kernel.{name}", "?" if value is None else str(value), f"/proc/sys/kernel/{name}"
    yield "Unix socket path", f"{limits.unix_path_max} bytes", "sizeof(sun_path) - 1"


def limits_table(report: Report) -> Table:
    """Kernel limits of this IPC namespace and user."""
    table = Table("limit", "value", "source", title="IPC limits")
    for row in limit_rows(report):
        table.add_row(*row)
    return table


def channel_table(report: Report) -> Table:
    """Every channel: usable here, largest message, and the fix."""
    table = Table("scheme", "usable", "max message", "why not / fix / notes", title="channels")
    for verdict in report.channels:
        if verdict.usable:
            usable = Text("yes", style="green")
            detail = "\n".join(verdict.notes)
            largest = f"{verdict.max_message_size:,} B ({verdict.limit_source})" if verdict.max_message_size else "?"
        else:
            usable, largest = Text("no", style="red"), ""
            detail = f"{verdict.reason}\nfix: {verdict.fix}"
        table.add_row(verdict.scheme, usable, largest, detail)
    return table


def url_table(report: Report) -> Table:
    """The configured URLs and what is wrong with each."""
    table = Table("url", "ok", "problems", title="configured URLs")
    table.columns[0].overflow = "fold"
    for check in report.urls:
        table.add_row(check.url, Text("yes", style="green") if check.ok else Text("no", style="red"),
                      "\n".join(check.problems))  # fmt: skip
    return table


def peer_lines(peer: PeerReport) -> Text:
    """How the peer was found, or why not."""
    if not peer.found:
        return Text("\n".join(peer.problems), style="red")
    return Text(f"peer {peer.hostname} at {peer.address} seen via {', '.join(peer.seen_via)} "
                f"after {peer.waited_seconds:.2f} s")  # fmt: skip


def render(report: Report) -> Iterator[RenderableType]:
    """Every part of the human report, in reading order."""
    yield identity_table(report)
    if report.peer is not None:
        yield peer_lines(report.peer)
    yield namespace_table(report)
    yield volume_table(report)
    yield limits_table(report)
    yield channel_table(report)
    if report.urls:
        yield url_table(report)
    if report.serving is not None:
        published = ", ".join(f"{medium}: {state}" for medium, state in report.serving["published"].items())
        yield Text(f"serving at {report.serving['address']}: {published}")
    if report.required:
        if report.ok:
            yield Text(f"required channels usable: {', '.join(report.required)}", style="green")
        for line in report.unmet:
            yield Text(f"REQUIRED BUT UNUSABLE {line}", style="bold red")
