"""The auth service as gateways and admins call it: a real server on port 0 over SQLite in
a temporary data directory, started with a bootstrap admin key.

Who may call what (admin key, tenant key, no key, bad key) on every RPC; Authenticate
refusing every kind of bad key with one identical message; rotation grace; idempotent
usage batches; tenant isolation of usage; the bootstrap key file; and no key in the
service's log output, checked after every test here.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate import AsyncAuthClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth.v1 import auth_pb2_grpc

from services.auth.server import AuthServer, start_auth
from services.auth.settings import AuthSettings
from services.runtime.api_keys import new_key, parse_key
from services.runtime.logging import configure_logging, flush_logs

# Missing or refused, a key hears the same words, which say what to send.
INVALID_KEY = KEY_REQUIRED = (
    "a valid API key is required: send metadata 'authorization: Bearer <api key>'"
)
ADMIN_REQUIRED = "this call needs an admin key"
OPEN_METHODS = {"Authenticate", "RecordUsage", "WatchKeys"}
KEY_IF_GIVEN = {"ListPrices"}  # keyless for gateways; a key given is checked
SERVICE = pb.DESCRIPTOR.services_by_name["AuthService"]
Metadata = tuple[tuple[str, str], ...]

configure_logging(level="info", fmt="json")


def auth_settings(data_dir: Path) -> AuthSettings:
    return AuthSettings(
        data_dir=data_dir,
        metrics_port=-1,
        drain_seconds=0.0,
        grace_seconds=1.0,
        bootstrap_admin_key_file=data_dir / "secrets" / "admin.key",
    )


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Auth:
    server: AuthServer
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    admin_key: str

    @property
    def admin(self) -> Metadata:
        return bearer(self.admin_key)


@pytest.fixture(scope="module")
async def auth(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Auth]:
    data_dir = tmp_path_factory.mktemp("auth")
    server = await start_auth(auth_settings(data_dir))
    try:
        admin_key = (data_dir / "secrets" / "admin.key").read_text().strip()
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Auth(server, auth_pb2_grpc.AuthServiceStub(channel), admin_key)
    finally:
        await server.stop()


class Output:
    """The log output of a test, and every key it saw: none may appear in that output."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.text = ""
        self.keys: list[str] = []

    def key(self, key: str) -> str:
        self.keys.append(key)
        return key

    def read(self) -> str:
        flush_logs()
        self.text += self._capsys.readouterr().out
        return self.text

    def rpc_lines(self, method: str) -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in self.read().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("method", "").endswith(f"/{method}")]


@pytest.fixture
def output(capsys: pytest.CaptureFixture[str]) -> Iterator[Output]:
    seen = Output(capsys)
    yield seen
    text = seen.read()
    for key in seen.keys:
        parsed = parse_key(key)
        assert key not in text
        assert parsed is None or parsed.secret not in text


async def fails(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def tenant_key(
    auth: Auth, output: Output, tenant: str, **fields: Any
) -> pb.CreateApiKeyResponse:
    try:
        await auth.stub.CreateTenant(
            pb.CreateTenantRequest(tenant=pb.Tenant(id=tenant)), metadata=auth.admin
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    fields.setdefault("models", ["*"])
    request = pb.CreateApiKeyRequest(tenant_id=tenant, name="test", **fields)
    created = await auth.stub.CreateApiKey(request, metadata=auth.admin)
    output.key(created.secret)
    return created


def call(auth: Auth, method: str, metadata: Metadata = ()) -> Awaitable[object]:
    """`method` with an empty request (authorization comes before any validation)."""
    request = getattr(pb, SERVICE.methods_by_name[method].input_type.name)()
    return getattr(auth.stub, method)(request, metadata=metadata, timeout=10)  # type: ignore[no-any-return]


def today() -> str:
    return datetime.now(UTC).date().isoformat()


# --- who may call what --------------------------------------------------------------------


async def test_admin_rpcs_need_an_admin_key(auth: Auth, output: Output) -> None:
    output.key(auth.admin_key)
    tenant = await tenant_key(auth, output, "who")
    unknown = output.key(new_key()[1])
    for method in SERVICE.methods_by_name:
        if method in OPEN_METHODS:
            continue
        if method in KEY_IF_GIVEN:
            await call(auth, method)
        else:
            no_key = await fails(call(auth, method))
            assert (no_key.code(), no_key.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                KEY_REQUIRED,
            )
        basic = await fails(call(auth, method, (("authorization", "Basic dTpw"),)))
        assert (basic.code(), basic.details()) == (grpc.StatusCode.UNAUTHENTICATED, KEY_REQUIRED)
        for bad in (unknown, "tg_nonsense", unknown[:-1] + "!"):
            refused = await fails(call(auth, method, bearer(bad)))
            assert (refused.code(), refused.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                INVALID_KEY,
            )
        if method in ("GetUsage", *KEY_IF_GIVEN):
            await call(auth, method, bearer(tenant.secret))
        else:
            denied = await fails(call(auth, method, bearer(tenant.secret)))
            assert (denied.code(), denied.details()) == (
                grpc.StatusCode.PERMISSION_DENIED,
                ADMIN_REQUIRED,
            )
        try:
            await call(auth, method, auth.admin)
        except grpc.aio.AioRpcError as error:  # an empty request may be invalid, no more
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    # The canonical line says who called (key id and tenant), never with what key.
    (listed,) = [line for line in output.rpc_lines("ListTenants") if line["status"] == "OK"]
    admin_id = parse_key(auth.admin_key)
    assert admin_id is not None
    assert (listed["key_id"], listed["tenant"]) == (admin_id.key_id, "admin")


async def test_gateway_rpcs_need_no_key(auth: Auth, output: Output) -> None:
    created = await tenant_key(auth, output, "gw")
    principal = await auth.stub.Authenticate(pb.AuthenticateRequest(key=created.secret))
    assert (principal.key_id, principal.tenant_id) == (created.key.key_id, "gw")
    record = pb.UsageRecord(
        tenant_id="gw", key_id=created.key.key_id, model="m", day=today(), requests=1
    )
    await auth.stub.RecordUsage(pb.RecordUsageRequest(batch_id="gw-1", records=[record]))


async def test_authenticate_refuses_every_bad_key_with_one_message(
    auth: Auth, output: Output
) -> None:
    good = await tenant_key(auth, output, "authn", admin=True)
    revoked = await tenant_key(auth, output, "authn")
    await auth.stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=revoked.key.key_id), metadata=auth.admin
    )
    expire = Timestamp()
    expire.FromMicroseconds(int((time.time() + 1.0) * 1e6))
    expiring = await tenant_key(auth, output, "authn", expire_time=expire)
    assert (await auth.stub.Authenticate(pb.AuthenticateRequest(key=expiring.secret))).HasField(
        "expire_time"
    )
    last = good.secret[-1]
    bad_keys = {
        "none": "",
        "malformed": "not a key",
        "bad checksum": good.secret[:-1] + ("A" if last != "A" else "B"),
        "unknown": output.key(new_key()[1]),
        "revoked": revoked.secret,
    }
    await asyncio.sleep(max(0.0, expire.ToMicroseconds() / 1e6 - time.time()) + 0.05)
    bad_keys["expired"] = expiring.secret
    answers = set()
    for key in bad_keys.values():
        error = await fails(auth.stub.Authenticate(pb.AuthenticateRequest(key=key)))
        answers.add((error.code(), error.details()))
    assert answers == {(grpc.StatusCode.UNAUTHENTICATED, INVALID_KEY)}
    principal = await auth.stub.Authenticate(pb.AuthenticateRequest(key=good.secret))
    assert principal.admin and list(principal.models) == ["*"]


# --- rotation, revocation -----------------------------------------------------------------


async def test_the_old_key_works_until_the_grace_ends(auth: Auth, output: Output) -> None:
    old = await tenant_key(auth, output, "rot", admin=True)
    rotated_at = time.time()
    rotated = await auth.stub.RotateApiKey(
        pb.RotateApiKeyRequest(key_id=old.key.key_id, grace_seconds=2), metadata=auth.admin
    )
    output.key(rotated.secret)
    assert rotated.key.rotated_from == old.key.key_id and rotated.key.admin
    for key in (old.secret, rotated.secret):
        await auth.stub.Authenticate(pb.AuthenticateRequest(key=key))
        await auth.stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(key))
    await asyncio.sleep(rotated_at + 2.0 - time.time() + 0.2)
    error = await fails(auth.stub.Authenticate(pb.AuthenticateRequest(key=old.secret)))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_KEY)
    # The admin-call cache never outlives the key, even within its 2 s.
    error = await fails(auth.stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(old.secret)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await auth.stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(rotated.secret))


async def test_a_revoked_admin_key_stops_working_within_the_cache_time(
    auth: Auth, output: Output
) -> None:
    admin = await tenant_key(auth, output, "rev", admin=True)
    await auth.stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(admin.secret))
    await auth.stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=admin.key.key_id), metadata=auth.admin
    )
    await asyncio.sleep(2.05)
    error = await fails(
        auth.stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(admin.secret))
    )
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_KEY)


# --- usage --------------------------------------------------------------------------------


async def test_a_usage_batch_counts_once(auth: Auth, output: Output) -> None:
    created = await tenant_key(auth, output, "usage")
    record = pb.UsageRecord(
        tenant_id="usage",
        key_id=created.key.key_id,
        model="tinylm",
        day=today(),
        requests=1,
        prompt_tokens=10,
        completion_tokens=20,
        cost=0.75,
    )
    batch = pb.RecordUsageRequest(batch_id="usage-1", records=[record, record])
    for _ in range(3):
        await auth.stub.RecordUsage(batch)
    await auth.stub.RecordUsage(pb.RecordUsageRequest(batch_id="usage-2", records=[record]))
    error = await fails(auth.stub.RecordUsage(pb.RecordUsageRequest(records=[record])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch_id" in (error.details() or "")
    (row,) = (
        await auth.stub.GetUsage(pb.GetUsageRequest(tenant_id="usage"), metadata=auth.admin)
    ).records
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 30, 60)
    principal = await auth.stub.Authenticate(pb.AuthenticateRequest(key=created.secret))
    assert principal.month_spend == pytest.approx(2.25)


async def test_a_tenant_sees_only_its_own_usage(auth: Auth, output: Output) -> None:
    a = await tenant_key(auth, output, "iso-a")
    b = await tenant_key(auth, output, "iso-b")
    records = [
        pb.UsageRecord(tenant_id=t, key_id=k.key.key_id, model="m", day=today(), requests=1)
        for t, k in (("iso-a", a), ("iso-b", b))
    ]
    await auth.stub.RecordUsage(pb.RecordUsageRequest(batch_id="iso", records=records))

    async def tenants_seen(metadata: Metadata, **filters: str) -> set[str]:
        request = pb.GetUsageRequest(**filters)  # type: ignore[arg-type]
        answer = await auth.stub.GetUsage(request, metadata=metadata)
        return {record.tenant_id for record in answer.records}

    assert await tenants_seen(bearer(a.secret)) == {"iso-a"}
    assert await tenants_seen(bearer(a.secret), tenant_id="iso-a") == {"iso-a"}
    assert await tenants_seen(bearer(a.secret), key_id=b.key.key_id) == set()
    denied = await fails(
        auth.stub.GetUsage(pb.GetUsageRequest(tenant_id="iso-b"), metadata=bearer(a.secret))
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await tenants_seen(auth.admin, tenant_id="iso-b") == {"iso-b"}
    assert {"iso-a", "iso-b"} <= await tenants_seen(auth.admin)


async def test_keys_pasted_into_other_fields_are_not_echoed(auth: Auth, output: Output) -> None:
    created = await tenant_key(auth, output, "paste")
    for request_call in (
        auth.stub.GetTenant(pb.GetTenantRequest(id=created.secret), metadata=auth.admin),
        auth.stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=created.secret), metadata=auth.admin),
        auth.stub.GetTenant(pb.GetTenantRequest(id=created.secret[:30]), metadata=auth.admin),
        auth.stub.ListApiKeys(pb.ListApiKeysRequest(tenant_id=created.secret), metadata=auth.admin),
    ):
        error = await fails(request_call)
        assert created.secret[:30] not in (error.details() or "")
    output.key(created.secret[:30])


# --- the first admin key ------------------------------------------------------------------


async def test_bootstrap_writes_a_private_key_file_once(tmp_path: Path, output: Output) -> None:
    key_file = tmp_path / "secrets" / "admin.key"
    server = await start_auth(auth_settings(tmp_path))
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = output.key(key_file.read_text().strip())
        parsed = parse_key(key)
        assert parsed is not None
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            tenants = await stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(key))
            assert [t.id for t in tenants.tenants] == ["admin"]
    finally:
        await server.stop()
    (line,) = [
        orjson.loads(line)
        for line in output.read().splitlines()
        if "bootstrap admin key written" in line
    ]
    assert (line["key_id"], line["path"]) == (parsed.key_id, str(key_file))

    key_file.unlink()
    restarted = await start_auth(auth_settings(tmp_path))
    await restarted.stop()
    assert not key_file.exists()
    assert output.read().count("bootstrap admin key written") == 1


async def test_amounts_and_times_out_of_range_are_invalid(auth: Auth) -> None:
    huge_price = pb.SetPriceRequest(price=pb.Price(model="digits", per_1k_prompt_tokens=1e308))
    refused = await fails(auth.stub.SetPrice(huge_price, metadata=auth.admin))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "per_1k_prompt_tokens" in (refused.details() or "")
    await auth.stub.CreateTenant(
        pb.CreateTenantRequest(tenant=pb.Tenant(id="bounds")), metadata=auth.admin
    )
    cap = pb.UpdateTenantRequest(id="bounds", monthly_spend_cap=1.7e308)
    refused = await fails(auth.stub.UpdateTenant(cap, metadata=auth.admin))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    for seconds in (253402300800, 10**15, -(2**62)):
        late = pb.CreateApiKeyRequest(tenant_id="bounds", models=["*"])
        late.expire_time.seconds = seconds
        refused = await fails(auth.stub.CreateApiKey(late, metadata=auth.admin))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expire_time" in (refused.details() or "")


async def test_a_tenant_key_lists_only_the_prices_of_models_it_may_call(
    auth: Auth, output: Output
) -> None:
    for model in ("pricey-a", "pricey-b", "hidden-c"):
        price = pb.Price(model=model, per_1k_prompt_tokens=0.5)
        await auth.stub.SetPrice(pb.SetPriceRequest(price=price), metadata=auth.admin)
    scoped = await tenant_key(auth, output, "prices", models=["pricey-*"])

    async def listed(metadata: Metadata = ()) -> set[str]:
        answer = await auth.stub.ListPrices(pb.ListPricesRequest(), metadata=metadata)
        return {price.model for price in answer.prices}

    assert {"pricey-a", "pricey-b"} <= await listed(bearer(scoped.secret))
    assert "hidden-c" not in await listed(bearer(scoped.secret))
    # Keyless (a gateway's price book) and admin: every price.
    assert {"pricey-a", "pricey-b", "hidden-c"} <= await listed()
    assert {"pricey-a", "pricey-b", "hidden-c"} <= await listed(auth.admin)


async def test_usage_comes_a_page_at_a_time(auth: Auth, output: Output) -> None:
    created = await tenant_key(auth, output, "pages")
    models = [f"m{n:03d}" for n in range(250)]
    records = [
        pb.UsageRecord(
            tenant_id="pages", key_id=created.key.key_id, model=m, day=today(), requests=1
        )
        for m in models
    ]
    await auth.stub.RecordUsage(pb.RecordUsageRequest(batch_id="pages", records=records))
    seen: list[str] = []
    request = pb.GetUsageRequest(tenant_id="pages", page_size=100)
    pages = 0
    while True:
        answer = await auth.stub.GetUsage(request, metadata=auth.admin)
        seen.extend(record.model for record in answer.records)
        pages += 1
        if not answer.next_page_token:
            break
        request.page_token = answer.next_page_token
    assert (pages, seen) == (3, models)  # 100, 100, 50: each row once, in order
    # 0 means 100; a size past 1000 or a token this call never made is refused.
    first = await auth.stub.GetUsage(pb.GetUsageRequest(tenant_id="pages"), metadata=auth.admin)
    assert len(first.records) == 100 and first.next_page_token
    for bad in (pb.GetUsageRequest(page_size=1001), pb.GetUsageRequest(page_token="nonsense")):
        error = await fails(auth.stub.GetUsage(bad, metadata=auth.admin))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The SDK reads every page.
    async with AsyncAuthClient(auth.server.address, api_key=auth.admin_key) as client:
        rows = await client.get_usage(tenant="pages")
    assert [row.model for row in rows] == models
