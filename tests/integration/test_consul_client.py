"""The runtime's Consul client against the HTTP double: register, health, deregister,
blocking queries, and an agent that goes away and comes back.

Real gRPC servers on port 0 (the runtime's own, with generic handlers): the double
probes their grpc.health.v1 service, so "passing" is their real health.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from services.runtime.consul import (
    ConsulAgent,
    ConsulRefused,
    ConsulRegistration,
    ConsulUnavailable,
    follow_healthy,
)
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService, build_server
from services.runtime.settings import ServiceSettings
from tests.consul_double import ConsulDouble
from tests.helpers import UNTIL_S, until


@pytest.fixture
async def agent(double: ConsulDouble) -> AsyncIterator[ConsulAgent]:
    client = ConsulAgent(double.address, timeout=5.0)
    yield client
    await client.close()


async def _service(double: ConsulDouble, name: str = "probe") -> GrpcService:
    settings = ServiceSettings(
        consul=double.address, consul_check_interval=0.2, drain_seconds=0, grace_seconds=1
    )
    service = build_server(settings, [], name=name, metrics=ServiceMetrics(f"consul_{name}"))
    await service.start()
    return service


async def test_a_service_registers_with_a_grpc_check_and_deregisters_on_stop(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    service = await _service(double)
    assert service.consul is not None
    sid = service.consul.service_id
    try:
        await until(lambda: sid in double.services, "registered")
        registration = double.services[sid]
        assert registration.name == "tensorgate-probe"
        assert f"{registration.address}:{registration.port}" == service.address
        assert registration.check is not None
        assert registration.check["grpc"] == service.address
        assert registration.check["grpcusetls"] is False
        assert registration.check["deregistercriticalserviceafter"] == "600000ms"
        # The double's own probe of the real health service says passing.
        await until(lambda: registration.probes > 0, "probed")
        _, healthy = await agent.healthy("tensorgate-probe")
        assert [i.address for i in healthy] == [service.address]
        assert await agent.is_registered(sid)
        # Health says NOT_SERVING: the double's probe takes it out of the passing set.
        await service.set_serving(False)
        await until(lambda: registration.status == "critical", "critical")
        assert (await agent.healthy("tensorgate-probe"))[1] == []
        await service.set_serving(True)
        await until(lambda: registration.status == "passing", "passing again")
    finally:
        await service.stop()
    assert sid not in double.services
    assert ("PUT", f"/v1/agent/service/deregister/{sid}") in double.requests
    assert not await agent.is_registered(sid)


async def test_blocking_query_wakes_on_change_and_not_before(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    index, healthy = await agent.healthy("tensorgate-probe")
    assert healthy == []
    query = asyncio.ensure_future(agent.healthy("tensorgate-probe", index=index, wait=60))
    # A change to another service does not answer it.
    other = await _service(double, "other")
    try:
        assert other.consul is not None
        other_id = other.consul.service_id
        await until(lambda: other_id in double.services, "other registered")
        await asyncio.sleep(0.5)
        assert not query.done()
        service = await _service(double)
        try:
            new_index, healthy = await asyncio.wait_for(query, UNTIL_S)
            assert new_index > index
            assert [i.address for i in healthy] == [service.address]
        finally:
            await service.stop()
    finally:
        query.cancel()
        await other.stop()


async def test_blocking_query_returns_after_its_wait_with_the_same_index(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    index, _ = await agent.healthy("nobody")
    again, healthy = await agent.healthy("nobody", index=index, wait=1)
    assert (again, healthy) == (index, [])


async def test_meta_changes_are_registered_again(double: ConsulDouble) -> None:
    service = await _service(double, "worker")
    try:
        assert service.consul is not None
        sid = service.consul.service_id
        service.consul.set_meta(models="digits:1,tinylm:2")
        await until(
            lambda: (
                sid in double.services
                and double.services[sid].meta.get("models") == "digits:1,tinylm:2"
            ),
            "meta registered",
        )
        service.consul.set_meta(models="digits:1")
        await until(lambda: double.services[sid].meta.get("models") == "digits:1", "meta")
    finally:
        await service.stop()


async def _follow(
    agent: ConsulAgent, name: str, seen: list[list[str]], *, wait: float = 2.0
) -> Callable[[], Awaitable[None]]:
    """Follows `name`, appending each answer's addresses to `seen`; returns its stop."""

    async def run() -> None:
        async for instances in follow_healthy(agent, name, wait=wait, settle=1.0):
            seen.append([i.address for i in instances])

    task = asyncio.ensure_future(run())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop


async def test_agent_that_comes_back_gets_the_registration_again_and_followers_recover(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    service = await _service(double)
    seen: list[list[str]] = []
    stop_following = await _follow(agent, "tensorgate-probe", seen)
    try:
        assert service.consul is not None
        await until(lambda: bool(seen) and seen[-1] == [service.address], "followed")
        changes_before = len(seen)
        await double.stop()  # the agent goes away, and its state with it
        with pytest.raises(ConsulUnavailable):
            await agent.healthy("tensorgate-probe")
        await asyncio.sleep(1.0)
        # The follower keeps the last set while the agent is away: nothing yielded.
        assert len(seen) == changes_before
        await double.start()  # same port, no registrations
        sid = service.consul.service_id
        await until(lambda: sid in double.services, "registered again")
        assert service.consul.registrations >= 2
        # Registered again as passing (the service is SERVING), so followers never
        # saw it leave.
        await until(lambda: double.services[sid].probes > 0, "probed after the restart")
        assert all(addresses == [service.address] for addresses in seen[changes_before:])
        _, healthy = await agent.healthy("tensorgate-probe")
        assert [i.address for i in healthy] == [service.address]
        await service.stop()
        await until(lambda: seen[-1] == [], "follower saw it leave")
    finally:
        await stop_following()
        await service.stop()


async def test_a_refusal_names_the_agent_and_the_call(double: ConsulDouble) -> None:
    agent = ConsulAgent(double.address)
    try:
        registration = ConsulRegistration(
            agent,
            name="x",
            address="127.0.0.1:1",
            tls=False,
            check_interval=0.2,
            deregister_after=60,
        )
        payload = registration.payload()
        payload["check"]["Interval"] = "soon"
        with pytest.raises(ConsulRefused, match=f"Consul agent at {double.address} refused"):
            await agent.register(payload)
    finally:
        await agent.close()


async def test_an_agent_that_is_not_there_is_unavailable() -> None:
    agent = ConsulAgent("127.0.0.1:1", timeout=5)
    try:
        with pytest.raises(ConsulUnavailable, match=r"127\.0\.0\.1:1 is unreachable"):
            await agent.healthy("tensorgate-worker")
    finally:
        await agent.close()


async def test_following_is_blocking_queries_not_polling(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    seen: list[list[str]] = []
    path = "/v1/health/service/tensorgate-probe"
    stop = await _follow(agent, "tensorgate-probe", seen, wait=60)
    try:
        await until(lambda: len(seen) == 1, "first answer")
        await until(lambda: double.requests.count(("GET", path)) == 2, "blocking query")
        await asyncio.sleep(1.0)  # nothing changes: that query is still waiting, no other
        assert double.requests.count(("GET", path)) == 2
        assert seen == [[]]
        service = await _service(double)
        try:
            await until(lambda: len(seen) == 2, "woken by the registration")
            assert seen[1] == [service.address]
        finally:
            await service.stop()
    finally:
        await stop()


async def test_following_outlives_answers_it_cannot_read(
    double: ConsulDouble, agent: ConsulAgent
) -> None:
    seen: list[list[str]] = []
    entry = {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": "x", "Port": "not a port"}}
    double.garbage = [
        web.json_response([], headers={"X-Consul-Index": "abc"}),  # an index not a number
        web.json_response({"not": "a list"}, headers={"X-Consul-Index": "5"}),
        web.json_response(["a string", entry], headers={"X-Consul-Index": "6"}),  # skipped
        web.Response(text="{not json", headers={"X-Consul-Index": "7"}),
        web.json_response([]),  # no index at all
    ]
    stop = await _follow(agent, "tensorgate-probe", seen, wait=60)
    try:
        # The entries that could not be read were skipped, not the whole answer.
        await until(lambda: seen == [[]], "the readable answer")
        await until(lambda: not double.garbage, "every bad answer asked past")
        service = await _service(double)
        try:
            await until(lambda: len(seen) == 2, "still following after them")
            assert seen[1] == [service.address]
        finally:
            await service.stop()
    finally:
        await stop()
