"""
What the command line prints: aligned tables and key/value blocks for people, JSON for scripts,
one-line errors, and progress for bulk work.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TextIO

from pydantic import BaseModel

Row = Sequence[object]


def cell(value: object) -> str:
    """How one value reads in a table: credits with thousands separators, instants in UTC."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, Decimal):
        return f"{value:,}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def _numeric(value: object) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def render_table(headers: Sequence[str], rows: Iterable[Row]) -> str:
    """
    Columns aligned under their headers; numbers right-aligned, text left-aligned.

    Args:
        headers: The column titles.
        rows: One sequence of values per row, as long as `headers`.

    Returns:
        The table, without a trailing newline.
    """
    rows = list(rows)
    texts = [[cell(value) for value in row] for row in rows]
    widths = [len(title) for title in headers]
    for row_texts in texts:
        for index, text in enumerate(row_texts):
            widths[index] = max(widths[index], len(text))
    right = [
        any(_numeric(row[index]) for row in rows)
        and all(_numeric(row[index]) or row[index] is None for row in rows)
        for index in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if align_right else value.ljust(width)
            for value, width, align_right in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * width for width in widths])]
    out.extend(line(row_texts) for row_texts in texts)
    return "\n".join(out)


def render_pairs(pairs: Sequence[tuple[str, object]]) -> str:
    """A block of ``label  value`` lines with the values aligned."""
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{label.ljust(width)}  {cell(value)}".rstrip() for label, value in pairs)


def jsonable(value: object) -> Any:
    """`value` as plain JSON data: models dumped in JSON mode, containers walked."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


class Output:
    """Where a command writes: stdout for results, stderr for errors, notes and progress."""

    def __init__(self, *, as_json: bool, stdout: TextIO | None = None) -> None:
        """
        Write JSON documents when `as_json`, human text otherwise.

        Args:
            as_json: Whether results are JSON.
            stdout: Where results go; `sys.stdout` when None (looked up at each write, so
                test capture works).
        """
        self.as_json = as_json
        self._stdout = stdout

    @property
    def out(self) -> TextIO:
        """The stream results go to."""
        return self._stdout if self._stdout is not None else sys.stdout

    def json(self, document: object) -> None:
        """Write one JSON document."""
        json.dump(jsonable(document), self.out, indent=2, ensure_ascii=False)
        self.out.write("\n")

    def text(self, text: str = "") -> None:
        """Write human text (ignored in JSON mode)."""
        if not self.as_json:
            self.out.write(text + "\n")

    def table(self, headers: Sequence[str], rows: Iterable[Row], empty: str) -> None:
        """Write a table, or the sentence `empty` when there are no rows (human mode only)."""
        rows = list(rows)
        self.text(render_table(headers, rows) if rows else empty)

    def pairs(self, pairs: Sequence[tuple[str, object]]) -> None:
        """Write an aligned key/value block (human mode only)."""
        self.text(render_pairs(pairs))

    @staticmethod
    def note(message: str) -> None:
        """Write a remark for people to stderr (both modes: it never mixes with JSON)."""
        sys.stderr.write(message + "\n")


class Progress:
    """
    Progress of bulk work on stderr.

    On a terminal one line is rewritten in place; elsewhere (a log file, a CI job) a line is
    written at every tenth of the work, so logs stay short.
    """

    def __init__(self, total: int, label: str, *, enabled: bool, stream: TextIO | None = None):
        """
        Start reporting.

        Args:
            total: How many items there are.
            label: What is being done, for example ``granting``.
            enabled: Whether to write anything at all.
            stream: Where to write; stderr when None.
        """
        self.total = total
        self.done = 0
        self._label = label
        self._enabled = enabled and total > 0
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._enabled and self._stream.isatty()
        self._next_tenth = 1

    def advance(self, count: int = 1) -> None:
        """Count `count` more items as done."""
        self.done += count
        if not self._enabled:
            return
        if self._live:
            self._stream.write(f"\r{self._label} {self._status()}")
            self._stream.flush()
            return
        tenth = self.done * 10 // self.total
        if tenth >= self._next_tenth:
            self._stream.write(f"{self._label} {self._status()}\n")
            self._next_tenth = tenth + 1

    def close(self) -> None:
        """End the in-place line, if there is one."""
        if self._live:
            self._stream.write("\n")
            self._stream.flush()

    def _status(self) -> str:
        percent = 100 * self.done // self.total
        return f"{self.done:,}/{self.total:,} ({percent}%)"
