"""API keys in the database: creation (the one moment a key exists in full), lookups,
and the check a presented key must pass. AuthStore calls these inside its transactions.

A key is refused the same way (records.KeyRefused, KEY_REFUSED) whether it is
malformed, unknown, has the wrong secret, is revoked or has expired; the work done is
the same too: an unknown key id still costs a hash and a compare.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.auth.v1 import auth_pb2 as pb

from services.auth import ledger
from services.auth.records import (
    QUOTA_FIELDS,
    KeyRefused,
    quota_of,
    quota_values,
    timestamp,
    upsert,
)
from services.auth.schema import api_keys, tenants
from services.runtime.api_keys import hash_secret, new_key, parse_key, secret_matches
from services.runtime.errors import NotFound, shown

# Compared against when the key id is unknown, so that case costs what a wrong secret does.
_NO_SUCH_HASH = hash_secret("")
# A 60-bit random key id collides about never; a second draw covers it anyway.
_KEY_ID_TRIES = 3


@dataclass(frozen=True)
class NewKey:
    """What a key is created with; the secret is drawn when it is inserted."""

    tenant_id: str
    name: str
    models: Sequence[str]
    admin: bool
    quota: pb.Quota
    expire_us: int | None = None
    rotated_from: str = ""
    # The first key of the rotation chain ("": the new key starts one of its own).
    lineage_id: str = ""


async def require_key(connection: AsyncConnection, key_id: str, *, lock: bool = False) -> Row[Any]:
    query = select(api_keys).where(api_keys.c.key_id == key_id)
    if lock:
        # PostgreSQL: concurrent rotations of one key take turns (SQLite: the write lock).
        query = query.with_for_update()
    row = (await connection.execute(query)).first()
    if row is None:
        raise NotFound(f"API key {shown(key_id)} does not exist")
    return row


async def insert_key(connection: AsyncConnection, key: NewKey, now_us: int) -> tuple[Row[Any], str]:
    """Inserts `key` with a fresh secret: its row and the full key, which exists only here."""
    for _ in range(_KEY_ID_TRIES):
        key_id, full_key = new_key()
        parsed = parse_key(full_key)
        if parsed is None:  # new_key and parse_key disagree: a bug, never a caller's fault
            raise RuntimeError("a freshly made API key does not parse")
        insert = (
            upsert(connection, api_keys)
            .values(
                key_id=key_id,
                tenant_id=key.tenant_id,
                name=key.name,
                secret_sha256=hash_secret(parsed.secret),
                models=json.dumps(list(key.models)),
                admin=key.admin,
                created_us=now_us,
                expire_us=key.expire_us,
                revoke_us=None,
                rotated_from=key.rotated_from,
                lineage_id=key.lineage_id or key_id,
                **quota_values(key.quota),
            )
            .on_conflict_do_nothing(index_elements=[api_keys.c.key_id])
            .returning(*api_keys.c)
        )
        row = (await connection.execute(insert)).first()
        if row is not None:
            return row, full_key
    raise RuntimeError(f"no free key id after {_KEY_ID_TRIES} tries")


def key_state(row: Row[Any], now_us: int) -> str:
    """ "revoked", "expired" or "" (usable) at `now_us`."""
    if row.revoke_us is not None:
        return "revoked"
    if row.expire_us is not None and row.expire_us <= now_us:
        return "expired"
    return ""


async def check_key(connection: AsyncConnection, key: str, now_us: int) -> Row[Any]:
    """The key's row joined with its tenant's limits (columns `tenant_*`), if `key` may
    be used at `now_us`; KeyRefused otherwise."""
    parsed = parse_key(key)
    if parsed is None:
        raise KeyRefused("malformed")
    query = (
        select(
            api_keys,
            *(tenants.c[name].label(f"tenant_{name}") for name in QUOTA_FIELDS),
            tenants.c.monthly_spend_cap,
        )
        .join(tenants, tenants.c.id == api_keys.c.tenant_id)
        .where(api_keys.c.key_id == parsed.key_id)
    )
    row = (await connection.execute(query)).first()
    matches = secret_matches(_NO_SUCH_HASH if row is None else row.secret_sha256, parsed.secret)
    if row is None:
        raise KeyRefused("unknown", parsed.key_id)
    if not matches:
        raise KeyRefused("wrong secret", parsed.key_id)
    state = key_state(row, now_us)
    if state:
        raise KeyRefused(state, parsed.key_id)
    return row


def principal_message(
    row: Row[Any], month_spend: float, spend_month: str, day: ledger.DayTokens | None = None
) -> pb.Principal:
    """A row from `check_key` as the Principal a gateway enforces; `month_spend` is the
    tenant's spend in the UTC month `spend_month` ("2024-06"), `day` the ledger's tokens
    of the key's lineage and tenant today."""
    principal = pb.Principal(
        key_id=row.key_id,
        tenant_id=row.tenant_id,
        models=json.loads(row.models),
        admin=row.admin,
        key_quota=quota_of(row),
        tenant_quota=pb.Quota(**{name: getattr(row, f"tenant_{name}") for name in QUOTA_FIELDS}),
        monthly_spend_cap=row.monthly_spend_cap,
        month_spend=month_spend,
        spend_month=spend_month,
        lineage_id=row.lineage_id or row.key_id,
    )
    if day is not None:
        principal.lineage_day_tokens = day.lineage
        principal.tenant_day_tokens = day.tenant
        principal.usage_day = day.day
    if row.expire_us is not None:
        principal.expire_time.CopyFrom(timestamp(row.expire_us))
    return principal
