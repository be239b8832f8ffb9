"""What the registry's store modules share: lookups that raise the contract's errors, rows
turned into registry_pb2 messages, and `Change`, the one shape of every write.

A `Change` first locks the revision row, so writers (in any process) run one at a time
and revisions commit in order; a write that changes something then takes the next
revision and records exactly one feed event with it, in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Row, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.feed import subject_of
from services.registry.schema import (
    aliases,
    events,
    model_labels,
    models,
    registry_state,
    versions,
)
from services.runtime.errors import InvalidArgument, NotFound, shown

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Far below gRPC's default 4 MiB receive limit, which plain clients (grpcurl) keep.
MAX_EVENT_BYTES = 1 << 20
_NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 128"


def timestamp(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def micros(at: datetime) -> int:
    """`at` in microseconds since the epoch; a naive datetime is taken as UTC."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(microseconds=1)


def check_name(field: str, value: str) -> None:
    """Model and alias names follow the grammar of model references (tensorgate.model_ref)."""
    try:
        valid = ModelRef.parse(value) == ModelRef(value)
    except InvalidModelRef:
        valid = False
    if not valid:
        raise InvalidArgument(field, f"{shown(value)} is not a valid name: {_NAME_RULE}")


def check_labels(field: str, labels: Mapping[str, str]) -> None:
    for key in labels:
        if not key:
            raise InvalidArgument(field, "a label's key must not be empty")


# --- lookups ------------------------------------------------------------------------------


async def require_model(connection: AsyncConnection, name: str) -> Row[Any]:
    row = (await connection.execute(select(models).where(models.c.name == name))).first()
    if row is None:
        raise NotFound(f"model {shown(name)} does not exist")
    return row


async def find_version(connection: AsyncConnection, model: str, version: int) -> Row[Any] | None:
    query = select(versions).where(versions.c.model == model, versions.c.version == version)
    return (await connection.execute(query)).first()


async def require_version(
    connection: AsyncConnection, model: str, version: int, *, what: str = "version"
) -> Row[Any]:
    """The version's row; NOT_FOUND naming the model first if that is what is missing."""
    row = await find_version(connection, model, version)
    if row is None:
        await require_model(connection, model)
        raise NotFound(f"model {shown(model)} has no {what} {version}")
    return row


async def find_alias(connection: AsyncConnection, model: str, alias: str) -> Row[Any] | None:
    query = select(aliases).where(aliases.c.model == model, aliases.c.name == alias)
    return (await connection.execute(query)).first()


async def require_alias(connection: AsyncConnection, model: str, alias: str) -> Row[Any]:
    row = await find_alias(connection, model, alias)
    if row is None:
        await require_model(connection, model)
        raise NotFound(f"model {shown(model)} has no alias {shown(alias)}")
    return row


def latest_version() -> Any:
    """The newest existing version of the model in the enclosing query (0 while none)."""
    newest = select(func.max(versions.c.version)).where(versions.c.model == models.c.name)
    return func.coalesce(newest.scalar_subquery(), 0)


async def labels_of(connection: AsyncConnection, names: list[str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {name: {} for name in names}
    if names:
        query = select(model_labels).where(model_labels.c.model.in_(names))
        for row in await connection.execute(query):
            found[row.model][row.key] = row.value
    return found


async def load_model(connection: AsyncConnection, name: str) -> pb.Model:
    query = select(models, latest_version().label("latest")).where(models.c.name == name)
    row = (await connection.execute(query)).first()
    if row is None:
        raise NotFound(f"model {shown(name)} does not exist")
    return model_message(row, (await labels_of(connection, [name]))[name])


# --- rows to messages ---------------------------------------------------------------------


def model_message(row: Row[Any], labels: Mapping[str, str]) -> pb.Model:
    """A `models` row selected with `latest_version()` labelled "latest"."""
    return pb.Model(
        name=row.name,
        task=row.task,
        description=row.description,
        owner_tenant=row.owner_tenant,
        labels=labels,
        create_time=timestamp(row.created_us),
        update_time=timestamp(row.updated_us),
        latest_version=row.latest,
    )


def version_message(row: Row[Any]) -> pb.ModelVersion:
    return pb.ModelVersion(
        model=row.model,
        version=row.version,
        artifact=pb.Artifact(sha256=row.sha256, size_bytes=row.size_bytes, format=row.format),
        config=pb.TritonConfig.FromString(row.config),
        lineage=pb.Lineage.FromString(row.lineage),
        facts=json.loads(row.facts),
        description=row.description,
        create_time=timestamp(row.created_us),
        created_by=row.created_by,
    )


def alias_message(row: Row[Any]) -> pb.Alias:
    return pb.Alias(
        model=row.model,
        name=row.name,
        version=row.version,
        update_time=timestamp(row.updated_us),
        updated_by=row.updated_by,
        reason=row.reason,
        revision=row.revision,
        max_quality_loss=row.max_quality_loss,
    )


def move_message(row: Row[Any]) -> pb.AliasMove:
    return pb.AliasMove(
        model=row.model,
        alias=row.alias,
        from_version=row.from_version,
        to_version=row.to_version,
        time=timestamp(row.at_us),
        actor=row.actor,
        reason=row.reason,
        revision=row.revision,
        rollback=row.rollback,
    )


# --- writes -------------------------------------------------------------------------------


class Change:
    """One registry write in progress (see the module docstring)."""

    def __init__(self, connection: AsyncConnection, actor: str) -> None:
        self.connection = connection
        self.actor = actor  # who makes the change: recorded with its event
        self.revision = 0
        self.at_us = 0
        self._recorded = False

    async def lock(self) -> None:
        # FOR UPDATE is PostgreSQL's cross-process write lock (SQLite's is BEGIN IMMEDIATE
        # and it leaves the clause out); later statements then see every earlier commit.
        query = select(registry_state.c.revision).where(registry_state.c.id == 1)
        await self.connection.execute(query.with_for_update())

    async def stamp(self) -> None:
        """Takes the next revision and the time of this change, once it will happen."""
        if self.revision:
            raise RuntimeError("a change takes one revision")
        now = time.time_ns() // 1000
        # Never earlier than the previous change, even if this host's clock is behind
        # another replica's: point-in-time lookups need times in revision order.
        at_us = case((registry_state.c.at_us < now, now), else_=registry_state.c.at_us)
        bump = (
            update(registry_state)
            .where(registry_state.c.id == 1)
            .values(revision=registry_state.c.revision + 1, at_us=at_us)
            .returning(registry_state.c.revision, registry_state.c.at_us)
        )
        self.revision, self.at_us = (await self.connection.execute(bump)).one()

    async def record(self, kind: str, change: Message) -> None:
        """Appends the feed event of this change: `kind` is a RegistryEvent `change` field."""
        if not self.revision or self._recorded:
            raise RuntimeError("a change is stamped first, then records one event")
        event = pb.RegistryEvent(
            revision=self.revision, time=timestamp(self.at_us), actor=self.actor
        )
        getattr(event, kind).CopyFrom(change)
        payload = event.SerializeToString()
        if len(payload) > MAX_EVENT_BYTES:
            # Every watcher must be able to receive every event (gRPC's default limit is
            # 4 MiB); one that could not be sent would stop the feed for all of them.
            raise InvalidArgument(
                kind, f"the change is {len(payload)} bytes; at most {MAX_EVENT_BYTES} are allowed"
            )
        row = {
            "revision": self.revision,
            "at_us": self.at_us,
            "payload": payload,
            "subject": subject_of(event),
        }
        await self.connection.execute(insert(events).values(row))
        self._recorded = True

    def check_recorded(self) -> None:
        """Called before commit: a revision without its event would be a hole in the feed."""
        if self.revision and not self._recorded:
            raise RuntimeError(f"revision {self.revision} was taken but recorded no event")
