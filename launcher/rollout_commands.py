"""`tensorgate models alias|history|rollback|deploy|undeploy|deployments`: how versions
reach production. Aliases name versions and record every move; deployments say what the
workers must serve.

    tensorgate models alias digits production 2 --expect 1 --reason "better accuracy"
    tensorgate models alias digits production 2 --max-quality-loss 0.01
    tensorgate models history digits production --at 2025-06-01T14:30
    tensorgate models rollback digits production --reason "latency regression"
    tensorgate models deploy digits@production --instances 2

These commands join the `models` group (launcher/registry_commands.py).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from tensorgate import AsyncGatewayClient
from tensorgate.errors import UnimplementedError
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2
from tensorgate.registry_client import AsyncRegistryClient

from launcher import output
from launcher.options import (
    DEFAULT_ADDRESS,
    Address,
    AliasName,
    ApiKey,
    Name,
    Reason,
    Ref,
    UsageError,
    parse_time,
    with_registry,
)

rollout_app = typer.Typer(rich_markup_mode=None)


@rollout_app.command()
def alias(
    name: Name,
    alias_name: AliasName,
    version: Annotated[
        int, typer.Argument(metavar="VERSION", help="the version it should point at")
    ],
    expect: Annotated[
        int | None,
        typer.Option(help="move only if it points at this version now (0: only if new)"),
    ] = None,
    reason: Reason = "",
    max_quality_loss: Annotated[
        float | None,
        typer.Option(
            help="the alias's policy from now on: refuse versions that lost more quality "
            "than this against their parent (accuracy for digits, nats/byte for tinylm)"
        ),
    ] = None,
    clear_policy: Annotated[bool, typer.Option(help="remove the alias's policy")] = False,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Point an alias at a version (recorded in its history), under its policy."""

    moved = with_registry(
        address,
        api_key,
        lambda registry: registry.set_alias(
            name,
            alias_name,
            version,
            expected_version=expect,
            reason=reason,
            max_quality_loss=max_quality_loss,
            clear_policy=clear_policy,
        ),
    )
    output.result(
        f"{moved.model}@{moved.name} -> {moved.version}",
        (f"{moved.model}@{moved.name}", str(moved.version)),
    )


@rollout_app.command()
def history(
    name: Name,
    alias_name: AliasName,
    at: Annotated[
        str | None,
        typer.Option(metavar="ISO-TIME", help="only the move in force at this ISO 8601 time"),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """An alias's moves, oldest first: TIME FROM TO ACTOR REASON ROLLBACK REVISION."""
    when = parse_time(at, "--at") if at is not None else None

    async def fetch(registry: AsyncRegistryClient) -> list[registry_pb2.AliasMove]:
        if when is not None:
            return [await registry.get_alias_at(name, alias_name, when)]
        return await registry.get_alias_history(name, alias_name)

    found = with_registry(address, api_key, fetch)
    rows = [
        (
            output.local_time(m.time),
            output.dash(m.from_version),
            output.dash(m.to_version),
            m.actor,
            m.reason,
            "rollback" if m.rollback else "",
            str(m.revision),
        )
        for m in found
    ]
    columns = ("TIME", "FROM", "TO", "ACTOR", "REASON", "ROLLBACK", "REVISION")
    output.table(columns, rows, empty=f"{name}@{alias_name} never moved")


@rollout_app.command()
def rollback(
    name: Name,
    alias_name: AliasName,
    reason: Reason = "",
    expect: Annotated[
        int | None,
        typer.Option(
            help="roll back only if the alias points at this version now (default: the "
            "version it points at when the command starts)"
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Point an alias back where it pointed before its last move."""

    async def roll_back(registry: AsyncRegistryClient) -> registry_pb2.Alias:
        expected = expect
        if expected is None:
            # Pinned to what the alias points at now, two rollbacks at once (two people,
            # two scripts) move it once: the second is refused, naming where it points,
            # instead of rolling the first one back. (One run after another is two
            # rollbacks: the second undoes the first, as documented.)
            current = [a for a in await registry.list_aliases(name) if a.name == alias_name]
            expected = current[0].version if current else None
        return await registry.rollback_alias(
            name, alias_name, reason=reason, expected_version=expected
        )

    moved = with_registry(address, api_key, roll_back)
    output.result(
        f"{moved.model}@{moved.name} -> {moved.version} (rolled back)",
        (f"{moved.model}@{moved.name}", str(moved.version)),
    )


@rollout_app.command()
def deploy(
    ref: Ref,
    instances: Annotated[int, typer.Option(help="Triton instances per worker")] = 1,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Have the workers serve a version; name@alias follows the alias as it moves, a plain
    name means its newest version now."""
    target = ModelRef.parse(ref)

    async def apply(registry: AsyncRegistryClient) -> registry_pb2.Deployment:
        version = target.version
        if target.alias is None and version is None:
            version = (await registry.resolve_model_ref(target.name)).version
        return await registry.set_deployment(
            target.name, version=version, alias=target.alias, instances=instances
        )

    done = with_registry(address, api_key, apply)
    output.result(
        f"deployed {_deployment_ref(done)} (version {done.resolved_version}), "
        f"{done.instances} instance(s) per worker",
        (_deployment_ref(done), str(done.resolved_version), str(done.instances)),
    )


@rollout_app.command()
def undeploy(
    ref: Annotated[str, typer.Argument(metavar="REF", help="name:3 or name@alias, as deployed")],
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Stop serving a deployment."""
    target = ModelRef.parse(ref)
    if target.version is None and target.alias is None:
        raise UsageError(f"{ref!r}: say which deployment, NAME:VERSION or NAME@ALIAS")

    with_registry(
        address,
        api_key,
        lambda registry: registry.delete_deployment(
            target.name, version=target.version, alias=target.alias
        ),
    )
    output.result(f"undeployed {target}", (str(target),))


def _deployment_ref(d: registry_pb2.Deployment) -> str:
    return f"{d.model}@{d.alias}" if d.WhichOneof("target") == "alias" else f"{d.model}:{d.version}"


@rollout_app.command()
def deployments(address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """What the workers must serve, and whether they do: REF VERSION INSTANCES SERVED
    UPDATED REVISION (SERVED "no": no worker has that version loaded; the workers' logs
    say why, e.g. an artifact that failed its sha256 check)."""

    async def fetch() -> tuple[list[registry_pb2.Deployment], set[tuple[str, int]]]:
        async with AsyncRegistryClient(address, api_key=api_key) as registry:
            found = await registry.list_deployments()
        async with AsyncGatewayClient(address, api_key=api_key) as gateway:
            try:
                loaded = {(m.name, m.version) for m in await gateway.list_models()}
            except UnimplementedError:  # a registry address, not a gateway's
                loaded = set()
        return found, loaded

    found, loaded = asyncio.run(fetch())
    rows = [
        (
            _deployment_ref(d),
            str(d.resolved_version),
            str(d.instances),
            "yes" if (d.model, d.resolved_version) in loaded else "no",
            output.local_time(d.update_time),
            str(d.revision),
        )
        for d in found
    ]
    columns = ("REF", "VERSION", "INSTANCES", "SERVED", "UPDATED", "REVISION")
    output.table(columns, rows, empty="nothing deployed")
