"""Registers the demo models through the registry, as a team registers its own.

`tensorgate up` and `tensorgate demo` call this on every start: each model folder
under models/repository is created as a model if it is new, uploaded as a version
unless a version with the same artifact exists already, given a `production`
alias if it has none (an alias someone moved is left where they put it), and
deployed by that alias unless it is deployed already (a deployment someone changed,
its instances say, is left as they set it). Run twice, it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tensorgate.errors import FailedPreconditionError, NotFoundError
from tensorgate.model_folder import pack
from tensorgate.registry_client import AsyncRegistryClient

REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "repository"
DEMO_MODELS = ("tinylm", "digits")
ALIAS = "production"


def _config_parameter(config: str, key: str) -> str:
    """A string parameter of a config.pbtxt, read without Triton's parser (the SDK has none)."""
    marker = f'key: "{key}"'
    start = config.find(marker)
    if start < 0:
        return ""
    value = config.find('string_value: "', start)
    end = config.find('"', value + len('string_value: "'))
    return config[value + len('string_value: "') : end] if value >= 0 and end > 0 else ""


async def register_demo_model(client: AsyncRegistryClient, folder: Path) -> int:
    """Makes sure `folder`'s model is registered, aliased and deployed; returns its version."""
    name = folder.name
    with await asyncio.to_thread(pack, folder) as packed:
        sha256, config = packed.sha256, packed.config_pbtxt
    try:
        await client.get_model(name)
    except NotFoundError:
        await client.create_model(
            name,
            task=_config_parameter(config, "task") or "infer",
            description=_config_parameter(config, "description"),
            labels={"source": "demo"},
        )
    existing = [v for v in await client.list_versions(name) if v.artifact.sha256 == sha256]
    if existing:
        version = existing[0].version
    else:
        version = (await client.upload(name, folder, description="demo model")).version
    # Only where there is no production yet: whoever moved it decides where it points.
    with contextlib.suppress(FailedPreconditionError):
        await client.set_alias(
            name, ALIAS, version, expected_version=0, reason="demo model registered at start"
        )
    if name not in {d.model for d in await client.list_deployments()}:
        await client.set_deployment(name, alias=ALIAS)
    return version


async def register_demo_models(address: str, repository: Path = REPOSITORY) -> list[str]:
    """Registers every demo model through the registry at `address`; returns "name@alias"."""
    async with AsyncRegistryClient(address, actor="tensorgate-launcher") as client:
        for name in DEMO_MODELS:
            await register_demo_model(client, repository / name)
    return [f"{name}@{ALIAS}" for name in DEMO_MODELS]
