"""Aliases: compare-and-set moves, rollback, deletion, and their recorded history.

Every move (a rollback and a deletion too) is a row in alias_moves with its revision
and time, so "what did production point at last Tuesday" is one indexed lookup. The
RegistryStore calls these inside its transactions.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.alias_policy import check_bound, require_within
from services.registry.records import (
    Change,
    alias_message,
    check_name,
    find_alias,
    find_version,
    micros,
    move_message,
    require_alias,
    require_model,
    require_version,
    version_message,
)
from services.registry.schema import alias_moves, aliases, deployments
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, shown


def _named(model: str, alias: str) -> str:
    return f"alias {shown(alias)} of model {shown(model)}"


async def set_alias(
    change: Change,
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
    """Moves the alias (compare-and-set), under its quality policy: the one it has, or
    `policy` when given (which it keeps from then on); `clear_policy` removes it."""
    check_name("alias", alias)
    if version < 1:
        raise InvalidArgument("version", f"must be a version number (>= 1), got {version}")
    if expected_version is not None and expected_version < 0:
        raise InvalidArgument("expected_version", f"must be >= 0, got {expected_version}")
    connection = change.connection
    target = version_message(await require_version(connection, model, version))
    current = await find_alias(connection, model, alias)
    now = current.version if current is not None else 0
    bound = None if current is None else current.max_quality_loss
    if clear_policy:
        bound = None
    if policy is not None:
        bound = check_bound(policy)
    if expected_version is not None and expected_version != now:
        if current is None:
            raise FailedPrecondition(
                f"{_named(model, alias)} does not exist, not at version {expected_version}"
            )
        if expected_version == 0:
            raise FailedPrecondition(f"{_named(model, alias)} exists: it points at version {now}")
        raise FailedPrecondition(
            f"{_named(model, alias)} points at version {now}, not {expected_version}"
        )
    if bound is not None:
        require_within(target, alias, bound)
    if current is not None and now == version:
        if bound == current.max_quality_loss:
            return alias_message(current)  # already there: nothing moves, nothing is recorded
        return await _set_policy(change, model, alias, bound)
    return await _move(
        change, model, alias, now, version, reason, actor, rollback=False, policy=bound
    )


async def _set_policy(change: Change, model: str, alias: str, bound: float | None) -> pb.Alias:
    """A policy change without a move: no alias_moves row (nothing moved), but an event,
    so followers of the feed see the alias as it is."""
    await change.stamp()
    await change.connection.execute(
        update(aliases)
        .where(aliases.c.model == model, aliases.c.name == alias)
        .values(max_quality_loss=bound)
    )
    message = alias_message(await require_alias(change.connection, model, alias))
    await change.record("alias_moved", message)
    return message


async def rollback_alias(
    change: Change,
    model: str,
    alias: str,
    *,
    expected_version: int | None = None,
    reason: str,
    actor: str,
) -> pb.Alias:
    connection = change.connection
    current = await require_alias(connection, model, alias)
    if expected_version is not None and expected_version != current.version:
        raise FailedPrecondition(
            f"{_named(model, alias)} points at version {current.version}, not "
            f"{expected_version}: someone moved it since (see its history)"
        )
    last = await _last_move(connection, model, alias)
    if last.from_version == 0:
        raise FailedPrecondition(
            f"{_named(model, alias)} has no earlier version to roll back to: "
            f"its last move created it at version {last.to_version}"
        )
    if await find_version(connection, model, last.from_version) is None:
        raise FailedPrecondition(
            f"cannot roll {_named(model, alias)} back to version {last.from_version}: "
            "that version was deleted"
        )
    return await _move(
        change, model, alias, current.version, last.from_version, reason, actor, rollback=True
    )


async def _last_move(connection: AsyncConnection, model: str, alias: str) -> Any:
    query = (
        select(alias_moves)
        .where(alias_moves.c.model == model, alias_moves.c.alias == alias)
        .order_by(alias_moves.c.revision.desc())
        .limit(1)
    )
    return (await connection.execute(query)).one()


async def rollback_target(connection: AsyncConnection, model: str, alias: str) -> int | None:
    """The version a rollback of `model@alias` would point it at now (None: none)."""
    if await find_alias(connection, model, alias) is None:
        return None
    last = await _last_move(connection, model, alias)
    return int(last.from_version) or None


async def delete_alias(change: Change, model: str, alias: str, *, reason: str, actor: str) -> None:
    connection = change.connection
    current = await require_alias(connection, model, alias)
    follows = select(deployments.c.model).where(
        deployments.c.model == model, deployments.c.alias == alias
    )
    if (await connection.execute(follows)).first() is not None:
        raise FailedPrecondition(f"{_named(model, alias)} is deployed: delete its deployment first")
    await _move(change, model, alias, current.version, 0, reason, actor, rollback=False)


async def _move(
    change: Change,
    model: str,
    alias: str,
    from_version: int,
    to_version: int,
    reason: str,
    actor: str,
    *,
    rollback: bool,
    policy: float | None = None,
) -> pb.Alias:
    """Points the alias at `to_version` (0 deletes it), recording the move and its event."""
    await change.stamp()
    connection = change.connection
    row: dict[str, object] = {
        "version": to_version,
        "updated_us": change.at_us,
        "updated_by": actor,
        "reason": reason,
        "revision": change.revision,
    }
    if not rollback:
        row["max_quality_loss"] = policy
    key = (aliases.c.model == model, aliases.c.name == alias)
    if to_version == 0:
        await connection.execute(delete(aliases).where(*key))
    elif from_version == 0:
        await connection.execute(insert(aliases).values(model=model, name=alias, **row))
    else:
        await connection.execute(update(aliases).where(*key).values(row))
    await connection.execute(
        insert(alias_moves).values(
            model=model,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            at_us=change.at_us,
            actor=actor,
            reason=reason,
            revision=change.revision,
            rollback=rollback,
        )
    )
    moved = (await find_alias(connection, model, alias)) if to_version else None
    if moved is None:
        await change.record("alias_deleted", pb.AliasDeleted(model=model, alias=alias))
        return pb.Alias(model=model, name=alias)
    message = alias_message(moved)
    message.previous_version = from_version
    await change.record("alias_moved", message)
    return message


async def list_aliases(connection: AsyncConnection, model: str | None) -> list[pb.Alias]:
    # Each alias with the version its last move came from (that move has its revision).
    last_move = alias_moves.alias("last_move")
    query = (
        select(aliases, last_move.c.from_version.label("previous"))
        .outerjoin(
            last_move,
            (last_move.c.model == aliases.c.model)
            & (last_move.c.alias == aliases.c.name)
            & (last_move.c.revision == aliases.c.revision),
        )
        .order_by(aliases.c.model, aliases.c.name)
    )
    if model is not None:
        await require_model(connection, model)
        query = query.where(aliases.c.model == model)
    listed = []
    for row in await connection.execute(query):
        message = alias_message(row)
        message.previous_version = row.previous or 0
        listed.append(message)
    return listed


def _moves_of(model: str, alias: str) -> Select[Any]:
    return select(alias_moves).where(alias_moves.c.model == model, alias_moves.c.alias == alias)


async def alias_history(connection: AsyncConnection, model: str, alias: str) -> list[pb.AliasMove]:
    await require_model(connection, model)
    query = _moves_of(model, alias).order_by(alias_moves.c.revision)
    moves = [move_message(row) for row in await connection.execute(query)]
    if not moves:
        raise NotFound(f"model {shown(model)} has no alias {shown(alias)}, and never had")
    return moves


async def alias_at(
    connection: AsyncConnection, model: str, alias: str, at: datetime
) -> pb.AliasMove:
    await require_model(connection, model)
    query = (
        _moves_of(model, alias)
        .where(alias_moves.c.at_us <= micros(at))
        .order_by(alias_moves.c.revision.desc())
        .limit(1)
    )
    row = (await connection.execute(query)).first()
    if row is None or row.to_version == 0:
        raise NotFound(f"{_named(model, alias)} did not exist at {at.isoformat()}")
    return move_message(row)
