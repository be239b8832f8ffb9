"""Rollouts and rollbacks through the registry under load: no request fails, and every
response names the version that served it.

A client streams Generate from tinylm@production and calls Infer on digits@production
in loops while production moves to a new version of each (loaded by the worker on the
way) and back again. The gateway keeps traffic on the old version until the new one is
loaded, and the worker lets go of the old one only after that.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
from tensorgate import AsyncGatewayClient
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry_client import AsyncRegistryClient
from tensorgate.tensors import to_tensor

from tests.conftest import RegistryStack

REPO = Path(__file__).resolve().parents[2]
ROWS = json.loads((REPO / "models" / "examples" / "digits.json").read_text())


class Load:
    """Generate and Infer in loops through an alias, counting what served each call."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.served: dict[str, int] = {}
        self.failures: list[str] = []
        self.stopping = asyncio.Event()

    def _count(self, model: str) -> None:
        self.served[model] = self.served.get(model, 0) + 1

    async def generate_loop(self, client: AsyncGatewayClient) -> None:
        while not self.stopping.is_set():
            try:
                models = {
                    c.model
                    async for c in client.generate("tinylm@production", "KING:", max_tokens=8)
                }
                assert len(models - {""}) == 1, models
                self._count(next(iter(models - {""})))
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(f"Generate: {exc!r}")

    async def infer_loop(self, stub: gateway_pb2_grpc.InferenceGatewayAsyncStub) -> None:
        request = inference_pb2.InferRequest(
            model="digits@production",
            inputs=[to_tensor("image", np.asarray(ROWS, dtype=np.float32))],
        )
        while not self.stopping.is_set():
            try:
                response = await stub.Infer(request, timeout=10)
                self._count(response.model)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"Infer: {exc.code().name} {exc.details()}")

    async def run(self) -> None:
        async with (
            AsyncGatewayClient(self.address) as client,
            grpc.aio.insecure_channel(self.address) as channel,
        ):
            stub: gateway_pb2_grpc.InferenceGatewayAsyncStub = (
                gateway_pb2_grpc.InferenceGatewayStub(channel)
            )
            await asyncio.gather(
                *(self.generate_loop(client) for _ in range(2)),
                *(self.infer_loop(stub) for _ in range(2)),
            )


async def _until_served(load: Load, label: str, timeout: float = 120.0) -> None:
    """Waits until `label` has served a few calls since the wait began."""
    before = load.served.get(label, 0)
    for _ in range(int(timeout / 0.1)):
        if load.served.get(label, 0) >= before + 5:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{label} never served: {load.served}, failures {load.failures[:5]}")


async def test_rollout_and_rollback_under_load_fail_no_request(
    registry_stack: RegistryStack,
) -> None:
    address = registry_stack.gateway.address
    load = Load(address)
    running = asyncio.create_task(load.run())
    try:
        # The registry's own API, through the gateway: the one public address.
        async with AsyncRegistryClient(address) as registry:
            before = {
                name: (await registry.resolve_model_ref(f"{name}@production")).version
                for name in ("digits", "tinylm")
            }
            await _until_served(load, f"digits:{before['digits']}")
            await _until_served(load, f"tinylm:{before['tinylm']}")
            new = {}
            for name in ("digits", "tinylm"):
                version = await registry.upload(
                    name, REPO / "models" / "repository" / name, description="rollout"
                )
                new[name] = version.version
                await registry.set_alias(
                    name,
                    "production",
                    version.version,
                    expected_version=before[name],
                    reason="rollout test",
                )
            for name in ("digits", "tinylm"):
                await _until_served(load, f"{name}:{new[name]}")
            for name in ("digits", "tinylm"):
                rolled = await registry.rollback_alias(name, "production", reason="rollback test")
                assert rolled.version == before[name]
            for name in ("digits", "tinylm"):
                await _until_served(load, f"{name}:{before[name]}")
    finally:
        load.stopping.set()
        await running
    assert load.failures == [], load.failures[:10]
    # Every response named a version, and only the versions production pointed at.
    served_versions = set(load.served)
    allowed = {f"{n}:{v}" for n in ("digits", "tinylm") for v in (before[n], new[n])}
    assert served_versions <= allowed, load.served
