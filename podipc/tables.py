"""Tables and sizes for people: plain text and Markdown, shared by `podipc channels`, the README's
channel table (podipc.transport) and the bench report. Presentation only; no rich needed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def size_label(size: int) -> str:
    """A size in bytes for people: 64 B, 4 KiB, 1 MiB..."""
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def markdown_table(columns: Iterable[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of rows under columns (cells with '|' escaped), without a final newline."""
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, a rule under the heading."""
    body = [list(row) for row in rows]
    widths = [max([len(column), *(len(row[index]) for row in body)]) for index, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * width for width in widths]), *(line(row) for row in body)])
