"""How the command line prints: aligned tables, JSON, and a progress bar on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    footer: dict[str, Any] | None = None,
    out: TextIO | None = None,
) -> None:
    """Rows as aligned columns under a header; numbers right-aligned; an optional totals line."""
    out = out or sys.stdout
    body = [[_cell(row.get(c)) for c in columns] for row in rows]
    lines = [list(columns), *body]
    if footer is not None:
        lines.append([_cell(footer.get(c)) for c in columns])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    numeric = [
        bool(rows)
        and all(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool) for r in rows)
        for c in columns
    ]

    def render(line: list[str]) -> str:
        cells = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(line, widths, numeric, strict=True)
        ]
        return "  ".join(cells).rstrip()

    out.write(render(lines[0]) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in lines[1:-1] if footer is not None else lines[1:]:
        out.write(render(line) + "\n")
    if footer is not None:
        out.write("  ".join("-" * w for w in widths) + "\n")
        out.write(render(lines[-1]) + "\n")
    if not rows:
        out.write("(none)\n")


class Progress:
    """A one-line progress bar on stderr: [#####.....] 25/50 label."""

    def __init__(self, total: int, label: str, out: TextIO | None = None, width: int = 30) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.out = out or sys.stderr
        self.width = width
        self._draw()

    def advance(self, step: int = 1) -> None:
        self.done += step
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.out.write(f"\r[{bar}] {self.done}/{self.total} {self.label}")
        self.out.flush()

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()
