"""`tensorgate usage`: the usage ledger, per UTC day, tenant, key and model.

    tensorgate usage --tenant acme --from 2025-06-01 --to 2025-06-30
    tensorgate usage --model tinylm --csv > usage.csv

On a terminal: a table with a totals row. `--csv`: CSV with a header row and no totals,
for spreadsheets. Otherwise (a pipe, a file): tab-separated rows, no header. An admin
key sees every tenant's usage; any other key only its own tenant's.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from datetime import date
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from tensorgate.auth.v1 import auth_pb2

from launcher import output
from launcher.options import DEFAULT_ADDRESS, Address, ApiKey, UsageError, with_auth

COLUMNS = (
    "DAY",
    "TENANT",
    "KEY ID",
    "MODEL",
    "REQUESTS",
    "ERRORS",
    "PROMPT TOKENS",
    "COMPLETION TOKENS",
    "COMPUTE S",
    "COST",
)
CSV_HEADER = (
    "day",
    "tenant",
    "key_id",
    "model",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "compute_seconds",
    "cost",
)
_NUMBERS = ("requests", "errors", "prompt_tokens", "completion_tokens")


def _day(text: str | None, flag: str) -> str:
    if not text:
        return ""
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise UsageError(f"{flag} {text!r}: write a UTC day as YYYY-MM-DD") from None


def _cells(record: auth_pb2.UsageRecord) -> list[str]:
    return [
        record.day,
        record.tenant_id,
        record.key_id,
        record.model,
        *(str(getattr(record, name)) for name in _NUMBERS),
        f"{record.compute_micros / 1e6:.3f}",
        f"{record.cost:.6f}",
    ]


def _terminal_table(records: Sequence[auth_pb2.UsageRecord]) -> None:
    console = Console()
    if not records:
        console.print("no usage in that range", style="dim", highlight=False)
        return
    shown = Table(show_edge=False, header_style="bold", pad_edge=False, show_footer=True)
    totals = [
        "total",
        "",
        "",
        "",
        *(str(sum(getattr(r, name) for r in records)) for name in _NUMBERS),
        f"{sum(r.compute_micros for r in records) / 1e6:.3f}",
        f"{sum(r.cost for r in records):.6f}",
    ]
    for index, (column, total) in enumerate(zip(COLUMNS, totals, strict=True)):
        shown.add_column(
            column, footer=total, no_wrap=index == 0, justify="right" if index >= 4 else "left"
        )
    for record in records:
        shown.add_row(*_cells(record))
    console.print(shown)


def usage(
    tenant: Annotated[
        str, typer.Option(metavar="ID", help="only this tenant (a tenant's key: its own)")
    ] = "",
    key: Annotated[str, typer.Option(metavar="KEY_ID", help="only this key")] = "",
    model: Annotated[str, typer.Option(help="only this model")] = "",
    start_day: Annotated[
        str | None, typer.Option("--from", metavar="DAY", help="first UTC day, YYYY-MM-DD")
    ] = None,
    end_day: Annotated[
        str | None, typer.Option("--to", metavar="DAY", help="last UTC day, YYYY-MM-DD")
    ] = None,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="CSV with a header row on stdout, for spreadsheets")
    ] = False,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Usage per day, tenant, key and model: requests, errors, tokens, compute and cost."""
    if key.startswith("tg_"):
        raise UsageError("--key: give the key id (the 12 characters after 'tg_'), not the key")
    first, last = _day(start_day, "--from"), _day(end_day, "--to")
    if first and last and last < first:
        raise UsageError(f"--to {last} is before --from {first}")
    records = with_auth(
        address,
        api_key,
        lambda auth: auth.get_usage(
            tenant=tenant, key=key, model=model, start_day=first, end_day=last
        ),
    )
    records = sorted(records, key=lambda r: (r.day, r.tenant_id, r.key_id, r.model))
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(_cells(r) for r in records)
    elif output.stdout_is_terminal():
        _terminal_table(records)
    else:
        output.table(COLUMNS, [_cells(r) for r in records])
