"""Which version an alias's calls go to during a rollout: pure logic, no servers."""

from __future__ import annotations

import pytest
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2

from gateway.aliases import AliasFeed, AliasRouting, pick_version
from gateway.discovery import StaticDiscovery
from gateway.worker_pool import WorkerPool
from services.runtime.errors import NotFound, Unavailable


def test_first_call_goes_to_the_target() -> None:
    assert pick_version(3, None, {3: ["a"]}) == 3


def test_traffic_stays_until_the_target_is_everywhere_the_current_version_is() -> None:
    # a has the new version, b not yet: both still serve v3, so v3 keeps the traffic.
    assert pick_version(4, 3, {3: ["a", "b"], 4: ["a"]}) == 3
    assert pick_version(4, 3, {3: ["a", "b"], 4: ["a", "b"]}) == 4
    # a already let go of v3 after loading v4; b still only has v3.
    assert pick_version(4, 3, {3: ["b"], 4: ["a"]}) == 3


def test_a_current_version_served_nowhere_gives_way_to_the_target() -> None:
    assert pick_version(4, 3, {4: ["a"]}) == 4
    # Neither is loaded: the target is named, and routing says it is not loaded yet.
    assert pick_version(4, 3, {}) == 4


def test_rollback_is_the_same_move_backwards() -> None:
    assert pick_version(3, 4, {3: ["a"], 4: ["a", "b"]}) == 4
    assert pick_version(3, 4, {3: ["a", "b"], 4: ["a", "b"]}) == 3


def _moved(revision: int, model: str, alias: str, version: int) -> registry_pb2.RegistryEvent:
    return registry_pb2.RegistryEvent(
        revision=revision,
        alias_moved=registry_pb2.Alias(model=model, name=alias, version=version),
    )


async def test_routing_remembers_where_traffic_is() -> None:
    feed = AliasFeed("127.0.0.1:1")  # never started: events are applied by hand
    try:
        with pytest.raises(Unavailable, match="not been reached"):
            feed.target("digits", "production")
        feed.synced.set()
        with pytest.raises(NotFound, match="no alias 'production'"):
            feed.target("digits", "production")
        routing = AliasRouting(feed)
        feed.apply(_moved(1, "digits", "production", 1))
        assert routing.version("digits", "production", {1: ["a"]}) == 1
        feed.apply(_moved(2, "digits", "production", 2))
        # v2 is not loaded anywhere yet: traffic stays on v1.
        assert routing.version("digits", "production", {1: ["a"]}) == 1
        assert routing.version("digits", "production", {1: ["a"], 2: ["a"]}) == 2
        # Once moved, it does not go back when v1 disappears or reappears.
        assert routing.version("digits", "production", {1: ["a"], 2: ["a"]}) == 2
        assert feed.revision == 2
        feed.apply(
            registry_pb2.RegistryEvent(
                revision=3,
                alias_deleted=registry_pb2.AliasDeleted(model="digits", alias="production"),
            )
        )
        with pytest.raises(NotFound):
            routing.version("digits", "production", {2: ["a"]})
    finally:
        await feed.close()


async def test_a_gateway_that_never_routed_the_alias_starts_where_the_others_are() -> None:
    feed = AliasFeed("127.0.0.1:1")
    try:
        feed.synced.set()
        feed.apply(
            registry_pb2.RegistryEvent(
                revision=1,
                alias_moved=registry_pb2.Alias(
                    model="digits", name="canary", version=3, previous_version=1
                ),
            )
        )
        routing = AliasRouting(feed)
        # v3 is not loaded yet: the new gateway stays on v1 like every other gateway.
        assert routing.version("digits", "canary", {1: ["a"]}) == 1
        assert routing.version("digits", "canary", {1: ["a"], 3: ["a"]}) == 3
    finally:
        await feed.close()


async def test_settled_is_the_target_only_once_traffic_is_on_it() -> None:
    feed = AliasFeed("127.0.0.1:1")
    try:
        feed.synced.set()
        feed.apply(_moved(1, "digits", "production", 1))
        routing = AliasRouting(feed)
        assert routing.settled("digits", "production") is None  # never routed yet
        assert routing.version("digits", "production", {1: ["a"]}) == 1
        assert routing.settled("digits", "production") == 1
        feed.apply(_moved(2, "digits", "production", 2))
        assert routing.settled("digits", "production") is None  # a rollout under way
    finally:
        await feed.close()


class _Endpoint:
    """What routing reads of a worker (a WorkerEndpoint without its streams)."""

    def __init__(self, address: str, versions: list[int], *, serving: bool) -> None:
        self.address = address
        self.serving = serving
        self.reached = True
        self.outstanding = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.models = {
            ("digits", v): inference_pb2.ModelInfo(name="digits", version=v) for v in versions
        }

    def available(self, now: float) -> bool:
        return self.serving and now >= self.ejected_until

    def taken(self) -> None:
        pass

    def untaken(self) -> None:
        pass


async def test_a_bare_name_goes_to_the_newest_version_a_serving_worker_has() -> None:
    pool = WorkerPool(StaticDiscovery([]), refresh_seconds=60, eject_seconds=1)
    draining = _Endpoint("a", [1, 2], serving=False)
    serving = _Endpoint("b", [1], serving=True)
    pool._workers = {"a": draining, "b": serving}  # type: ignore[dict-item]
    pool._index_models()
    worker, info, _ = await pool.route(ModelRef.parse("digits"))
    assert (worker.address, info.version) == ("b", 1)
    # Pinned to a version only the draining worker has: it says so rather than reroute.
    with pytest.raises(Unavailable, match="digits:2"):
        await pool.route(ModelRef.parse("digits:2"))
    draining.serving = True
    worker, info, _ = await pool.route(ModelRef.parse("digits"))
    assert (worker.address, info.version) == ("a", 2)


async def test_a_gateway_that_knows_no_worker_says_unavailable_not_unknown() -> None:
    pool = WorkerPool(StaticDiscovery([]), refresh_seconds=60, eject_seconds=1)
    with pytest.raises(Unavailable, match="no worker is known to this gateway"):
        await pool.route(ModelRef.parse("digits"))
    pool._workers = {"b": _Endpoint("b", [1], serving=True)}  # type: ignore[dict-item]
    pool._index_models()
    with pytest.raises(NotFound, match="not served here"):
        await pool.route(ModelRef.parse("other"))
