"""Model prices as the gateway charges them: read from the auth service, refreshed
every `refresh_seconds` (prices change rarely, and a call must not wait for them).

Until the first read succeeds the gateway does not know what any call costs, so
`price` refuses metered calls with UNAVAILABLE rather than treating every model as
free: a gateway that started while the auth service was unreachable would otherwise
bill nothing and let a tenant at its spend cap through until the next refresh. It
retries that first read every second or so instead of waiting a whole refresh
period. Once prices are known, a failed refresh keeps the last ones.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc

from gateway.quota import Price
from services.runtime.errors import Unavailable

log = structlog.get_logger("tensorgate.gateway.prices")

# The first read is retried from this delay, doubling up to the cap (or the refresh
# period when that is shorter): calls are refused until it succeeds, so soon matters,
# but a gateway fleet restarting into an auth outage must not hammer it either.
_FIRST_RETRY_S = 0.5
_MAX_RETRY_S = 4.0

_UNKNOWN = (
    "model prices have not been read from the auth service yet (it could not be "
    "reached); metered calls are refused until they are, retry shortly"
)


class PriceBook:
    def __init__(self, channel: grpc.aio.Channel, *, refresh_seconds: float = 30.0) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._refresh_seconds = refresh_seconds
        # None until the first read: unknown is not the same as free.
        self._prices: dict[str, Price] | None = None
        self.known = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def price(self, model: str) -> Price | None:
        """The model's price (None: it has none, it is free). Raises Unavailable while
        no price has been read yet."""
        prices = self._prices
        if prices is None:
            raise Unavailable(_UNKNOWN)
        return prices.get(model)

    async def refresh(self) -> bool:
        """Reads the prices; False when the auth service did not answer."""
        try:
            listing = await self._stub.ListPrices(auth_pb2.ListPricesRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("prices not refreshed", error=exc.code().name, known=self.known.is_set())
            return False
        self._prices = {
            p.model: Price(
                prompt_per_1k=p.per_1k_prompt_tokens,
                completion_per_1k=p.per_1k_completion_tokens,
                compute_per_second=p.per_compute_second,
            )
            for p in listing.prices
        }
        if not self.known.is_set():
            self.known.set()
            log.info("prices read", models=len(self._prices))
        return True

    async def start(self) -> None:
        """Reads the prices once, then keeps them fresh in the background. Does not wait
        for an unreachable auth service: the gateway starts, refusing metered calls."""
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="price-refresh")

    async def _refresh_forever(self) -> None:
        retry_s = _FIRST_RETRY_S
        while not self.known.is_set():
            await asyncio.sleep(retry_s)
            if not await self.refresh():
                retry_s = min(retry_s * 2, _MAX_RETRY_S, self._refresh_seconds)
        while True:
            await asyncio.sleep(self._refresh_seconds)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
