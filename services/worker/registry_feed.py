"""Follows the registry's change feed (Watch) and keeps a `DesiredState` current.

The registry pushes every change with a revision number; nobody polls. A lost
stream (registry restarting, network) is reopened with exponential backoff,
capped at a few seconds, asking for the events after the last revision folded
in (and that event's time), so none is missed or folded twice. A registry whose
history was reset, replaced or restored (FAILED_PRECONDITION: our revision is ahead
of it, or its change there is another) is followed again from 0.

`caught_up` is set once the fold has reached the revision the registry was at
when this follower last connected: from then on `wanted()` says what the registry
said then or later, not some half-replayed past. The feed up to that revision comes
compacted, so a half-folded one may even hold a state the registry never had; a
reconnect that has catching up to do clears `caught_up` until it is done.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.worker.desired_state import DesiredState

log = structlog.get_logger("tensorgate.worker.registry")

_FIRST_RETRY_S = 0.1


class RegistryFeed:
    """One Watch on the registry at a time, reopened until `run` is cancelled."""

    def __init__(self, channel: grpc.aio.Channel, *, max_backoff: float = 3.0) -> None:
        self._stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self._max_backoff = max_backoff
        self.state = DesiredState()
        self.caught_up = asyncio.Event()
        self._start_revision: int | None = None
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """Makes the next `wait_changed` return at once, as a change would."""
        self._changed.set()

    async def wait_changed(self, timeout: float | None = None) -> None:
        """Returns once the state changed since the last call, or after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return
        self._changed.clear()

    async def run(self) -> None:
        """Follows the feed until cancelled; never returns otherwise."""
        failures = 0
        while True:
            opened = asyncio.get_running_loop().time()
            try:
                await self._follow()
                reason = "the registry ended the stream"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and self.state.revision:
                    log.warning(
                        "registry history reset; following it again from the start",
                        revision=self.state.revision,
                        detail=exc.details(),
                    )
                    # Until the replay reaches where the new history is now, the fold
                    # holds a past state; nobody should act on it meanwhile.
                    self.state = DesiredState()
                    self.caught_up.clear()
                    self._start_revision = None
                    continue
                reason = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                # A bug must not end the following silently: the worker would keep
                # serving a state nobody updates. Log it and reconnect as after an outage.
                log.exception("registry feed failed")
                reason = f"{type(exc).__name__}: {exc}"
            # A stream that lived a while was healthy: start the backoff over.
            if asyncio.get_running_loop().time() - opened > self._max_backoff:
                failures = 0
            delay = min(self._max_backoff, _FIRST_RETRY_S * 2**failures)
            failures += 1
            log.warning(
                "registry feed lost; reconnecting",
                reason=reason,
                revision=self.state.revision,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        # Where the registry is now: the feed up to there comes compacted (only the
        # state matters here, so catching up costs what the registry holds, not every
        # change it ever made), and the fold is whole only once it reached it.
        listing = await self._stub.ListAliases(registry_pb2.ListAliasesRequest(), timeout=30)
        head = listing.revision
        if self.state.revision < head and self.caught_up.is_set():
            # A resume: until the fold is at head, it may hold a state the registry
            # never had (a compacted feed skips what was superseded), so nobody acts on it.
            self.caught_up.clear()
        self._start_revision = head
        log.info("following the registry", from_revision=self.state.revision, current_revision=head)
        self._check_caught_up()
        since = registry_pb2.WatchRequest(since_revision=self.state.revision, compact_until=head)
        if self.state.revision:
            since.since_time.CopyFrom(self.state.revision_time)
        call = self._stub.Watch(since)
        try:
            async for event in call:
                if self.state.apply(event):
                    self._changed.set()
                self._check_caught_up()
        finally:
            call.cancel()

    def _check_caught_up(self) -> None:
        start = self._start_revision
        if not self.caught_up.is_set() and start is not None and self.state.revision >= start:
            self.caught_up.set()
            self._changed.set()
            log.info("registry feed caught up", revision=self.state.revision)
