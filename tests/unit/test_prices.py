"""The gateway's price book when the auth service cannot answer at start: no model is
free meanwhile (metered calls are refused with UNAVAILABLE, a tenant at its spend cap
gets nothing through), and the first read is retried soon, not a refresh period later.

Against a real in-process gRPC server that fails ListPrices until told to answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from gateway.local_counters import InProcessCounters
from gateway.prices import PriceBook
from gateway.quota import Price, QuotaGate
from services.runtime.calls import Call, Principal
from services.runtime.channels import open_channel
from services.runtime.errors import ResourceExhausted, Unavailable
from tests.helpers import generate_call


class FlakyAuth(auth_pb2_grpc.AuthServiceServicer):
    """Answers ListPrices with UNAVAILABLE `failures` times, then with one price."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.asked = 0

    async def ListPrices(
        self, request: auth_pb2.ListPricesRequest, context: Any
    ) -> auth_pb2.ListPricesResponse:
        self.asked += 1
        if self.asked <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unreachable")
        price = auth_pb2.Price(model="tinylm", per_1k_completion_tokens=1.0)
        return auth_pb2.ListPricesResponse(prices=[price])


@pytest.fixture
async def auth() -> AsyncIterator[tuple[FlakyAuth, grpc.aio.Channel]]:
    fake = FlakyAuth(failures=2)  # type: ignore[abstract]  # only what the book calls
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield fake, channel
    await channel.close(None)
    await server.stop(None)


def capped_call() -> Call:
    """A Generate call of a tenant already at its monthly spend cap."""
    return generate_call(Principal(key_id="k1", tenant="acme", monthly_spend_cap=1.0))


async def test_no_model_is_free_before_the_first_price_read(
    auth: tuple[FlakyAuth, grpc.aio.Channel],
) -> None:
    fake, channel = auth
    book = PriceBook(channel, refresh_seconds=30.0)
    gate = QuotaGate(InProcessCounters(), prices=book.price)
    request = inference_pb2.GenerateRequest(model="tinylm", prompt="hi", max_tokens=2000)
    await book.start()
    try:
        assert fake.asked == 1  # the read at start failed
        with pytest.raises(Unavailable, match="prices have not been read"):
            book.price("tinylm")
        with pytest.raises(Unavailable, match="prices have not been read"):
            await gate.reserve(capped_call(), request)
        # Retried within seconds (it failed once more), not after the 30 s refresh.
        await asyncio.wait_for(book.known.wait(), 15)
        assert fake.asked == 3
        assert book.price("tinylm") == Price(completion_per_1k=1.0)
        assert book.price("unpriced") is None  # known to have no price: free
        # 2,002 tokens at up to 1.0 per 1,000 is over the tenant's cap of 1.0.
        with pytest.raises(ResourceExhausted, match="spend cap"):
            await gate.reserve(capped_call(), request)
    finally:
        await book.close()
