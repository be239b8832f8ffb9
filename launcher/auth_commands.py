"""`tensorgate tenants ...` and `tensorgate keys ...`: who may call the platform.

    tensorgate tenants create acme --description "the acme team"
    tensorgate keys create acme --name ci --model "tinylm*" --requests-per-minute 60
    tensorgate keys list --tenant acme
    tensorgate keys rotate abcdefghijkl --grace 1h
    tensorgate keys revoke abcdefghijkl

A key is shown once, when `keys create` or `keys rotate` makes it: alone on stdout,
so that `KEY=$(tensorgate keys create acme)` keeps it, with its key id on stderr.
Afterwards only its key id (the 12 characters after `tg_`) names it; nothing shows the
key again. All of it needs an admin key (--api-key or TENSORGATE_API_KEY).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated

import typer
from tensorgate.auth.v1 import auth_pb2
from tensorgate.auth_limits import MAX_GRACE_SECONDS

from launcher import output
from launcher.options import (
    DEFAULT_ADDRESS,
    Address,
    ApiKey,
    UsageError,
    parse_time,
    with_auth,
)
from launcher.quota_commands import (
    QUOTA_COLUMNS,
    ConcurrentStreams,
    QuotaFlags,
    RequestsPerMinute,
    TokensPerDay,
    TokensPerMinute,
    key_id_argument,
    quota_cells,
)
from services.runtime.settings import SettingsError, parse_duration

tenants_app = typer.Typer(
    help="Tenants: the teams that keys belong to, with quotas and a spend cap of their own.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
keys_app = typer.Typer(
    help="API keys (tg_...): shown once, stored only as hashes; scoped to model patterns.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

TenantId = Annotated[str, typer.Argument(metavar="ID", help="the tenant's id")]
KeyId = Annotated[
    str, typer.Argument(metavar="KEY_ID", help="the key id: the 12 characters after 'tg_'")
]


def _tenant_rows(tenants: list[auth_pb2.Tenant]) -> list[tuple[str, ...]]:
    terminal = output.stdout_is_terminal()
    return [
        (
            t.id,
            *quota_cells(t.quota),
            f"{t.monthly_spend_cap:g}" if t.monthly_spend_cap or not terminal else "-",
            output.local_time(t.create_time),
            t.description,
        )
        for t in tenants
    ]


_TENANT_COLUMNS = ("ID", *QUOTA_COLUMNS, "SPEND CAP/MONTH", "CREATED", "DESCRIPTION")


@tenants_app.command("create")
def create_tenant(
    tenant_id: TenantId,
    description: Annotated[str, typer.Option(help="who the tenant is")] = "",
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Create a tenant (quotas come with `tensorgate quotas set --tenant ID`)."""
    tenant = with_auth(
        address, api_key, lambda auth: auth.create_tenant(tenant_id, description=description)
    )
    output.result(f"created tenant {tenant.id}", (tenant.id,))


@tenants_app.command("list")
def list_tenants(address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """Every tenant: ID REQUESTS/MIN TOKENS/MIN TOKENS/DAY STREAMS SPEND CAP/MONTH CREATED
    DESCRIPTION (no limit: - on a terminal, 0 for scripts)."""
    tenants = with_auth(address, api_key, lambda auth: auth.list_tenants())
    output.table(_TENANT_COLUMNS, _tenant_rows(tenants), empty="no tenants")


@tenants_app.command("show")
def show_tenant(
    tenant_id: TenantId, address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None
) -> None:
    """One tenant, in the columns of `tenants list`."""
    tenant = with_auth(address, api_key, lambda auth: auth.get_tenant(tenant_id))
    output.table(_TENANT_COLUMNS, _tenant_rows([tenant]))


def _state(key: auth_pb2.ApiKey, now: float) -> str:
    if key.HasField("revoke_time"):
        return "revoked"
    if key.HasField("expire_time") and key.expire_time.seconds <= now:
        return "expired"
    return "active"


def _limits(quota: auth_pb2.Quota) -> str:
    """The limits a key has, in one cell: "requests/min=60 streams=2"."""
    named = (
        ("requests/min", quota.requests_per_minute),
        ("tokens/min", quota.tokens_per_minute),
        ("tokens/day", quota.tokens_per_day),
        ("streams", quota.concurrent_streams),
    )
    return " ".join(f"{name}={value}" for name, value in named if value)


def _shown_once(secret: str, key: auth_pb2.ApiKey, note: str = "") -> None:
    """The key alone on stdout; what it is on stderr, so that $(...) captures only the key."""
    print(secret, flush=True)
    print(
        f"key id {key.key_id} (tenant {key.tenant_id}){note}; the key above is shown only "
        "this once: store it now",
        file=sys.stderr,
    )


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Argument(metavar="TENANT", help="the tenant it belongs to")],
    name: Annotated[str, typer.Option(help="what the key is for, e.g. ci or alice")] = "",
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar="PATTERN",
            help="a model it may call; '*' matches any run of characters, e.g. 'tiny*' "
            "(repeatable; none given: every model, '*')",
        ),
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="may manage tenants, keys, quotas and models")
    ] = False,
    expires: Annotated[
        str | None,
        typer.Option(metavar="ISO", help="stops working at this time, e.g. 2026-01-01T00:00Z"),
    ] = None,
    requests_per_minute: RequestsPerMinute = None,
    tokens_per_minute: TokensPerMinute = None,
    tokens_per_day: TokensPerDay = None,
    concurrent_streams: ConcurrentStreams = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Create a key; the key goes to stdout this once, its key id to stderr."""
    expires_at: datetime | None = parse_time(expires, "--expires") if expires else None
    if expires_at is not None and expires_at.timestamp() <= time.time():
        raise UsageError(f"--expires {expires}: that time has passed")
    quota = QuotaFlags(
        requests_per_minute, tokens_per_minute, tokens_per_day, concurrent_streams
    ).quota()
    key, secret = with_auth(
        address,
        api_key,
        lambda auth: auth.create_key(
            tenant,
            name=name,
            models=model or ["*"],
            admin=admin,
            quota=quota,
            expires_at=expires_at,
        ),
    )
    _shown_once(secret, key)


@keys_app.command("list")
def list_keys(
    tenant: Annotated[str, typer.Option(metavar="ID", help="only this tenant's keys")] = "",
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Keys, never their secrets: KEY ID TENANT NAME MODELS ADMIN STATE EXPIRES LIMITS
    CREATED ROTATED FROM (`quotas show --key` has the limits one per column)."""
    keys = with_auth(address, api_key, lambda auth: auth.list_keys(tenant))
    now = time.time()
    rows = [
        (
            k.key_id,
            k.tenant_id,
            k.name,
            ",".join(k.models),
            "yes" if k.admin else "no",
            _state(k, now),
            output.local_time(k.expire_time),
            _limits(k.quota),
            output.local_time(k.create_time),
            k.rotated_from,
        )
        for k in keys
    ]
    columns = ("KEY ID", "TENANT", "NAME", "MODELS", "ADMIN", "STATE", "EXPIRES", "LIMITS")
    output.table((*columns, "CREATED", "ROTATED FROM"), rows, empty="no keys")


@keys_app.command("revoke")
def revoke_key(key_id: KeyId, address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """Revoke a key now (gateways stop accepting it within seconds)."""
    key_id_argument(key_id)
    key = with_auth(address, api_key, lambda auth: auth.revoke_key(key_id))
    output.result(
        f"revoked key {key.key_id} (tenant {key.tenant_id})",
        (key.key_id, output.local_time(key.revoke_time)),
    )


@keys_app.command("rotate")
def rotate_key(
    key_id: KeyId,
    grace: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="how long the old key keeps working: 0, 90s, 15m, 1h, 168h",
        ),
    ] = "1h",
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Replace a key with a new one (same tenant, scopes, quotas and expiry); the new key
    goes to stdout this once, and the old one works for --grace more."""
    key_id_argument(key_id)
    try:
        grace_seconds = parse_duration(grace)
    except SettingsError as exc:
        raise UsageError(f"--grace: {exc}") from None
    if grace_seconds > MAX_GRACE_SECONDS:
        raise UsageError(f"--grace {grace}: at most 366 days ({MAX_GRACE_SECONDS // 3600}h)")
    key, secret = with_auth(
        address,
        api_key,
        lambda auth: auth.rotate_key(key_id, grace_seconds=round(grace_seconds)),
    )
    _shown_once(secret, key, f", replacing {key_id}, which keeps working for {grace}")
