"""Quotas at the gateway, end to end (real Triton, real auth service, real Redis): every
kind of quota at key and at tenant level refuses with RESOURCE_EXHAUSTED, a google.rpc
QuotaFailure naming the quota and a RetryInfo; concurrent streams; the monthly spend cap;
one limit shared exactly by two gateway processes through Redis; Redis unreachable.

Redis: TEST_REDIS_URL, else redis://127.0.0.1:6379/15. Without one the Redis tests skip
saying why, except on CI (CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tensorgate import AsyncGatewayClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.errors import (
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorgateClientError,
    UnavailableError,
)

from gateway.server import Gateway
from services.runtime.process import ChildProcess, LineSink, free_port
from services.worker.server import Worker
from tests.auth_helpers import (
    Admin,
    admin_at,
    digits_image,
    eventually,
    failure,
    prices_seen,
    quota,
)
from tests.conftest import AuthStack, start_auth_gateway
from tests.helpers import health_status
from tests.redis_servers import delete_keys

pytestmark = pytest.mark.integration

PROMPT = "ROMEO:"  # 6 prompt tokens (tinylm's tokens are bytes)
MINUTE, DAY = 60.0, 86400.0


@pytest.fixture
async def admin(auth_stack: AuthStack) -> AsyncIterator[Admin]:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as connected:
        yield connected


@dataclass
class Limited:
    """Keys limited at one level: `scope` is how refusals name it ("key:<id>" or
    "tenant:<id>"); calls go round the keys, so a tenant's limit is shared by two."""

    scope: str
    keys: list[str]
    tenant: str

    def key(self, n: int) -> str:
        return self.keys[n % len(self.keys)]


async def limited(admin: Admin, level: str, limits: pb.Quota, *, spend_cap: float = 0.0) -> Limited:
    if level == "key":
        tenant = await admin.tenant("q", spend_cap=spend_cap)
        created = await admin.new_key(tenant, limits=limits)
        return Limited(f"key:{created.key.key_id}", [created.secret], tenant)
    tenant = await admin.tenant("q", limits=limits, spend_cap=spend_cap)
    keys = [(await admin.new_key(tenant)).secret for _ in range(2)]
    return Limited(f"tenant:{tenant}", keys, tenant)


def assert_over(error: TensorgateClientError, subject: str, *, retry_within: float) -> None:
    """RESOURCE_EXHAUSTED naming `subject`, retry after more than 0 and at most
    `retry_within` seconds."""
    assert isinstance(error, ResourceExhaustedError), error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.subject == subject, error
    assert error.retry_after_s is not None, "no RetryInfo"
    assert 0 < error.retry_after_s <= retry_within, error.retry_after_s


async def infer(address: str, key: str) -> None:
    async with AsyncGatewayClient(address, api_key=key) as client:
        await client.infer("digits", {"image": digits_image()})


async def generate_on(client: AsyncGatewayClient, *, max_tokens: int, prompt: str = PROMPT) -> int:
    """One whole generation; its tokens (prompt + completion) as the model counted them."""
    completion, prompt_tokens = 0, -1
    async for chunk in client.generate("tinylm", prompt, max_tokens=max_tokens, seed=3):
        completion += len(chunk.token_ids)
        if chunk.HasField("usage"):
            prompt_tokens = chunk.usage.prompt_tokens
            assert chunk.usage.completion_tokens == completion
    assert prompt_tokens == len(prompt.encode())
    return prompt_tokens + completion


async def generate(address: str, key: str, *, max_tokens: int, prompt: str = PROMPT) -> int:
    async with AsyncGatewayClient(address, api_key=key) as client:
        return await generate_on(client, max_tokens=max_tokens, prompt=prompt)


LEVELS = pytest.mark.parametrize("level", ["key", "tenant"])


@LEVELS
async def test_requests_per_minute(auth_stack: AuthStack, admin: Admin, level: str) -> None:
    address = auth_stack.gateway.address
    keys = await limited(admin, level, quota(requests_per_minute=3))
    await infer(address, keys.key(0))
    await generate(address, keys.key(1), max_tokens=4)
    await infer(address, keys.key(2))
    for n in range(3, 5):
        over = await failure(infer(address, keys.key(n)))
        assert_over(over, f"{keys.scope}:requests_per_minute", retry_within=MINUTE)
        over = await failure(generate(address, keys.key(n), max_tokens=4))
        assert_over(over, f"{keys.scope}:requests_per_minute", retry_within=MINUTE)


async def _spend_tokens_until_refused(
    address: str, keys: Limited, limit: int, quota_name: str, retry_within: float
) -> None:
    """Generations reserving 6 + 40 tokens each, until the quota refuses one: exactly
    when what the earlier ones really used plus 46 would pass `limit`."""
    reserve = len(PROMPT) + 40
    used = 0
    for n in range(limit // len(PROMPT) + 1):
        if used + reserve > limit:
            over = await failure(generate(address, keys.key(n), max_tokens=40))
            assert_over(over, f"{keys.scope}:{quota_name}", retry_within=retry_within)
            assert str(limit) in over.message
            break
        used += await generate(address, keys.key(n), max_tokens=40)
    else:
        raise AssertionError("the token quota never refused a call")
    # Calls without tokens are not held back by a token quota.
    await infer(address, keys.key(0))
    # A call that could never fit is refused too, and told that retrying will not help.
    never = await failure(generate(address, keys.key(1), max_tokens=limit))
    assert isinstance(never, ResourceExhaustedError), never
    assert never.subject == f"{keys.scope}:{quota_name}"
    assert never.retry_after_s == 0


@LEVELS
async def test_tokens_per_minute(auth_stack: AuthStack, admin: Admin, level: str) -> None:
    keys = await limited(admin, level, quota(tokens_per_minute=120))
    await _spend_tokens_until_refused(
        auth_stack.gateway.address, keys, 120, "tokens_per_minute", MINUTE
    )


@LEVELS
async def test_tokens_per_day(auth_stack: AuthStack, admin: Admin, level: str) -> None:
    keys = await limited(admin, level, quota(tokens_per_day=120))
    await _spend_tokens_until_refused(auth_stack.gateway.address, keys, 120, "tokens_per_day", DAY)


async def _stream_or_refusal(address: str, key: str) -> tuple[int, TensorgateClientError | None]:
    """A long generation: (tokens received, None), or (tokens before it, the refusal)."""
    tokens = 0
    try:
        async with AsyncGatewayClient(address, api_key=key) as client:
            async for chunk in client.generate("tinylm", PROMPT, max_tokens=200, seed=5):
                tokens += len(chunk.token_ids)
    except TensorgateClientError as error:
        return tokens, error
    return tokens, None


@LEVELS
async def test_concurrent_streams_three_run_seven_refused_then_more_admitted(
    auth_stack: AuthStack, admin: Admin, level: str
) -> None:
    address = auth_stack.gateway.address
    keys = await limited(admin, level, quota(concurrent_streams=3))
    # Known to the gateway first, so the 10 below race only for stream slots.
    await infer(address, keys.key(0))
    await infer(address, keys.key(1))

    results = await asyncio.gather(*(_stream_or_refusal(address, keys.key(n)) for n in range(10)))
    ran = [tokens for tokens, error in results if error is None]
    refused = [(tokens, error) for tokens, error in results if error is not None]
    assert len(ran) == 3, results
    assert all(tokens > 0 for tokens in ran), ran
    assert len(refused) == 7, results
    for tokens, error in refused:
        assert tokens == 0, "a refused stream must be refused at once, before any token"
        assert_over(error, f"{keys.scope}:concurrent_streams", retry_within=MINUTE)

    # The three have finished: their slots are free again, for three at once.
    again = await asyncio.gather(*(_stream_or_refusal(address, keys.key(n)) for n in range(3)))
    assert all(error is None and tokens > 0 for tokens, error in again), again
    # Unary calls never take a stream slot.
    await asyncio.gather(*(infer(address, keys.key(n)) for n in range(5)))


async def test_monthly_spend_cap(auth_stack: AuthStack, admin: Admin) -> None:
    address = auth_stack.gateway.address
    # 1.0 per 1,000 completion tokens: a call of max_tokens 40 may cost 0.04.
    await admin.set_price("tinylm", completion_per_1k=1.0)
    await prices_seen(auth_stack.gateway, "tinylm", completion_per_1k=1.0)
    cap = 0.1
    keys = await limited(admin, "tenant", quota(), spend_cap=cap)
    spent = 0.0
    for n in range(20):
        if spent + 0.04 > cap + 1e-9:
            over = await failure(generate(address, keys.key(n), max_tokens=40))
            assert_over(over, f"tenant:{keys.tenant}:monthly_spend_cap", retry_within=32 * DAY)
            break
        tokens = await generate(address, keys.key(n), max_tokens=40)
        spent += (tokens - len(PROMPT)) / 1000
    else:
        raise AssertionError("the spend cap never refused a call")
    # Unpriced models cost nothing, so the cap does not hold them back.
    await infer(address, keys.key(0))
    # A call that alone costs more than the cap: refused, and retrying will not help.
    never = await failure(generate(address, keys.key(1), max_tokens=200))
    assert isinstance(never, ResourceExhaustedError), never
    assert never.subject == f"tenant:{keys.tenant}:monthly_spend_cap"


# --- Redis ------------------------------------------------------------------------------


@pytest.fixture
async def two_gateway_processes(
    auth_stack: AuthStack, worker: Worker, redis_url: str, tmp_path: Path
) -> AsyncIterator[list[str]]:
    """Two gateways, each its own process, sharing quota counters in one Redis."""
    log_file = (tmp_path / "gateways.log").open("ab")
    sink = LineSink(log_file)
    children: list[ChildProcess] = []
    try:
        addresses = []
        for n in range(2):
            port = free_port()
            children.append(
                await ChildProcess.spawn(
                    f"gateway-{n}",
                    [
                        *(sys.executable, "-m", "gateway", "--port", str(port)),
                        *("--workers", worker.address, "--auth", auth_stack.auth.address),
                        *("--redis-url", redis_url, "--metrics-port", "-1"),
                        *("--data-dir", str(tmp_path / f"gateway-{n}")),
                        *("--log-format", "json", "--drain-seconds", "0"),
                    ],
                    env=dict(os.environ, PYTHONUNBUFFERED="1"),
                    stdout=sink,
                    stderr=sink,
                )
            )
            addresses.append(f"127.0.0.1:{port}")
        for child, address in zip(children, addresses, strict=True):

            async def serving(child: ChildProcess = child, address: str = address) -> bool | None:
                assert child.returncode is None, f"{child.name} exited; see {log_file.name}"
                try:
                    return await health_status(address) == "SERVING" or None
                except grpc.aio.AioRpcError:
                    return None

            await eventually(serving, timeout=120, what=f"gateway at {address}", interval=0.3)
        yield addresses
    finally:
        for child in children:
            await child.stop(30)
        log_file.close()


async def test_two_gateway_processes_share_a_limit_exactly(
    auth_stack: AuthStack, admin: Admin, two_gateway_processes: list[str], redis_url: str
) -> None:
    tenant = await admin.tenant("replicas")
    created = await admin.new_key(tenant, models=("digits",), limits=quota(requests_per_minute=100))
    image = digits_image()
    try:
        clients = [AsyncGatewayClient(a, api_key=created.secret) for a in two_gateway_processes]
        try:
            # Each gateway learns the key by a call refused before any quota is counted
            # (a model outside its scope), so both take part in the race from its start.
            for client in clients:
                denied = await failure(generate_on(client, max_tokens=1))
                assert isinstance(denied, PermissionDeniedError), denied

            async def one(n: int) -> str:
                try:
                    await clients[n % 2].infer("digits", {"image": image}, timeout=120)
                except ResourceExhaustedError as error:
                    assert error.subject == f"key:{created.key.key_id}:requests_per_minute"
                    assert error.retry_after_s is not None and error.retry_after_s > 0
                    return "refused"
                return "ok"

            outcomes = await asyncio.gather(*(one(n) for n in range(1000)))
        finally:
            for client in clients:
                await client.close()
        assert outcomes.count("ok") == 100, outcomes.count("ok")
        assert outcomes.count("refused") == 900
    finally:
        await delete_keys(redis_url, f"tg:quota:{{{tenant}}}:*")


async def _unreachable_redis_gateway(
    auth_stack: AuthStack, worker: Worker, *, fail_open: bool
) -> Gateway:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    return await start_auth_gateway(
        auth_stack.auth.address, worker, redis_url=closed, quota_fail_open=fail_open
    )


Call = Callable[[str, str], Awaitable[object]]


async def _generate_4(address: str, key: str) -> None:
    await generate(address, key, max_tokens=4)


@pytest.mark.parametrize("call", [infer, _generate_4], ids=["Infer", "Generate"])
async def test_redis_unreachable_refuses_with_unavailable_by_default(
    auth_stack: AuthStack, worker: Worker, admin: Admin, call: Call
) -> None:
    gateway = await _unreachable_redis_gateway(auth_stack, worker, fail_open=False)
    try:
        tenant = await admin.tenant("noredis")
        limited_key = await admin.new_key(tenant, limits=quota(requests_per_minute=1000))
        free_key = await admin.new_key(tenant)
        for _ in range(3):
            error = await failure(call(gateway.address, limited_key.secret))
            assert isinstance(error, UnavailableError), error
        # A key with nothing to count never needs the counters.
        await call(gateway.address, free_key.secret)
    finally:
        await gateway.stop()


async def test_redis_unreachable_with_fail_open_admits_and_counts_locally(
    auth_stack: AuthStack, worker: Worker, admin: Admin
) -> None:
    gateway = await _unreachable_redis_gateway(auth_stack, worker, fail_open=True)
    try:
        tenant = await admin.tenant("failopen")
        created = await admin.new_key(tenant, limits=quota(requests_per_minute=3))
        await infer(gateway.address, created.secret)
        await generate(gateway.address, created.secret, max_tokens=4)
        await infer(gateway.address, created.secret)
        over = await failure(infer(gateway.address, created.secret))
        assert_over(over, f"key:{created.key.key_id}:requests_per_minute", retry_within=MINUTE)
    finally:
        await gateway.stop()
