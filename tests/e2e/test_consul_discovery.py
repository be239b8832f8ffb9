"""Consul discovery end to end, against the agent double (tests/consul_double.py):
workers register and publish their models, a gateway follows them with blocking
queries and routes to both, a stopping worker leaves and gets no more calls, and
the gateway finds the registry and the auth service through Consul too.

The last test runs against a real agent when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from tensorgate import AsyncGatewayClient

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from services.auth.server import start_auth
from services.auth.settings import AuthSettings
from services.registry.server import start_registry
from services.registry.settings import RegistrySettings
from services.runtime.consul import ConsulAgent
from services.runtime.upstreams import FollowingChannel
from services.worker.catalog import loaded_model
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from services.worker.triton_process import BundledTriton
from tests.conftest import _GATEWAY_DIRS, worker_settings
from tests.consul_double import ConsulDouble
from tests.helpers import metric_value, scrape, until

CHECK_S = 0.2  # the double probes this often
INFER = "/tensorgate.worker.v1.InferenceWorker/Infer"


def _published(double: ConsulDouble, sid: str) -> set[str]:
    """The model versions a worker's Consul Meta lists."""
    return set(filter(None, double.services[sid].meta.get("models", "").split(",")))


async def _consul_worker(triton: BundledTriton, double: ConsulDouble) -> Worker:
    return await start_worker(
        worker_settings(
            triton, models=("digits",), consul=double.address, consul_check_interval=CHECK_S
        )
    )


async def _consul_gateway(double: ConsulDouble, **overrides: object) -> Gateway:
    spool = Path(tempfile.mkdtemp(prefix="tg-gateway-"))
    _GATEWAY_DIRS.append(spool)  # removed when the session ends
    values: dict[str, object] = {
        "workers": ("consul",),
        "consul": double.address,
        "consul_check_interval": CHECK_S,
        "allow_anonymous": True,
        "refresh_seconds": 3600,  # nothing may depend on the timer
        "metrics_port": 0,
        "drain_seconds": 0,
        "grace_seconds": 1,
        "data_dir": spool,
    }
    values.update(overrides)
    return await start_gateway(GatewaySettings(**values))  # type: ignore[arg-type]


async def _passing(double: ConsulDouble, sid: str) -> None:
    await until(
        lambda: sid in double.services and double.services[sid].status == "passing",
        f"{sid} registered and passing",
    )


async def _infers(worker: Worker) -> float:
    assert worker.service.metrics_endpoint is not None
    text = await scrape(f"http://127.0.0.1:{worker.service.metrics_endpoint.port}/metrics")
    return metric_value(text, "tensorgate_rpc_requests_total", method=INFER)


async def test_gateway_follows_workers_in_consul_and_stops_routing_to_one_that_stops(
    triton: BundledTriton, double: ConsulDouble
) -> None:
    first = await _consul_worker(triton, double)
    second = await _consul_worker(triton, double)
    gateway: Gateway | None = None
    try:
        for worker in (first, second):
            assert worker.service.consul is not None
            sid = worker.service.consul.service_id
            await _passing(double, sid)
            # A static worker lists what the session's shared Triton has ready: digits, and
            # tinylm too when an earlier test loaded it there.
            assert "digits:1" in _published(double, sid)
            assert double.services[sid].name == "tensorgate-worker"
        gateway = await _consul_gateway(double)
        pool = gateway.pool
        await until(lambda: set(pool._workers) == {first.address, second.address}, "both followed")
        image = np.zeros((1, 64), np.float32)
        async with AsyncGatewayClient(gateway.address) as client:
            await until(lambda: len(pool.models()) > 0, "models known")
            before = [await _infers(first), await _infers(second)]
            # Concurrent calls: least outstanding spreads them over both workers.
            for _ in range(5):
                await asyncio.gather(*(client.infer("digits", {"image": image}) for _ in range(8)))
            after = [await _infers(first), await _infers(second)]
            assert after[0] > before[0] and after[1] > before[1], (before, after)

            await first.stop()  # deregisters while draining
            await until(lambda: set(pool._workers) == {second.address}, "first left")
            on_second = await _infers(second)
            for _ in range(4):
                outputs = await client.infer("digits", {"image": image})
                assert outputs["label"].shape == (1, 1)
            assert await _infers(second) == on_second + 4
    finally:
        if gateway is not None:
            await gateway.stop()
        await first.stop()
        await second.stop()


async def test_worker_publishes_the_models_it_loads(
    triton: BundledTriton, double: ConsulDouble
) -> None:
    worker = await _consul_worker(triton, double)
    try:
        assert worker.service.consul is not None
        sid = worker.service.consul.service_id
        await until(lambda: sid in double.services, "registered")
        assert _published(double, sid) == {m.label for m in worker.catalog.models()}
        assert double.services[sid].meta["models_more"] == "0"
        # The catalog changes (a registry-mode worker loads or retires a version). The
        # shared Triton may have tinylm ready already: it goes first, then comes and goes.
        worker.catalog.remove("tinylm", 1)
        await until(lambda: _published(double, sid) == {"digits:1"}, "only digits")
        if "tinylm" not in await worker.triton.ready_versions():
            await worker.triton.load_model("tinylm")
        worker.catalog.add(loaded_model(1, await worker.triton.model_config("tinylm", 1)))
        await until(
            lambda: _published(double, sid) == {"digits:1", "tinylm:1"}, "new model published"
        )
        worker.catalog.remove("tinylm", 1)
        await until(lambda: _published(double, sid) == {"digits:1"}, "gone")
    finally:
        await worker.stop()


async def test_gateway_finds_registry_and_auth_through_consul_and_moves_when_one_leaves(
    worker: Worker, double: ConsulDouble, tmp_path: Path
) -> None:
    common = {
        "consul": double.address,
        "consul_check_interval": CHECK_S,
        "metrics_port": -1,
        "drain_seconds": 0,
        "grace_seconds": 1,
    }
    key_file = tmp_path / "admin.key"
    auth = await start_auth(
        AuthSettings(data_dir=tmp_path / "auth", bootstrap_admin_key_file=key_file, **common)  # type: ignore[arg-type]
    )
    spare = await start_auth(AuthSettings(data_dir=tmp_path / "auth", **common))  # type: ignore[arg-type]
    registry = await start_registry(RegistrySettings(data_dir=tmp_path / "registry", **common))  # type: ignore[arg-type]
    gateway: Gateway | None = None
    try:
        for service in (auth.service, spare.service, registry.service):
            assert service.consul is not None
            sid = service.consul.service_id
            await _passing(double, sid)
        gateway = await _consul_gateway(
            double,
            workers=(worker.address,),
            allow_anonymous=False,
            auth="consul",
            registry="consul",
            # Every call asks the auth service, and none is let through while it is
            # unreachable: the calls below must reach a live instance.
            auth_cache_seconds=0,
            auth_outage_seconds=0,
        )
        channels = [c for c in gateway.control._channels if isinstance(c, FollowingChannel)]
        by_service = {c.service: c for c in channels}
        assert by_service["tensorgate-registry"].address == registry.address
        auth_channel = by_service["tensorgate-auth"]
        assert auth_channel.address in (auth.address, spare.address)
        key = key_file.read_text().strip()
        image = np.zeros((1, 64), np.float32)
        async with AsyncGatewayClient(gateway.address, api_key=key) as client:
            outputs = await client.infer("digits", {"image": image})
            assert outputs["label"].shape == (1, 1)
            # The instance the gateway uses stops: it moves to the other one.
            used, other = (auth, spare) if auth_channel.address == auth.address else (spare, auth)
            await used.stop()
            await until(lambda: auth_channel.address == other.address, "moved")
            # The key is checked by the other instance now (same database).
            outputs = await client.infer("digits", {"image": image})
            assert outputs["label"].shape == (1, 1)
    finally:
        if gateway is not None:
            await gateway.stop()
        await registry.stop()
        await spare.stop()
        await auth.stop()


async def test_an_upstream_that_never_shows_up_fails_the_start_naming_it(
    worker: Worker, double: ConsulDouble
) -> None:
    with pytest.raises(OSError, match="no healthy instance of tensorgate-registry in Consul"):
        await _consul_gateway(
            double, workers=(worker.address,), registry="consul", consul_wait_seconds=0.5
        )


@pytest.mark.skipif(
    not os.environ.get("CONSUL_HTTP_ADDR"),
    reason="no Consul server can run on this machine (ENVIRONMENT.md): set CONSUL_HTTP_ADDR "
    "to a real agent to run this test",
)
async def test_against_a_real_consul_agent(worker: Worker) -> None:
    address = os.environ["CONSUL_HTTP_ADDR"]
    token = os.environ.get("CONSUL_HTTP_TOKEN", "")
    # The agent probes us: advertise an address it can reach (CONSUL_TEST_ADVERTISE_HOST
    # when it runs elsewhere, in a container say).
    host = os.environ.get("CONSUL_TEST_ADVERTISE_HOST", "127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    gateway = await start_gateway(
        GatewaySettings(
            workers=(worker.address,),
            allow_anonymous=True,
            consul=address,
            consul_token=token,
            consul_check_interval=1.0,
            host="0.0.0.0",
            port=port,
            advertise_address=f"{host}:{port}",
            metrics_port=-1,
            drain_seconds=0,
            grace_seconds=1,
        )
    )
    agent = ConsulAgent(address, token=token)
    try:
        registration = gateway.service.consul
        assert registration is not None
        expected = registration.address

        async def healthy() -> list[str]:
            return [i.address for i in (await agent.healthy("tensorgate-gateway"))[1]]

        deadline = asyncio.get_running_loop().time() + 60
        while expected not in await healthy():
            assert asyncio.get_running_loop().time() < deadline, "never passing in Consul"
            await asyncio.sleep(0.5)
    finally:
        await gateway.stop()
    try:
        assert not await agent.is_registered(registration.service_id)
        assert expected not in await healthy()
    finally:
        await agent.close()


async def test_gateway_keeps_its_workers_while_the_agent_restarts(
    triton: BundledTriton, double: ConsulDouble
) -> None:
    worker = await _consul_worker(triton, double)
    gateway: Gateway | None = None
    try:
        assert worker.service.consul is not None
        sid = worker.service.consul.service_id
        await _passing(double, sid)
        gateway = await _consul_gateway(double)
        pool = gateway.pool
        await until(lambda: set(pool._workers) == {worker.address}, "followed")
        image = np.zeros((1, 64), np.float32)
        async with AsyncGatewayClient(gateway.address) as client:
            await double.stop()  # the agent goes away with every registration
            await asyncio.sleep(1.0)
            assert set(pool._workers) == {worker.address}
            await client.infer("digits", {"image": image})
            await double.start()  # back on the same port, knowing nothing
            await _passing(double, sid)
            assert set(pool._workers) == {worker.address}
            await client.infer("digits", {"image": image})
            # The gateway follows the new agent: a worker leaving is seen again.
            await worker.stop()
            await until(lambda: not pool._workers, "the worker left")
    finally:
        if gateway is not None:
            await gateway.stop()
        await worker.stop()


async def test_worker_finds_its_registry_through_consul(
    double: ConsulDouble, tmp_path: Path
) -> None:
    registry = await start_registry(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            consul=double.address,
            consul_check_interval=CHECK_S,
            metrics_port=-1,
            drain_seconds=0,
        )
    )
    try:
        assert registry.service.consul is not None
        await _passing(double, registry.service.consul.service_id)
        # With a Triton of its own: a registry-mode worker unloads what the registry does
        # not deploy, which on the session's shared Triton would be every test's models.
        worker = await start_worker(
            WorkerSettings(
                registry="consul",
                data_dir=tmp_path / "worker",
                consul=double.address,
                consul_check_interval=CHECK_S,
                metrics_port=-1,
                drain_seconds=0,
                grace_seconds=1,
            )
        )
        try:
            assert worker.deployments is not None
            channel = worker.deployments._channel
            assert isinstance(channel, FollowingChannel)
            assert channel.address == registry.address
            # SERVING once in sync with the registry it found, hence passing in Consul.
            assert worker.service.consul is not None
            await _passing(double, worker.service.consul.service_id)
        finally:
            await worker.stop()
    finally:
        await registry.stop()
