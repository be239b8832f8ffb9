"""A registry-mode worker against a real registry and a real bundled Triton of its own:
a deployment loads its version (WatchModels shows it), an alias move loads the new one
and retires the old after retire_seconds, a tampered artifact is logged and never
loaded, and a restarted worker is SERVING with what it could load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
import tritonclient.grpc.aio as triton_aio
from tensorgate import from_tensor, to_tensor
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry_client import AsyncRegistryClient
from tensorgate.worker.v1 import worker_pb2_grpc

from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from tests.helpers import health_status

RETIRE_SECONDS = 1.0
CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
parameters { key: "task" value: { string_value: "infer" } }
"""
# numpy only, so Triton loads it in about a second.
MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

FACTOR = {factor}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = (x * FACTOR).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
"""


@dataclass
class Setup:
    registry: Registry
    client: AsyncRegistryClient
    data_dir: Path
    versions: dict[int, str]  # factor -> sha256 of that version's artifact
    worker: Worker | None = None


def model_folder(root: Path, factor: int) -> Path:
    folder = root / f"scale{factor}"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "1" / "model.py").write_text(MODEL.format(factor=factor))
    return folder


def worker_settings(registry: Registry, data_dir: Path) -> WorkerSettings:
    return WorkerSettings(
        registry=registry.address,
        data_dir=data_dir,
        metrics_port=0,
        drain_seconds=0.0,
        grace_seconds=1.0,
        retire_seconds=RETIRE_SECONDS,
    )


@pytest.fixture(scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    root = tmp_path_factory.mktemp("worker-registry")
    registry = await start_registry(
        RegistrySettings(data_dir=root / "registry", metrics_port=0, drain_seconds=0.0)
    )
    client = AsyncRegistryClient(registry.address, actor="test")
    state = Setup(registry, client, root, versions={})
    try:
        await client.create_model("scale", task="infer")
        for factor in (1, 2, 3):
            uploaded = await client.upload("scale", model_folder(root / "folders", factor))
            assert uploaded.version == factor
            state.versions[factor] = uploaded.artifact.sha256
        state.worker = await start_worker(worker_settings(registry, root / "worker"))
        yield state
    finally:
        if state.worker is not None:
            await state.worker.stop()
        await client.close()
        await registry.stop()


@pytest.fixture(scope="module")
async def stub(setup: Setup) -> AsyncIterator[worker_pb2_grpc.InferenceWorkerAsyncStub]:
    assert setup.worker is not None
    async with grpc.aio.insecure_channel(setup.worker.address) as channel:
        yield worker_pb2_grpc.InferenceWorkerStub(channel)


async def wait_for_list(
    stub: worker_pb2_grpc.InferenceWorkerAsyncStub,
    done: Callable[[list[str]], bool],
    timeout: float = 60,
) -> list[str]:
    """Follows WatchModels until the listed "name:version"s satisfy `done`."""
    call = stub.WatchModels(inference_pb2.ListModelsRequest(), timeout=timeout)
    try:
        async for listing in call:
            labels = [f"{m.name}:{m.version}" for m in listing.models]
            if done(labels):
                return labels
    finally:
        call.cancel()
    raise AssertionError("WatchModels ended")


async def scale(stub: worker_pb2_grpc.InferenceWorkerAsyncStub, ref: str) -> list[float]:
    x = np.array([1.0, 2.0], dtype=np.float32)
    response = await stub.Infer(inference_pb2.InferRequest(model=ref, inputs=[to_tensor("x", x)]))
    assert response.model == ref
    return [float(v) for v in from_tensor(response.outputs[0])]


async def test_an_empty_registry_leaves_the_worker_serving_nothing(
    setup: Setup, stub: worker_pb2_grpc.InferenceWorkerAsyncStub
) -> None:
    assert setup.worker is not None
    for _ in range(300):
        if await health_status(setup.worker.address) == "SERVING":
            break
        await asyncio.sleep(0.1)
    assert await health_status(setup.worker.address) == "SERVING"
    assert (await stub.ListModels(inference_pb2.ListModelsRequest())).models == []


async def test_a_deployment_loads_its_version(
    setup: Setup, stub: worker_pb2_grpc.InferenceWorkerAsyncStub
) -> None:
    await setup.client.set_alias("scale", "production", 1)
    await setup.client.set_deployment("scale", alias="production")
    assert await wait_for_list(stub, lambda labels: labels == ["scale:1"]) == ["scale:1"]
    assert await scale(stub, "scale:1") == [1.0, 2.0]
    listing = await stub.ListModels(inference_pb2.ListModelsRequest())
    (info,) = listing.models
    assert (info.task, [s.name for s in info.inputs]) == ("infer", ["x"])
    repository = setup.data_dir / "worker" / "model-repository"
    assert sorted(p.name for p in repository.iterdir()) == ["scale__v1"]


async def test_an_alias_move_loads_the_new_version_and_retires_the_old(
    setup: Setup, stub: worker_pb2_grpc.InferenceWorkerAsyncStub
) -> None:
    await setup.client.set_alias("scale", "production", 2)
    both = await wait_for_list(stub, lambda labels: "scale:2" in labels)
    loaded_at = time.monotonic()
    assert both == ["scale:1", "scale:2"]  # the old one is still routable meanwhile
    assert await scale(stub, "scale:2") == [2.0, 4.0]
    assert await scale(stub, "scale:1") == [1.0, 2.0]
    assert await wait_for_list(stub, lambda labels: labels == ["scale:2"]) == ["scale:2"]
    assert time.monotonic() - loaded_at >= RETIRE_SECONDS * 0.9
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await scale(stub, "scale:1")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    repository = setup.data_dir / "worker" / "model-repository"
    for _ in range(50):  # the folder goes right after the unload
        if sorted(p.name for p in repository.iterdir()) == ["scale__v2"]:
            break
        await asyncio.sleep(0.1)
    assert sorted(p.name for p in repository.iterdir()) == ["scale__v2"]


async def folders(setup: Setup, wanted: list[str], timeout: float = 60) -> list[str]:
    """The worker's model folders, once they are `wanted` (or at the timeout)."""
    repository = setup.data_dir / "worker" / "model-repository"
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(p.name for p in repository.iterdir())
        if names == wanted or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.01)


async def triton_states(setup: Setup) -> dict[str, str]:
    """Triton model name -> state, from the worker's own Triton."""
    assert setup.worker is not None
    client = triton_aio.InferenceServerClient(setup.worker.triton.url)
    try:
        index = await client.get_model_repository_index()
    finally:
        await client.close()
    return {entry.name: entry.state for entry in index.models}


async def test_changing_instances_under_load_fails_no_call(
    setup: Setup, stub: worker_pb2_grpc.InferenceWorkerAsyncStub
) -> None:
    served: list[list[float]] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                served.append(await scale(stub, "scale:2"))
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    try:
        await setup.client.set_deployment("scale", alias="production", instances=2)
        # Loaded beside the running model, routed to, and only then the old one goes.
        assert await folders(setup, ["scale__v2__x2"]) == ["scale__v2__x2"]
        # A folder goes only once Triton has let go of its model (its unload is async).
        # (A model whose folder is gone drops out of Triton's index.)
        assert (await triton_states(setup)).get("scale__v2") in (None, "UNAVAILABLE")
        before = len(served)
        await setup.client.set_deployment("scale", alias="production", instances=1)
        assert await folders(setup, ["scale__v2"]) == ["scale__v2"]
        assert (await triton_states(setup)).get("scale__v2__x2") in (None, "UNAVAILABLE")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert failures == []
    assert before > 0 and len(served) > before
    assert all(result == [2.0, 4.0] for result in served)


async def test_a_tampered_artifact_is_logged_and_not_loaded(setup: Setup) -> None:
    # The registry refuses to point an alias at bytes it finds corrupt, so the worker's
    # own check is for bytes that go bad after the move: here, while the worker is down.
    assert setup.worker is not None
    await setup.client.set_deployment("scale", version=2)  # besides production
    await setup.worker.stop()
    setup.worker = None
    await setup.client.set_alias("scale", "production", 3)
    sha = setup.versions[3]
    blob = setup.data_dir / "registry" / "artifacts" / "sha256" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x01
    blob.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs:
        setup.worker = await start_worker(
            worker_settings(setup.registry, setup.data_dir / "worker")
        )
        for _ in range(300):
            if any(line.get("version") == "scale:3" for line in logs if _is_error(line)):
                break
            await asyncio.sleep(0.1)
    (error,) = [line for line in logs if _is_error(line) and line.get("version") == "scale:3"]
    assert error["event"] == "artifact rejected; this version is not loaded"
    async with grpc.aio.insecure_channel(setup.worker.address) as channel:
        stub = worker_pb2_grpc.InferenceWorkerStub(channel)
        listing = await stub.ListModels(inference_pb2.ListModelsRequest())
        assert [f"{m.name}:{m.version}" for m in listing.models] == ["scale:2"]
        assert await scale(stub, "scale:2") == [2.0, 4.0]
    repository = setup.data_dir / "worker" / "model-repository"
    assert sorted(p.name for p in repository.iterdir()) == ["scale__v2"]


async def test_a_restarted_worker_is_serving_with_what_it_could_load(setup: Setup) -> None:
    assert setup.worker is not None
    await setup.worker.stop()
    setup.worker = None
    started = time.monotonic()
    setup.worker = await start_worker(worker_settings(setup.registry, setup.data_dir / "worker"))
    while await health_status(setup.worker.address) != "SERVING":
        assert time.monotonic() - started < 120
        await asyncio.sleep(0.1)
    # SERVING means in sync: what could be loaded is loaded, the broken one did not wait.
    async with grpc.aio.insecure_channel(setup.worker.address) as channel:
        listing = await worker_pb2_grpc.InferenceWorkerStub(channel).ListModels(
            inference_pb2.ListModelsRequest()
        )
    assert [f"{m.name}:{m.version}" for m in listing.models] == ["scale:2"]


async def test_a_rejected_version_is_loaded_once_its_bytes_are_repaired(setup: Setup) -> None:
    # scale:3's stored bytes are still corrupt (above). Uploading the same bytes again
    # heals the registry's blob; the worker fetches a rejected artifact again later.
    assert setup.worker is not None
    await setup.worker.stop()
    setup.worker = None
    settings = worker_settings(setup.registry, setup.data_dir / "worker")
    setup.worker = await start_worker(settings.model_copy(update={"rejected_retry_seconds": 0.5}))
    async with grpc.aio.insecure_channel(setup.worker.address) as channel:
        stub = worker_pb2_grpc.InferenceWorkerStub(channel)
        assert await wait_for_list(stub, lambda labels: labels == ["scale:2"]) == ["scale:2"]
        healed = await setup.client.upload("scale", setup.data_dir / "folders" / "scale3")
        assert healed.artifact.sha256 == setup.versions[3]
        await wait_for_list(stub, lambda labels: "scale:3" in labels)
        assert await scale(stub, "scale:3") == [3.0, 6.0]


def _is_error(line: Mapping[str, Any]) -> bool:
    return line.get("log_level") == "error"


SLOW_MODEL = """
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        while not os.path.exists({flag!r}):  # a load that takes as long as the test says
            time.sleep(0.05)

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""


async def test_a_model_that_loads_for_ever_holds_no_other_rollout_back(setup: Setup) -> None:
    assert setup.worker is not None  # the one the tests above restarted
    async with grpc.aio.insecure_channel(setup.worker.address) as channel:
        await _roll_out_beside_a_hung_load(setup, worker_pb2_grpc.InferenceWorkerStub(channel))


async def _roll_out_beside_a_hung_load(
    setup: Setup, stub: worker_pb2_grpc.InferenceWorkerAsyncStub
) -> None:
    flag = setup.data_dir / "slow-may-finish"
    folder = setup.data_dir / "folders" / "slow"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "1" / "model.py").write_text(SLOW_MODEL.format(flag=str(flag)))
    await setup.client.create_model("slow", task="infer")
    await setup.client.upload("slow", folder)
    await setup.client.set_deployment("slow", version=1)
    for _ in range(600):  # Triton has no feed of its states: asked every 0.1 s
        if (await triton_states(setup)).get("slow__v1") == "LOADING":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("slow:1 never started loading")
    # While slow:1 is still in its initialize, production moves (the healed copy, v4).
    await setup.client.set_alias("scale", "production", 4)
    labels = await wait_for_list(stub, lambda labels: "scale:4" in labels)
    assert "slow:1" not in labels
    assert await scale(stub, "scale:4") == [3.0, 6.0]
    flag.touch()
    await wait_for_list(stub, lambda labels: "slow:1" in labels)
    await setup.client.delete_deployment("slow", version=1)
