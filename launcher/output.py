"""How the CLI shows results: rich tables and progress bars on a terminal, plain
tab-separated rows (no header, same column order) when stdout is a pipe or a file, so
that scripts can `cut -f` them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from tensorgate.registry_client import Progress as ProgressCallback


def stdout_is_terminal() -> bool:
    return Console().is_terminal


def local_time(ts: timestamp_pb2.Timestamp) -> str:
    """A protobuf timestamp in local time, ISO 8601; empty when unset.

    Scripts get the UTC offset too (2025-06-01T14:30:05+02:00), people a shorter
    2025-06-01 14:30:05 that leaves room in a table.
    """
    if not ts.seconds and not ts.nanos:
        return ""
    when = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC).astimezone()
    if stdout_is_terminal():
        return when.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    return when.isoformat(timespec="seconds")


def size(n: int) -> str:
    """Bytes for people: 1.2 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def dash(n: int) -> str:
    """A version number, or "-" for none (0)."""
    return str(n) if n else "-"


# C0 and C1 controls and the bidirectional overrides: what a stored description or
# reason could use to drive the terminal (escape sequences) or show other than it reads.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(cell: str) -> str:
    """`cell` with each control character written out as an escape (\\x1b)."""
    return _CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode(), cell)


def _plain(cell: str) -> str:
    # A tab or newline inside a cell would split one row into several for a script.
    return _visible(cell).replace("\t", " ").replace("\n", " ")


_FREE_TEXT = frozenset({"DESCRIPTION", "LABELS", "REASON", "ALIASES"})


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str = "") -> None:
    """Prints rows as a rich table on a terminal, else as tab-separated lines."""
    console = Console()
    if not console.is_terminal:
        for row in rows:
            print("\t".join(_plain(cell) for cell in row))
        return
    if not rows:
        if empty:
            console.print(empty, style="dim", highlight=False)
        return
    shown = Table(show_edge=False, header_style="bold", pad_edge=False)
    for index, column in enumerate(columns):
        # On a narrow terminal cells wrap rather than lose their ends; the first column
        # (what a row is about) stays on one line. Free text gives up its width first.
        shown.add_column(
            column, no_wrap=index == 0, overflow="fold", ratio=2 if column in _FREE_TEXT else None
        )
    for row in rows:
        # Text, not str: a "[" in a stored description is not rich markup.
        shown.add_row(*(Text(_visible(cell)) for cell in row))
    console.print(shown)


def result(sentence: str, row: Sequence[str]) -> None:
    """What a command did: a sentence for people, or one tab-separated row for scripts."""
    if Console().is_terminal:
        Console().print(_visible(sentence), highlight=False, markup=False, soft_wrap=True)
    else:
        print("\t".join(_plain(cell) for cell in row))


@contextlib.contextmanager
def transfer_progress(description: str) -> Iterator[ProgressCallback | None]:
    """A progress callback(done, total) that draws a bar on stderr; None off a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def limit(n: int) -> str:
    """A quota limit; 0 (no limit) is "-" for people and stays 0 for scripts."""
    return str(n) if n or not stdout_is_terminal() else "-"
