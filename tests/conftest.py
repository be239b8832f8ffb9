"""Shared fixtures: one real bundled Triton per session, with a real worker and gateway
on port 0 in front of it (in this process, on the session's event loop); and, for the
tests that need it, the registry-driven stack (`registry_stack`) with a Triton of its own."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorgate import AsyncGatewayClient

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from launcher.demo_models import register_demo_models
from services.auth.server import AuthServer, start_auth
from services.auth.settings import AuthSettings
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.runtime.logging import configure_logging
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from services.worker.triton_process import BundledTriton
from tests.consul_double import ConsulDouble

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "models" / "repository"

configure_logging(level="info", fmt="json")

# Redis for the tests that need one (its fixtures: redis_url, prefix, private_redis).
pytest_plugins = ("tests.redis_servers",)


@pytest.fixture(scope="session")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BundledTriton]:
    bundled = BundledTriton(MODEL_REPOSITORY, tmp_path_factory.mktemp("triton"))
    await bundled.start(timeout=120)
    yield bundled
    await bundled.stop()


def worker_settings(triton: BundledTriton, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "triton_url": triton.grpc_url,
        "metrics_port": 0,
        "models": ("tinylm", "digits"),
        "drain_seconds": 0.0,
        "grace_seconds": 2.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def worker(triton: BundledTriton) -> AsyncIterator[Worker]:
    running = await start_worker(worker_settings(triton))
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def gateway(worker: Worker) -> AsyncIterator[Gateway]:
    running = await start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=(worker.address,),
            metrics_port=0,
            drain_seconds=0.0,
            grace_seconds=2.0,
        )
    )
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def client(gateway: Gateway) -> AsyncIterator[AsyncGatewayClient]:
    async with AsyncGatewayClient(gateway.address) as connected:
        yield connected


@dataclass
class RegistryStack:
    """The platform as `tensorgate up` runs it, in this process: registry, a worker with
    its own bundled Triton serving what the registry deploys, a gateway in front."""

    registry: Registry
    worker: Worker
    gateway: Gateway
    data_dir: Path


@pytest.fixture(scope="session")
async def registry_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    registry = await start_registry(
        RegistrySettings(data_dir=data_dir / "registry", metrics_port=0, drain_seconds=0.0)
    )
    try:
        await register_demo_models(registry.address)
        worker = await start_worker(
            WorkerSettings(
                registry=registry.address,
                data_dir=data_dir / "worker",
                metrics_port=0,
                drain_seconds=0.0,
                grace_seconds=2.0,
                retire_seconds=1.0,
            )
        )
        try:
            gateway = await start_gateway(
                GatewaySettings(
                    allow_anonymous=True,
                    workers=(worker.address,),
                    registry=registry.address,
                    metrics_port=0,
                    drain_seconds=0.0,
                    grace_seconds=2.0,
                )
            )
            try:
                async with AsyncGatewayClient(gateway.address) as client:
                    for _ in range(600):
                        if {"tinylm", "digits"} <= {m.name for m in await client.list_models()}:
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError("the worker did not load the deployed demo models")
                yield RegistryStack(registry, worker, gateway, data_dir)
            finally:
                await gateway.stop()
        finally:
            await worker.stop()
    finally:
        await registry.stop()


@dataclass
class AuthStack:
    """The session worker behind a gateway that requires keys, with its auth service
    (SQLite in a temp dir, in-process counters) and the bootstrap admin key."""

    auth: AuthServer
    gateway: Gateway
    admin_key: str


_GATEWAY_DIRS: list[Path] = []  # removed when the session ends


@pytest.fixture(scope="session", autouse=True)
def _remove_gateway_dirs() -> Iterator[None]:
    yield
    for directory in _GATEWAY_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


async def start_auth_gateway(auth_address: str, worker: Worker, **overrides: object) -> Gateway:
    """Another gateway in front of the session worker, checking keys with `auth_address`;
    its usage spool in a directory of its own, so that what one test's gateway kept for
    its auth service is not sent to another test's."""
    spool = Path(tempfile.mkdtemp(prefix="tg-gateway-"))
    _GATEWAY_DIRS.append(spool)
    values: dict[str, object] = {
        "data_dir": spool,
        "workers": (worker.address,),
        "auth": auth_address,
        "metrics_port": 0,
        "drain_seconds": 0.0,
        "grace_seconds": 2.0,
        "price_refresh_seconds": 0.2,
    }
    values.update(overrides)
    return await start_gateway(GatewaySettings(**values))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def auth_stack(
    worker: Worker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AuthStack]:
    data_dir = tmp_path_factory.mktemp("auth")
    key_file = data_dir / "admin.key"
    auth = await start_auth(
        AuthSettings(
            data_dir=data_dir,
            metrics_port=0,
            drain_seconds=0.0,
            bootstrap_admin_key_file=key_file,
        )
    )
    try:
        gateway = await start_auth_gateway(auth.address, worker)
        try:
            yield AuthStack(auth, gateway, key_file.read_text().strip())
        finally:
            await gateway.stop()
    finally:
        await auth.stop()


@pytest.fixture
async def double() -> AsyncIterator[ConsulDouble]:
    """A Consul agent stand-in on port 0 (tests/consul_double.py), fresh per test."""
    agent = ConsulDouble()
    await agent.start()
    yield agent
    await agent.stop()
