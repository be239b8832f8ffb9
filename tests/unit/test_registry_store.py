"""RegistryStore on real databases: every test runs on SQLite and on PostgreSQL
(tests/databases.py); two stores on one database stand in for two registry processes."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.feed import subject_of
from services.registry.store import MIGRATIONS, VERSION_TABLE, RegistryStore
from services.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.worker.desired_state import DesiredState
from tests.helpers import migrate_to

pytest_plugins = ("tests.databases",)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RegistryStore]:
    opened = await RegistryStore.open(database_url)
    yield opened
    await opened.close()


async def add_model(
    store: RegistryStore, name: str = "digits", labels: dict[str, str] | None = None
) -> pb.Model:
    model = pb.Model(name=name, task="infer", description="mnist", labels=labels or {})
    return await store.create_model(model, actor="alice")


async def add_version(store: RegistryStore, model: str = "digits", parent: int = 0) -> int:
    version = await store.create_version(
        model,
        artifact=pb.Artifact(sha256=f"{parent:064x}", size_bytes=10, format="onnx"),
        config=pb.TritonConfig(backend="onnxruntime", max_batch_size=8),
        lineage=pb.Lineage(parent_version=parent, transformation="int8" if parent else ""),
        facts={"artifact_bytes": 10.0},
        description="",
        actor="alice",
    )
    return version.version


async def set_alias(
    store: RegistryStore, version: int, expected: int | None = None, alias: str = "production"
) -> pb.Alias:
    return await store.set_alias(
        "digits", alias, version, expected_version=expected, reason="test", actor="bob"
    )


# --- models -------------------------------------------------------------------------------


async def test_models_create_get_update(store: RegistryStore) -> None:
    created = await add_model(store, labels={"a": "1"})
    assert (created.name, created.task, created.latest_version) == ("digits", "infer", 0)
    assert created.create_time == created.update_time
    assert await store.get_model("digits") == created
    with pytest.raises(AlreadyExists, match="model 'digits' already exists"):
        await add_model(store)
    with pytest.raises(InvalidArgument, match=r"model.name: '-bad' is not a valid name"):
        await add_model(store, name="-bad")
    with pytest.raises(InvalidArgument, match=r"model.task"):
        await store.create_model(pb.Model(name="x"), actor="alice")
    with pytest.raises(NotFound, match="model 'nope' does not exist"):
        await store.get_model("nope")
    updated = await store.update_model("digits", description="new", labels=None, actor="carol")
    assert (updated.description, dict(updated.labels)) == ("new", {"a": "1"})
    updated = await store.update_model("digits", description=None, labels={"b": "2"}, actor="c")
    assert (updated.description, dict(updated.labels)) == ("new", {"b": "2"})
    assert updated.update_time.ToMicroseconds() > created.update_time.ToMicroseconds()
    with pytest.raises(NotFound, match="model 'nope'"):
        await store.update_model("nope", description="x", labels=None, actor="c")


async def test_list_models_pages_and_filters(store: RegistryStore) -> None:
    for index, name in enumerate(["b", "a", "C", "d", "e", "f", "g"]):
        labels = {"team": "x" if index % 2 else "y", "tier": "gold"}
        await store.create_model(
            pb.Model(name=name, task="generate" if index < 3 else "infer", labels=labels),
            actor="alice",
        )
    seen, token, pages = [], "", 0
    while True:
        models, token = await store.list_models(page_size=3, page_token=token, task="", labels={})
        seen += [model.name for model in models]
        pages += 1
        if not token:
            break
    assert (seen, pages) == (["C", "a", "b", "d", "e", "f", "g"], 3)
    everything, token = await store.list_models(page_size=0, page_token="", task="", labels={})
    assert (len(everything), token) == (7, "")

    async def names(task: str, labels: dict[str, str]) -> list[str]:
        models, _ = await store.list_models(page_size=0, page_token="", task=task, labels=labels)
        return [model.name for model in models]

    assert await names("generate", {}) == ["C", "a", "b"]
    assert await names("", {"team": "x"}) == ["a", "d", "f"]
    assert await names("infer", {"team": "y", "tier": "gold"}) == ["e", "g"]
    assert await names("", {"team": "z"}) == []
    with pytest.raises(InvalidArgument, match="page_token"):
        await store.list_models(page_size=1, page_token="garbage!", task="", labels={})
    with pytest.raises(InvalidArgument, match=r"page_size: must be 0..1000"):
        await store.list_models(page_size=1001, page_token="", task="", labels={})


# --- versions -----------------------------------------------------------------------------


async def test_versions_come_in_pages_bounded_in_count_and_bytes(store: RegistryStore) -> None:
    await add_model(store)
    for _ in range(5):
        await add_version(store)
    pages, token = [], ""
    while True:
        page, token = await store.list_versions("digits", page_size=2, page_token=token)
        pages.append([v.version for v in page])
        if not token:
            break
    assert pages == [[5, 4], [3, 2], [1]]
    # Configs of about a megabyte each: a page stops before 3 MiB, whatever its size.
    for _ in range(4):
        await store.create_version(
            "digits",
            artifact=pb.Artifact(sha256="f" * 64, size_bytes=10, format="onnx"),
            config=pb.TritonConfig(backend="onnxruntime", pbtxt="#" * 1_000_000),
            lineage=pb.Lineage(),
            facts={},
            description="",
            actor="alice",
        )
    page, token = await store.list_versions("digits", page_size=1000)
    assert [v.version for v in page] == [9, 8, 7] and token
    page, token = await store.list_versions("digits", page_size=1000, page_token=token)
    assert [v.version for v in page] == [6, 5, 4, 3, 2, 1] and not token
    await add_model(store, "digits2")
    _, of_models = await store.list_models(page_size=1, page_token="", task="", labels={})
    with pytest.raises(InvalidArgument, match="page_token"):  # a ListModels token
        await store.list_versions("digits", page_token=of_models)
    with pytest.raises(InvalidArgument, match="page_size"):
        await store.list_versions("digits", page_size=-1)
    for after in ("²", "9" * 40):  # a digit that int() refuses; more than a bigint holds
        forged = base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()
        with pytest.raises(InvalidArgument, match="page_token"):
            await store.list_versions("digits", page_token=forged)


async def test_version_numbers_are_never_reused(store: RegistryStore) -> None:
    await add_model(store)
    assert [await add_version(store) for _ in range(3)] == [1, 2, 3]
    await store.delete_version("digits", 3, actor="alice")
    assert (await store.get_model("digits")).latest_version == 2
    assert await add_version(store, parent=2) == 4
    assert [v.version for v in (await store.list_versions("digits"))[0]] == [4, 2, 1]
    derived = await store.get_version("digits", 4)
    assert (derived.lineage.parent_version, derived.config.max_batch_size) == (2, 8)
    assert dict(derived.facts) == {"artifact_bytes": 10.0}
    with pytest.raises(NotFound, match="model 'digits' has no version 3"):
        await store.get_version("digits", 3)
    with pytest.raises(NotFound, match="has no version \\(lineage parent\\) 3"):
        await add_version(store, parent=3)
    with pytest.raises(NotFound, match="model 'nope' does not exist"):
        await add_version(store, model="nope")
    assert await store.referenced_artifacts() == {f"{0:064x}", f"{2:064x}"}


async def test_resolve_model_refs(store: RegistryStore) -> None:
    await add_model(store)
    with pytest.raises(NotFound, match="model 'digits' has no versions yet"):
        await store.resolve(ModelRef("digits"))
    await add_version(store)
    await add_version(store)
    await set_alias(store, 1)
    assert (await store.resolve(ModelRef.parse("digits"))).version == 2
    assert (await store.resolve(ModelRef.parse("digits:1"))).version == 1
    assert (await store.resolve(ModelRef.parse("digits@production"))).version == 1
    with pytest.raises(NotFound, match="model 'digits' has no alias 'staging'"):
        await store.resolve(ModelRef.parse("digits@staging"))


# --- aliases ------------------------------------------------------------------------------


async def test_set_alias_compare_and_set(store: RegistryStore) -> None:
    await add_model(store)
    for _ in range(3):
        await add_version(store)
    created = await set_alias(store, 1, expected=0)
    assert (created.version, created.updated_by, created.reason) == (1, "bob", "test")
    with pytest.raises(FailedPrecondition, match="exists: it points at version 1"):
        await set_alias(store, 2, expected=0)
    with pytest.raises(FailedPrecondition, match="of model 'digits' points at version 1, not 2"):
        await set_alias(store, 3, expected=2)
    with pytest.raises(FailedPrecondition, match="'staging' of model 'digits' does not exist"):
        await set_alias(store, 3, expected=2, alias="staging")
    with pytest.raises(NotFound, match="has no version 9"):
        await set_alias(store, 9)
    assert (await set_alias(store, 2, expected=1)).version == 2
    revision = await store.feed.current_revision()
    assert await set_alias(store, 2) == await set_alias(store, 2, expected=2)  # no-ops
    assert await store.feed.current_revision() == revision
    assert [move.to_version for move in await store.alias_history("digits", "production")] == [
        1,
        2,
    ]


async def _race(first: RegistryStore, second: RegistryStore) -> None:
    await add_model(first)
    for _ in range(3):
        await add_version(first)
    await set_alias(first, 1)
    results = await asyncio.gather(
        set_alias(first, 2, expected=1), set_alias(second, 3, expected=1), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, pb.Alias)]
    losers = [r for r in results if isinstance(r, FailedPrecondition)]
    assert (len(winners), len(losers)) == (1, 1), results
    assert f"points at version {winners[0].version}, not 1" in losers[0].message
    assert [m.to_version for m in await second.alias_history("digits", "production")] == [
        1,
        winners[0].version,
    ]


async def test_concurrent_compare_and_set_one_wins(store: RegistryStore) -> None:
    await _race(store, store)


async def test_concurrent_compare_and_set_across_processes(
    store: RegistryStore, database_url: str
) -> None:
    other = await RegistryStore.open(database_url)
    try:
        await _race(store, other)
    finally:
        await other.close()


async def test_rollback_points_back(store: RegistryStore) -> None:
    await add_model(store)
    for _ in range(3):
        await add_version(store)
    await set_alias(store, 1)
    with pytest.raises(FailedPrecondition, match="no earlier version to roll back to"):
        await store.rollback_alias("digits", "production", reason="oops", actor="bob")
    await set_alias(store, 3)
    back = await store.rollback_alias("digits", "production", reason="bad", actor="carol")
    assert (back.version, back.reason, back.updated_by) == (1, "bad", "carol")
    last = (await store.alias_history("digits", "production"))[-1]
    assert (last.from_version, last.to_version, last.rollback, last.actor) == (3, 1, True, "carol")
    forth = await store.rollback_alias("digits", "production", reason="undo", actor="bob")
    assert forth.version == 3  # rolling back a rollback undoes it
    await set_alias(store, 2)
    await store.delete_version("digits", 3, actor="alice")
    with pytest.raises(FailedPrecondition, match="back to version 3: that version was deleted"):
        await store.rollback_alias("digits", "production", reason="", actor="bob")
    with pytest.raises(NotFound, match="has no alias 'staging'"):
        await store.rollback_alias("digits", "staging", reason="", actor="bob")


async def test_alias_at_answers_for_any_past_moment(store: RegistryStore) -> None:
    await add_model(store)
    for _ in range(3):
        await add_version(store)
    moments = [datetime.now(UTC)]
    for version in (1, 3, 2):
        await asyncio.sleep(0.002)
        await set_alias(store, version)
        await asyncio.sleep(0.002)
        moments.append(datetime.now(UTC))
    await store.delete_alias("digits", "production", reason="retired", actor="bob")
    moments.append(datetime.now(UTC))
    with pytest.raises(NotFound, match="'production' of model 'digits' did not exist at"):
        await store.alias_at("digits", "production", moments[0])
    at = [await store.alias_at("digits", "production", moment) for moment in moments[1:4]]
    assert [(m.from_version, m.to_version) for m in at] == [(0, 1), (1, 3), (3, 2)]
    with pytest.raises(NotFound, match="did not exist at"):
        await store.alias_at("digits", "production", moments[4])
    naive = moments[2].replace(tzinfo=None)  # taken as UTC
    assert (await store.alias_at("digits", "production", naive)).to_version == 3
    history = await store.alias_history("digits", "production")
    assert [(m.to_version, m.reason) for m in history][-1] == (0, "retired")


async def test_in_use_versions_and_aliases_cannot_be_deleted(store: RegistryStore) -> None:
    await add_model(store)
    await add_version(store)
    await add_version(store)
    await set_alias(store, 1)
    await store.set_deployment(pb.Deployment(model="digits", alias="production"), actor="dave")
    await store.set_deployment(pb.Deployment(model="digits", version=1), actor="dave")
    with pytest.raises(FailedPrecondition) as caught:
        await store.delete_version("digits", 1, actor="alice")
    assert caught.value.message == (
        "version 1 of model 'digits' is in use by alias 'production', the deployment of "
        "alias 'production', the deployment of version 1: move or delete them first"
    )
    with pytest.raises(FailedPrecondition, match="'production' of model 'digits' is deployed"):
        await store.delete_alias("digits", "production", reason="", actor="bob")
    await store.delete_deployment("digits", version=None, alias="production", actor="dave")
    await store.delete_deployment("digits", version=1, alias=None, actor="dave")
    await store.delete_alias("digits", "production", reason="", actor="bob")
    await store.delete_version("digits", 1, actor="alice")
    assert [v.version for v in (await store.list_versions("digits"))[0]] == [2]


# --- deployments --------------------------------------------------------------------------


async def test_deployments_follow_their_alias(store: RegistryStore) -> None:
    await add_model(store)
    await add_version(store)
    await add_version(store)
    await set_alias(store, 1)
    by_alias = await store.set_deployment(
        pb.Deployment(model="digits", alias="production"), actor="dave"
    )
    assert (by_alias.alias, by_alias.instances, by_alias.resolved_version) == ("production", 1, 1)
    await store.set_deployment(pb.Deployment(model="digits", version=2, instances=4), actor="dave")
    await store.set_deployment(
        pb.Deployment(model="digits", version=2, instances=2), actor="dave"
    )  # upsert
    await set_alias(store, 2)
    listed = await store.list_deployments()
    assert [(d.WhichOneof("target"), d.instances, d.resolved_version) for d in listed] == [
        ("alias", 1, 2),
        ("version", 2, 2),
    ]
    with pytest.raises(InvalidArgument, match=r"deployment.instances: must be 1..16, got 17"):
        await store.set_deployment(
            pb.Deployment(model="digits", version=2, instances=17), actor="dave"
        )
    with pytest.raises(InvalidArgument, match=r"deployment.target"):
        await store.set_deployment(pb.Deployment(model="digits"), actor="dave")
    with pytest.raises(NotFound, match="has no alias 'staging'"):
        await store.set_deployment(pb.Deployment(model="digits", alias="staging"), actor="dave")
    with pytest.raises(NotFound, match="has no deployment of version 1"):
        await store.delete_deployment("digits", version=1, alias=None, actor="dave")


# --- the change feed ----------------------------------------------------------------------


async def test_events_after_replays_every_change_once_in_order(store: RegistryStore) -> None:
    await add_model(store)
    await add_version(store)
    await add_version(store)
    await set_alias(store, 1)
    await set_alias(store, 1)  # no-op: no event
    await set_alias(store, 2)
    await store.rollback_alias("digits", "production", reason="", actor="bob")
    await store.set_deployment(pb.Deployment(model="digits", alias="production"), actor="dave")
    await store.delete_deployment("digits", version=None, alias="production", actor="dave")
    await store.delete_alias("digits", "production", reason="", actor="bob")
    await store.delete_version("digits", 2, actor="alice")
    await store.update_model("digits", description="d", labels=None, actor="alice")
    feed = await store.feed.events_after(0)
    assert [event.WhichOneof("change") for event in feed] == [
        "model_changed",
        "version_created",
        "version_created",
        "alias_moved",
        "alias_moved",
        "alias_moved",
        "deployment_set",
        "deployment_deleted",
        "alias_deleted",
        "version_deleted",
        "model_changed",
    ]
    assert [event.revision for event in feed] == list(range(1, 12))
    # Who made each change, deletions included.
    assert [event.actor for event in feed] == (
        ["alice"] * 3 + ["bob"] * 3 + ["dave"] * 2 + ["bob", "alice", "alice"]
    )
    assert await store.feed.current_revision() == 11
    assert feed[5].alias_moved.revision == 6 and feed[6].deployment_set.resolved_version == 1
    assert await store.feed.events_after(8) == feed[8:]
    assert await store.feed.events_after(3, limit=2) == feed[3:5]
    # A batch stops at its byte budget, but always holds at least one event.
    size = feed[3].ByteSize()
    assert await store.feed.events_after(3, max_bytes=size + feed[4].ByteSize()) == feed[3:5]
    assert await store.feed.events_after(3, max_bytes=1) == feed[3:4]
    assert await store.feed.events_after(11) == []
    times = [event.time.ToMicroseconds() for event in feed]
    assert times == sorted(times)


async def test_concurrent_writers_get_gap_free_revisions(
    store: RegistryStore, database_url: str
) -> None:
    other = await RegistryStore.open(database_url)
    try:
        await asyncio.gather(
            *(add_model(store if i % 2 else other, f"m{i}") for i in range(20)),
        )
    finally:
        await other.close()
    feed = await store.feed.events_after(0)
    assert [event.revision for event in feed] == list(range(1, 21))
    assert sorted(event.model_changed.name for event in feed) == sorted(f"m{i}" for i in range(20))


async def test_wait_for_change_wakes_on_commit(store: RegistryStore) -> None:
    await store.feed.wait_for_change(0, timeout=0.01)  # nothing happens: returns after timeout
    waiter = asyncio.create_task(store.feed.wait_for_change(0, timeout=30))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await add_model(store)
    await asyncio.wait_for(waiter, timeout=5)


# --- the compacted feed -------------------------------------------------------------------


async def _a_busy_history(store: RegistryStore) -> None:
    """Versions made and deleted, aliases moved back and forth and deleted, deployments
    set, changed and deleted: what a registry that has run for a while holds."""
    await add_model(store)
    await add_model(store, "tiny")
    for _ in range(4):
        await add_version(store)
    await add_version(store, "tiny")
    for target in (1, 2, 3, 2, 4):
        await store.set_alias(
            "digits", "production", target, expected_version=None, reason="", actor="a"
        )
    await store.set_alias("digits", "staging", 3, expected_version=None, reason="", actor="a")
    await store.set_deployment(pb.Deployment(model="digits", alias="production"), actor="a")
    await store.set_deployment(pb.Deployment(model="digits", version=1, instances=2), actor="a")
    await store.set_deployment(pb.Deployment(model="tiny", version=1), actor="a")
    await store.delete_deployment("digits", version=1, alias=None, actor="a")
    await store.set_deployment(pb.Deployment(model="digits", version=3, instances=2), actor="a")
    await store.rollback_alias("digits", "production", reason="", actor="a")
    await store.delete_alias("digits", "staging", reason="", actor="a")
    await store.delete_version("digits", 1, actor="a")
    await store.update_model("tiny", description="smaller", labels=None, actor="a")


async def test_a_compacted_feed_keeps_the_newest_event_of_each_subject(
    store: RegistryStore,
) -> None:
    await _a_busy_history(store)
    full = await store.feed.events_after(0, limit=1000)
    head = full[-1].revision
    compacted = await store.feed.events_after(0, limit=1000, compact_until=head)
    assert len(compacted) < len(full)
    # The newest event of all is kept, so a follower reaches the registry's revision.
    assert compacted[-1] == full[-1]
    newest: dict[str, pb.RegistryEvent] = {}
    for event in full:
        newest[subject_of(event)] = event
    assert compacted == sorted(newest.values(), key=lambda event: event.revision)
    # A follower folding either ends in the same state.
    replayed, caught_up = DesiredState(), DesiredState()
    for event in full:
        replayed.apply(event)
    for event in compacted:
        caught_up.apply(event)
    assert caught_up.wanted() == replayed.wanted() and replayed.wanted()
    assert caught_up.deployments() == replayed.deployments()
    # From a revision on, too, and in pages.
    later = [e for e in full[10:] if newest[subject_of(e)] is e]
    assert await store.feed.events_after(10, limit=1000, compact_until=head) == later
    assert await store.feed.events_after(10, limit=2, compact_until=head) == later[:2]
    # Compacted up to an earlier revision: cut from the history as it was then, then
    # whole after it.
    until = 15
    then: dict[str, pb.RegistryEvent] = {}
    for event in full[:until]:
        then[subject_of(event)] = event
    expected = sorted(then.values(), key=lambda event: event.revision)
    assert await store.feed.events_after(0, limit=1000, compact_until=until) == expected
    assert await store.feed.events_after(until, limit=1000, compact_until=until) == full[until:]


def _old_events() -> list[pb.RegistryEvent]:
    return [
        pb.RegistryEvent(revision=1, alias_moved=pb.Alias(model="m", name="production", version=1)),
        pb.RegistryEvent(revision=2, alias_moved=pb.Alias(model="m", name="production", version=2)),
        pb.RegistryEvent(revision=3, model_changed=pb.Model(name="m", task="infer")),
    ]


async def test_the_subject_migration_fills_in_existing_events(database_url: str) -> None:
    await migrate_to(database_url, MIGRATIONS, VERSION_TABLE, "0001")
    # Events as a registry of schema 0001 wrote them: no subject.
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            for revision, event in enumerate(_old_events(), start=1):
                await connection.execute(
                    text("INSERT INTO events (revision, at_us, payload) VALUES (:r, :t, :p)"),
                    {"r": revision, "t": revision, "p": event.SerializeToString()},
                )
            await connection.execute(text("UPDATE registry_state SET revision = 3"))
    finally:
        await engine.dispose()
    store = await RegistryStore.open(database_url)  # migrates to head
    try:
        compacted = await store.feed.events_after(0, compact_until=3)
        assert [e.revision for e in compacted] == [2, 3]  # the first move was superseded
    finally:
        await store.close()
