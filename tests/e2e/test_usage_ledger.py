"""The usage ledger, end to end: what the auth service's ledger holds (read with GetUsage
through the gateway) equals what callers really got, token for token: whole streams,
streams the caller cancels, streams cut by their deadline, unary calls and failed ones;
costs are the model's price times those tokens; a tenant sees only its own usage; 200
concurrent calls cannot take a tenant past its monthly spend cap; and calls a gateway
served while the auth service was down are booked once, after that gateway stopped.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tensorgate import AsyncGatewayClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TensorgateClientError,
)

from services.auth.server import start_auth
from services.auth.settings import AuthSettings
from services.runtime.process import free_port
from services.worker.server import Worker
from tests.auth_helpers import (
    Admin,
    admin_at,
    bearer,
    digits_image,
    eventually,
    failure,
    prices_seen,
    rpc_failure,
    settled_usage,
)
from tests.conftest import AuthStack, start_auth_gateway

pytestmark = pytest.mark.integration

# Per 1,000 tokens; whole micro-units per token, so every cost is exact.
PROMPT_PER_1K, COMPLETION_PER_1K = 0.25, 2.0
PROMPT = "ROMEO:\nBut soft"


@pytest.fixture
async def admin(auth_stack: AuthStack) -> AsyncIterator[Admin]:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as connected:
        yield connected


@pytest.fixture
async def priced(auth_stack: AuthStack, admin: Admin) -> None:
    """tinylm has this module's price, and the gateway charges it."""
    await admin.set_price(
        "tinylm", prompt_per_1k=PROMPT_PER_1K, completion_per_1k=COMPLETION_PER_1K
    )
    await prices_seen(
        auth_stack.gateway,
        "tinylm",
        prompt_per_1k=PROMPT_PER_1K,
        completion_per_1k=COMPLETION_PER_1K,
    )


def cost(prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * PROMPT_PER_1K + completion_tokens * COMPLETION_PER_1K) / 1000


@dataclass
class Streamed:
    """What a caller got of one generation."""

    chunks: int
    tokens: int
    complete: bool
    error: TensorgateClientError | None = None
    largest_chunk: int = 0  # tokens


async def stream(
    client: AsyncGatewayClient,
    *,
    max_tokens: int,
    stop_after_chunks: int = 0,
    timeout: float | None = None,
) -> Streamed:
    """A generation read chunk by chunk; `stop_after_chunks` > 0 cancels it after so many."""
    chunks = tokens = largest = 0
    complete = False
    try:
        # Read to the end (the status), not just to the last chunk: leaving the loop
        # early cancels the call, and a cancelled call counts as an error.
        async for chunk in client.generate(
            "tinylm", PROMPT, max_tokens=max_tokens, seed=7, timeout=timeout
        ):
            assert not complete, "a chunk after the last one"
            chunks += 1
            tokens += len(chunk.token_ids)
            largest = max(largest, len(chunk.token_ids))
            if chunk.finish_reason:
                assert chunk.usage.completion_tokens == tokens
                assert chunk.usage.prompt_tokens == len(PROMPT.encode())
                complete = True
            elif chunks == stop_after_chunks:
                break  # leaving the loop cancels the call
    except TensorgateClientError as error:
        return Streamed(chunks, tokens, complete=False, error=error, largest_chunk=largest)
    return Streamed(chunks, tokens, complete=complete, largest_chunk=largest)


# How each generation goes: read whole, cancelled by the caller after a few chunks, or
# cut by a deadline that passes while it streams.
GENERATIONS: dict[str, dict[str, Any]] = {
    "whole, 5 tokens": {"max_tokens": 5},
    "whole, 30 tokens": {"max_tokens": 30},
    "whole, 60 tokens": {"max_tokens": 60},
    "cancelled after 1 chunk": {"max_tokens": 200, "stop_after_chunks": 1},
    "cancelled after 3 chunks": {"max_tokens": 200, "stop_after_chunks": 3},
    "cut by a 0.05 s deadline": {"max_tokens": 200, "timeout": 0.05},
    "cut by a 0.12 s deadline": {"max_tokens": 200, "timeout": 0.12},
}


def billed(row: pb.UsageRecord | None) -> tuple[int, int, int, int]:
    """A ledger row as (requests, errors, prompt tokens, completion tokens)."""
    if row is None:
        return (0, 0, 0, 0)
    return (row.requests, row.errors, row.prompt_tokens, row.completion_tokens)


@pytest.mark.usefixtures("priced")
async def test_the_ledger_equals_what_was_streamed_cancelled_and_cut_included(
    auth_stack: AuthStack, admin: Admin
) -> None:
    address = auth_stack.gateway.address
    tenant = await admin.tenant("ledger")
    # A key per generation: the ledger's row of each key is what that one call used.
    keys = {name: await admin.new_key(tenant) for name in GENERATIONS}
    streams: dict[str, Streamed] = {}
    for name, how in GENERATIONS.items():
        async with AsyncGatewayClient(address, api_key=keys[name].secret) as client:
            streams[name] = await stream(client, **how)
        got = streams[name]
        if name.startswith("whole"):
            assert got.complete, (name, got)
        elif name.startswith("cancelled"):
            assert not got.complete and got.error is None, (name, got)
        else:
            assert isinstance(got.error, DeadlineExceededError), (name, got)
    unary = await admin.new_key(tenant)
    async with AsyncGatewayClient(address, api_key=unary.secret) as client:
        image = digits_image()
        await client.infer("digits", {"image": image})
        await client.infer("digits", {"image": image})
        bad = await failure(client.infer("digits", {"image": np.zeros((1, 3), np.float32)}))
        assert isinstance(bad, InvalidArgumentError), bad

    totals = await settled_usage(admin, tenant, {"tinylm": len(streams), "digits": 3})
    rows = {(row.key_id, row.model): row for row in await admin.usage(tenant)}
    prompt = len(PROMPT.encode())
    # A chunk is a few tokens; one sent just as the caller cancelled or its deadline
    # passed was streamed (and is billed) but never read: no gateway can tell.
    in_flight = max(got.largest_chunk for got in streams.values())
    wrong = {}
    for name, got in streams.items():
        row = billed(rows.get((keys[name].key.key_id, "tinylm")))
        requests, errors, prompt_tokens, completion = row
        if got.complete:
            ok = row == (1, 0, prompt, got.tokens)
        else:
            # Cut short: billed the prompt once anything streamed, and every token the
            # caller read (never fewer), plus at most the chunk in flight.
            ok = (
                (requests, errors) == (1, 1)
                and got.tokens <= completion <= got.tokens + in_flight
                and prompt_tokens == (prompt if completion or got.chunks else 0)
            )
        if not ok:
            wrong[name] = f"ledger {row} for {got}"
    assert not wrong, wrong
    # The cost is the price of what was billed.
    tiny = totals["tinylm"]
    assert math.isclose(
        tiny.cost,
        cost(tiny.prompt_tokens, tiny.completion_tokens),
        rel_tol=1e-9,
        abs_tol=1e-9,
    )
    assert tiny.compute_micros > 0
    assert billed(rows.get((unary.key.key_id, "digits"))) == (3, 1, 0, 0)
    assert totals["digits"].cost == 0.0  # digits has no price


async def test_a_tenant_key_sees_only_its_own_tenants_usage(
    auth_stack: AuthStack, admin: Admin
) -> None:
    mine, theirs = await admin.tenant("mine"), await admin.tenant("theirs")
    my_key, their_key = await admin.new_key(mine), await admin.new_key(theirs)
    for key in (my_key, their_key):
        async with AsyncGatewayClient(auth_stack.gateway.address, api_key=key.secret) as client:
            await client.infer("digits", {"image": digits_image()})
    await settled_usage(admin, mine, {"digits": 1})
    await settled_usage(admin, theirs, {"digits": 1})

    as_mine = bearer(my_key.secret)
    own = await admin.stub.GetUsage(pb.GetUsageRequest(), metadata=as_mine, timeout=10)
    assert {(r.tenant_id, r.key_id) for r in own.records} == {(mine, my_key.key.key_id)}
    named = await admin.stub.GetUsage(
        pb.GetUsageRequest(tenant_id=mine), metadata=as_mine, timeout=10
    )
    assert list(named.records) == list(own.records)
    denied = await rpc_failure(
        admin.stub.GetUsage(pb.GetUsageRequest(tenant_id=theirs), metadata=as_mine, timeout=10)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert theirs not in (denied.details() or "")
    # Filtering by the other tenant's key does not reach into the other tenant either.
    by_key = await admin.stub.GetUsage(
        pb.GetUsageRequest(key_id=their_key.key.key_id), metadata=as_mine, timeout=10
    )
    assert list(by_key.records) == []
    # An admin sees every tenant.
    everyone = await admin.stub.GetUsage(pb.GetUsageRequest(), metadata=admin.metadata, timeout=10)
    assert {mine, theirs} <= {r.tenant_id for r in everyone.records}


@pytest.mark.usefixtures("priced")
async def test_200_concurrent_calls_never_overrun_the_spend_cap(
    auth_stack: AuthStack, admin: Admin
) -> None:
    max_tokens = 10
    prompt_tokens = len(PROMPT.encode())
    reserved = cost(prompt_tokens, max_tokens)  # what each call may cost
    cap = round(12.5 * reserved, 6)  # admits about a dozen at once
    tenant = await admin.tenant("capped", spend_cap=cap)
    keys = [await admin.new_key(tenant) for _ in range(2)]
    clients = [AsyncGatewayClient(auth_stack.gateway.address, api_key=k.secret) for k in keys]
    try:
        results = await asyncio.gather(
            *(stream(clients[n % 2], max_tokens=max_tokens) for n in range(200))
        )
    finally:
        for client in clients:
            await client.close()

    served = [s for s in results if s.complete]
    refused = [s for s in results if not s.complete]
    assert served and refused, (len(served), len(refused))
    assert len(served) + len(refused) == 200
    for s in refused:
        assert isinstance(s.error, ResourceExhaustedError), s
        assert s.chunks == 0
        assert s.error.subject == f"tenant:{tenant}:monthly_spend_cap", s.error
        assert s.error.retry_after_s is not None and s.error.retry_after_s > 0

    by_key: dict[str, int] = {}
    for n, s in enumerate(results):
        if s.complete:
            key_id = keys[n % 2].key.key_id
            by_key[key_id] = by_key.get(key_id, 0) + 1
    rows = await settled_usage(admin, tenant, {"tinylm": len(served)})
    ledger = rows["tinylm"]
    completion = sum(s.tokens for s in served)
    assert ledger.completion_tokens == completion
    assert ledger.prompt_tokens == prompt_tokens * len(served)
    assert ledger.errors == 0
    assert math.isclose(
        ledger.cost, cost(prompt_tokens * len(served), completion), rel_tol=1e-9, abs_tol=1e-9
    )
    assert ledger.cost <= cap + 1e-9, (ledger.cost, cap)
    # Per key too: what each key's calls used is booked to that key.
    per_key = {r.key_id: r.requests for r in await admin.usage(tenant)}
    assert per_key == by_key


async def test_calls_naming_no_model_are_booked_as_unresolved_and_block_nothing(
    auth_stack: AuthStack, admin: Admin
) -> None:
    tenant = await admin.tenant("typos")
    key = await admin.new_key(tenant)
    async with AsyncGatewayClient(auth_stack.gateway.address, api_key=key.secret) as client:
        for model in ("", "@x", ":3", "no-such-model", "m" * 300, "=cmd|' /C calc'!A0"):
            with pytest.raises(TensorgateClientError):
                await client.infer(model, {"image": digits_image()})
        # Calls after them are recorded as usual: the bad ones did not stop the ledger.
        await client.infer("digits", {"image": digits_image()})
    booked = await settled_usage(admin, tenant, {"(unresolved)": 6, "digits": 1})
    assert booked["(unresolved)"].errors == 6 and booked["digits"].errors == 0


async def test_calls_served_while_the_auth_service_is_down_are_booked_once_after_a_restart(
    worker: Worker, tmp_path: Path
) -> None:
    key_file = tmp_path / "admin.key"
    auth_settings = AuthSettings(
        data_dir=tmp_path / "auth",
        port=free_port(),
        metrics_port=-1,
        drain_seconds=0.0,
        bootstrap_admin_key_file=key_file,
    )
    spool = tmp_path / "gateway"
    auth = await start_auth(auth_settings)
    try:
        first = await start_auth_gateway(
            auth.address, worker, data_dir=spool, auth_cache_seconds=0.2
        )
        key = key_file.read_text().strip()
        try:
            async with AsyncGatewayClient(first.address, api_key=key) as client:
                await client.infer("digits", {"image": digits_image()})  # the key is vouched for
                await auth.stop()
                for _ in range(5):  # served through the outage: nobody can book them now
                    await client.infer("digits", {"image": digits_image()})
        finally:
            await first.stop()
        (kept,) = (spool / "usage-spool").glob("*.spool")
        kept_bytes = kept.read_bytes()

        auth = await start_auth(auth_settings)
        second = await start_auth_gateway(auth.address, worker, data_dir=spool)
        try:
            async with admin_at(second.address, key) as admin:
                assert (await settled_usage(admin, "admin", {"digits": 6}))["digits"].errors == 0
        finally:
            await second.stop()
        assert not list((spool / "usage-spool").iterdir()), "a sent spool is not left behind"

        # A gateway that died after sending the kept batches but before crossing them
        # off leaves them on disk: the next one sends them again, and they count once.
        (spool / "usage-spool" / "died.spool").write_bytes(kept_bytes)
        third = await start_auth_gateway(auth.address, worker, data_dir=spool)
        try:

            async def sent_again() -> bool | None:
                files = list((spool / "usage-spool").iterdir())
                return True if [f.stat().st_size for f in files] == [0] else None

            await eventually(sent_again, timeout=30, what="the kept batches sent again")
            async with admin_at(third.address, key) as admin:
                assert (await settled_usage(admin, "admin", {"digits": 6}))["digits"].errors == 0
        finally:
            await third.stop()
    finally:
        await auth.stop()
