"""JobStore: optimization jobs in the registry's database, as registry_pb2 messages.

Jobs are not part of the change feed: nothing a worker or gateway serves depends on
them, and they change many times a minute while they run (progress). The version a job
derives is a normal version with its feed events.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection
from typing import Any

from sqlalchemy import Row, insert, select, update
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.optimization.methods import Step
from services.registry.records import timestamp
from services.registry.schema import optimization_jobs
from services.runtime.errors import InvalidArgument, NotFound, shown
from services.store import Database

State = pb.OptimizationJob.State
_STATES = {
    "queued": State.QUEUED,
    "running": State.RUNNING,
    "done": State.DONE,
    "failed": State.FAILED,
}
MAX_ERROR_CHARS = 2000


def now_us() -> int:
    return time.time_ns() // 1000


def job_message(row: Row[Any]) -> pb.OptimizationJob:
    return pb.OptimizationJob(
        id=row.id,
        model=row.model,
        parent_version=row.parent_version,
        steps=[
            pb.OptimizationStep(method=s["method"], parameters=s["parameters"])
            for s in json.loads(row.steps)
        ],
        state=_STATES[row.state],
        stage=row.stage,
        progress=row.progress,
        error=row.error,
        result_version=row.result_version,
        create_time=timestamp(row.created_us),
        update_time=timestamp(row.updated_us),
        created_by=row.created_by,
    )


class JobStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def create(
        self,
        model: str,
        parent_version: int,
        steps: list[Step],
        *,
        description: str,
        latency_calls: int,
        actor: str,
    ) -> pb.OptimizationJob:
        now = now_us()
        job_id = f"job-{secrets.token_hex(6)}"
        async with self._database.write() as connection:
            await connection.execute(
                insert(optimization_jobs).values(
                    id=job_id,
                    model=model,
                    parent_version=parent_version,
                    steps=json.dumps([step.as_dict() for step in steps]),
                    description=description,
                    latency_calls=latency_calls,
                    state="queued",
                    stage="queued",
                    progress=0.0,
                    error="",
                    result_version=0,
                    created_us=now,
                    updated_us=now,
                    created_by=actor,
                )
            )
        return await self.get(job_id)

    async def row(self, job_id: str) -> Row[Any]:
        query = select(optimization_jobs).where(optimization_jobs.c.id == job_id)
        async with self._database.read() as connection:
            found = (await connection.execute(query)).first()
        if found is None:
            raise NotFound(f"optimization job {shown(job_id)} not found")
        return found

    async def get(self, job_id: str) -> pb.OptimizationJob:
        return job_message(await self.row(job_id))

    async def newest(self, model: str | None, limit: int) -> list[pb.OptimizationJob]:
        if not 0 <= limit <= 1000:
            raise InvalidArgument("limit", f"must be 0..1000, got {limit}")
        query = select(optimization_jobs).order_by(optimization_jobs.c.created_us.desc())
        if model:
            query = query.where(optimization_jobs.c.model == model)
        async with self._database.read() as connection:
            rows = await connection.execute(query.limit(limit or 100))
            return [job_message(row) for row in rows]

    async def update(self, job_id: str, **values: object) -> None:
        if "error" in values:
            values["error"] = str(values["error"])[:MAX_ERROR_CHARS]
        async with self._database.write() as connection:
            await connection.execute(
                update(optimization_jobs)
                .where(optimization_jobs.c.id == job_id)
                .values(updated_us=now_us(), **values)
            )

    async def touch(self, job_ids: Collection[str]) -> None:
        """Marks jobs as kept alive by a running registry (see runner.STALE_S)."""
        if not job_ids:
            return
        async with self._database.write() as connection:
            await connection.execute(
                update(optimization_jobs)
                .where(optimization_jobs.c.id.in_(list(job_ids)))
                .values(updated_us=now_us())
            )

    async def unfinished(self) -> list[Row[Any]]:
        """Jobs a registry that stopped left queued or running."""
        query = select(optimization_jobs).where(
            optimization_jobs.c.state.in_(("queued", "running"))
        )
        async with self._database.read() as connection:
            return list(await connection.execute(query))
