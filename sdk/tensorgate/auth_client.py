"""AsyncAuthClient: the asyncio client for tenants, API keys, quotas, prices and usage
(tensorgate.auth.v1).

    async with AsyncAuthClient("127.0.0.1:50051", api_key=admin_key) as auth:
        await auth.create_tenant("acme", description="the acme team")
        key, secret = await auth.create_key("acme", name="ci", models=["tinylm*"])
        await auth.update_key(key.key_id, requests_per_minute=600)
        rows = await auth.get_usage(tenant="acme", start_day="2025-06-01")

One method per RPC a caller may make (the gateway offers all of them but the
gateways' own Authenticate and RecordUsage), with keyword arguments; failed calls
raise `tensorgate.errors`. Every call but `list_prices` and `get_usage` needs an
admin key; a tenant's own key may read that tenant's usage. A key's secret exists
only in what `create_key` and `rotate_key` return: store it then.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime

import grpc
from google.protobuf import timestamp_pb2

from tensorgate._channel import AsyncChannelClient
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc

# The largest page GetUsage serves: the fewest round trips for a whole export.
_USAGE_PAGE = 1000


def _day(value: str | date | None) -> str:
    # A datetime is a date too: only its day counts (the ledger is kept per UTC day).
    if isinstance(value, date):
        return value.strftime("%Y-%m-%d")
    return value or ""


class AsyncAuthClient(AsyncChannelClient):
    """One channel to the auth service (directly, or through a gateway that forwards it).

    `api_key` travels as `authorization: Bearer ...`; `credentials` connects over
    TLS. `timeout` is the deadline of each call, in seconds.
    """

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        super().__init__(
            address,
            credentials=credentials,
            metadata=(("authorization", f"Bearer {api_key}"),) if api_key else (),
            timeout=timeout,
        )
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    # Tenants

    async def create_tenant(
        self,
        tenant_id: str,
        *,
        description: str = "",
        quota: auth_pb2.Quota | None = None,
        monthly_spend_cap: float = 0.0,
    ) -> auth_pb2.Tenant:
        """A new tenant; `quota` limits all its keys together (0: no limit)."""
        tenant = auth_pb2.Tenant(
            id=tenant_id,
            description=description,
            quota=quota,
            monthly_spend_cap=monthly_spend_cap,
        )
        return await self._unary(
            self._stub.CreateTenant, auth_pb2.CreateTenantRequest(tenant=tenant)
        )

    async def get_tenant(self, tenant_id: str) -> auth_pb2.Tenant:
        return await self._unary(self._stub.GetTenant, auth_pb2.GetTenantRequest(id=tenant_id))

    async def list_tenants(self) -> list[auth_pb2.Tenant]:
        """Every tenant, by id."""
        response = await self._unary(self._stub.ListTenants, auth_pb2.ListTenantsRequest())
        return list(response.tenants)

    async def update_tenant(
        self,
        tenant_id: str,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        tokens_per_day: int | None = None,
        concurrent_streams: int | None = None,
        monthly_spend_cap: float | None = None,
        description: str | None = None,
    ) -> auth_pb2.Tenant:
        """Sets what is given (0 lifts a limit) and keeps the rest."""
        request = auth_pb2.UpdateTenantRequest(
            id=tenant_id,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            tokens_per_day=tokens_per_day,
            concurrent_streams=concurrent_streams,
            monthly_spend_cap=monthly_spend_cap,
            description=description,
        )
        return await self._unary(self._stub.UpdateTenant, request)

    # Keys

    async def create_key(
        self,
        tenant: str,
        *,
        name: str = "",
        models: Iterable[str] = ("*",),
        admin: bool = False,
        quota: auth_pb2.Quota | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[auth_pb2.ApiKey, str]:
        """A new key of `tenant` and its secret, the only time the secret is shown.

        `models` are the model patterns it may call ("tinylm", "tiny*", "*"; the default
        is every model, as the CLI's); an empty list is refused (InvalidArgumentError).
        `expires_at` (an aware datetime) None: it never expires.
        """
        expire_time = None
        if expires_at is not None:
            expire_time = timestamp_pb2.Timestamp()
            expire_time.FromDatetime(expires_at)
        request = auth_pb2.CreateApiKeyRequest(
            tenant_id=tenant,
            name=name,
            models=list(models),
            admin=admin,
            quota=quota,
            expire_time=expire_time,
        )
        response = await self._unary(self._stub.CreateApiKey, request)
        return response.key, response.secret

    async def list_keys(self, tenant: str = "") -> list[auth_pb2.ApiKey]:
        """A tenant's keys (every tenant's when `tenant` is empty), without secrets."""
        request = auth_pb2.ListApiKeysRequest(tenant_id=tenant)
        response = await self._unary(self._stub.ListApiKeys, request)
        return list(response.keys)

    async def revoke_key(self, key_id: str) -> auth_pb2.ApiKey:
        """Revokes at once; gateways stop accepting it within their cache time."""
        return await self._unary(
            self._stub.RevokeApiKey, auth_pb2.RevokeApiKeyRequest(key_id=key_id)
        )

    async def rotate_key(
        self, key_id: str, *, grace_seconds: int = 0
    ) -> tuple[auth_pb2.ApiKey, str]:
        """A new key like `key_id` and its secret; the old key keeps working for
        `grace_seconds`, and not after."""
        request = auth_pb2.RotateApiKeyRequest(key_id=key_id, grace_seconds=grace_seconds)
        response = await self._unary(self._stub.RotateApiKey, request)
        return response.key, response.secret

    async def update_key(
        self,
        key_id: str,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        tokens_per_day: int | None = None,
        concurrent_streams: int | None = None,
    ) -> auth_pb2.ApiKey:
        """Sets the key's own limits that are given (0 lifts one) and keeps the rest."""
        request = auth_pb2.UpdateApiKeyRequest(
            key_id=key_id,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            tokens_per_day=tokens_per_day,
            concurrent_streams=concurrent_streams,
        )
        return await self._unary(self._stub.UpdateApiKey, request)

    # Prices

    async def set_price(
        self,
        model: str,
        *,
        per_1k_prompt_tokens: float = 0.0,
        per_1k_completion_tokens: float = 0.0,
        per_compute_second: float = 0.0,
    ) -> auth_pb2.Price:
        """What a model's usage costs from now on (the ledger's cost, the spend cap)."""
        price = auth_pb2.Price(
            model=model,
            per_1k_prompt_tokens=per_1k_prompt_tokens,
            per_1k_completion_tokens=per_1k_completion_tokens,
            per_compute_second=per_compute_second,
        )
        return await self._unary(self._stub.SetPrice, auth_pb2.SetPriceRequest(price=price))

    async def list_prices(self) -> list[auth_pb2.Price]:
        response = await self._unary(self._stub.ListPrices, auth_pb2.ListPricesRequest())
        return list(response.prices)

    # Usage

    async def get_usage(
        self,
        *,
        tenant: str = "",
        key: str = "",
        model: str = "",
        start_day: str | date | None = None,
        end_day: str | date | None = None,
    ) -> list[auth_pb2.UsageRecord]:
        """Ledger rows per tenant, key id, model and UTC day; the days are inclusive and
        a filter left empty matches everything. No `tenant`: the key's own tenant (an
        admin key: every tenant)."""
        request = auth_pb2.GetUsageRequest(
            tenant_id=tenant,
            key_id=key,
            model=model,
            start_day=_day(start_day),
            end_day=_day(end_day),
            page_size=_USAGE_PAGE,
        )
        records: list[auth_pb2.UsageRecord] = []
        while True:  # every page: the service answers a page at a time
            response = await self._unary(self._stub.GetUsage, request)
            records.extend(response.records)
            if not response.next_page_token:
                return records
            request.page_token = response.next_page_token
