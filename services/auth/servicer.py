"""AuthService: the auth service's RPCs, each a thin step from the request to the store.

What a call may do and what it means lives in the store (store.py, keys.py,
ledger.py); who may call it is decided before it runs (authenticator.py). This file
reads requests, limits a tenant's key to its own usage, and hands back messages.
Domain errors raised below become statuses in the runtime's pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth.v1 import auth_pb2_grpc

from services.auth.key_changes import KeyChanges
from services.auth.records import QUOTA_FIELDS, KeyRefused, QuotaUpdate
from services.auth.store import AuthStore
from services.runtime import calls
from services.runtime.api_keys import KEY_REFUSED, allows
from services.runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated

Context = grpc.aio.ServicerContext[Any, Any]


def _quota_update(request: pb.UpdateTenantRequest | pb.UpdateApiKeyRequest) -> QuotaUpdate:
    # ListFields holds the optional fields that were sent, zeros included.
    sent = {field.name: value for field, value in request.ListFields()}
    return QuotaUpdate(**{name: sent[name] for name in QUOTA_FIELDS if name in sent})


def _expire_us(request: pb.CreateApiKeyRequest) -> int | None:
    if not request.HasField("expire_time"):
        return None
    stamp = request.expire_time
    # Years 1..9999: what a timestamp can mean (protobuf refuses the rest with ValueError).
    if not (-62135596800 <= stamp.seconds <= 253402300799 and 0 <= stamp.nanos < 10**9):
        raise InvalidArgument("expire_time", "must be a time between the years 1 and 9999")
    return int(stamp.ToMicroseconds())


class AuthServiceServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, store: AuthStore, changes: KeyChanges) -> None:
        self._store = store
        self._changes = changes

    # --- tenants --------------------------------------------------------------------------

    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Context) -> pb.Tenant:
        created = await self._store.create_tenant(request.tenant)
        calls.note(subject_tenant=created.id)  # once valid: a key pasted as an id is not
        return created

    async def GetTenant(self, request: pb.GetTenantRequest, context: Context) -> pb.Tenant:
        return await self._store.get_tenant(request.id)

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: Context
    ) -> pb.ListTenantsResponse:
        return pb.ListTenantsResponse(tenants=await self._store.list_tenants())

    async def UpdateTenant(self, request: pb.UpdateTenantRequest, context: Context) -> pb.Tenant:
        updated = await self._store.update_tenant(
            request.id,
            quota=_quota_update(request),
            monthly_spend_cap=(
                request.monthly_spend_cap if request.HasField("monthly_spend_cap") else None
            ),
            description=request.description if request.HasField("description") else None,
        )
        calls.note(subject_tenant=updated.id)
        self._changes.publish(tenant_id=updated.id)  # its limits travel with every key
        return updated

    # --- keys -----------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        created = await self._store.create_key(
            request.tenant_id,
            name=request.name,
            models=list(request.models),
            admin=request.admin,
            quota=request.quota,
            expire_us=_expire_us(request),
        )
        calls.note(created_key_id=created.key.key_id)
        return created

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        return pb.ListApiKeysResponse(keys=await self._store.list_keys(request.tenant_id))

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Context) -> pb.ApiKey:
        revoked = await self._store.revoke_key(request.key_id)
        calls.note(revoked_key_id=revoked.key_id)
        self._changes.publish(key_id=revoked.key_id)
        return revoked

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        rotated = await self._store.rotate_key(request.key_id, grace_seconds=request.grace_seconds)
        calls.note(rotated_key_id=request.key_id, created_key_id=rotated.key.key_id)
        self._changes.publish(key_id=request.key_id)  # its grace now ends
        return rotated

    async def UpdateApiKey(self, request: pb.UpdateApiKeyRequest, context: Context) -> pb.ApiKey:
        updated = await self._store.update_key(request.key_id, quota=_quota_update(request))
        self._changes.publish(key_id=updated.key_id)
        return updated

    # --- prices ---------------------------------------------------------------------------

    async def SetPrice(self, request: pb.SetPriceRequest, context: Context) -> pb.Price:
        return await self._store.set_price(request.price)

    async def ListPrices(
        self, request: pb.ListPricesRequest, context: Context
    ) -> pb.ListPricesResponse:
        prices = await self._store.list_prices()
        caller = calls.principal()
        if caller is not None and not caller.admin:  # keyless: a gateway's price book
            prices = [price for price in prices if allows(caller, price.model)]
        return pb.ListPricesResponse(prices=prices)

    # --- for gateways ---------------------------------------------------------------------

    async def Authenticate(self, request: pb.AuthenticateRequest, context: Context) -> pb.Principal:
        try:
            principal = await self._store.authenticate(request.key)
        except KeyRefused as refused:
            # Why, for the operator's log line; the gateway hears KEY_REFUSED only.
            calls.note(auth_refused=refused.reason)
            if refused.key_id:
                calls.note(key_id=refused.key_id)
            raise
        calls.note(key_id=principal.key_id, tenant=principal.tenant_id)
        return principal

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        applied = await self._store.record_usage(request.batch_id, request.records)
        calls.note(records=len(request.records), repeated_batch=not applied)
        return pb.RecordUsageResponse()

    async def WatchKeys(
        self, request: pb.WatchKeysRequest, context: Context
    ) -> AsyncIterator[pb.KeyChanged]:
        queue = self._changes.subscribe()
        # Headers now, so the gateway knows it is subscribed (and drops what it cached
        # before) while no change has happened yet.
        await context.send_initial_metadata(())
        async for change in self._changes.follow(queue):
            yield change

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        caller = calls.principal()
        if caller is None:  # the authenticator lets no keyless GetUsage through
            raise Unauthenticated(KEY_REFUSED)
        tenant_id = request.tenant_id
        if not caller.admin:
            if tenant_id and tenant_id != caller.tenant:
                raise PermissionDenied("a tenant's key sees only its own tenant's usage")
            tenant_id = caller.tenant
        records, token = await self._store.get_usage(
            tenant_id=tenant_id,
            key_id=request.key_id,
            model=request.model,
            start_day=request.start_day,
            end_day=request.end_day,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.GetUsageResponse(records=records, next_page_token=token)
