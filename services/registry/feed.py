"""The registry's change feed as the store keeps it: every change's event under its
revision, read in revision order (Watch), and the wake-up watchers wait on when this
process commits a change."""

from __future__ import annotations

import asyncio

from sqlalchemy import exists, func, select
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.schema import events, registry_state
from services.store import Database


def subject_of(event: pb.RegistryEvent) -> str:
    """What an event is about: a later event with the same subject supersedes it."""
    change = event.WhichOneof("change")
    if change == "model_changed":
        return f"model/{event.model_changed.name}"
    if change in ("version_created", "version_deleted"):
        version = getattr(event, change)
        return f"version/{version.model}/{version.version}"
    if change == "alias_moved":
        return f"alias/{event.alias_moved.model}/{event.alias_moved.name}"
    if change == "alias_deleted":
        return f"alias/{event.alias_deleted.model}/{event.alias_deleted.alias}"
    if change in ("deployment_set", "deployment_deleted"):
        target = getattr(event, change)
        if target.WhichOneof("target") == "alias":
            return f"deployment/{target.model}@{target.alias}"
        return f"deployment/{target.model}:{target.version}"
    return f"revision/{event.revision}"  # nothing supersedes what no later event names


class ChangeFeed:
    """Reads the events RegistryStore's changes append (records.Change.record)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        # The newest revision this process committed, and the event its watchers wait on
        # (replaced at each commit, so a waiter only ever sees one wake-up).
        self._committed = 0
        self._changed = asyncio.Event()

    def committed(self, revision: int) -> None:
        """Called by the store once a change at `revision` is committed: wakes watchers."""
        self._committed = max(self._committed, revision)
        self._changed.set()
        self._changed = asyncio.Event()

    async def current_revision(self) -> int:
        return (await self.current_revision_at())[0]

    async def current_revision_at(self) -> tuple[int, int]:
        """The newest revision and the time of its change (microseconds since the epoch)."""
        query = select(registry_state.c.revision, registry_state.c.at_us).where(
            registry_state.c.id == 1
        )
        async with self._database.read() as connection:
            revision, at_us = (await connection.execute(query)).one()
            return int(revision), int(at_us)

    async def event_time(self, revision: int) -> int | None:
        """When the change at `revision` was made (microseconds); None: no such event."""
        query = select(events.c.at_us).where(events.c.revision == revision)
        async with self._database.read() as connection:
            at_us = (await connection.execute(query)).scalar_one_or_none()
            return None if at_us is None else int(at_us)

    async def last_event(self, subject: str) -> pb.RegistryEvent | None:
        """The newest event about `subject` (subject_of), if any."""
        query = (
            select(events.c.payload)
            .where(events.c.subject == subject)
            .order_by(events.c.revision.desc())
            .limit(1)
        )
        async with self._database.read() as connection:
            payload = (await connection.execute(query)).scalar_one_or_none()
        return None if payload is None else pb.RegistryEvent.FromString(payload)

    async def events_after(
        self,
        revision: int,
        limit: int = 500,
        max_bytes: int = 4 << 20,
        *,
        compact_until: int = 0,
    ) -> list[pb.RegistryEvent]:
        """Up to `limit` events after `revision`, in revision order, and no more than
        `max_bytes` of them (but at least one): an event may carry a megabyte of config,
        and a watcher catching up must not hold hundreds of them at once.

        With `compact_until` above `revision`, only events up to it, leaving out each
        that a later one up to it with its subject supersedes (a deletion is kept: it
        may be the newest); so every batch up to it is cut from one fixed history.
        """
        after = events.c.revision > revision
        if compact_until > revision:
            later = events.alias("later")
            superseded = exists().where(
                later.c.subject == events.c.subject,
                later.c.revision > events.c.revision,
                later.c.revision <= compact_until,
            )
            after = after & (events.c.revision <= compact_until) & ~superseded
        sizes = (
            select(events.c.revision, func.length(events.c.payload))
            .where(after)
            .order_by(events.c.revision)
            .limit(limit)
        )
        async with self._database.read() as connection:
            last, total = revision, 0
            for number, size in (await connection.execute(sizes)).all():
                total += int(size)
                if total > max_bytes and last > revision:
                    break
                last = int(number)
            if last == revision:
                return []
            query = (
                select(events.c.payload)
                .where(after, events.c.revision <= last)
                .order_by(events.c.revision)
            )
            payloads = (await connection.execute(query)).scalars()
            return [pb.RegistryEvent.FromString(payload) for payload in payloads]

    async def wait_for_change(self, after_revision: int, timeout: float) -> None:
        """Returns once this process committed past `after_revision`, or after `timeout`.

        Only commits made here wake it; a watcher re-reads the database after each
        wait, which is how it sees writes made by other replicas.
        """
        try:
            async with asyncio.timeout(timeout):
                while self._committed <= after_revision:
                    await self._changed.wait()
        except TimeoutError:
            pass
