"""The registry's API at a gateway that requires keys: only an admin key reads or changes
it (an upload is code the workers run; a download is another team's weights)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.errors import PermissionDeniedError, UnauthenticatedError
from tensorgate.registry_client import AsyncRegistryClient

from gateway.server import Gateway
from services.runtime.api_keys import parse_key
from tests.conftest import AuthStack, RegistryStack, start_auth_gateway

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def keyed_registry_gateway(
    registry_stack: RegistryStack, auth_stack: AuthStack
) -> AsyncIterator[Gateway]:
    gateway = await start_auth_gateway(
        auth_stack.auth.address, registry_stack.worker, registry=registry_stack.registry.address
    )
    yield gateway
    await gateway.stop()


async def test_only_admin_keys_change_the_registry(
    keyed_registry_gateway: Gateway, auth_stack: AuthStack
) -> None:
    address = keyed_registry_gateway.address
    async with AsyncAuthClient(address, api_key=auth_stack.admin_key) as admin:
        await admin.create_tenant("registry-readers")
        _, tenant_key = await admin.create_key("registry-readers", models=["*"])

    async with AsyncRegistryClient(address) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.list_models()

    async with AsyncRegistryClient(address, api_key=auth_stack.admin_key) as registry:
        assert {m.name for m in await registry.list_models()} >= {"digits", "tinylm"}
        production = await registry.resolve_model_ref("digits@production")

    async with AsyncRegistryClient(address, api_key=tenant_key) as reader:
        with pytest.raises(PermissionDeniedError, match="admin"):
            await reader.list_models()
        with pytest.raises(PermissionDeniedError, match="admin"):
            await reader.download("digits", production.version, REPO / "never-written.tar")
        with pytest.raises(PermissionDeniedError, match="admin"):
            await reader.set_alias("digits", "stolen", production.version)
        with pytest.raises(PermissionDeniedError, match="admin"):
            await reader.upload("digits", REPO / "models" / "repository" / "digits")
        with pytest.raises(PermissionDeniedError, match="admin"):
            await reader.set_deployment("digits", version=production.version)

    async with AsyncRegistryClient(address, api_key=auth_stack.admin_key) as registry:
        moved = await registry.set_alias("digits", "admin-set", production.version)
        assert moved.version == production.version
        await registry.delete_alias("digits", "admin-set")


async def test_the_audit_trail_names_the_key_not_who_the_caller_claims_to_be(
    keyed_registry_gateway: Gateway, auth_stack: AuthStack
) -> None:
    admin_key = parse_key(auth_stack.admin_key)
    assert admin_key is not None
    async with AsyncRegistryClient(
        keyed_registry_gateway.address, api_key=auth_stack.admin_key, actor="someone-else"
    ) as registry:
        production = await registry.resolve_model_ref("digits@production")
        await registry.set_alias("digits", "audited", production.version, reason="audit")
        try:
            (move,) = await registry.get_alias_history("digits", "audited")
        finally:
            await registry.delete_alias("digits", "audited")
        async for event in registry.watch():
            if event.alias_deleted.alias == "audited":
                break
    assert move.actor == f"key:{admin_key.key_id}"
    # A deletion, which leaves no history row, is on the change feed with who made it.
    assert event.actor == f"key:{admin_key.key_id}"
