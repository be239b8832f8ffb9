"""The gateway's usage ledger against a real auth service: summed records arrive once, a
batch the auth service cannot take right now is kept and sent again with the same id,
and a record it refuses loses only itself, not the batch it was summed into."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth.v1 import auth_pb2_grpc

from gateway.ledger import UsageLedger
from gateway.quota import UsageRecord
from services.auth.server import AuthServer, start_auth
from services.auth.settings import AuthSettings
from services.runtime.api_keys import new_key
from tests.auth_helpers import bearer

pytestmark = pytest.mark.integration


@dataclass
class Auth:
    server: AuthServer
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    admin: tuple[tuple[str, str], ...]


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Auth]:
    key_file = tmp_path / "admin.key"
    server = await start_auth(
        AuthSettings(
            data_dir=tmp_path, metrics_port=-1, drain_seconds=0.0, bootstrap_admin_key_file=key_file
        )
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Auth(
                server, auth_pb2_grpc.AuthServiceStub(channel), bearer(key_file.read_text().strip())
            )
    finally:
        await server.stop()


def _record(key_id: str, *, day: str = "", cost: float = 0.5, tokens: int = 10) -> UsageRecord:
    return UsageRecord(
        tenant="acme",
        key_id=key_id,
        model="tinylm",
        day=day or datetime.now(UTC).date().isoformat(),
        requests=1,
        errors=0,
        prompt_tokens=tokens,
        completion_tokens=2 * tokens,
        compute_seconds=0.25,
        cost=cost,
    )


async def _usage(auth: Auth) -> dict[str, pb.UsageRecord]:
    answer = await auth.stub.GetUsage(pb.GetUsageRequest(tenant_id="acme"), metadata=auth.admin)
    return {row.key_id: row for row in answer.records}


async def test_records_are_summed_and_sent_once(auth: Auth) -> None:
    async with grpc.aio.insecure_channel(auth.server.address) as channel:
        ledger = UsageLedger(channel)
        key_id = new_key()[0]
        for _ in range(3):
            ledger.record(_record(key_id))
        assert await ledger.flush()
        assert await ledger.flush()  # nothing left: nothing sent twice
        await ledger.close()
    row = (await _usage(auth))[key_id]
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 30, 60)
    assert row.compute_micros == 750_000
    assert row.cost == pytest.approx(1.5)


async def test_a_refused_record_loses_only_itself(auth: Auth) -> None:
    async with grpc.aio.insecure_channel(auth.server.address) as channel:
        ledger = UsageLedger(channel)
        good, bad, costly = new_key()[0], new_key()[0], new_key()[0]
        ledger.record(_record(good))
        ledger.record(_record(bad, day="2024-02-30"))  # no such day: refused
        # A cost past what one record may carry is capped, not refused with the rest.
        ledger.record(_record(costly, cost=7e8))
        ledger.record(_record(costly, cost=7e8))
        assert await ledger.flush()
        await ledger.close()
    usage = await _usage(auth)
    assert set(usage) == {good, costly}
    assert usage[good].requests == 1
    assert usage[costly].requests == 2
    assert usage[costly].cost == pytest.approx(1e9)


async def test_a_batch_the_auth_service_cannot_take_is_kept_and_sent_again(
    tmp_path: Path,
) -> None:
    # The gateway's auth service is away at first; it comes up later at that address.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key_file = tmp_path / "admin.key"
    settings = AuthSettings(
        data_dir=tmp_path,
        port=port,
        metrics_port=-1,
        drain_seconds=0.0,
        bootstrap_admin_key_file=key_file,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ledger = UsageLedger(channel)
        key_id = new_key()[0]
        ledger.record(_record(key_id))
        assert not await ledger.flush()
        assert not await ledger.flush()
        server = await start_auth(settings)
        try:
            # The channel reconnects on its own backoff: the batch goes once it has.
            deadline = asyncio.get_running_loop().time() + 15.0
            while not await ledger.flush():
                assert asyncio.get_running_loop().time() < deadline, "never sent"
                await asyncio.sleep(0.2)
            ledger.record(_record(key_id))
            await ledger.close()
            auth = Auth(
                server, auth_pb2_grpc.AuthServiceStub(channel), bearer(key_file.read_text().strip())
            )
            # Kept while the service was away, sent once: the first call and the later one.
            assert (await _usage(auth))[key_id].requests == 2
        finally:
            await server.stop()
