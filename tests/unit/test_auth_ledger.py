"""The usage ledger and prices of AuthStore on real databases (SQLite and PostgreSQL,
tests/databases.py): batches that count once, concurrent batches from two replicas
(two stores on one database), filters, the month's spend, and forgetting old batch ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from tensorgate.auth.v1 import auth_pb2 as pb

from services.auth.store import AuthStore
from services.runtime.errors import InvalidArgument

pytest_plugins = ("tests.databases",)

START = datetime(2030, 3, 31, 23, 0, tzinfo=UTC).timestamp()
DAY = 24 * 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(database_url: str, clock: Clock) -> AsyncIterator[AuthStore]:
    opened = await AuthStore.open(database_url, clock=clock)
    yield opened
    await opened.close()


# --- prices and the ledger ----------------------------------------------------------------


async def test_prices(store: AuthStore) -> None:
    await store.set_price(pb.Price(model="tinylm", per_1k_prompt_tokens=0.5))
    await store.set_price(pb.Price(model="digits", per_compute_second=0.01))
    changed = await store.set_price(pb.Price(model="tinylm", per_1k_completion_tokens=2))
    assert changed == pb.Price(model="tinylm", per_1k_completion_tokens=2)
    assert [p.model for p in await store.list_prices()] == ["digits", "tinylm"]
    for price, field in [
        (pb.Price(model="a*"), "price.model"),
        (pb.Price(model="m", per_1k_prompt_tokens=-1), "price.per_1k_prompt_tokens"),
        (pb.Price(model="m", per_compute_second=float("nan")), "price.per_compute_second"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await store.set_price(price)
        assert caught.value.violations[0].field == field


async def test_usage_batches_add_up_once_each(store: AuthStore) -> None:
    records = [
        pb.UsageRecord(
            tenant_id="acme",
            key_id="aaaaaaaaaaaa",
            model="tinylm",
            day="2030-03-31",
            requests=1,
            prompt_tokens=10,
            completion_tokens=5,
            compute_micros=100,
            cost=0.25,
        ),
        pb.UsageRecord(
            tenant_id="acme",
            key_id="aaaaaaaaaaaa",
            model="tinylm",
            day="2030-03-31",
            requests=1,
            errors=1,
            cost=0.5,
        ),
    ]
    assert await store.record_usage("batch-1", records)
    assert not await store.record_usage("batch-1", records)  # a retried batch
    assert await store.record_usage("batch-2", records[:1])
    (row,), _ = await store.get_usage()
    assert (row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == (3, 1, 20, 10)
    assert (row.compute_micros, row.cost) == (200, 1.0)


async def test_concurrent_batches_from_two_replicas_lose_nothing(
    store: AuthStore, database_url: str, clock: Clock
) -> None:
    other = await AuthStore.open(database_url, clock=clock)
    record = pb.UsageRecord(
        tenant_id="acme", key_id="aaaaaaaaaaaa", model="m", day="2030-03-31", requests=1, cost=1
    )
    try:
        await asyncio.gather(
            *((store if n % 2 else other).record_usage(f"b{n % 20}", [record]) for n in range(40))
        )
    finally:
        await other.close()
    (row,), _ = await store.get_usage()
    assert (row.requests, row.cost) == (20, 20.0)


async def test_usage_refusals_name_the_record_and_field(store: AuthStore) -> None:
    good = pb.UsageRecord(tenant_id="acme", key_id="aaaaaaaaaaaa", model="m", day="2030-03-31")
    with pytest.raises(InvalidArgument, match="batch_id"):
        await store.record_usage("", [good])
    bad: list[tuple[dict[str, object], str]] = [
        ({"tenant_id": ""}, "records[1].tenant_id"),
        ({"key_id": "KEY"}, "records[1].key_id"),
        ({"model": ""}, "records[1].model"),
        ({"day": "2030-02-30"}, "records[1].day"),
        ({"day": "30-03-2030"}, "records[1].day"),
        ({"prompt_tokens": -1}, "records[1].prompt_tokens"),
        ({"cost": float("inf")}, "records[1].cost"),
    ]
    for change, field in bad:
        record = pb.UsageRecord()
        record.CopyFrom(good)
        for name, value in change.items():
            setattr(record, name, value)
        with pytest.raises(InvalidArgument) as caught:
            await store.record_usage("b", [good, record])
        assert caught.value.violations[0].field == field
    assert await store.get_usage() == ([], "")
    assert await store.record_usage("b", [good])  # refused batches claimed nothing


async def test_get_usage_filters_and_month_spend(store: AuthStore, clock: Clock) -> None:
    rows = [
        ("acme", "aaaaaaaaaaaa", "m1", "2030-02-28", 1.0),
        ("acme", "aaaaaaaaaaaa", "m1", "2030-03-01", 2.0),
        ("acme", "bbbbbbbbbbbb", "m2", "2030-03-31", 4.0),
        ("beta", "cccccccccccc", "m1", "2030-03-15", 8.0),
        ("acme", "aaaaaaaaaaaa", "m1", "2030-04-01", 16.0),
    ]
    records = [
        pb.UsageRecord(tenant_id=t, key_id=k, model=m, day=d, requests=1, cost=c)
        for t, k, m, d, c in rows
    ]
    assert await store.record_usage("all", records)

    async def costs(**filters: str) -> list[float]:
        rows, _ = await store.get_usage(**filters)  # type: ignore[arg-type]
        return [r.cost for r in rows]

    assert await costs() == [1, 2, 8, 4, 16]
    assert await costs(tenant_id="acme") == [1, 2, 4, 16]
    assert await costs(tenant_id="acme", key_id="aaaaaaaaaaaa", model="m1") == [1, 2, 16]
    assert await costs(start_day="2030-03-01", end_day="2030-03-31") == [2, 8, 4]
    assert await costs(model="m2") == [4]
    with pytest.raises(InvalidArgument, match="end_day"):
        await store.get_usage(start_day="2030-03-02", end_day="2030-03-01")
    with pytest.raises(InvalidArgument, match="start_day"):
        await store.get_usage(start_day="March")
    # The clock reads 2030-03-31 23:00 UTC: March only, for that tenant only.
    assert await store.month_spend("acme") == 6.0
    clock.now += 2 * 3600  # 2030-04-01 01:00 UTC
    assert await store.month_spend("acme") == 16.0
    await store.create_tenant(pb.Tenant(id="acme"))
    key = await store.create_key("acme")
    principal = await store.authenticate(key.secret)
    # The spend says which month it is for: a gateway holding it into May ignores it.
    assert (principal.month_spend, principal.spend_month) == (16.0, "2030-04")


async def test_applied_batch_ids_are_forgotten_after_a_week(store: AuthStore, clock: Clock) -> None:
    record = pb.UsageRecord(
        tenant_id="acme", key_id="aaaaaaaaaaaa", model="m", day="2030-03-31", requests=1
    )
    assert await store.record_usage("old", [record])
    clock.now += 8 * DAY
    assert await store.record_usage("new", [record])  # prunes "old"
    assert await store.record_usage("old", [record])
    (row,), _ = await store.get_usage()
    assert row.requests == 3


async def test_usage_pages_cover_every_row_once_in_order(store: AuthStore) -> None:
    keys = ("aaaaaaaaaaaa", "bbbbbbbbbbbb")
    records = [
        pb.UsageRecord(tenant_id=t, key_id=k, model=m, day=d, requests=1)
        for d in ("2030-03-01", "2030-03-02")
        for t in ("acme", "beta")
        for k in keys
        for m in ("m1", "m2")
    ]
    assert await store.record_usage("all", records)
    whole, token = await store.get_usage(page_size=1000)
    assert len(whole) == 16 and token == ""
    paged: list[pb.UsageRecord] = []
    token = ""
    while True:
        page, token = await store.get_usage(page_size=3, page_token=token)
        paged.extend(page)
        if not token:
            break
    assert paged == whole
    with pytest.raises(InvalidArgument, match="page_size"):
        await store.get_usage(page_size=1001)
