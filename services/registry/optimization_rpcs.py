"""The ModelRegistry RPCs of optimization jobs (StartOptimization, GetOptimizationJob,
ListOptimizationJobs), kept apart from servicer.py, which the registry's servicer class
takes them from (one servicer, as the proto has one service; two files, to keep each
readable). The jobs themselves run in optimization/runner.py.
"""

from __future__ import annotations

from typing import Any

import grpc
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2

from services.registry import requests as check
from services.registry.optimization.methods import check_steps
from services.registry.optimization.runner import JobRunner
from services.registry.store import RegistryStore
from services.runtime import calls
from services.runtime.errors import InvalidArgument

Context = grpc.aio.ServicerContext[Any, Any]

MAX_LATENCY_CALLS = 10000
_MAX_JOB_ID = 32


class OptimizationRpcs:
    """Mixed into ModelRegistryServicer, which sets `_store`, `_runner` and `_actor`."""

    _store: RegistryStore
    _runner: JobRunner

    def _actor(self) -> str:
        raise NotImplementedError

    async def StartOptimization(
        self, request: registry_pb2.StartOptimizationRequest, context: Context
    ) -> registry_pb2.OptimizationJob:
        calls.note(model=request.ref)
        steps = check_steps([(s.method, dict(s.parameters)) for s in request.steps])
        check.text("description", request.description, check.MAX_DESCRIPTION)
        if not 0 <= request.latency_calls <= MAX_LATENCY_CALLS:
            raise InvalidArgument(
                "latency_calls", f"must be 0..{MAX_LATENCY_CALLS}, got {request.latency_calls}"
            )
        parent = await self._store.resolve(ModelRef.parse(request.ref))
        calls.note(resolved=f"{parent.model}:{parent.version}")
        return await self._runner.start(
            parent,
            steps,
            description=request.description,
            latency_calls=request.latency_calls,
            actor=self._actor(),
        )

    async def GetOptimizationJob(
        self, request: registry_pb2.GetOptimizationJobRequest, context: Context
    ) -> registry_pb2.OptimizationJob:
        if not request.id or len(request.id) > _MAX_JOB_ID:
            raise InvalidArgument("id", f"must be a job id (1..{_MAX_JOB_ID} characters)")
        return await self._store.jobs.get(request.id)

    async def ListOptimizationJobs(
        self, request: registry_pb2.ListOptimizationJobsRequest, context: Context
    ) -> registry_pb2.ListOptimizationJobsResponse:
        check.optional_name("model", request.model)
        jobs = await self._store.jobs.newest(request.model or None, request.limit)
        return registry_pb2.ListOptimizationJobsResponse(jobs=jobs)
