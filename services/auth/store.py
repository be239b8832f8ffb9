"""AuthStore: the auth service's state in its database, as auth_pb2 messages.

Tenants live here; keys (keys.py) and the ledger with its prices (ledger.py) have
modules of their own that these methods call inside one transaction each. Every call
validates what it is given and raises the contract's errors (services.runtime.errors):
INVALID_ARGUMENT naming the field, NOT_FOUND for an unknown tenant or key,
ALREADY_EXISTS for a duplicate, and for a presented key that may not be used, always
the same UNAUTHENTICATED KEY_REFUSED (records.KeyRefused).

Writes that must not interleave across replicas on PostgreSQL are single statements
(ON CONFLICT upserts, UPDATE ... SET x = coalesce(x, ...)) or lock the row they read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth_limits import MAX_GRACE_SECONDS

from services.auth import keys as key_ops
from services.auth import ledger
from services.auth.records import (
    QuotaUpdate,
    check_amount,
    check_day,
    check_key_id,
    check_name,
    check_new_name,
    check_patterns,
    check_quota,
    check_text,
    key_message,
    price_message,
    quota_values,
    quoted,
    tenant_message,
    upsert,
    utc_month,
)
from services.auth.schema import api_keys, prices, tenants
from services.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.store import Database

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version_auth"
_PAGE_SIZE, _MAX_PAGE_SIZE = 100, 1000  # GetUsage, as the registry's list calls
# Applied batch ids are pruned at most this often: a DELETE per batch would be waste.
_PRUNE_EVERY_US = 3600 * 1_000_000


async def _require_tenant(connection: AsyncConnection, tenant_id: str) -> Row[Any]:
    row = (await connection.execute(select(tenants).where(tenants.c.id == tenant_id))).first()
    if row is None:
        raise NotFound(f"tenant {quoted(tenant_id)} does not exist")
    return row


class AuthStore:
    """Tenants, API keys (hashes only), prices and the usage ledger."""

    def __init__(self, database: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._database = database
        # Seconds since the epoch; tests pass their own to move through expiries.
        self._clock = clock
        self._next_prune_us = 0

    @classmethod
    async def open(cls, url: str, *, clock: Callable[[], float] = time.time) -> AuthStore:
        """Opens the database at `url` (SQLAlchemy async URL) and migrates it to head."""
        database = await Database.open(url, migrations=MIGRATIONS, version_table=VERSION_TABLE)
        return cls(database, clock=clock)

    async def close(self) -> None:
        await self._database.close()

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    # --- tenants --------------------------------------------------------------------------

    async def create_tenant(self, tenant: pb.Tenant) -> pb.Tenant:
        check_new_name("tenant.id", tenant.id)
        check_text("tenant.description", tenant.description)
        check_quota("tenant.quota", tenant.quota)
        check_amount("tenant.monthly_spend_cap", tenant.monthly_spend_cap)
        async with self._database.write() as connection:
            insert = (
                upsert(connection, tenants)
                .values(
                    id=tenant.id,
                    description=tenant.description,
                    monthly_spend_cap=tenant.monthly_spend_cap,
                    created_us=self.now_us(),
                    **quota_values(tenant.quota),
                )
                .on_conflict_do_nothing(index_elements=[tenants.c.id])
                .returning(*tenants.c)
            )
            row = (await connection.execute(insert)).first()
        if row is None:
            raise AlreadyExists(f"tenant {quoted(tenant.id)} already exists")
        return tenant_message(row)

    async def get_tenant(self, tenant_id: str) -> pb.Tenant:
        check_name("id", tenant_id)
        async with self._database.read() as connection:
            return tenant_message(await _require_tenant(connection, tenant_id))

    async def list_tenants(self) -> list[pb.Tenant]:
        async with self._database.read() as connection:
            rows = await connection.execute(select(tenants).order_by(tenants.c.id))
            return [tenant_message(row) for row in rows]

    async def update_tenant(
        self,
        tenant_id: str,
        *,
        quota: QuotaUpdate | None = None,
        monthly_spend_cap: float | None = None,
        description: str | None = None,
    ) -> pb.Tenant:
        """Sets what is given (not None) and keeps the rest."""
        check_name("id", tenant_id)
        values: dict[str, object] = dict(quota.checked_values()) if quota is not None else {}
        if monthly_spend_cap is not None:
            values["monthly_spend_cap"] = check_amount("monthly_spend_cap", monthly_spend_cap)
        if description is not None:
            values["description"] = check_text("description", description)
        async with self._database.write() as connection:
            if values:
                statement = update(tenants).where(tenants.c.id == tenant_id).values(values)
                await connection.execute(statement)
            return tenant_message(await _require_tenant(connection, tenant_id))

    # --- keys (keys.py) -------------------------------------------------------------------

    async def create_key(
        self,
        tenant_id: str,
        *,
        name: str = "",
        models: Sequence[str] = ("*",),
        admin: bool = False,
        quota: pb.Quota | None = None,
        expire_us: int | None = None,
    ) -> pb.CreateApiKeyResponse:
        """A new key of `tenant_id`; the response holds the full key, the only time it
        exists outside the caller. `expire_us` None: the key never expires."""
        check_name("tenant_id", tenant_id)
        check_text("name", name)
        patterns = check_patterns("models", models)
        if not patterns:
            # On the wire an empty list is also a forgotten field: neither a key that
            # silently calls nothing nor one that silently calls everything.
            raise InvalidArgument("models", "give at least one model pattern ('*': every model)")
        limits = check_quota("quota", quota if quota is not None else pb.Quota())
        now_us = self.now_us()
        if expire_us is not None and expire_us <= now_us:
            raise InvalidArgument("expire_time", "must be in the future (leave it unset: never)")
        new = key_ops.NewKey(tenant_id, name, patterns, admin, limits, expire_us=expire_us)
        async with self._database.write() as connection:
            await _require_tenant(connection, tenant_id)
            row, full_key = await key_ops.insert_key(connection, new, now_us)
        return pb.CreateApiKeyResponse(key=key_message(row), secret=full_key)

    async def list_keys(self, tenant_id: str = "") -> list[pb.ApiKey]:
        """A tenant's keys (every tenant's when `tenant_id` is empty), oldest first."""
        query = select(api_keys).order_by(api_keys.c.tenant_id, api_keys.c.created_us)
        async with self._database.read() as connection:
            if tenant_id:
                check_name("tenant_id", tenant_id)
                await _require_tenant(connection, tenant_id)
                query = query.where(api_keys.c.tenant_id == tenant_id)
            return [key_message(row) for row in await connection.execute(query)]

    async def revoke_key(self, key_id: str) -> pb.ApiKey:
        """Revokes the key now; revoking it again keeps the first revocation's time."""
        check_key_id("key_id", key_id)
        async with self._database.write() as connection:
            statement = (
                update(api_keys)
                .where(api_keys.c.key_id == key_id)
                .values(revoke_us=func.coalesce(api_keys.c.revoke_us, self.now_us()))
            )
            await connection.execute(statement)
            return key_message(await key_ops.require_key(connection, key_id))

    async def rotate_key(self, key_id: str, *, grace_seconds: int) -> pb.CreateApiKeyResponse:
        """A new key like `key_id` (tenant, name, models, admin, quota and expiry: rotation
        never extends a key's life); the old one stops working `grace_seconds` from now,
        or at its own expiry if that comes first."""
        check_key_id("key_id", key_id)
        if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
            raise InvalidArgument(
                "grace_seconds", f"must be 0..{MAX_GRACE_SECONDS} (366 days), got {grace_seconds}"
            )
        now_us = self.now_us()
        async with self._database.write() as connection:
            old = await key_ops.require_key(connection, key_id, lock=True)
            state = key_ops.key_state(old, now_us)
            if state:
                raise FailedPrecondition(f"API key {key_id} is {state}: create a new key instead")
            grace_end = now_us + grace_seconds * 1_000_000
            old_end = grace_end if old.expire_us is None else min(old.expire_us, grace_end)
            await connection.execute(
                update(api_keys).where(api_keys.c.key_id == key_id).values(expire_us=old_end)
            )
            same = key_message(old)
            new = key_ops.NewKey(
                same.tenant_id,
                same.name,
                same.models,
                same.admin,
                same.quota,
                expire_us=old.expire_us,
                rotated_from=key_id,
                lineage_id=old.lineage_id or key_id,
            )
            row, full_key = await key_ops.insert_key(connection, new, now_us)
        return pb.CreateApiKeyResponse(key=key_message(row), secret=full_key)

    async def update_key(self, key_id: str, *, quota: QuotaUpdate) -> pb.ApiKey:
        """Sets the key's quota limits that are given and keeps the rest."""
        check_key_id("key_id", key_id)
        values = quota.checked_values()
        async with self._database.write() as connection:
            if values:
                statement = update(api_keys).where(api_keys.c.key_id == key_id).values(values)
                await connection.execute(statement)
            return key_message(await key_ops.require_key(connection, key_id))

    async def has_keys(self) -> bool:
        async with self._database.read() as connection:
            return (
                await connection.execute(select(api_keys.c.key_id).limit(1))
            ).first() is not None

    async def create_first_admin_key(
        self, tenant_id: str, deliver: Callable[[str], None]
    ) -> pb.ApiKey | None:
        """While no key exists at all: creates tenant `tenant_id` (if missing) and an
        admin key for every model, and calls `deliver(full_key)` before committing, so a
        key nobody could learn (`deliver` raised) is never stored. None if keys exist."""
        check_name("tenant_id", tenant_id)
        any_key = select(api_keys.c.key_id).limit(1)
        async with self._database.write() as connection:
            if (await connection.execute(any_key)).first() is not None:
                return None
            now_us = self.now_us()
            await connection.execute(
                upsert(connection, tenants)
                .values(
                    id=tenant_id,
                    description="created at first start",
                    monthly_spend_cap=0.0,
                    created_us=now_us,
                    **quota_values(pb.Quota()),
                )
                .on_conflict_do_nothing(index_elements=[tenants.c.id])
            )
            # Replicas starting together on PostgreSQL take turns here; the second one
            # then sees the first one's key below and creates none.
            lock = select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update()
            await connection.execute(lock)
            if (await connection.execute(any_key)).first() is not None:
                return None
            new = key_ops.NewKey(tenant_id, "bootstrap admin", ["*"], True, pb.Quota())
            row, full_key = await key_ops.insert_key(connection, new, now_us)
            deliver(full_key)
        return key_message(row)

    async def authenticate(self, key: str, *, with_spend: bool = True) -> pb.Principal:
        """Who `key` is, with its tenant's limits and (`with_spend`) what the ledger
        counts of this month's spend and of today's tokens, which a gateway's counters
        start from.

        records.KeyRefused (KEY_REFUSED) whatever is wrong with it."""
        now_us = self.now_us()
        spend, day = 0.0, None
        async with self._database.read() as connection:
            row = await key_ops.check_key(connection, key, now_us)
            if with_spend:
                spend = await ledger.month_spend(connection, row.tenant_id, now_us)
                lineage = row.lineage_id or row.key_id
                day = await ledger.day_tokens(connection, row.tenant_id, lineage, now_us)
        return key_ops.principal_message(row, spend, utc_month(now_us), day)

    # --- prices and the ledger (ledger.py) ------------------------------------------------

    async def set_price(self, price: pb.Price) -> pb.Price:
        ledger.check_price(price)
        async with self._database.write() as connection:
            return price_message(await ledger.put_price(connection, price, self.now_us()))

    async def list_prices(self) -> list[pb.Price]:
        async with self._database.read() as connection:
            rows = await connection.execute(select(prices).order_by(prices.c.model))
            return [price_message(row) for row in rows]

    async def record_usage(self, batch_id: str, records: Sequence[pb.UsageRecord]) -> bool:
        """Adds a batch to the ledger, once: False if `batch_id` was applied before."""
        ledger.check_batch(batch_id, records)
        now_us = self.now_us()
        async with self._database.write() as connection:
            applied = await ledger.apply_batch(connection, batch_id, records, now_us)
            if now_us >= self._next_prune_us:
                await ledger.forget_batches(connection, now_us)
        if now_us >= self._next_prune_us:
            self._next_prune_us = now_us + _PRUNE_EVERY_US
        return applied

    async def get_usage(
        self,
        *,
        tenant_id: str = "",
        key_id: str = "",
        model: str = "",
        start_day: str = "",
        end_day: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.UsageRecord], str]:
        """Ledger rows per tenant, key, model and day, a page of `page_size` (0: 100)
        after `page_token`, and the next page's token ("" on the last); empty filters
        match everything and the days are inclusive."""
        if not 0 <= page_size <= _MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size", f"must be 0..{_MAX_PAGE_SIZE} (0 means {_PAGE_SIZE}), got {page_size}"
            )
        size = page_size or _PAGE_SIZE
        if tenant_id:
            check_name("tenant_id", tenant_id)
        if key_id:
            check_key_id("key_id", key_id)
        if start_day:
            check_day("start_day", start_day)
        if end_day:
            check_day("end_day", end_day)
        if start_day and end_day and end_day < start_day:
            raise InvalidArgument("end_day", f"{end_day} is before start_day {start_day}")
        async with self._database.read() as connection:
            rows = await ledger.usage_rows(
                connection,
                tenant_id=tenant_id,
                key_id=key_id,
                model=model,
                start_day=start_day,
                end_day=end_day,
                limit=size + 1,
                page_token=page_token,
            )
        page = rows[:size]
        return page, ledger.page_token(page[-1]) if len(rows) > size else ""

    async def month_spend(self, tenant_id: str) -> float:
        """The tenant's ledger cost in the current UTC month."""
        async with self._database.read() as connection:
            return await ledger.month_spend(connection, tenant_id, self.now_us())
