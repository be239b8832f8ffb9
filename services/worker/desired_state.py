"""What the registry says this worker must serve, folded from its change feed.

Pure logic, no I/O: `DesiredState.apply` takes the registry's events one at a time
(in revision order, as Watch sends them) and `wanted()` answers with the model
versions that must be loaded and how many Triton instances each gets. The feed
follower (registry_feed.py) feeds it; the loader (model_loader.py) acts on it.

A deployment names a fixed version or an alias. An alias deployment means
whatever the alias points at now, so it is resolved here against the alias's
latest move, or the deployment's own `resolved_version`, whichever the feed
reported later: the answer is the same whether or not the registry re-announces
a deployment when its alias moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.registry.v1 import registry_pb2

VersionKey = tuple[str, int]
"""(model, version), as the registry numbers it."""


@dataclass(frozen=True)
class WantedVersion:
    """A model version that must be served, with its artifact and config."""

    version: registry_pb2.ModelVersion
    instances: int

    @property
    def key(self) -> VersionKey:
        return (self.version.model, self.version.version)

    @property
    def label(self) -> str:
        return f"{self.version.model}:{self.version.version}"


@dataclass(frozen=True)
class _Pointer:
    """Where an alias or a deployment's target pointed, and as of which revision."""

    version: int  # 0: nowhere (a deleted alias)
    revision: int


def deployment_target(model: str, kind: str | None, version: int, alias: str) -> str:
    """A deployment's identity: "model:3" or "model@alias"."""
    return f"{model}@{alias}" if kind == "alias" else f"{model}:{version}"


class DesiredState:
    """The registry's versions, aliases and deployments as of `revision`."""

    def __init__(self) -> None:
        self.revision = 0
        # The time of the change at `revision`: a resumed Watch sends it, so a registry
        # whose history is not this one says so (see WatchRequest.since_time).
        self.revision_time = Timestamp()
        self._versions: dict[VersionKey, registry_pb2.ModelVersion] = {}
        self._aliases: dict[tuple[str, str], _Pointer] = {}
        self._deployments: dict[str, registry_pb2.Deployment] = {}
        self._resolved: dict[str, _Pointer] = {}

    def apply(self, event: registry_pb2.RegistryEvent) -> bool:
        """Folds one event in. False, changing nothing, for one already folded in.

        Watch never repeats an event, but a follower that reconnects could be sent
        one it has (it asks for those after `revision`); ignoring them makes the
        fold exactly-once whatever the transport does.
        """
        if event.revision <= self.revision:
            return False
        self.revision = event.revision
        self.revision_time.CopyFrom(event.time)
        change = event.WhichOneof("change")
        if change == "version_created":
            created = event.version_created
            self._versions[(created.model, created.version)] = created
        elif change == "version_deleted":
            self._versions.pop((event.version_deleted.model, event.version_deleted.version), None)
        elif change == "alias_moved":
            moved = event.alias_moved
            self._aliases[(moved.model, moved.name)] = _Pointer(moved.version, event.revision)
        elif change == "alias_deleted":
            gone = event.alias_deleted
            self._aliases[(gone.model, gone.alias)] = _Pointer(0, event.revision)
        elif change == "deployment_set":
            deployment = event.deployment_set
            target = _target_of(deployment)
            self._deployments[target] = deployment
            self._resolved[target] = _Pointer(deployment.resolved_version, event.revision)
        elif change == "deployment_deleted":
            deleted = event.deployment_deleted
            target = deployment_target(
                deleted.model, deleted.WhichOneof("target"), deleted.version, deleted.alias
            )
            self._deployments.pop(target, None)
            self._resolved.pop(target, None)
        # model_changed (description, labels) says nothing about what is served.
        return True

    def resolve(self, target: str) -> int:
        """The version deployment `target` means now; 0 when it means none."""
        deployment = self._deployments.get(target)
        if deployment is None:
            return 0
        if deployment.WhichOneof("target") != "alias":
            return deployment.version
        own = self._resolved[target]
        moved = self._aliases.get((deployment.model, deployment.alias))
        return moved.version if moved is not None and moved.revision > own.revision else own.version

    def wanted(self) -> dict[VersionKey, WantedVersion]:
        """Every version some deployment means now, with the most instances any asks for.

        A deployment whose version the feed never described (nor deleted) cannot be
        loaded; `unresolved` names those.
        """
        instances: dict[VersionKey, int] = {}
        for target, deployment in self._deployments.items():
            key = (deployment.model, self.resolve(target))
            if key in self._versions:
                instances[key] = max(instances.get(key, 0), max(1, deployment.instances))
        return {key: WantedVersion(self._versions[key], count) for key, count in instances.items()}

    def unresolved(self) -> list[str]:
        """Deployments that mean no version the feed has described, e.g. "m@prod -> v0"."""
        missing = []
        for target, deployment in sorted(self._deployments.items()):
            version = self.resolve(target)
            if (deployment.model, version) not in self._versions:
                missing.append(f"{target} -> v{version}")
        return missing

    def deployments(self) -> Mapping[str, registry_pb2.Deployment]:
        return dict(self._deployments)


def _target_of(deployment: registry_pb2.Deployment) -> str:
    return deployment_target(
        deployment.model, deployment.WhichOneof("target"), deployment.version, deployment.alias
    )
