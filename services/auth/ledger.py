"""The usage ledger and the prices behind its costs. AuthStore calls these inside its
transactions.

Gateways send what calls used in batches. A batch is applied whole, in one transaction
that first claims its batch id: a batch sent again (a gateway that retried after a lost
answer) finds its id taken and changes nothing. Rows are added to with one
INSERT ... ON CONFLICT DO UPDATE per (tenant, key, model, day), which is atomic on both
databases, so concurrent batches from several gateways never lose an addition.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Row, case, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.auth.v1 import auth_pb2 as pb

from services.auth.records import (
    check_amount,
    check_count,
    check_day,
    check_key_id,
    check_name,
    check_new_name,
    month_range,
    upsert,
    usage_message,
    utc_day,
)
from services.auth.schema import api_keys, prices, usage, usage_batches
from services.runtime.errors import InvalidArgument, shown

# How long an applied batch id is remembered; a gateway gives up a batch long before.
BATCH_MEMORY_US = 7 * 24 * 3600 * 1_000_000
_MAX_BATCH_ID = 128
_MAX_MODEL = 256
_COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "compute_micros")
_KEY = ("tenant_id", "key_id", "model", "day")
_KEY_ORDER = ("day", "tenant_id", "key_id", "model")  # what GetUsage pages through


def check_record(index: int, record: pb.UsageRecord) -> None:
    field = f"records[{index}]"
    check_name(f"{field}.tenant_id", record.tenant_id)
    check_key_id(f"{field}.key_id", record.key_id)
    if not record.model:
        raise InvalidArgument(f"{field}.model", "is required")
    if len(record.model) > _MAX_MODEL:
        raise InvalidArgument(f"{field}.model", f"must be at most {_MAX_MODEL} characters")
    check_day(f"{field}.day", record.day)
    for name in _COUNTS:
        check_count(f"{field}.{name}", getattr(record, name))
    check_amount(f"{field}.cost", record.cost)


def check_batch(batch_id: str, records: Sequence[pb.UsageRecord]) -> None:
    if not batch_id:
        raise InvalidArgument("batch_id", "is required: a unique id per batch, kept on retries")
    if len(batch_id) > _MAX_BATCH_ID:
        raise InvalidArgument("batch_id", f"must be at most {_MAX_BATCH_ID} characters")
    for index, record in enumerate(records):
        check_record(index, record)


def _merged(records: Sequence[pb.UsageRecord]) -> list[dict[str, Any]]:
    """One row per ledger key: a batch may name a key twice, and one statement must not
    update a row twice."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for record in records:
        key = tuple(getattr(record, name) for name in _KEY)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {name: getattr(record, name) for name in _KEY}
            row.update(dict.fromkeys(_COUNTS, 0), cost=0.0)
        for name in _COUNTS:
            row[name] += getattr(record, name)
        row["cost"] += record.cost
    return list(rows.values())


async def apply_batch(
    connection: AsyncConnection, batch_id: str, records: Sequence[pb.UsageRecord], now_us: int
) -> bool:
    """Adds `records` to the ledger unless `batch_id` was applied before; True if applied."""
    claim = (
        upsert(connection, usage_batches)
        .values(batch_id=batch_id, applied_us=now_us)
        .on_conflict_do_nothing(index_elements=[usage_batches.c.batch_id])
        .returning(usage_batches.c.batch_id)
    )
    if (await connection.execute(claim)).first() is None:
        return False
    rows = _merged(records)
    if rows:
        insert = upsert(connection, usage)
        added = {name: usage.c[name] + insert.excluded[name] for name in (*_COUNTS, "cost")}
        statement = insert.on_conflict_do_update(
            index_elements=[usage.c[name] for name in _KEY], set_=added
        )
        await connection.execute(statement, rows)
    return True


async def forget_batches(connection: AsyncConnection, now_us: int) -> int:
    """Forgets batch ids applied over BATCH_MEMORY_US ago; how many."""
    statement = delete(usage_batches).where(usage_batches.c.applied_us < now_us - BATCH_MEMORY_US)
    result = await connection.execute(statement)
    return int(result.rowcount)


def page_token(record: pb.UsageRecord) -> str:
    """The token of the page after `record`: the ledger key it ends at, opaque to callers."""
    after = [getattr(record, name) for name in _KEY_ORDER]
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def _after(token: str) -> list[str]:
    try:
        after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        after = None
    if not (
        isinstance(after, list)
        and len(after) == len(_KEY_ORDER)
        and all(isinstance(part, str) for part in after)
    ):
        raise InvalidArgument("page_token", f"{shown(token)} is not a token this call returned")
    return after


async def usage_rows(
    connection: AsyncConnection,
    *,
    tenant_id: str,
    key_id: str,
    model: str,
    start_day: str,
    end_day: str,
    limit: int | None = None,
    page_token: str = "",
) -> list[pb.UsageRecord]:
    """Ledger rows matching every filter that is not empty, oldest day first, then by
    tenant, key and model: at most `limit`, after the row `page_token` names."""
    query = select(usage)
    if page_token:
        # Keyset paging on the primary key's columns: a page is an index range, however
        # deep, and rows added meanwhile neither repeat nor shift later pages.
        query = query.where(
            tuple_(*(usage.c[name] for name in _KEY_ORDER)) > tuple_(*_after(page_token))
        )
    if limit is not None:
        query = query.limit(limit)
    if tenant_id:
        query = query.where(usage.c.tenant_id == tenant_id)
    if key_id:
        query = query.where(usage.c.key_id == key_id)
    if model:
        query = query.where(usage.c.model == model)
    if start_day:
        query = query.where(usage.c.day >= start_day)
    if end_day:
        query = query.where(usage.c.day <= end_day)
    query = query.order_by(*(usage.c[name] for name in _KEY_ORDER))
    return [usage_message(row) for row in await connection.execute(query)]


async def month_spend(connection: AsyncConnection, tenant_id: str, now_us: int) -> float:
    """The tenant's ledger cost in the UTC month holding `now_us`."""
    first, after = month_range(now_us)
    query = select(func.coalesce(func.sum(usage.c.cost), 0.0)).where(
        usage.c.tenant_id == tenant_id, usage.c.day >= first, usage.c.day < after
    )
    return float((await connection.execute(query)).scalar_one())


class DayTokens(NamedTuple):
    """Tokens the ledger counts on one UTC day for a key's lineage and for its tenant."""

    day: str
    lineage: int
    tenant: int


async def day_tokens(
    connection: AsyncConnection, tenant_id: str, lineage_id: str, now_us: int
) -> DayTokens:
    """Prompt plus completion tokens on the UTC day holding `now_us`: of every key of
    `lineage_id` (a key and the keys rotated from it), and of the whole tenant."""
    day = utc_day(now_us).isoformat()
    tokens = usage.c.prompt_tokens + usage.c.completion_tokens
    lineage_keys = select(api_keys.c.key_id).where(api_keys.c.lineage_id == lineage_id)
    query = select(
        func.coalesce(func.sum(case((usage.c.key_id.in_(lineage_keys), tokens), else_=0)), 0),
        func.coalesce(func.sum(tokens), 0),
    ).where(usage.c.tenant_id == tenant_id, usage.c.day == day)
    lineage, tenant = (await connection.execute(query)).one()
    return DayTokens(day, int(lineage), int(tenant))


def check_price(price: pb.Price) -> None:
    check_new_name("price.model", price.model)  # prices are listed without a key
    for name in ("per_1k_prompt_tokens", "per_1k_completion_tokens", "per_compute_second"):
        check_amount(f"price.{name}", getattr(price, name))


async def put_price(connection: AsyncConnection, price: pb.Price, now_us: int) -> Row[Any]:
    values = {
        "per_1k_prompt_tokens": price.per_1k_prompt_tokens,
        "per_1k_completion_tokens": price.per_1k_completion_tokens,
        "per_compute_second": price.per_compute_second,
        "updated_us": now_us,
    }
    statement = (
        upsert(connection, prices)
        .values(model=price.model, **values)
        .on_conflict_do_update(index_elements=[prices.c.model], set_=values)
        .returning(*prices.c)
    )
    return (await connection.execute(statement)).one()
