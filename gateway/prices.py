"""Model prices as the gateway charges them: read from the auth service, refreshed
every `refresh_seconds` (prices change rarely, and a call must not wait for them)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc

from gateway.quota import Price

log = structlog.get_logger("tensorgate.gateway.prices")


class PriceBook:
    def __init__(self, channel: grpc.aio.Channel, *, refresh_seconds: float = 30.0) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._refresh_seconds = refresh_seconds
        self._prices: dict[str, Price] = {}
        self._task: asyncio.Task[None] | None = None

    def price(self, model: str) -> Price | None:
        return self._prices.get(model)

    async def refresh(self) -> None:
        try:
            listing = await self._stub.ListPrices(auth_pb2.ListPricesRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("prices not refreshed", error=exc.code().name)
            return
        self._prices = {
            p.model: Price(
                prompt_per_1k=p.per_1k_prompt_tokens,
                completion_per_1k=p.per_1k_completion_tokens,
                compute_per_second=p.per_compute_second,
            )
            for p in listing.prices
        }

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="price-refresh")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
