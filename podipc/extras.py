"""Which podipc extra installs an optional package, read from the installed package's metadata.

So a command whose optional package is missing can say the one line that fixes it
(`pip install 'podipc[bench]'`) without a list of extras kept by hand beside pyproject.toml.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*(?:;\s*(.*))?$")
EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(distribution: str) -> list[str | None]:
    """How podipc's metadata requires `distribution`: one entry per requirement, its extra or None (base)."""
    try:
        lines = requires("podipc") or []
    except PackageNotFoundError:
        return []
    found: list[str | None] = []
    for line in lines:
        match = REQUIREMENT.match(line)
        if match is not None and _normal(match.group(1)) == _normal(distribution):
            extra = EXTRA_MARKER.search(match.group(2) or "")
            found.append(None if extra is None else extra.group(1))
    return found


def install_hint(distribution: str, prefer: str = "") -> str | None:
    """The command that installs a package podipc requires (its extra, `prefer` when that is one), else None."""
    ways = declared(distribution)
    if not ways:
        return None
    extras = [extra for extra in ways if extra is not None]
    if len(extras) < len(ways) or not extras:
        return f"pip install {distribution}"  # a base requirement: reinstalling podipc brings it back too
    return f"pip install 'podipc[{prefer if prefer in extras else extras[0]}]'"
