"""The feed follower against an in-process registry stand-in on port 0: it resumes after
the last revision it folded when the stream breaks, backs off, catches up with the
revision the registry was at, and starts over when the registry's history was reset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.runtime.channels import open_channel
from services.worker.registry_feed import RegistryFeed
from tests.unit.test_worker_desired_state import Feed, served

Context = grpc.aio.ServicerContext[Any, Any]


class FakeRegistry(registry_pb2_grpc.ModelRegistryServicer):
    """Watch replays `events` after since_revision; it can break a stream after n events."""

    def __init__(self, events: list[registry_pb2.RegistryEvent]) -> None:
        self.events = events
        self.watches: list[int] = []
        self.compact_untils: list[int] = []
        self.hold_after: int | None = None  # a revision after which a stream waits
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.since_times: list[Timestamp | None] = []
        self.break_after: list[int] = []  # one entry per stream to break
        self.live = asyncio.Event()

    async def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: Context
    ) -> registry_pb2.ListAliasesResponse:
        return registry_pb2.ListAliasesResponse(revision=len(self.events))

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[registry_pb2.RegistryEvent]:
        self.watches.append(request.since_revision)
        self.compact_untils.append(request.compact_until)
        self.since_times.append(request.since_time if request.HasField("since_time") else None)
        if request.since_revision > len(self.events):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "history was reset")
        budget = self.break_after.pop(0) if self.break_after else None
        for sent, event in enumerate(self.events[request.since_revision :]):
            if budget is not None and sent == budget:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "registry restarting")
            yield event
            if event.revision == self.hold_after:
                self.held.set()
                await self.release.wait()
        await self.live.wait()


@pytest.fixture
async def served_registry() -> AsyncIterator[tuple[FakeRegistry, grpc.aio.Channel]]:
    feed = Feed()
    for version in (1, 2):
        feed.version("m", version)
    feed.alias("m", "production", 1)
    feed.deploy("m", alias="production", resolved=1)
    feed.alias("m", "production", 2)
    fake = FakeRegistry(feed.events)  # type: ignore[abstract]  # only what the feed calls
    server = grpc.aio.server()
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield fake, channel
    fake.live.set()
    await channel.close(None)
    await server.stop(None)


async def following(feed: RegistryFeed) -> AsyncIterator[None]:
    task = asyncio.create_task(feed.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_broken_stream_is_resumed_after_the_last_revision(
    served_registry: tuple[FakeRegistry, grpc.aio.Channel],
) -> None:
    fake, channel = served_registry
    fake.break_after = [2, 0, 1]
    feed = RegistryFeed(channel, max_backoff=0.2)
    async for _ in following(feed):
        await asyncio.wait_for(feed.caught_up.wait(), 5)
        assert served(feed.state) == {"m:2": 1}
        assert feed.state.revision == 5
        # Each reconnect asked for exactly what it had not folded yet, naming the time
        # of the last change it folded (so another history would be refused).
        assert fake.watches == [0, 2, 2, 3]
        assert fake.since_times == [None] + [fake.events[n - 1].time for n in (2, 2, 3)]


async def test_live_events_arrive_and_wake_the_waiter(
    served_registry: tuple[FakeRegistry, grpc.aio.Channel],
) -> None:
    fake, channel = served_registry
    feed = RegistryFeed(channel)
    async for _ in following(feed):
        await asyncio.wait_for(feed.caught_up.wait(), 5)
        await feed.wait_changed(0)
        await feed.wait_changed(0)  # nothing new: returns after the timeout
        # The stand-in sends live events by ending the stream; the follower resumes.
        more = Feed()
        more.events = list(fake.events)
        more.undeploy("m", alias="production")
        fake.events = more.events
        fake.live.set()
        await asyncio.wait_for(feed.wait_changed(), 5)
        await asyncio.sleep(0)
        assert served(feed.state) == {}
        assert fake.watches[:2] == [0, 5]


async def test_a_resume_acts_on_nothing_until_it_reached_where_the_registry_was(
    served_registry: tuple[FakeRegistry, grpc.aio.Channel],
) -> None:
    # The feed up to the registry's revision comes compacted: half folded, it may be a
    # state the registry never had, so the follower is not caught up until it is done.
    fake, channel = served_registry
    feed = RegistryFeed(channel, max_backoff=0.1)
    async for _ in following(feed):
        await asyncio.wait_for(feed.caught_up.wait(), 5)
        more = Feed()
        more.events = list(fake.events)
        more.alias("m", "production", 1)
        more.undeploy("m", alias="production")
        fake.events = more.events
        fake.hold_after = 6
        fake.live.set()  # the stream ends: the follower reconnects at revision 5
        await asyncio.wait_for(fake.held.wait(), 5)
        for _ in range(250):  # until the follower folded what was sent
            if feed.state.revision == 6:
                break
            await asyncio.sleep(0.02)
        assert feed.state.revision == 6 and not feed.caught_up.is_set()
        assert fake.compact_untils[-1] == 7  # where the registry was when it reconnected
        fake.release.set()
        await asyncio.wait_for(feed.caught_up.wait(), 5)
        assert feed.state.revision == 7 and served(feed.state) == {}


async def test_a_reset_registry_is_followed_again_from_the_start(
    served_registry: tuple[FakeRegistry, grpc.aio.Channel],
) -> None:
    fake, channel = served_registry
    feed = RegistryFeed(channel, max_backoff=0.1)
    async for _ in following(feed):
        await asyncio.wait_for(feed.caught_up.wait(), 5)
        # A new registry with a shorter history: revision 5 is ahead of it.
        fresh = Feed()
        fresh.version("n", 1)
        fresh.deploy("n", version=1)
        fake.events = fresh.events
        fake.live.set()
        for _ in range(100):
            if served(feed.state) == {"n:1": 1}:
                break
            await asyncio.sleep(0.02)
        assert served(feed.state) == {"n:1": 1}
        assert 0 in fake.watches[2:]


async def test_an_unreachable_registry_is_retried_and_not_caught_up() -> None:
    channel = open_channel("127.0.0.1:9")  # discard port: nothing listens
    feed = RegistryFeed(channel, max_backoff=0.05)
    async for _ in following(feed):
        await asyncio.sleep(0.3)
        assert not feed.caught_up.is_set()
    await channel.close(None)
