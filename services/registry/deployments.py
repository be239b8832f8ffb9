"""Deployments: which model versions workers must serve, by fixed version or by alias.

A deployment on an alias means whatever the alias points at now, so its resolved
version is computed when it is read, never stored. The RegistryStore calls these
inside its transactions.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.records import (
    Change,
    require_alias,
    require_model,
    require_version,
    timestamp,
)
from services.registry.schema import aliases, deployments
from services.runtime.errors import InvalidArgument, NotFound, shown

MAX_INSTANCES = 16


def _target_key(version: int | None, alias: str | None) -> str:
    return f"version:{version}" if alias is None else f"alias:{alias}"


def _target_named(version: int | None, alias: str | None) -> str:
    return f"version {version}" if alias is None else f"alias {shown(alias)}"


def _message(row: Row[Any]) -> pb.Deployment:
    """A `deployments` row selected with the resolved version labelled "resolved"."""
    deployment = pb.Deployment(
        model=row.model,
        instances=row.instances,
        resolved_version=row.resolved,
        update_time=timestamp(row.updated_us),
        revision=row.revision,
    )
    if row.alias is not None:
        deployment.alias = row.alias
    else:
        deployment.version = row.version
    return deployment


def _with_resolved() -> Any:
    resolved = func.coalesce(deployments.c.version, aliases.c.version).label("resolved")
    joined = deployments.outerjoin(
        aliases, (aliases.c.model == deployments.c.model) & (aliases.c.name == deployments.c.alias)
    )
    return select(deployments, resolved).select_from(joined)


async def set_deployment(change: Change, deployment: pb.Deployment) -> pb.Deployment:
    target = deployment.WhichOneof("target")
    if target is None:
        raise InvalidArgument("deployment.target", "set a version or an alias to deploy")
    instances = deployment.instances or 1
    if not 1 <= instances <= MAX_INSTANCES:
        raise InvalidArgument(
            "deployment.instances", f"must be 1..{MAX_INSTANCES}, got {deployment.instances}"
        )
    model, connection = deployment.model, change.connection
    version = deployment.version if target == "version" else None
    alias = deployment.alias if target == "alias" else None
    if alias is not None:
        await require_alias(connection, model, alias)
    else:
        await require_version(connection, model, deployment.version)
    await change.stamp()
    key = _target_key(version, alias)
    row = {"instances": instances, "updated_us": change.at_us, "revision": change.revision}
    where = (deployments.c.model == model, deployments.c.target == key)
    found = await connection.execute(update(deployments).where(*where).values(row))
    if found.rowcount == 0:
        await connection.execute(
            insert(deployments).values(model=model, target=key, version=version, alias=alias, **row)
        )
    stored = _message((await connection.execute(_with_resolved().where(*where))).one())
    await change.record("deployment_set", stored)
    return stored


async def delete_deployment(
    change: Change, model: str, *, version: int | None, alias: str | None
) -> None:
    if (version is None) == (alias is None):
        raise InvalidArgument("target", "give either a version or an alias, not both or neither")
    connection = change.connection
    await require_model(connection, model)
    where = (deployments.c.model == model, deployments.c.target == _target_key(version, alias))
    if (await connection.execute(select(deployments.c.model).where(*where))).first() is None:
        raise NotFound(f"model {shown(model)} has no deployment of {_target_named(version, alias)}")
    await change.stamp()
    await connection.execute(delete(deployments).where(*where))
    deleted = pb.DeploymentDeleted(model=model)
    if alias is not None:
        deleted.alias = alias
    else:
        deleted.version = version or 0
    await change.record("deployment_deleted", deleted)


async def list_deployments(connection: AsyncConnection) -> list[pb.Deployment]:
    query = _with_resolved().order_by(deployments.c.model, deployments.c.target)
    return [_message(row) for row in await connection.execute(query)]


async def users_of_version(connection: AsyncConnection, model: str, version: int) -> list[str]:
    """What points at a version: its aliases, and deployments of it or of those aliases."""
    pointing = select(aliases.c.name).where(aliases.c.model == model, aliases.c.version == version)
    names = [row.name for row in await connection.execute(pointing.order_by(aliases.c.name))]
    users = [f"alias {shown(name)}" for name in names]
    query = select(deployments.c.version, deployments.c.alias).where(
        deployments.c.model == model,
        (deployments.c.version == version) | deployments.c.alias.in_(names),
    )
    for row in await connection.execute(query.order_by(deployments.c.target)):
        users.append(f"the deployment of {_target_named(row.version, row.alias)}")
    return users
