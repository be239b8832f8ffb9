"""The registry's change feed folded into what a worker must serve: versions, aliases,
deployments on a version or an alias, deletes, and resuming without repeats."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tensorgate.registry.v1 import registry_pb2

from services.worker.desired_state import DesiredState


class Feed:
    """Builds events with increasing revisions, as the registry writes them."""

    def __init__(self) -> None:
        self.events: list[registry_pb2.RegistryEvent] = []

    def _add(self, **change: object) -> registry_pb2.RegistryEvent:
        event = registry_pb2.RegistryEvent(revision=len(self.events) + 1, **change)  # type: ignore[arg-type]
        event.time.FromSeconds(1_700_000_000 + event.revision)  # each change its own time
        self.events.append(event)
        return event

    def version(self, model: str, version: int) -> None:
        self._add(
            version_created=registry_pb2.ModelVersion(
                model=model,
                version=version,
                artifact=registry_pb2.Artifact(sha256=f"{version:064x}"),
            )
        )

    def delete_version(self, model: str, version: int) -> None:
        self._add(version_deleted=registry_pb2.VersionDeleted(model=model, version=version))

    def alias(self, model: str, alias: str, version: int) -> None:
        self._add(alias_moved=registry_pb2.Alias(model=model, name=alias, version=version))

    def delete_alias(self, model: str, alias: str) -> None:
        self._add(alias_deleted=registry_pb2.AliasDeleted(model=model, alias=alias))

    def deploy(
        self,
        model: str,
        *,
        version: int = 0,
        alias: str = "",
        resolved: int = 0,
        instances: int = 1,
    ) -> None:
        deployment = registry_pb2.Deployment(
            model=model, instances=instances, resolved_version=resolved or version
        )
        if alias:
            deployment.alias = alias
        else:
            deployment.version = version
        self._add(deployment_set=deployment)

    def undeploy(self, model: str, *, version: int = 0, alias: str = "") -> None:
        deleted = registry_pb2.DeploymentDeleted(model=model)
        if alias:
            deleted.alias = alias
        else:
            deleted.version = version
        self._add(deployment_deleted=deleted)

    def fold(self, state: DesiredState | None = None) -> DesiredState:
        state = state or DesiredState()
        for event in self.events:
            state.apply(event)
        return state


def served(state: DesiredState) -> dict[str, int]:
    """ "model:version" -> instances."""
    return {want.label: want.instances for want in state.wanted().values()}


def test_a_deployment_on_a_version_wants_that_version() -> None:
    feed = Feed()
    feed.version("digits", 1)
    feed.version("digits", 2)
    feed.deploy("digits", version=1, instances=2)
    state = feed.fold()
    assert served(state) == {"digits:1": 2}
    assert state.revision == 3
    (wanted,) = state.wanted().values()
    assert wanted.version.artifact.sha256 == f"{1:064x}"


def test_a_deployment_on_an_alias_follows_the_alias_when_it_moves() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.version("m", 2)
    feed.alias("m", "production", 1)
    feed.deploy("m", alias="production", resolved=1)
    assert served(feed.fold()) == {"m:1": 1}
    # The registry need not re-announce the deployment: the alias move is enough.
    feed.alias("m", "production", 2)
    assert served(feed.fold()) == {"m:2": 1}
    # Rolling back is pointing back.
    feed.alias("m", "production", 1)
    assert served(feed.fold()) == {"m:1": 1}


def test_a_deployment_set_after_the_alias_moved_is_taken_as_resolved_then() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.version("m", 2)
    feed.alias("m", "staging", 1)
    # Re-announced with the version the alias means now: the later word wins.
    feed.deploy("m", alias="staging", resolved=2)
    assert served(feed.fold()) == {"m:2": 1}


def test_deployments_on_a_version_and_on_an_alias_add_up() -> None:
    feed = Feed()
    for version in (1, 2, 3):
        feed.version("m", version)
    feed.alias("m", "production", 2)
    feed.deploy("m", version=1, instances=1)
    feed.deploy("m", alias="production", resolved=2, instances=3)
    assert served(feed.fold()) == {"m:1": 1, "m:2": 3}
    # Both mean version 2 now: it is loaded once, with the most instances asked for.
    feed.deploy("m", version=2, instances=2)
    feed.undeploy("m", version=1)
    assert served(feed.fold()) == {"m:2": 3}


def test_deleting_a_deployment_or_its_alias_stops_wanting_the_version() -> None:
    feed = Feed()
    feed.version("a", 1)
    feed.version("b", 1)
    feed.alias("b", "production", 1)
    feed.deploy("a", version=1)
    feed.deploy("b", alias="production", resolved=1)
    assert served(feed.fold()) == {"a:1": 1, "b:1": 1}
    feed.undeploy("a", version=1)
    assert served(feed.fold()) == {"b:1": 1}
    feed.delete_alias("b", "production")
    state = feed.fold()
    assert served(state) == {}
    assert state.unresolved() == ["b@production -> v0"]
    feed.undeploy("b", alias="production")
    assert served(feed.fold()) == {} and feed.fold().unresolved() == []


def test_a_deployment_of_a_version_the_feed_never_described_is_reported() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.deploy("m", version=1)
    feed.delete_version("m", 1)  # the registry would refuse; the fold must not crash
    feed.deploy("other", version=4)
    state = feed.fold()
    assert served(state) == {}
    assert state.unresolved() == ["m:1 -> v1", "other:4 -> v4"]


def test_zero_instances_means_one() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.deploy("m", version=1, instances=0)
    assert served(feed.fold()) == {"m:1": 1}


def test_model_changes_say_nothing_about_what_is_served() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.deploy("m", version=1)
    before = served(feed.fold())
    feed._add(model_changed=registry_pb2.Model(name="m", description="new words"))
    state = feed.fold()
    assert served(state) == before and state.revision == 3


def _history() -> Feed:
    feed = Feed()
    for version in (1, 2, 3):
        feed.version("m", version)
    feed.version("n", 1)
    feed.alias("m", "production", 1)
    feed.deploy("m", alias="production", resolved=1, instances=2)
    feed.deploy("n", version=1)
    feed.alias("m", "production", 3)
    feed.deploy("m", version=2)
    feed.delete_version("m", 1)
    feed.undeploy("n", version=1)
    feed.alias("m", "production", 2)
    return feed


def _splits() -> Iterator[int]:
    yield from range(len(_history().events) + 1)


@pytest.mark.parametrize("cut", list(_splits()))
def test_resuming_after_the_last_revision_gives_the_same_state(cut: int) -> None:
    events = _history().events
    whole = DesiredState()
    for event in events:
        whole.apply(event)
    resumed = DesiredState()
    for event in events[:cut]:
        resumed.apply(event)
    # A reconnect asks for the events after `resumed.revision`; a transport that sends
    # some again (or all of them) changes nothing.
    for event in events[max(0, cut - 2) :]:
        resumed.apply(event)
    assert served(resumed) == served(whole) == {"m:2": 2}
    assert resumed.revision == whole.revision == len(events)


def test_an_event_already_folded_in_is_ignored() -> None:
    feed = Feed()
    feed.version("m", 1)
    feed.deploy("m", version=1)
    state = feed.fold()
    assert not state.apply(feed.events[1])
    stale = registry_pb2.RegistryEvent(
        revision=1, deployment_deleted=registry_pb2.DeploymentDeleted(model="m", version=1)
    )
    assert not state.apply(stale)
    assert served(state) == {"m:1": 1}
