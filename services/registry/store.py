"""RegistryStore: the registry's state in its database, as registry_pb2 messages.

Every mutation is one transaction that locks the revision row, writes its rows and
appends its feed event under the next revision (records.Change), so the feed holds
every change exactly once and in commit order. Calls raise the contract's errors
(services.runtime.errors). Aliases and deployments live in their own modules, and
reading the feed in feed.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, exists, func, insert, select, update
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry import aliases as alias_ops
from services.registry import deployments as deployment_ops
from services.registry import paging
from services.registry.feed import ChangeFeed
from services.registry.optimization.jobs import JobStore
from services.registry.records import (
    Change,
    check_labels,
    check_name,
    labels_of,
    latest_version,
    load_model,
    model_message,
    require_alias,
    require_model,
    require_version,
    version_message,
)
from services.registry.schema import model_labels, models, versions
from services.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    shown,
)
from services.store import Database

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version_registry"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryStore:
    """The registry's models, versions, aliases, deployments and change feed."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self.feed = ChangeFeed(database)
        self.jobs = JobStore(database)

    @classmethod
    async def open(cls, url: str) -> RegistryStore:
        """Opens the database at `url` (SQLAlchemy async URL) and migrates it to head."""
        return cls(await Database.open(url, migrations=MIGRATIONS, version_table=VERSION_TABLE))

    async def close(self) -> None:
        await self._database.close()

    @asynccontextmanager
    async def _change(self, actor: str) -> AsyncIterator[Change]:
        async with self._database.write() as connection:
            change = Change(connection, actor)
            await change.lock()
            yield change
            change.check_recorded()
        if change.revision:
            self.feed.committed(change.revision)

    # --- models -------------------------------------------------------------------------

    async def create_model(self, model: pb.Model, *, actor: str) -> pb.Model:
        check_name("model.name", model.name)
        if not model.task:
            raise InvalidArgument("model.task", "is required, e.g. 'generate' or 'infer'")
        check_labels("model.labels", model.labels)
        async with self._change(actor) as change:
            connection = change.connection
            taken = select(models.c.name).where(models.c.name == model.name)
            if (await connection.execute(taken)).first() is not None:
                raise AlreadyExists(f"model {shown(model.name)} already exists")
            await change.stamp()
            await connection.execute(
                insert(models).values(
                    name=model.name,
                    task=model.task,
                    description=model.description,
                    owner_tenant=model.owner_tenant,
                    last_version=0,
                    created_us=change.at_us,
                    updated_us=change.at_us,
                    updated_by=actor,
                )
            )
            await self._write_labels(change, model.name, model.labels)
            created = await load_model(connection, model.name)
            await change.record("model_changed", created)
        return created

    async def get_model(self, name: str) -> pb.Model:
        async with self._database.read() as connection:
            return await load_model(connection, name)

    async def list_models(
        self, *, page_size: int, page_token: str, task: str, labels: Mapping[str, str]
    ) -> tuple[list[pb.Model], str]:
        size = paging.page_size(page_size)
        # Byte order on both databases (PostgreSQL would otherwise use its locale's).
        name = models.c.name if self._database.is_sqlite else models.c.name.collate("C")
        query = select(models, latest_version().label("latest")).order_by(name).limit(size + 1)
        if page_token:
            query = query.where(name > paging.token_after(page_token))
        if task:
            query = query.where(models.c.task == task)
        for key, value in labels.items():
            query = query.where(
                exists().where(
                    model_labels.c.model == models.c.name,
                    model_labels.c.key == key,
                    model_labels.c.value == value,
                )
            )
        async with self._database.read() as connection:
            rows = (await connection.execute(query)).all()
            page = rows[:size]
            found = await labels_of(connection, [row.name for row in page])
        token = paging.page_token(page[-1].name) if len(rows) > size else ""
        return [model_message(row, found[row.name]) for row in page], token

    async def update_model(
        self,
        name: str,
        *,
        description: str | None,
        labels: Mapping[str, str] | None,
        actor: str,
    ) -> pb.Model:
        if description is None and labels is None:
            return await self.get_model(name)
        if labels is not None:
            check_labels("labels", labels)
        async with self._change(actor) as change:
            await require_model(change.connection, name)
            await change.stamp()
            row: dict[str, object] = {"updated_us": change.at_us, "updated_by": actor}
            if description is not None:
                row["description"] = description
            await change.connection.execute(update(models).where(models.c.name == name).values(row))
            if labels is not None:
                await change.connection.execute(
                    delete(model_labels).where(model_labels.c.model == name)
                )
                await self._write_labels(change, name, labels)
            updated = await load_model(change.connection, name)
            await change.record("model_changed", updated)
        return updated

    @staticmethod
    async def _write_labels(change: Change, model: str, labels: Mapping[str, str]) -> None:
        if labels:
            rows = [{"model": model, "key": key, "value": value} for key, value in labels.items()]
            await change.connection.execute(insert(model_labels), rows)

    # --- versions -----------------------------------------------------------------------

    async def create_version(
        self,
        model: str,
        *,
        artifact: pb.Artifact,
        config: pb.TritonConfig,
        lineage: pb.Lineage,
        facts: Mapping[str, float],
        description: str,
        actor: str,
    ) -> pb.ModelVersion:
        if not _SHA256.fullmatch(artifact.sha256):
            raise InvalidArgument("artifact.sha256", "must be 64 lowercase hex digits")
        if artifact.size_bytes < 0:
            raise InvalidArgument("artifact.size_bytes", f"must be >= 0, got {artifact.size_bytes}")
        async with self._change(actor) as change:
            connection = change.connection
            owner = await require_model(connection, model)
            if lineage.parent_version:
                await require_version(
                    connection, model, lineage.parent_version, what="version (lineage parent)"
                )
            # Numbers continue from the highest ever given out, deleted ones included, so
            # "digits:3" never means two different artifacts.
            number = owner.last_version + 1
            await change.stamp()
            await connection.execute(
                update(models).where(models.c.name == model).values(last_version=number)
            )
            await connection.execute(
                insert(versions).values(
                    model=model,
                    version=number,
                    sha256=artifact.sha256,
                    size_bytes=artifact.size_bytes,
                    format=artifact.format,
                    config=config.SerializeToString(deterministic=True),
                    lineage=lineage.SerializeToString(deterministic=True),
                    facts=json.dumps(dict(facts), sort_keys=True),
                    description=description,
                    created_by=actor,
                    created_us=change.at_us,
                )
            )
            created = version_message(await require_version(connection, model, number))
            await change.record("version_created", created)
        return created

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        async with self._database.read() as connection:
            return version_message(await require_version(connection, model, version))

    async def list_versions(
        self, model: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.ModelVersion], str]:
        """A page of `model`'s versions, newest first, and the token of the next page."""
        size = paging.page_size(page_size)
        of_model = versions.c.model == model
        if page_token:
            before = paging.token_after(page_token)
            if not paging.VERSION_TOKEN.fullmatch(before):
                raise InvalidArgument("page_token", "is not a token this call returned")
            of_model = of_model & (versions.c.version < int(before))
        # Sizes first: a page of a thousand versions with megabyte configs is not read
        # to send three of them.
        sizes = (
            select(versions.c.version, func.length(versions.c.config))
            .where(of_model)
            .order_by(versions.c.version.desc())
            .limit(size + 1)
        )
        async with self._database.read() as connection:
            await require_model(connection, model)
            found = (await connection.execute(sizes)).all()
            numbers: list[int] = []
            total = 0
            for number, config_bytes in found:
                total += int(config_bytes) + paging.VERSION_OVERHEAD
                if len(numbers) == size or (numbers and total > paging.MAX_PAGE_BYTES):
                    break
                numbers.append(int(number))
            more = len(numbers) < len(found)
            query = select(versions).where(of_model, versions.c.version.in_(numbers))
            rows = await connection.execute(query.order_by(versions.c.version.desc()))
            page = [version_message(row) for row in rows]
        return page, paging.page_token(str(numbers[-1])) if more and numbers else ""

    async def delete_version(self, model: str, version: int, *, actor: str) -> None:
        async with self._change(actor) as change:
            connection = change.connection
            await require_version(connection, model, version)
            users = await deployment_ops.users_of_version(connection, model, version)
            if users:
                raise FailedPrecondition(
                    f"version {version} of model {shown(model)} is in use by "
                    f"{', '.join(users)}: move or delete them first"
                )
            await change.stamp()
            await connection.execute(
                delete(versions).where(versions.c.model == model, versions.c.version == version)
            )
            deleted = pb.VersionDeleted(model=model, version=version)
            await change.record("version_deleted", deleted)

    async def add_facts(self, model: str, version: int, facts: Mapping[str, float]) -> None:
        """Adds measured facts to a version (an optimization job's latency figures, taken
        once the version exists and a worker serves it). The artifact, config and lineage
        stay immutable; facts are what was measured about them. No feed event: nothing
        served depends on them, and GetVersion reads them from here."""
        async with self._database.write() as connection:
            row = await require_version(connection, model, version)
            merged = {**json.loads(row.facts), **facts}
            await connection.execute(
                update(versions)
                .where(versions.c.model == model, versions.c.version == version)
                .values(facts=json.dumps(merged, sort_keys=True))
            )

    async def artifact_in_use(self, sha256: str) -> bool:
        """Whether some version's artifact is the blob named `sha256`."""
        query = select(versions.c.model).where(versions.c.sha256 == sha256).limit(1)
        async with self._database.read() as connection:
            return (await connection.execute(query)).first() is not None

    async def referenced_artifacts(self) -> set[str]:
        async with self._database.read() as connection:
            return set((await connection.execute(select(versions.c.sha256).distinct())).scalars())

    async def resolve(self, ref: ModelRef) -> pb.ModelVersion:
        """What "name", "name:3" or "name@alias" means now."""
        async with self._database.read() as connection:
            if ref.alias is not None:
                alias = await require_alias(connection, ref.name, ref.alias)
                return version_message(await require_version(connection, ref.name, alias.version))
            if ref.version is not None:
                return version_message(await require_version(connection, ref.name, ref.version))
            query = (
                select(versions)
                .where(versions.c.model == ref.name)
                .order_by(versions.c.version.desc())
                .limit(1)
            )
            newest = (await connection.execute(query)).first()
            if newest is None:
                await require_model(connection, ref.name)
                raise NotFound(f"model {shown(ref.name)} has no versions yet")
            return version_message(newest)

    # --- aliases (aliases.py) -----------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None,
        reason: str,
        actor: str,
        policy: float | None = None,
        clear_policy: bool = False,
    ) -> pb.Alias:
        """Compare-and-set: `expected_version` None moves unconditionally, 0 only creates,
        n moves only from n; under the alias's quality policy (alias_policy.py)."""
        async with self._change(actor) as change:
            return await alias_ops.set_alias(
                change,
                model,
                alias,
                version,
                expected_version=expected_version,
                reason=reason,
                actor=actor,
                policy=policy,
                clear_policy=clear_policy,
            )

    async def rollback_alias(
        self,
        model: str,
        alias: str,
        *,
        expected_version: int | None = None,
        reason: str,
        actor: str,
    ) -> pb.Alias:
        async with self._change(actor) as change:
            return await alias_ops.rollback_alias(
                change, model, alias, expected_version=expected_version, reason=reason, actor=actor
            )

    async def rollback_target(self, model: str, alias: str) -> int | None:
        async with self._database.read() as connection:
            return await alias_ops.rollback_target(connection, model, alias)

    async def delete_alias(self, model: str, alias: str, *, reason: str, actor: str) -> None:
        async with self._change(actor) as change:
            await alias_ops.delete_alias(change, model, alias, reason=reason, actor=actor)

    async def list_aliases(self, model: str | None) -> list[pb.Alias]:
        async with self._database.read() as connection:
            return await alias_ops.list_aliases(connection, model)

    async def alias_history(self, model: str, alias: str) -> list[pb.AliasMove]:
        async with self._database.read() as connection:
            return await alias_ops.alias_history(connection, model, alias)

    async def alias_at(self, model: str, alias: str, at: datetime) -> pb.AliasMove:
        async with self._database.read() as connection:
            return await alias_ops.alias_at(connection, model, alias, at)

    # --- deployments (deployments.py) ---------------------------------------------------

    async def set_deployment(self, deployment: pb.Deployment, *, actor: str) -> pb.Deployment:
        async with self._change(actor) as change:
            return await deployment_ops.set_deployment(change, deployment)

    async def delete_deployment(
        self, model: str, *, version: int | None, alias: str | None, actor: str
    ) -> None:
        async with self._change(actor) as change:
            await deployment_ops.delete_deployment(change, model, version=version, alias=alias)

    async def list_deployments(self) -> list[pb.Deployment]:
        async with self._database.read() as connection:
            return await deployment_ops.list_deployments(connection)
