"""`tensorgate models ...`: the model registry from the command line.

    tensorgate models create digits --task infer --label team=vision
    tensorgate models upload digits models/repository/digits
    tensorgate models versions digits
    tensorgate models download digits@production ./digits-copy

Aliases and deployments (alias, history, rollback, deploy, ...) are in
launcher/rollout_commands.py. Lists are tables on a terminal and tab-separated rows
otherwise (launcher/output.py). `served` asks the gateway what its workers have loaded,
everything else asks the registry.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from tensorgate import AsyncGatewayClient
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_folder import unpack
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2
from tensorgate.registry_client import AsyncRegistryClient

from launcher import output
from launcher.optimize_commands import optimize_app
from launcher.options import (
    DEFAULT_ADDRESS,
    Address,
    ApiKey,
    Labels,
    Name,
    Ref,
    UsageError,
    parse_labels,
    with_registry,
)
from launcher.rollout_commands import rollout_app

models_app = typer.Typer(
    help="The model registry: models, versions, aliases and deployments.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
# Aliases and deployments live in their own module; their commands join this group.
models_app.add_typer(rollout_app)
models_app.add_typer(optimize_app)


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@models_app.command("list")
def list_models(
    task: Annotated[str, typer.Option(help="only models with this task")] = "",
    label: Labels = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """The registered models: NAME TASK LATEST LABELS UPDATED DESCRIPTION."""
    wanted = parse_labels(label)

    found = with_registry(
        address, api_key, lambda registry: registry.list_models(task=task, labels=wanted)
    )
    rows = [
        (
            m.name,
            m.task,
            output.dash(m.latest_version),
            _labels(m.labels),
            output.local_time(m.update_time),
            m.description,
        )
        for m in found
    ]
    output.table(
        ("NAME", "TASK", "LATEST", "LABELS", "UPDATED", "DESCRIPTION"), rows, empty="no models"
    )


@models_app.command()
def create(
    name: Name,
    task: Annotated[str, typer.Option(help="generate, infer, embed, ...")],
    description: Annotated[str, typer.Option(help="what the model is")] = "",
    label: Labels = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Register a model name (its versions come with `upload`)."""
    labels = parse_labels(label)

    model = with_registry(
        address,
        api_key,
        lambda registry: registry.create_model(
            name, task=task, description=description, labels=labels
        ),
    )
    output.result(f"created {model.name} ({model.task})", (model.name, model.task))


@models_app.command()
def upload(
    name: Name,
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH", help="a model folder (config.pbtxt + 1/), or a tar with --config"
        ),
    ],
    config: Annotated[Path | None, typer.Option(help="the config.pbtxt to register")] = None,
    description: Annotated[str, typer.Option(help="what changed in this version")] = "",
    parent_version: Annotated[
        int | None, typer.Option(help="the version this one was derived from")
    ] = None,
    transformation: Annotated[str, typer.Option(help="how it was derived, e.g. int8-dynamic")] = "",
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Register a new version: NAME:VERSION SHA256 SIZE."""
    if transformation and parent_version is None:
        raise UsageError("--transformation says how a version was derived: add --parent-version")
    lineage = (
        registry_pb2.Lineage(parent_version=parent_version, transformation=transformation)
        if parent_version is not None
        else None
    )

    with output.transfer_progress(f"uploading {name}") as progress:
        version = with_registry(
            address,
            api_key,
            lambda registry: registry.upload(
                name,
                path,
                config=config,
                lineage=lineage,
                description=description,
                progress=progress,
            ),
        )
    artifact = version.artifact
    output.result(
        f"uploaded {version.model}:{version.version} "
        f"({output.size(artifact.size_bytes)}, sha256 {artifact.sha256})",
        (f"{version.model}:{version.version}", artifact.sha256, str(artifact.size_bytes)),
    )


@models_app.command()
def versions(name: Name, address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """A model's versions, newest first: VERSION ALIASES SHA256 SIZE FORMAT LINEAGE CREATED BY
    DESCRIPTION."""

    async def fetch(
        registry: AsyncRegistryClient,
    ) -> tuple[list[registry_pb2.ModelVersion], list[registry_pb2.Alias]]:
        return await registry.list_versions(name), await registry.list_aliases(name)

    found, aliases = with_registry(address, api_key, fetch)
    terminal = output.stdout_is_terminal()
    rows = []
    for v in found:
        lineage = (
            f"{v.lineage.parent_version} {v.lineage.transformation}".strip()
            if v.lineage.parent_version
            else ""
        )
        rows.append(
            (
                str(v.version),
                ",".join(a.name for a in aliases if a.version == v.version),
                v.artifact.sha256[:12] if terminal else v.artifact.sha256,
                output.size(v.artifact.size_bytes) if terminal else str(v.artifact.size_bytes),
                v.artifact.format,
                lineage,
                output.local_time(v.create_time),
                v.created_by,
                v.description,
            )
        )
    columns = ("VERSION", "ALIASES", "SHA256", "SIZE", "FORMAT", "FROM", "CREATED", "BY")
    output.table((*columns, "DESCRIPTION"), rows, empty=f"{name} has no versions")


@models_app.command()
def download(
    ref: Ref,
    dest: Annotated[
        Path,
        typer.Argument(
            metavar="DEST", help="a new model folder, or a file ending in .tar (the artifact)"
        ),
    ],
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Fetch a version, verified by sha256: DEST.tar gets the artifact, any other DEST
    becomes a model folder (config.pbtxt + <version>/) that `upload` takes back."""
    ModelRef.parse(ref)  # a malformed reference is refused before connecting

    if dest.suffix != ".tar" and dest.exists():
        raise UsageError(f"{dest} already exists; give a new folder or a .tar file")

    async def fetch(registry: AsyncRegistryClient) -> registry_pb2.ModelVersion:
        wanted = await registry.resolve_model_ref(ref)
        with output.transfer_progress(f"downloading {ref}") as progress:
            if dest.suffix == ".tar":
                return await registry.download(
                    wanted.model, wanted.version, dest, progress=progress
                )
            with tempfile.TemporaryDirectory() as scratch:
                artifact = Path(scratch) / "artifact.tar"
                got = await registry.download(
                    wanted.model, wanted.version, artifact, progress=progress
                )
                await asyncio.to_thread(unpack, artifact, got.config.pbtxt, dest, got.version)
                return got

    got = with_registry(address, api_key, fetch)
    output.result(
        f"downloaded {got.model}:{got.version} to {dest} "
        f"({output.size(got.artifact.size_bytes)}, sha256 {got.artifact.sha256})",
        (f"{got.model}:{got.version}", str(dest), got.artifact.sha256),
    )


@models_app.command()
def served(address: Address = DEFAULT_ADDRESS, api_key: ApiKey = None) -> None:
    """What the gateway's workers have loaded now: MODEL TASK CONTEXT DESCRIPTION."""

    async def fetch() -> list[inference_pb2.ModelInfo]:
        async with AsyncGatewayClient(address, api_key=api_key) as client:
            return await client.list_models()

    rows = [
        (
            f"{m.name}:{m.version}",
            m.task,
            str(m.context_length) if m.context_length else "",
            m.description,
        )
        for m in asyncio.run(fetch())
    ]
    output.table(("MODEL", "TASK", "CONTEXT", "DESCRIPTION"), rows, empty="nothing served")
