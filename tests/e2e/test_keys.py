"""API keys at the gateway, end to end (gateway -> worker -> real Triton, the auth service
behind the gateway): the error contract for Generate and Infer, model scopes, admin-only
calls, rotation grace and revocation within the gateway's key cache time.

Every refused key (none, malformed, a wrong checksum, unknown, revoked, expired) gets the
same UNAUTHENTICATED answer, word for word: nothing tells a caller which one it was, and
it says what to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from tensorgate import AsyncGatewayClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.errors import (
    PermissionDeniedError,
    TensorgateClientError,
    UnauthenticatedError,
    UnavailableError,
)

from services.auth.server import start_auth
from services.auth.settings import AuthSettings
from services.runtime.api_keys import new_key
from services.worker.server import Worker
from tests.auth_helpers import (
    Admin,
    admin_at,
    bearer,
    digits_image,
    failure,
    generate_all,
    rpc_failure,
)
from tests.conftest import AuthStack, start_auth_gateway

pytestmark = pytest.mark.integration

# One call of each kind through the gateway with a given key (None: no key at all).
Attempt = Callable[[str, str | None], Awaitable[object]]


async def _generate(address: str, key: str | None) -> None:
    async with AsyncGatewayClient(address, api_key=key) as client:
        await generate_all(client, "ROMEO:", max_tokens=8)


async def _infer(address: str, key: str | None) -> None:
    async with AsyncGatewayClient(address, api_key=key) as client:
        await client.infer("digits", {"image": digits_image()})


CALLS = {"Generate": _generate, "Infer": _infer}


@pytest.fixture(params=sorted(CALLS))
def attempt(request: pytest.FixtureRequest) -> Attempt:
    return CALLS[request.param]


@pytest.fixture
async def admin(auth_stack: AuthStack) -> AsyncIterator[Admin]:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as connected:
        yield connected


async def _refused(attempt: Attempt, address: str, key: str | None) -> TensorgateClientError:
    error = await failure(attempt(address, key))
    assert isinstance(error, UnauthenticatedError), error
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    return error


def _wrong_checksum(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


async def _until(moment: float) -> None:
    """Sleeps until the wall clock passes `moment` (unix time)."""
    await asyncio.sleep(max(0.0, moment - time.time()))


async def test_every_bad_key_is_unauthenticated_and_none_says_which(
    auth_stack: AuthStack, admin: Admin, attempt: Attempt
) -> None:
    address = auth_stack.gateway.address
    tenant = await admin.tenant("keys")
    good = await admin.new_key(tenant)
    revoked = await admin.new_key(tenant)
    expiring = await admin.new_key(tenant, expire_in_s=1.5)
    used_then_expired = await admin.new_key(tenant, expire_in_s=1.5)
    # Both work first; one of them is then cached by the gateway with its expiry.
    await attempt(address, good.secret)
    await attempt(address, used_then_expired.secret)
    await admin.revoke(revoked.key.key_id)
    _, unknown = new_key()  # well-formed, with a right checksum, never stored
    await _until(used_then_expired.key.expire_time.ToMicroseconds() / 1e6 + 0.1)

    bad: dict[str, str | None] = {
        "no key": None,
        "malformed": "tg_not_a_key",
        "not a tg_ key at all": "sk-" + "x" * 40,
        "wrong checksum": _wrong_checksum(good.secret),
        "a good key's secret with another checksum": good.secret[:-6] + "zzzzzz",
        "unknown": unknown,
        "revoked": revoked.secret,
        "expired": expiring.secret,
        "expired while cached": used_then_expired.secret,
    }
    answers = {why: (await _refused(attempt, address, key)).message for why, key in bad.items()}
    assert len(set(answers.values())) == 1, answers
    message = next(iter(answers.values()))
    assert "authorization: Bearer <api key>" in message  # what to do, for every one
    for word in ("revoked", "expired", "unknown", "checksum", "malformed", "exist"):
        assert word not in message.lower(), message
    for key in (revoked, expiring, used_then_expired):
        assert key.key.key_id not in message
    # The good key still works: the refusals were about the keys, not the gateway.
    await attempt(address, good.secret)


async def test_the_bearer_scheme_is_required(auth_stack: AuthStack, admin: Admin) -> None:
    tenant = await admin.tenant("scheme")
    created = await admin.new_key(tenant)
    async with grpc.aio.insecure_channel(auth_stack.gateway.address) as channel:
        list_models = channel.unary_unary(
            "/tensorgate.gateway.v1.InferenceGateway/ListModels",
            request_serializer=None,
            response_deserializer=None,
        )
        for metadata in ((("authorization", created.secret),), (("x-api-key", created.secret),)):
            error = await rpc_failure(list_models(b"", metadata=metadata, timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # Sent properly, the same key is let in.
        await list_models(b"", metadata=bearer(created.secret), timeout=10)


async def test_a_key_without_scope_for_the_model_is_permission_denied_naming_it(
    auth_stack: AuthStack, admin: Admin
) -> None:
    address = auth_stack.gateway.address
    tenant = await admin.tenant("scope")
    only_digits = await admin.new_key(tenant, models=("digits",))
    only_tiny = await admin.new_key(tenant, models=("tiny*",))
    # A key for no model is refused, not made useless: '*' says every model.
    empty = await rpc_failure(admin.new_key(tenant, models=()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT, empty
    assert "models" in (empty.details() or "") and "'*'" in (empty.details() or "")

    denied = await failure(_generate(address, only_digits.secret))
    assert isinstance(denied, PermissionDeniedError), denied
    assert "tinylm" in denied.message
    denied = await failure(_infer(address, only_tiny.secret))
    assert isinstance(denied, PermissionDeniedError), denied
    assert "digits" in denied.message
    # Each key may call what its patterns match, by name, version or not.
    await _infer(address, only_digits.secret)
    await _generate(address, only_tiny.secret)
    async with AsyncGatewayClient(address, api_key=only_tiny.secret) as client:
        async for _ in client.generate("tinylm:1", "ROMEO:", max_tokens=4):
            pass
        # And lists only those: other teams' models are not its business.
        assert {m.name for m in await client.list_models()} == {"tinylm"}
    async with AsyncGatewayClient(address, api_key=auth_stack.admin_key) as client:
        assert {m.name for m in await client.list_models()} >= {"tinylm", "digits"}


async def test_a_tenant_key_may_not_call_admin_rpcs_through_the_gateway(
    auth_stack: AuthStack, admin: Admin
) -> None:
    tenant = await admin.tenant("notadmin")
    tenant_key = await admin.new_key(tenant)
    stub = admin.stub
    as_tenant = bearer(tenant_key.secret)
    calls: dict[str, Awaitable[object]] = {
        "CreateTenant": stub.CreateTenant(
            pb.CreateTenantRequest(tenant=pb.Tenant(id=f"{tenant}-2")), metadata=as_tenant
        ),
        "UpdateTenant": stub.UpdateTenant(
            pb.UpdateTenantRequest(id=tenant, requests_per_minute=1_000_000), metadata=as_tenant
        ),
        "CreateApiKey": stub.CreateApiKey(
            pb.CreateApiKeyRequest(tenant_id=tenant, models=["*"], admin=True), metadata=as_tenant
        ),
        "ListApiKeys": stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=as_tenant),
        "RevokeApiKey": stub.RevokeApiKey(
            pb.RevokeApiKeyRequest(key_id=tenant_key.key.key_id), metadata=as_tenant
        ),
        "SetPrice": stub.SetPrice(
            pb.SetPriceRequest(price=pb.Price(model="tinylm")), metadata=as_tenant
        ),
        "ListTenants": stub.ListTenants(pb.ListTenantsRequest(), metadata=as_tenant),
    }
    for method, call in calls.items():
        error = await rpc_failure(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (method, error)
    # Nothing changed: the key is not revoked, the tenant has no quota, no tenant was made.
    await _generate(auth_stack.gateway.address, tenant_key.secret)
    got = await stub.GetTenant(pb.GetTenantRequest(id=tenant), metadata=admin.metadata)
    assert got.quota.requests_per_minute == 0
    missing = await rpc_failure(
        stub.GetTenant(pb.GetTenantRequest(id=f"{tenant}-2"), metadata=admin.metadata)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    # Without a key an admin call is not even considered.
    error = await rpc_failure(stub.ListTenants(pb.ListTenantsRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def _rotate_and_check_grace(
    admin: Admin, address: str, attempt: Attempt, *, use_before: bool
) -> None:
    """Rotates a key with a 2 s grace: old and new keys work during it, only the new one
    after it. `use_before`: the old key is used (so cached by the gateway) before."""
    tenant = await admin.tenant("rotate")
    old = await admin.new_key(tenant, models=("tinylm", "digits"))
    if use_before:
        await attempt(address, old.secret)
    rotated = await admin.rotate(old.key.key_id, grace_seconds=2)
    assert rotated.key.rotated_from == old.key.key_id
    assert list(rotated.key.models) == ["tinylm", "digits"]
    await attempt(address, old.secret)  # within the grace period
    await attempt(address, rotated.secret)

    keys = await admin.stub.ListApiKeys(
        pb.ListApiKeysRequest(tenant_id=tenant), metadata=admin.metadata
    )
    grace_end = next(k for k in keys.keys if k.key_id == old.key.key_id).expire_time
    assert grace_end.ToMicroseconds() / 1e6 <= time.time() + 2.0
    await _until(grace_end.ToMicroseconds() / 1e6 + 0.1)
    await _refused(attempt, address, old.secret)
    await attempt(address, rotated.secret)


async def test_rotation_old_key_works_during_the_grace_period_and_not_after(
    auth_stack: AuthStack, admin: Admin, attempt: Attempt
) -> None:
    await _rotate_and_check_grace(admin, auth_stack.gateway.address, attempt, use_before=False)


async def test_rotation_grace_is_exact_for_a_key_cached_since_before_a_shorter_cache(
    auth_stack: AuthStack, worker: Worker, admin: Admin, attempt: Attempt
) -> None:
    """A gateway trusting keys for 1 s, a grace of 2 s: the old key's cached answer from
    before the rotation has aged out by the end of the grace, so the end is exact."""
    gateway = await start_auth_gateway(auth_stack.auth.address, worker, auth_cache_seconds=1.0)
    try:
        await _rotate_and_check_grace(admin, gateway.address, attempt, use_before=True)
    finally:
        await gateway.stop()


async def test_rotation_grace_is_exact_even_for_a_key_the_gateway_cached_before(
    auth_stack: AuthStack, admin: Admin
) -> None:
    await _rotate_and_check_grace(admin, auth_stack.gateway.address, _infer, use_before=True)


async def test_revocation_takes_effect_within_the_gateways_cache_time(
    auth_stack: AuthStack, worker: Worker, admin: Admin, attempt: Attempt
) -> None:
    cache_seconds = 1.0
    gateway = await start_auth_gateway(
        auth_stack.auth.address, worker, auth_cache_seconds=cache_seconds
    )
    try:
        tenant = await admin.tenant("revoke")
        created = await admin.new_key(tenant)
        other = await admin.new_key(tenant)
        await attempt(gateway.address, created.secret)
        await attempt(gateway.address, other.secret)
        await admin.revoke(created.key.key_id)
        revoked_at = time.time()
        # Right after, the gateway may still trust its cached answer; either is allowed.
        with contextlib.suppress(UnauthenticatedError):
            await attempt(gateway.address, created.secret)
        await _until(revoked_at + cache_seconds + 0.3)
        await _refused(attempt, gateway.address, created.secret)
        await attempt(gateway.address, other.secret)
    finally:
        await gateway.stop()


async def test_a_revocation_is_pushed_to_the_gateway_not_left_to_its_cache(
    auth_stack: AuthStack, worker: Worker, admin: Admin, attempt: Attempt
) -> None:
    # A cache far longer than the test: only the auth service's push can end the key.
    gateway = await start_auth_gateway(auth_stack.auth.address, worker, auth_cache_seconds=60.0)
    try:
        tenant = await admin.tenant("pushed")
        created = await admin.new_key(tenant)
        await attempt(gateway.address, created.secret)  # now cached for a minute
        await admin.revoke(created.key.key_id)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                await attempt(gateway.address, created.secret)
            except UnauthenticatedError:
                break
            assert time.monotonic() < deadline, "the revoked key still works on the gateway"
            await asyncio.sleep(0.05)
    finally:
        await gateway.stop()


async def test_through_an_auth_outage_only_recently_vouched_keys_keep_working(
    worker: Worker, tmp_path: Path
) -> None:
    # An auth service of its own, to stop; two gateways that differ only in how long a
    # key vouched for before the outage keeps working (0: not at all).
    key_file = tmp_path / "admin.key"
    auth = await start_auth(
        AuthSettings(
            data_dir=tmp_path, metrics_port=-1, drain_seconds=0.0, bootstrap_admin_key_file=key_file
        )
    )
    tolerant = await start_auth_gateway(
        auth.address, worker, auth_cache_seconds=0.2, auth_outage_seconds=60.0
    )
    strict = await start_auth_gateway(
        auth.address, worker, auth_cache_seconds=0.2, auth_outage_seconds=0.0
    )
    try:
        key = key_file.read_text().strip()
        await _generate(tolerant.address, key)
        await _generate(strict.address, key)
        await auth.stop()
        await asyncio.sleep(0.3)  # past the cache: each gateway asks, and cannot
        for _ in range(20):  # served from the cache, asked again in the background
            await _generate(tolerant.address, key)
        error = await failure(_generate(strict.address, key))
        assert isinstance(error, UnavailableError), error
        assert "API keys cannot be checked right now" in str(error)
        # A key never vouched for is not let through by the outage either.
        error = await failure(_generate(tolerant.address, new_key()[1]))
        assert isinstance(error, UnavailableError), error
    finally:
        await tolerant.stop()
        await strict.stop()
        await auth.stop()
