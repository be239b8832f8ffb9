"""Model optimization as a registry operation, end to end: real registry, worker with its
bundled Triton, gateway; the jobs quantize the demo models' real weights, evaluate them
on the held-out sets, and measure latency through the worker.

One platform for the module, and each model's int8 job runs once (module fixtures):
the tests read what it made. Latency is measured with few calls (the figures are not
judged here, only recorded).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine
from tensorgate import AsyncGatewayClient
from tensorgate.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tensorgate.registry.v1 import registry_pb2
from tensorgate.registry_client import AsyncRegistryClient

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from launcher.demo_models import register_demo_model, register_demo_models
from services.registry.optimization.jobs import now_us
from services.registry.optimization.methods import check_steps
from services.registry.optimization.runner import STALE_S
from services.registry.schema import optimization_jobs
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.runtime.process import lasting_port
from services.store.database import database_url
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from tests.e2e.test_optimization_limits import registry_with_a_silent_worker

REPO = Path(__file__).resolve().parents[2]
ROWS = np.asarray(json.loads((REPO / "models/examples/digits.json").read_text()), np.float32)
LATENCY_CALLS = 8
Job = registry_pb2.OptimizationJob

# digits' held-out accuracy is 0.972 in fp32 (models/README.md); int8 weights may cost
# it at most 2 points on the 360 held-out images (7 images).
MAX_DIGITS_ACCURACY_LOSS = 0.02
MIN_DIGITS_ACCURACY = 0.95


@dataclass
class Platform:
    registry: Registry
    worker: Worker
    gateway: Gateway


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    data_dir = tmp_path_factory.mktemp("optimize")
    worker_port = lasting_port()
    registry = await start_registry(
        RegistrySettings(
            data_dir=data_dir / "registry",
            metrics_port=0,
            drain_seconds=0.0,
            workers=(f"127.0.0.1:{worker_port}",),
            latency_calls=LATENCY_CALLS,
        )
    )
    try:
        await register_demo_models(registry.address)
        worker = await start_worker(
            WorkerSettings(
                registry=registry.address,
                port=worker_port,
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
                yield Platform(registry, worker, gateway)
            finally:
                await gateway.stop()
        finally:
            await worker.stop()
    finally:
        await registry.stop()


@pytest.fixture
async def registry(platform: Platform) -> AsyncIterator[AsyncRegistryClient]:
    async with AsyncRegistryClient(platform.registry.address) as client:
        yield client


async def finished(client: AsyncRegistryClient, job: registry_pb2.OptimizationJob) -> Job:
    seen = []
    async for now in client.wait_optimization_job(job.id, interval=0.2):
        seen.append(now)
    assert seen[-1].state in (Job.DONE, Job.FAILED)
    return seen[-1]


async def int8_of(platform: Platform, ref: str) -> registry_pb2.ModelVersion:
    async with AsyncRegistryClient(platform.registry.address) as client:
        job = await client.start_optimization(ref, [("int8-dynamic", {})])
        assert job.state == Job.QUEUED
        done = await finished(client, job)
        assert done.state == Job.DONE, done.error
        return await client.get_version(done.model, done.result_version)


@pytest.fixture(scope="module")
async def digits_int8(platform: Platform) -> registry_pb2.ModelVersion:
    return await int8_of(platform, "digits@production")


@pytest.fixture(scope="module")
async def tinylm_int8(platform: Platform) -> registry_pb2.ModelVersion:
    return await int8_of(platform, "tinylm:1")


def assert_measured_beside_parent(version: registry_pb2.ModelVersion, quality: str) -> None:
    facts = version.facts
    figures = [
        "artifact_bytes",
        "param_bytes",
        quality,
        *(f"latency_c{c}_{p}_ms" for c in (1, 8) for p in ("p50", "p99")),
    ]
    for name in figures:
        assert name in facts and f"parent.{name}" in facts, name
        assert facts[f"delta.{name}"] == pytest.approx(facts[name] - facts[f"parent.{name}"])
    for name in figures[-4:]:
        assert facts[name] > 0 and facts[f"parent.{name}"] > 0
    assert facts["latency_calls"] == LATENCY_CALLS
    assert version.lineage.parameters["quality_metric"] == quality


async def test_int8_digits_is_smaller_keeps_accuracy_and_serves_by_alias(
    platform: Platform, registry: AsyncRegistryClient, digits_int8: registry_pb2.ModelVersion
) -> None:
    version = digits_int8
    assert version.version == 2
    assert version.lineage.parent_version == 1
    assert version.lineage.transformation == "int8-dynamic"
    assert version.lineage.parameters["torch"] == importlib.metadata.version("torch")
    assert_measured_beside_parent(version, "accuracy")
    facts = version.facts
    assert facts["artifact_bytes"] == version.artifact.size_bytes
    assert facts["artifact_bytes"] < facts["parent.artifact_bytes"]
    assert facts["param_bytes"] < facts["parent.param_bytes"] / 2  # int8: 1 byte, not 4
    assert facts["parent.accuracy"] >= MIN_DIGITS_ACCURACY
    assert facts["accuracy"] >= facts["parent.accuracy"] - MAX_DIGITS_ACCURACY_LOSS
    assert facts["quality_loss"] == pytest.approx(facts["parent.accuracy"] - facts["accuracy"])
    # The job undeployed what it deployed to measure: only production's stays.
    deployed = await registry.list_deployments()
    assert [(d.model, d.alias) for d in deployed if d.model == "digits"] == [
        ("digits", "production")
    ]

    await registry.set_alias("digits", "staging", version.version)
    await registry.set_deployment("digits", alias="staging")
    try:
        async with AsyncGatewayClient(platform.gateway.address) as client:
            for _ in range(600):
                if ("digits", 2) in {(m.name, m.version) for m in await client.list_models()}:
                    break
                await asyncio.sleep(0.1)
            quantized = await client.infer("digits@staging", {"image": ROWS})
            original = await client.infer("digits@production", {"image": ROWS})
        assert quantized["label"].reshape(-1).tolist() == [0, 1, 2, 3]
        assert quantized["label"].tolist() == original["label"].tolist()
    finally:
        await registry.delete_deployment("digits", alias="staging")


async def test_int8_tinylm_streams_and_records_held_out_loss(
    platform: Platform, registry: AsyncRegistryClient, tinylm_int8: registry_pb2.ModelVersion
) -> None:
    version = tinylm_int8
    assert version.lineage.parent_version == 1
    assert_measured_beside_parent(version, "heldout_loss_per_byte")
    facts = version.facts
    # The training's own held-out figure is 1.83 nats/byte (models/README.md).
    assert facts["parent.heldout_loss_per_byte"] == pytest.approx(1.83, abs=0.02)
    assert facts["heldout_loss_per_byte"] < facts["parent.heldout_loss_per_byte"] + 0.2
    assert facts["artifact_bytes"] < facts["parent.artifact_bytes"]

    await registry.set_alias("tinylm", "int8", version.version)
    await registry.set_deployment("tinylm", alias="int8")
    try:
        async with AsyncGatewayClient(platform.gateway.address) as client:
            for _ in range(600):
                loaded = {(m.name, m.version) for m in await client.list_models()}
                if ("tinylm", version.version) in loaded:
                    break
                await asyncio.sleep(0.1)
            chunks = [
                c async for c in client.generate("tinylm@int8", "ROMEO:", max_tokens=12, seed=1)
            ]
        assert len(chunks) >= 2  # streamed, not one reply
        assert {c.model for c in chunks} == {f"tinylm:{version.version}"}
        assert chunks[-1].usage.completion_tokens >= 1
        assert "".join(c.text for c in chunks)
    finally:
        await registry.delete_deployment("tinylm", alias="int8")


async def test_alias_policy_refuses_a_version_over_the_loss_bound(
    registry: AsyncRegistryClient,
    tinylm_int8: registry_pb2.ModelVersion,
    digits_int8: registry_pb2.ModelVersion,
) -> None:
    loss = tinylm_int8.facts["quality_loss"]
    assert loss > 0  # int8 costs tinylm some held-out loss: the bound below is under it
    under = loss / 2
    with pytest.raises(FailedPreconditionError) as refused:
        await registry.set_alias(
            "tinylm", "production", tinylm_int8.version, max_quality_loss=under
        )
    message = str(refused.value)
    assert f"{loss:.6g}" in message and "heldout_loss_per_byte" in message
    assert f"{under:g}" in message
    production = {a.name: a for a in await registry.list_aliases("tinylm")}["production"]
    assert production.version == 1 and not production.HasField("max_quality_loss")

    # The policy, set on its own, stays with the alias and refuses the move after.
    kept = await registry.set_alias("tinylm", "production", 1, max_quality_loss=under)
    assert kept.max_quality_loss == pytest.approx(under)
    with pytest.raises(FailedPreconditionError):
        await registry.set_alias("tinylm", "production", tinylm_int8.version)
    # staging has no policy: it takes anything.
    staged = await registry.set_alias("tinylm", "staging", tinylm_int8.version)
    assert staged.version == tinylm_int8.version
    # A bound above the loss accepts it; digits' int8 is within 0.01 of its parent.
    moved = await registry.set_alias(
        "tinylm", "production", tinylm_int8.version, max_quality_loss=loss * 2
    )
    assert moved.version == tinylm_int8.version
    assert moved.max_quality_loss == pytest.approx(loss * 2)
    policy = await registry.set_alias(
        "digits", "production", digits_int8.version, max_quality_loss=0.01
    )
    assert policy.version == digits_int8.version
    await registry.rollback_alias("digits", "production")
    await registry.rollback_alias("tinylm", "production")


async def cli(*args: str, address: str) -> tuple[int, str, str]:
    """The tensorgate CLI in a child process (this loop serves the registry meanwhile)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher.cli",
        *args,
        "--address",
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_a_job_that_fails_midway_leaves_no_version_and_says_why(
    platform: Platform, registry: AsyncRegistryClient, digits_int8: registry_pb2.ModelVersion
) -> None:
    before = [v.version for v in await registry.list_versions("digits")]
    # Valid steps each, but prune after int8 finds no float weights: the job fails once
    # the first step has run, inside the optimizer.
    code, out, err = await cli(
        "models",
        "optimize",
        "digits:1",
        "--method",
        "int8-dynamic",
        "--method",
        "prune",
        "--sparsity",
        "0.5",
        address=platform.registry.address,
    )
    assert code == 1, (out, err)
    assert "failed: prune: the model has no float Linear weights" in err
    jobs = await registry.list_optimization_jobs("digits")
    failed = jobs[0]
    assert failed.state == Job.FAILED and failed.result_version == 0
    assert "put prune before int8-dynamic" in failed.error
    assert [v.version for v in await registry.list_versions("digits")] == before
    assert (await registry.get_model("digits")).latest_version == max(before)

    # A parameter out of range is refused before any job exists.
    with pytest.raises(InvalidArgumentError) as bad:
        await registry.start_optimization("digits:1", [("prune", {"sparsity": "1.5"})])
    assert "steps[0].parameters.sparsity" in str(bad.value)
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        await registry.start_optimization("digits:1", [("fp4-magic", {})])
    with pytest.raises(InvalidArgumentError):
        await registry.start_optimization("", [("int8-dynamic", {})])
    with pytest.raises(NotFoundError):
        await registry.start_optimization("digits:99", [("int8-dynamic", {})])
    assert len(await registry.list_optimization_jobs("digits")) == len(jobs)


async def test_a_job_that_fails_after_registering_its_version_deletes_it(
    tmp_path: Path,
) -> None:
    # The job derives and registers its version, then cannot have it loaded to measure
    # latency.
    registry = await registry_with_a_silent_worker(tmp_path, load_timeout_s=0.5)
    try:
        async with AsyncRegistryClient(registry.address) as client:
            job = await client.start_optimization("digits:1", [("int8-dynamic", {})])
            failed = await finished(client, job)
            assert failed.state == Job.FAILED
            assert "waiting for the worker to load digits:1, digits:2" in failed.error
            assert failed.result_version == 0
            assert [v.version for v in await client.list_versions("digits")] == [1]
            deployed = await client.list_deployments()
            assert [(d.model, d.alias) for d in deployed] == [("digits", "production")]
    finally:
        await registry.stop()


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "died-before-recording"])
async def test_a_job_its_registry_abandoned_is_failed_and_its_version_deleted(
    tmp_path: Path, recorded: bool
) -> None:
    # `recorded`: the registry died after noting the version on the job; otherwise between
    # registering the version and noting it (the job's id is then only in its lineage).
    settings = RegistrySettings(data_dir=tmp_path, metrics_port=0, drain_seconds=0.0)
    registry = await start_registry(settings)
    try:
        async with AsyncRegistryClient(registry.address) as client:
            await register_demo_model(client, REPO / "models" / "repository" / "digits")
            parent = await client.get_version("digits", 1)
        # What a registry that died while measuring leaves: a running job, its version.
        store = registry.store
        job = await store.jobs.create(
            "digits",
            1,
            check_steps([("int8-dynamic", {})]),
            description="",
            latency_calls=1,
            actor="test",
        )
        left = await store.create_version(
            "digits",
            artifact=parent.artifact,
            config=parent.config,
            lineage=registry_pb2.Lineage(parent_version=1, parameters={"job": job.id}),
            facts={},
            description="",
            actor="t",
        )
        await store.jobs.update(
            job.id, state="running", result_version=left.version if recorded else 0
        )
        # A version someone registered meanwhile is not the job's.
        await store.create_version(
            "digits",
            artifact=parent.artifact,
            config=parent.config,
            lineage=registry_pb2.Lineage(parent_version=1, parameters={"job": "another"}),
            facts={},
            description="",
            actor="t",
        )
        # It had deployed the parent to measure it (production serves it only by alias).
        measured = registry_pb2.Deployment(model="digits", version=1, instances=1)
        await store.set_deployment(measured, actor=f"optimization:{job.id}")
    finally:
        await registry.stop()
    # Touched just now, it would pass for another replica's running job: the test makes
    # it as old as an abandoned one.
    engine = create_async_engine(database_url("", tmp_path, "registry"))
    try:
        async with engine.begin() as connection:
            stale = now_us() - int((STALE_S + 1) * 1e6)
            await connection.execute(
                update(optimization_jobs)
                .where(optimization_jobs.c.id == job.id)
                .values(updated_us=stale)
            )
    finally:
        await engine.dispose()
    registry = await start_registry(settings)
    try:
        async with AsyncRegistryClient(registry.address) as client:
            failed = await client.get_optimization_job(job.id)
            assert failed.state == Job.FAILED and "stopped before it finished" in failed.error
            assert failed.result_version == 0
            assert [v.version for v in await client.list_versions("digits")] == [3, 1]
            deployed = await client.list_deployments()
            assert [(d.model, d.alias) for d in deployed] == [("digits", "production")]
    finally:
        await registry.stop()


async def test_compare_prints_both_versions_side_by_side(
    platform: Platform, digits_int8: registry_pb2.ModelVersion
) -> None:
    code, out, err = await cli(
        "models", "compare", "digits:1", "digits:2", address=platform.registry.address
    )
    assert code == 0, err
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    facts = digits_int8.facts
    size = rows["artifact size (bytes)"]
    assert size[0] == f"{facts['parent.artifact_bytes']:,.0f}"
    assert size[1] == f"{facts['artifact_bytes']:,.0f}"
    assert size[2].startswith("-")  # smaller
    assert {"held-out accuracy", "latency p99, concurrency 8 (ms)"} <= set(rows)
