"""AuthStore's tenants and keys, and the service's authenticator, on real databases: every
test runs on SQLite and on PostgreSQL (tests/databases.py); two stores on one database
stand in for two auth replicas, and a settable clock moves through expiries and rotation
grace periods. The ledger and prices are in test_auth_ledger.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from tensorgate.auth.v1 import auth_pb2 as pb

from services.auth.authenticator import AuthServiceAuthenticator
from services.auth.records import INVALID_KEY, KeyRefused, QuotaUpdate
from services.auth.schema import api_keys as api_keys_table
from services.auth.schema import metadata as auth_metadata
from services.auth.store import MIGRATIONS, VERSION_TABLE, AuthStore
from services.runtime import api_keys
from services.runtime.api_keys import parse_key
from services.runtime.calls import Call
from services.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tests.helpers import migrate_to

pytest_plugins = ("tests.databases",)

START = datetime(2030, 3, 31, 23, 0, tzinfo=UTC).timestamp()


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


async def add_tenant(store: AuthStore, tenant_id: str = "acme", **quota: int) -> pb.Tenant:
    return await store.create_tenant(
        pb.Tenant(id=tenant_id, description="a team", quota=pb.Quota(**quota))
    )


async def add_key(
    store: AuthStore, tenant_id: str = "acme", **options: object
) -> pb.CreateApiKeyResponse:
    values: dict[str, object] = {"name": "ci", "models": ["tiny*"], **options}
    return await store.create_key(tenant_id, **values)  # type: ignore[arg-type]


async def refused(store: AuthStore, key: str) -> KeyRefused:
    with pytest.raises(KeyRefused) as caught:
        await store.authenticate(key)
    assert caught.value.message == INVALID_KEY
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    return caught.value


# --- tenants ------------------------------------------------------------------------------


async def test_tenants_create_get_list_update(store: AuthStore) -> None:
    created = await add_tenant(store, requests_per_minute=60)
    assert (created.id, created.quota.requests_per_minute) == ("acme", 60)
    assert created.create_time.ToSeconds() == int(START)
    await add_tenant(store, "beta")
    assert [t.id for t in await store.list_tenants()] == ["acme", "beta"]
    updated = await store.update_tenant(
        "acme", quota=QuotaUpdate(tokens_per_day=0, concurrent_streams=3), monthly_spend_cap=5.5
    )
    assert updated.quota == pb.Quota(requests_per_minute=60, concurrent_streams=3)
    assert (updated.monthly_spend_cap, updated.description) == (5.5, "a team")
    assert await store.get_tenant("acme") == updated


async def test_tenant_refusals_name_the_field(store: AuthStore) -> None:
    await add_tenant(store)
    with pytest.raises(AlreadyExists):
        await add_tenant(store)
    with pytest.raises(NotFound, match="'nobody'"):
        await store.get_tenant("nobody")
    with pytest.raises(NotFound):
        await store.update_tenant("nobody", description="x")
    cases: list[tuple[pb.Tenant, str]] = [
        (pb.Tenant(id=""), "tenant.id"),
        (pb.Tenant(id="-x"), "tenant.id"),
        (pb.Tenant(id="a" * 129), "tenant.id"),
        (pb.Tenant(id="a b"), "tenant.id"),
        (pb.Tenant(id="ok", quota=pb.Quota(tokens_per_day=-1)), "tenant.quota.tokens_per_day"),
        (pb.Tenant(id="ok", monthly_spend_cap=-1), "tenant.monthly_spend_cap"),
        (pb.Tenant(id="ok", monthly_spend_cap=float("nan")), "tenant.monthly_spend_cap"),
        (pb.Tenant(id="ok", monthly_spend_cap=float("inf")), "tenant.monthly_spend_cap"),
    ]
    for tenant, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await store.create_tenant(tenant)
        assert caught.value.violations[0].field == field
    with pytest.raises(InvalidArgument, match="requests_per_minute"):
        await store.update_tenant("acme", quota=QuotaUpdate(requests_per_minute=-5))


# --- keys ---------------------------------------------------------------------------------


async def test_a_key_is_shown_once_and_stored_only_as_a_hash(store: AuthStore) -> None:
    await add_tenant(store, tokens_per_minute=1000)
    created = await add_key(store, admin=True, quota=pb.Quota(requests_per_minute=7))
    parsed = parse_key(created.secret)
    assert parsed is not None and parsed.key_id == created.key.key_id
    assert (created.key.tenant_id, created.key.name, list(created.key.models)) == (
        "acme",
        "ci",
        ["tiny*"],
    )
    assert created.key.admin and not created.key.HasField("expire_time")
    assert [k.key_id for k in await store.list_keys("acme")] == [created.key.key_id]
    async with store._database.read() as connection:
        rows = (await connection.execute(select(api_keys_table))).all()
    assert parsed.secret not in repr(rows) and created.secret not in repr(rows)

    principal = await store.authenticate(created.secret)
    assert (principal.key_id, principal.tenant_id, principal.admin) == (
        created.key.key_id,
        "acme",
        True,
    )
    assert principal.key_quota.requests_per_minute == 7
    assert principal.tenant_quota.tokens_per_minute == 1000
    assert list(principal.models) == ["tiny*"] and principal.month_spend == 0


async def test_key_refusals(store: AuthStore) -> None:
    with pytest.raises(NotFound):
        await add_key(store, "nobody")
    await add_tenant(store)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"models": ["ok", "bad pattern"]}, "models"),
        ({"models": ["tiny?"]}, "models"),
        ({"models": ["[ab]"]}, "models"),
        ({"models": []}, "models"),  # a key that could call nothing
        ({"quota": pb.Quota(concurrent_streams=-1)}, "quota.concurrent_streams"),
        ({"expire_us": int(START * 1e6)}, "expire_time"),
        ({"name": "n" * 2000}, "name"),
    ]
    for options, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await add_key(store, **options)
        assert caught.value.violations[0].field == field
    with pytest.raises(NotFound):
        await store.list_keys("nobody")
    with pytest.raises(NotFound):
        await store.revoke_key("aaaaaaaaaaaa")
    with pytest.raises(NotFound):
        await store.update_key("aaaaaaaaaaaa", quota=QuotaUpdate())
    # A whole key pasted where a key id goes is refused without being echoed.
    key = (await add_key(store)).secret
    with pytest.raises(InvalidArgument) as pasted:
        await store.revoke_key(key)
    assert key not in pasted.value.message and "key_id" in pasted.value.message
    with pytest.raises(NotFound) as as_tenant:
        await store.get_tenant(key[:40])
    assert key[:40] not in as_tenant.value.message


async def test_a_key_pasted_into_a_stored_field_is_refused_not_kept(store: AuthStore) -> None:
    """Names, patterns and descriptions are shown in every listing, in plain text."""
    await add_tenant(store)
    key = (await add_key(store)).secret
    secret = key.split("_")[2]
    attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("name", lambda: add_key(store, name=key)),
        ("name", lambda: add_key(store, name=f"ci key {key}")),
        ("models", lambda: add_key(store, models=["tiny*", key])),
        ("models", lambda: add_key(store, models=[f"{key}*"])),
        ("tenant.description", lambda: store.create_tenant(pb.Tenant(id="b", description=key))),
        ("description", lambda: store.update_tenant("acme", description=f"see {key}")),
    ]
    for field, attempt in attempts:
        with pytest.raises(InvalidArgument, match="looks like an API key") as caught:
            await attempt()
        assert caught.value.violations[0].field == field
        assert secret[:8] not in caught.value.message
    stored = repr(await store.list_keys("acme")) + repr(await store.list_tenants())
    assert secret[:8] not in stored


@pytest.mark.parametrize(
    "text", ["nul\x00here", "two\nlines", "bell\x07", "csi\x9b2J", "esc\x1b[2J"]
)
async def test_names_and_descriptions_are_one_line_of_printable_text(
    store: AuthStore, text: str
) -> None:
    await add_tenant(store)
    with pytest.raises(InvalidArgument, match="control character U\\+00") as caught:
        await add_key(store, name=text)
    assert caught.value.violations[0].field == "name"
    with pytest.raises(InvalidArgument, match="one line of printable text"):
        await store.create_tenant(pb.Tenant(id="b", description=text))
    assert [k.name for k in await store.list_keys("acme")] == []
    await add_key(store, name="ci key: déploiement ✓")  # not ASCII, but printable


async def test_every_unusable_key_gets_the_same_refusal(store: AuthStore, clock: Clock) -> None:
    await add_tenant(store)
    good = (await add_key(store)).secret
    revoked = await add_key(store)
    expiring = await add_key(store, expire_us=int((START + 60) * 1e6))
    await store.revoke_key(revoked.key.key_id)
    other_id = (await add_key(store)).key.key_id
    parsed = parse_key(good)
    assert parsed is not None
    other_id_same_secret = good.replace(parsed.key_id, other_id)  # its checksum is now wrong
    reasons = [
        (await refused(store, "")).reason,
        (await refused(store, "tg_" + "a" * 63)).reason,
        (await refused(store, good[:-1] + ("A" if good[-1] != "A" else "B"))).reason,
        (await refused(store, other_id_same_secret)).reason,
        (await refused(store, revoked.secret)).reason,
    ]
    assert reasons == ["malformed", "malformed", "malformed", "malformed", "revoked"]
    assert (await store.authenticate(expiring.secret)).expire_time.ToSeconds() == int(START + 60)
    clock.now = START + 60  # expiry is exclusive: at expire_time the key no longer works
    assert (await refused(store, expiring.secret)).reason == "expired"
    await store.authenticate(good)


async def test_unknown_key_and_wrong_secret_are_refused(store: AuthStore) -> None:
    await add_tenant(store)
    created = await add_key(store)
    _, unknown = api_keys.new_key()
    assert (await refused(store, unknown)).reason == "unknown"
    # A well-formed key with a correct checksum and a known id, but another secret.
    forged_body = f"tg_{created.key.key_id}_{'0' * 43}"
    forged = f"{forged_body}_{api_keys._checksum(forged_body)}"
    assert (await refused(store, forged)).reason == "wrong secret"


async def test_revoke_is_idempotent_and_update_key_keeps_unset_limits(
    store: AuthStore, clock: Clock
) -> None:
    await add_tenant(store)
    created = await add_key(store, quota=pb.Quota(requests_per_minute=5, tokens_per_day=9))
    first = await store.revoke_key(created.key.key_id)
    clock.now += 10
    again = await store.revoke_key(created.key.key_id)
    assert first.revoke_time == again.revoke_time and first.HasField("revoke_time")
    updated = await store.update_key(created.key.key_id, quota=QuotaUpdate(requests_per_minute=0))
    assert updated.quota == pb.Quota(tokens_per_day=9)


async def test_rotation_keeps_scopes_and_ends_the_old_key_after_the_grace(
    store: AuthStore, clock: Clock
) -> None:
    await add_tenant(store)
    old = await add_key(store, admin=True, quota=pb.Quota(tokens_per_minute=3))
    rotated = await store.rotate_key(old.key.key_id, grace_seconds=30)
    new = rotated.key
    assert new.rotated_from == old.key.key_id and new.key_id != old.key.key_id
    assert (new.tenant_id, new.name, list(new.models), new.admin, new.quota) == (
        "acme",
        "ci",
        ["tiny*"],
        True,
        pb.Quota(tokens_per_minute=3),
    )
    assert not new.HasField("expire_time")
    old_principal = await store.authenticate(old.secret)
    assert old_principal.expire_time.ToSeconds() == int(START + 30)
    clock.now = START + 29.9
    await store.authenticate(old.secret)
    clock.now = START + 30
    await refused(store, old.secret)
    await store.authenticate(rotated.secret)
    with pytest.raises(FailedPrecondition):
        await store.rotate_key(old.key.key_id, grace_seconds=10)


async def test_a_rotation_chain_shares_the_first_keys_lineage_and_its_day_tokens(
    store: AuthStore, clock: Clock
) -> None:
    await add_tenant(store)
    first = await add_key(store)
    other = await add_key(store)
    second = await store.rotate_key(first.key.key_id, grace_seconds=60)
    third = await store.rotate_key(second.key.key_id, grace_seconds=60)
    # Every key of the chain counts in the first key's per-key counters.
    lineage = first.key.key_id
    for key in (first, second, third):
        assert (await store.authenticate(key.secret)).lineage_id == lineage
    assert (await store.authenticate(other.secret)).lineage_id == other.key.key_id
    # Today's tokens in the ledger, which a gateway's day counters start from.
    today = datetime.fromtimestamp(clock.now, UTC).strftime("%Y-%m-%d")
    used = [(first, today, 100), (second, today, 20), (other, today, 5), (third, "2030-03-30", 7)]
    await store.record_usage(
        "b1",
        [
            pb.UsageRecord(
                tenant_id="acme",
                key_id=key.key.key_id,
                model="tinylm",
                day=day,
                requests=1,
                prompt_tokens=tokens - 1,
                completion_tokens=1,
            )
            for key, day, tokens in used
        ],
    )
    seen = await store.authenticate(third.secret)
    assert (seen.usage_day, seen.lineage_day_tokens, seen.tenant_day_tokens) == (today, 120, 125)
    seen = await store.authenticate(other.secret)
    assert (seen.lineage_day_tokens, seen.tenant_day_tokens) == (5, 125)


async def test_the_lineage_migration_follows_existing_rotation_chains(database_url: str) -> None:
    await migrate_to(database_url, MIGRATIONS, VERSION_TABLE, "0001")
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO auth_tenants VALUES ('acme', '', 0, 0, 0, 0, 0, 0)")
            )
            # a <- b <- c (c rotated from b, b from a), and d on its own.
            for key_id, parent in (
                ("a" * 12, ""),
                ("b" * 12, "a" * 12),
                ("c" * 12, "b" * 12),
                ("d" * 12, ""),
            ):
                await connection.execute(
                    text(
                        "INSERT INTO auth_api_keys VALUES (:k, 'acme', '', '', '[]', false,"
                        " 0, 0, 0, 0, 0, NULL, NULL, :p)"
                    ),
                    {"k": key_id, "p": parent},
                )
    finally:
        await engine.dispose()
    store = await AuthStore.open(database_url)  # migrates to head
    await store.close()
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT key_id, lineage_id FROM auth_api_keys ORDER BY key_id")
            )
            assert [tuple(row) for row in rows] == [
                ("a" * 12, "a" * 12),
                ("b" * 12, "a" * 12),
                ("c" * 12, "a" * 12),
                ("d" * 12, "d" * 12),
            ]
    finally:
        await engine.dispose()


async def test_rotation_never_extends_a_key_and_refuses_dead_ones(
    store: AuthStore, clock: Clock
) -> None:
    await add_tenant(store)
    old = await add_key(store, expire_us=int((START + 100) * 1e6))
    rotated = await store.rotate_key(old.key.key_id, grace_seconds=3600)
    # The old key keeps its own earlier expiry; the new one inherits it.
    assert (await store.authenticate(old.secret)).expire_time.ToSeconds() == int(START + 100)
    assert rotated.key.expire_time.ToSeconds() == int(START + 100)
    immediate = await store.rotate_key(rotated.key.key_id, grace_seconds=0)
    await refused(store, rotated.secret)
    await store.authenticate(immediate.secret)
    for grace in (-1, 10**12):
        with pytest.raises(InvalidArgument, match="grace_seconds"):
            await store.rotate_key(immediate.key.key_id, grace_seconds=grace)
    revoked = await add_key(store)
    await store.revoke_key(revoked.key.key_id)
    with pytest.raises(FailedPrecondition, match="revoked"):
        await store.rotate_key(revoked.key.key_id, grace_seconds=10)


async def test_the_first_admin_key_is_made_once_even_by_two_replicas(
    store: AuthStore, database_url: str, clock: Clock
) -> None:
    other = await AuthStore.open(database_url, clock=clock)
    delivered: list[str] = []
    try:
        made = await asyncio.gather(
            store.create_first_admin_key("admin", delivered.append),
            other.create_first_admin_key("admin", delivered.append),
        )
    finally:
        await other.close()
    (key,) = [k for k in made if k is not None]
    assert len(delivered) == 1 and key.admin and list(key.models) == ["*"]
    assert (await store.authenticate(delivered[0])).admin
    assert await store.create_first_admin_key("admin", delivered.append) is None
    assert [t.id for t in await store.list_tenants()] == ["admin"]


async def test_a_key_that_could_not_be_delivered_is_not_stored(store: AuthStore) -> None:
    def fail(_key: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        await store.create_first_admin_key("admin", fail)
    assert not await store.has_keys()


# --- sharing a database; the service's own authenticator ----------------------------------


async def test_auth_and_registry_share_one_database(store: AuthStore, database_url: str) -> None:
    from services.registry.store import RegistryStore

    registry = await RegistryStore.open(database_url)
    try:
        assert await registry.feed.current_revision() == 0
    finally:
        await registry.close()
    await add_tenant(store)
    reopened = await AuthStore.open(database_url)  # migrations already at head: a no-op
    try:
        assert [t.id for t in await reopened.list_tenants()] == ["acme"]
    finally:
        await reopened.close()


def _call(method: str, key: str | None) -> Call:
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else ()
    return Call(
        method=f"/tensorgate.auth.v1.AuthService/{method}",
        request_id="r1",
        started=0.0,
        deadline=None,
        peer="test",
        metadata=metadata,
    )


async def test_the_authenticator_caches_briefly_and_boundedly(
    store: AuthStore, clock: Clock
) -> None:
    authenticator = AuthServiceAuthenticator(store, cache_entries=2, clock=clock)
    await add_tenant(store)
    admins = [(await add_key(store, admin=True)).secret for _ in range(3)]
    tenant_key = (await add_key(store)).secret
    assert await authenticator.authenticate(_call("Authenticate", None)) is None
    assert await authenticator.authenticate(_call("RecordUsage", None)) is None
    with pytest.raises(Unauthenticated, match=r"Bearer <api key>"):
        await authenticator.authenticate(_call("ListTenants", None))
    with pytest.raises(PermissionDenied, match="admin"):
        await authenticator.authenticate(_call("ListTenants", tenant_key))
    principal = await authenticator.authenticate(_call("GetUsage", tenant_key))
    assert principal is not None and (principal.tenant, principal.admin) == ("acme", False)
    for key in admins:
        principal = await authenticator.authenticate(_call("SetPrice", key))
        assert principal is not None and principal.admin
    assert len(authenticator._passed) == 2
    # A revoked key passes from the cache for at most its time, then never again.
    parsed = parse_key(admins[-1])
    assert parsed is not None
    await store.revoke_key(parsed.key_id)
    await authenticator.authenticate(_call("SetPrice", admins[-1]))
    clock.now += 2.0
    with pytest.raises(KeyRefused):
        await authenticator.authenticate(_call("SetPrice", admins[-1]))
    # A wrong secret under a cached key id goes to the database, which refuses it.
    await authenticator.authenticate(_call("SetPrice", admins[0]))
    cached = parse_key(admins[0])
    assert cached is not None
    forged_body = f"tg_{cached.key_id}_{'1' * 43}"
    forged = f"{forged_body}_{api_keys._checksum(forged_body)}"
    with pytest.raises(KeyRefused) as caught:
        await authenticator.authenticate(_call("SetPrice", forged))
    assert caught.value.reason == "wrong secret"


def _schema_drift(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, auth_metadata))


async def test_the_migrations_make_the_schema_the_code_declares(database_url: str) -> None:
    store = await AuthStore.open(database_url)  # migrates to head
    await store.close()
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_drift) == []
    finally:
        await engine.dispose()
