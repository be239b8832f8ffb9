"""What the end-to-end tests of keys, quotas and the usage ledger share: the auth admin API
called through the gateway with the admin key (the plain generated stub, as any client
would), fresh tenants and keys with unique ids, and the few calls the tests make."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate import AsyncGatewayClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth.v1 import auth_pb2_grpc
from tensorgate.errors import TensorgateClientError

from gateway.quota import Price
from gateway.server import Gateway

REPO = Path(__file__).resolve().parent.parent
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def unique(prefix: str) -> str:
    """A tenant id (or name) no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def digits_image() -> npt.NDArray[np.float32]:
    """Four 8x8 digit images (0, 1, 2, 3), the input `digits` expects."""
    rows = json.loads((REPO / "models" / "examples" / "digits.json").read_text())
    return np.asarray(rows, dtype=np.float32)


def timestamp_in(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(int((time.time() + seconds) * 1_000_000))
    return stamp


def quota(
    *,
    requests_per_minute: int = 0,
    tokens_per_minute: int = 0,
    tokens_per_day: int = 0,
    concurrent_streams: int = 0,
) -> pb.Quota:
    return pb.Quota(
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
        concurrent_streams=concurrent_streams,
    )


@dataclass
class Admin:
    """The auth admin API at an address (a gateway), called with the admin key."""

    stub: auth_pb2_grpc.AuthServiceAsyncStub
    # Never in a repr: a failing test's traceback must not show the admin key.
    admin_key: str = field(repr=False)

    @property
    def metadata(self) -> Metadata:
        return bearer(self.admin_key)

    async def tenant(
        self, prefix: str = "t", *, limits: pb.Quota | None = None, spend_cap: float = 0.0
    ) -> str:
        tenant = pb.Tenant(id=unique(prefix), monthly_spend_cap=spend_cap)
        if limits is not None:
            tenant.quota.CopyFrom(limits)
        created = await self.stub.CreateTenant(
            pb.CreateTenantRequest(tenant=tenant), metadata=self.metadata, timeout=10
        )
        return created.id

    async def new_key(
        self,
        tenant_id: str,
        *,
        models: tuple[str, ...] = ("*",),
        limits: pb.Quota | None = None,
        expire_in_s: float | None = None,
        admin: bool = False,
    ) -> pb.CreateApiKeyResponse:
        """A new key of `tenant_id`; `.secret` is the whole key, `.key.key_id` its id."""
        request = pb.CreateApiKeyRequest(
            tenant_id=tenant_id, name="e2e", models=list(models), admin=admin
        )
        if limits is not None:
            request.quota.CopyFrom(limits)
        if expire_in_s is not None:
            request.expire_time.CopyFrom(timestamp_in(expire_in_s))
        return await self.stub.CreateApiKey(request, metadata=self.metadata, timeout=10)

    async def revoke(self, key_id: str) -> pb.ApiKey:
        return await self.stub.RevokeApiKey(
            pb.RevokeApiKeyRequest(key_id=key_id), metadata=self.metadata, timeout=10
        )

    async def rotate(self, key_id: str, grace_seconds: int) -> pb.CreateApiKeyResponse:
        return await self.stub.RotateApiKey(
            pb.RotateApiKeyRequest(key_id=key_id, grace_seconds=grace_seconds),
            metadata=self.metadata,
            timeout=10,
        )

    async def set_price(
        self, model: str, *, prompt_per_1k: float = 0.0, completion_per_1k: float = 0.0
    ) -> None:
        price = pb.Price(
            model=model,
            per_1k_prompt_tokens=prompt_per_1k,
            per_1k_completion_tokens=completion_per_1k,
        )
        await self.stub.SetPrice(
            pb.SetPriceRequest(price=price), metadata=self.metadata, timeout=10
        )

    async def usage(self, tenant_id: str) -> list[pb.UsageRecord]:
        response = await self.stub.GetUsage(
            pb.GetUsageRequest(tenant_id=tenant_id), metadata=self.metadata, timeout=10
        )
        return list(response.records)


@asynccontextmanager
async def admin_at(address: str, admin_key: str) -> AsyncIterator[Admin]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield Admin(auth_pb2_grpc.AuthServiceStub(channel), admin_key)


async def failure(call: Awaitable[object]) -> TensorgateClientError:
    """The typed error `call` (an SDK call) ends with; fails the test if it succeeds."""
    try:
        await call
    except TensorgateClientError as error:
        return error
    raise AssertionError("the call succeeded; it should have been refused")


async def rpc_failure(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The status a raw stub call ends with; fails the test if it succeeds."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded; it should have been refused")


async def generated_tokens(
    client: AsyncGatewayClient, prompt: str, *, max_tokens: int, model: str = "tinylm"
) -> int:
    """Streams a whole generation; the number of tokens received."""
    tokens = 0
    async for chunk in client.generate(model, prompt, max_tokens=max_tokens, seed=7):
        tokens += len(chunk.token_ids)
    return tokens


async def generate_all(client: AsyncGatewayClient, prompt: str, *, max_tokens: int) -> None:
    await generated_tokens(client, prompt, max_tokens=max_tokens)


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float, what: str, interval: float = 0.2
) -> T:
    """The first answer of `check` that is not None, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if answer is not None:
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not so within {timeout:g} s")
        await asyncio.sleep(interval)


async def prices_seen(
    gateway: Gateway, model: str, *, prompt_per_1k: float = 0.0, completion_per_1k: float = 0.0
) -> None:
    """Waits until `gateway` (in this process) charges the price just set for `model`: it
    re-reads prices every price_refresh_seconds (0.2 s in the tests)."""
    wanted = Price(prompt_per_1k=prompt_per_1k, completion_per_1k=completion_per_1k)

    async def seen() -> bool | None:
        book = gateway.control._prices
        return True if book is not None and book.price(model) == wanted else None

    await eventually(seen, timeout=30, what=f"the gateway's price of {model}")


def by_model(records: list[pb.UsageRecord]) -> dict[str, pb.UsageRecord]:
    """Ledger rows summed per model (over keys and days); `key_id` is kept when one key
    made all of a model's calls."""
    summed: dict[str, pb.UsageRecord] = {}
    for row in records:
        total = summed.get(row.model)
        if total is None:
            summed[row.model] = total = pb.UsageRecord()
            total.CopyFrom(row)
            continue
        if total.key_id != row.key_id:
            total.key_id = ""
        total.requests += row.requests
        total.errors += row.errors
        total.prompt_tokens += row.prompt_tokens
        total.completion_tokens += row.completion_tokens
        total.compute_micros += row.compute_micros
        total.cost += row.cost
    return summed


async def settled_usage(
    admin: Admin, tenant_id: str, requests: dict[str, int], *, flush_s: float = 1.0
) -> dict[str, pb.UsageRecord]:
    """The tenant's ledger summed per model once it holds `requests` calls per model and
    nothing more arrives: the gateway sends usage once every `flush_s`, so a read that
    stays the same over a few of its sends has everything."""

    async def counted() -> list[pb.UsageRecord] | None:
        try:
            rows = await admin.usage(tenant_id)
        except grpc.aio.AioRpcError as exc:
            # A gateway or auth service just (re)started may not reach the other yet
            # ("retry shortly"); one that never does still fails the wait below.
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None
        got = {model: row.requests for model, row in by_model(rows).items()}
        return rows if got == requests else None

    first = await eventually(counted, timeout=60, what=f"{requests} calls in the ledger")
    await asyncio.sleep(2.5 * flush_s)
    later = await admin.usage(tenant_id)
    assert later == first, "the ledger changed after it held every call"
    return by_model(later)
