"""Aliases as the gateway routes them: followed live from the registry's change feed,
and moved over to a new version only once it is ready everywhere the old one is.

`AliasFeed` keeps {(model, alias): version} from the registry's Watch stream,
resuming from the last revision it saw after any disconnect, so it never misses
or repeats a move. `AliasRouting` decides which version a `name@alias` call goes
to: the alias's target as soon as every serving worker that has the version
traffic is on also has the target loaded; until then the version traffic was on.
That is what makes a rollout (or a rollback) under load fail no request: the old
version serves until the new one can take every call it took.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.runtime.channels import open_channel
from services.runtime.errors import NotFound, Unavailable, shown

log = structlog.get_logger("tensorgate.gateway.aliases")

_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0


class AliasFeed:
    """The registry's aliases, kept current from its change feed."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """Opens its own channel to `address`, or uses `channel` (whose owner closes it)."""
        self.address = address
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else open_channel(address, credentials)
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)
        self._targets: dict[tuple[str, str], int] = {}
        # Where each alias pointed before its last move: where traffic still is for a
        # gateway that has not routed the alias itself yet (a new or restarted one).
        self._previous: dict[tuple[str, str], int] = {}
        self.revision = 0
        self._revision_time = Timestamp()  # of the change at `revision` (see Watch)
        # Set once the feed has caught up with the registry at least once: before
        # that an unknown alias may simply not have arrived yet.
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="alias-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._owns_channel:
            await self._channel.close(None)

    def target(self, model: str, alias: str) -> int:
        """The version `model@alias` points at now."""
        version = self._targets.get((model, alias))
        if version is not None:
            return version
        if not self.synced.is_set():
            raise Unavailable(
                f"model {shown(f'{model}@{alias}')}: the model registry has not been "
                "reached yet to resolve the alias; retry shortly"
            )
        raise NotFound(f"model {shown(model)} has no alias {shown(alias)}")

    def previous(self, model: str, alias: str) -> int | None:
        """The version `model@alias` pointed at before its last move, if any."""
        return self._previous.get((model, alias)) or None

    def apply(self, event: registry_pb2.RegistryEvent) -> None:
        change = event.WhichOneof("change")
        if change == "alias_moved":
            self._set(event.alias_moved)
        elif change == "alias_deleted":
            key = (event.alias_deleted.model, event.alias_deleted.alias)
            self._targets.pop(key, None)
            self._previous.pop(key, None)
        self.revision = event.revision
        self._revision_time.CopyFrom(event.time)

    def _set(self, alias: registry_pb2.Alias) -> None:
        key = (alias.model, alias.name)
        self._targets[key] = alias.version
        self._previous[key] = alias.previous_version

    async def _follow(self) -> None:
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                if not self.synced.is_set():
                    # A snapshot first, then the feed from its revision: no replay of
                    # the whole history, and nothing between the two is missed.
                    listing = await self._stub.ListAliases(
                        registry_pb2.ListAliasesRequest(), timeout=10.0
                    )
                    self._targets, self._previous = {}, {}
                    for alias in listing.aliases:
                        self._set(alias)
                    self.revision = listing.revision
                    self._revision_time.CopyFrom(listing.revision_time)
                    self.synced.set()
                since = registry_pb2.WatchRequest(since_revision=self.revision)
                if self.revision:
                    since.since_time.CopyFrom(self._revision_time)
                async for event in self._stub.Watch(since):
                    self.apply(event)
                    backoff = _BACKOFF_FIRST_S
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # The registry's history was reset, replaced or restored: start
                    # over from nothing.
                    log.warning("registry history reset; re-reading aliases")
                    self.synced.clear()
                    continue
                log.warning("alias feed interrupted", registry=self.address, error=exc.code().name)
            except Exception:
                # Anything else (a malformed event, a bug) must not end the feed and
                # freeze every alias where it was: said loudly, then followed again.
                log.exception("alias feed failed", registry=self.address)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)


def pick_version(
    target: int,
    current: int | None,
    serving: Mapping[int, Collection[object]],
) -> int:
    """The version an alias's calls go to now.

    `serving` maps each version to the workers that have it loaded and are serving.
    Traffic moves from `current` to `target` once every worker serving `current` also
    serves `target` (and something serves it); while `current` is served nowhere, the
    target is all there is.
    """
    if current is None or current == target:
        return target
    on_target = set(serving.get(target, ()))
    on_current = set(serving.get(current, ()))
    if on_target and on_current <= on_target:
        return target
    return current if on_current else target


class AliasRouting:
    """Which version each alias's calls go to, remembering where traffic is now."""

    def __init__(self, feed: AliasFeed) -> None:
        self._feed = feed
        self._current: dict[tuple[str, str], int] = {}

    def settled(self, model: str, alias: str) -> int | None:
        """The alias's version when traffic is already on its target (no rollout under
        way), so the common call needs no view of which workers serve what."""
        target = self._feed.target(model, alias)
        return target if self._current.get((model, alias)) == target else None

    def version(self, model: str, alias: str, serving: Mapping[int, Collection[object]]) -> int:
        key = (model, alias)
        # Where this gateway sent the alias's traffic last, or else where every gateway's
        # was before the alias's last move (a gateway started mid-rollout, or one whose
        # last version is gone, must not run ahead of the others onto an unloaded one).
        current = next(
            (
                version
                for version in (self._current.get(key), self._feed.previous(model, alias))
                if version is not None and serving.get(version)
            ),
            None,
        )
        chosen = pick_version(self._feed.target(model, alias), current, serving)
        if self._current.get(key) != chosen:
            log.info("alias traffic moved", model=model, alias=alias, version=chosen)
            self._current[key] = chosen
        return chosen
