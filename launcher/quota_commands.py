"""`tensorgate quotas ...` and `tensorgate prices ...`: limits per tenant and per key, and
what each model's usage costs.

    tensorgate quotas set --tenant acme --tokens-per-day 1000000 --monthly-spend-cap 50
    tensorgate quotas set --key abcdefghijkl --requests-per-minute 60 --concurrent-streams 2
    tensorgate quotas show --tenant acme
    tensorgate prices set tinylm --prompt-per-1k 0.1 --completion-per-1k 0.4 \\
        --compute-per-second 0.01

A call must be within its key's limits and its tenant's (for all its keys together);
0 lifts a limit. Prices turn the ledger's tokens and compute time into cost, which the
tenant's monthly spend cap bounds. All of it needs an admin key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import typer
from tensorgate.auth.v1 import auth_pb2
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.auth_limits import MAX_AMOUNT, MAX_COUNT

from launcher import output
from launcher.options import DEFAULT_ADDRESS, Address, ApiKey, UsageError, with_auth


def amount(value: str) -> float:
    """A price or a spend cap: a finite number 0..MAX_AMOUNT. (click's FloatRange lets nan
    through its bounds and then says it is not <= the maximum.)"""
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number") from None
    if not (math.isfinite(number) and 0 <= number <= MAX_AMOUNT):
        raise typer.BadParameter(f"{value!r} is not a number 0..{MAX_AMOUNT:g}")
    return number


quotas_app = typer.Typer(
    help="Quotas per tenant and per key: requests and tokens per minute, tokens per day, "
    "concurrent streams, and a tenant's monthly spend cap.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
prices_app = typer.Typer(
    help="What a model's usage costs: per 1,000 prompt and completion tokens, per compute second.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

TenantOption = Annotated[str | None, typer.Option("--tenant", metavar="ID", help="a tenant")]
KeyOption = Annotated[
    str | None, typer.Option("--key", metavar="KEY_ID", help="a key, by its key id")
]
# Bounded here as the auth service bounds them: a number too big for the wire is a usage
# error (exit 2) that names the flag and the range, not a failure to encode it.
RequestsPerMinute = Annotated[
    int | None, typer.Option(min=0, max=MAX_COUNT, help="requests per minute (0: no limit)")
]
TokensPerMinute = Annotated[
    int | None,
    typer.Option(min=0, max=MAX_COUNT, help="prompt + completion tokens per minute (0: no limit)"),
]
TokensPerDay = Annotated[
    int | None,
    typer.Option(min=0, max=MAX_COUNT, help="prompt + completion tokens per UTC day (0: no limit)"),
]
ConcurrentStreams = Annotated[
    int | None,
    typer.Option(min=0, max=MAX_COUNT, help="generations streaming at once (0: no limit)"),
]

QUOTA_COLUMNS = ("REQUESTS/MIN", "TOKENS/MIN", "TOKENS/DAY", "STREAMS")


@dataclass(frozen=True)
class QuotaFlags:
    """The quota flags as given; None: not given (keep what is set)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent_streams: int | None = None

    def quota(self) -> auth_pb2.Quota:
        """The limits of a new key: what is not given is 0, no limit."""
        return auth_pb2.Quota(
            requests_per_minute=self.requests_per_minute or 0,
            tokens_per_minute=self.tokens_per_minute or 0,
            tokens_per_day=self.tokens_per_day or 0,
            concurrent_streams=self.concurrent_streams or 0,
        )


def quota_cells(quota: auth_pb2.Quota) -> tuple[str, str, str, str]:
    return (
        output.limit(quota.requests_per_minute),
        output.limit(quota.tokens_per_minute),
        output.limit(quota.tokens_per_day),
        output.limit(quota.concurrent_streams),
    )


def key_id_argument(key_id: str, flag: str = "KEY_ID") -> str:
    """A key id, refused before it is sent when it is a whole key (never echoed)."""
    if key_id.startswith("tg_"):
        raise UsageError(
            f"{flag}: give the key id (the 12 characters after 'tg_' in the key), not the key"
        )
    return key_id


def _subject(tenant: str | None, key: str | None) -> tuple[str, str]:
    if (tenant is None) == (key is None):
        raise UsageError("give exactly one of --tenant ID and --key KEY_ID")
    return (
        ("tenant", tenant) if tenant is not None else ("key", key_id_argument(key or "", "--key"))
    )


async def _key(auth: AsyncAuthClient, key_id: str) -> auth_pb2.ApiKey:
    # There is no GetApiKey: a key is found among all of them (an admin's call anyway).
    for key in await auth.list_keys():
        if key.key_id == key_id:
            return key
    raise UsageError(f"--key {key_id}: no such key id (see `tensorgate keys list`)")


def _show(kind: str, name: str, quota: auth_pb2.Quota, cap: float | None) -> None:
    cap_cell = (
        "" if cap is None else (f"{cap:g}" if cap or not output.stdout_is_terminal() else "-")
    )
    output.table(
        ("SUBJECT", *QUOTA_COLUMNS, "SPEND CAP/MONTH"),
        [(f"{kind} {name}", *quota_cells(quota), cap_cell)],
    )


@quotas_app.command("set")
def set_quotas(
    tenant: TenantOption = None,
    key: KeyOption = None,
    requests_per_minute: RequestsPerMinute = None,
    tokens_per_minute: TokensPerMinute = None,
    tokens_per_day: TokensPerDay = None,
    concurrent_streams: ConcurrentStreams = None,
    monthly_spend_cap: Annotated[
        float | None,
        typer.Option(parser=amount, help="a tenant's spend per calendar month (UTC); 0: none"),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Set limits of a tenant or a key (those given; the rest are kept), then show them."""
    kind, name = _subject(tenant, key)
    flags = QuotaFlags(requests_per_minute, tokens_per_minute, tokens_per_day, concurrent_streams)
    if kind == "key" and monthly_spend_cap is not None:
        raise UsageError("--monthly-spend-cap is a tenant's: use it with --tenant")
    if flags == QuotaFlags() and monthly_spend_cap is None:
        raise UsageError(
            "nothing to set: give --requests-per-minute, --tokens-per-minute, "
            "--tokens-per-day, --concurrent-streams or --monthly-spend-cap"
        )
    if kind == "tenant":
        updated = with_auth(
            address,
            api_key,
            lambda auth: auth.update_tenant(
                name,
                requests_per_minute=flags.requests_per_minute,
                tokens_per_minute=flags.tokens_per_minute,
                tokens_per_day=flags.tokens_per_day,
                concurrent_streams=flags.concurrent_streams,
                monthly_spend_cap=monthly_spend_cap,
            ),
        )
        _show(kind, name, updated.quota, updated.monthly_spend_cap)
        return
    changed = with_auth(
        address,
        api_key,
        lambda auth: auth.update_key(
            name,
            requests_per_minute=flags.requests_per_minute,
            tokens_per_minute=flags.tokens_per_minute,
            tokens_per_day=flags.tokens_per_day,
            concurrent_streams=flags.concurrent_streams,
        ),
    )
    _show(kind, name, changed.quota, None)


@quotas_app.command("show")
def show_quotas(
    tenant: TenantOption = None,
    key: KeyOption = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """A tenant's or a key's limits: SUBJECT REQUESTS/MIN TOKENS/MIN TOKENS/DAY STREAMS
    SPEND CAP/MONTH (no limit: - on a terminal, 0 for scripts)."""
    kind, name = _subject(tenant, key)
    if kind == "tenant":
        found = with_auth(address, api_key, lambda auth: auth.get_tenant(name))
        _show(kind, name, found.quota, found.monthly_spend_cap)
        return
    key_found = with_auth(address, api_key, lambda auth: _key(auth, name))
    _show(kind, name, key_found.quota, None)


@prices_app.command("set")
def set_price(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="the model's name")],
    prompt_per_1k: Annotated[
        float,
        typer.Option("--prompt-per-1k", parser=amount, help="per 1,000 prompt tokens"),
    ],
    completion_per_1k: Annotated[
        float,
        typer.Option("--completion-per-1k", parser=amount, help="per 1,000 completion tokens"),
    ],
    compute_per_second: Annotated[
        float,
        typer.Option("--compute-per-second", parser=amount, help="per second of compute"),
    ],
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Set what a model's usage costs from now on (in the currency of the spend caps)."""
    price = with_auth(
        address,
        api_key,
        lambda auth: auth.set_price(
            model,
            per_1k_prompt_tokens=prompt_per_1k,
            per_1k_completion_tokens=completion_per_1k,
            per_compute_second=compute_per_second,
        ),
    )
    cells = _price_cells(price)
    output.result(
        f"price of {price.model}: {cells[1]} per 1k prompt tokens, {cells[2]} per 1k "
        f"completion tokens, {cells[3]} per compute second",
        cells,
    )


def _price_cells(price: auth_pb2.Price) -> tuple[str, str, str, str]:
    return (
        price.model,
        f"{price.per_1k_prompt_tokens:g}",
        f"{price.per_1k_completion_tokens:g}",
        f"{price.per_compute_second:g}",
    )


@prices_app.command("list")
def list_prices(address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """Every model's price: MODEL PROMPT/1K COMPLETION/1K COMPUTE/S."""
    prices = with_auth(address, api_key, lambda auth: auth.list_prices())
    output.table(
        ("MODEL", "PROMPT/1K", "COMPLETION/1K", "COMPUTE/S"),
        [_price_cells(p) for p in prices],
        empty="no prices set: usage costs nothing",
    )
