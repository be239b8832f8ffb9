"""The Triton model repository a registry-mode worker writes.

Each registry version is its own Triton model, `<model>__v<version>`, with the
artifact unpacked as its version folder `1/` and a config.pbtxt rendered from the
registered one. Loading a new version therefore never reloads a loaded model in
place (which Triton 2.51's Python backend does not survive reliably), and the old
and the new version can be served side by side while traffic moves. A version
deployed with more than one Triton instance is `<model>__v<version>__x<instances>`,
so a change of instances is loaded beside the running model too, never in its place.

A folder is built beside its final place and renamed into it, so one that exists
is whole. Unpacking refuses any member that is not a relative regular file or
folder (links, absolute paths, `..`), and extracts with tarfile's "data" filter.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

from tensorgate.model_folder import CONFIG_FILE, ModelFolderError, unpack
from tensorgate.registry.v1 import registry_pb2

from services.runtime.errors import DataLoss
from services.runtime.triton_config import render_config
from services.worker.artifact_cache import ArtifactRejected, version_label
from services.worker.catalog import MODEL_PARAMETER, VERSION_PARAMETER

# Every registry version is version 1 of its own Triton model.
TRITON_VERSION = 1
_OURS = re.compile(r"(?P<model>.+?)__v(?P<version>[0-9]+)(?:__x(?P<instances>[0-9]+))?")
# What `unpack` leaves behind when the worker dies while building a folder.
_STAGING = re.compile(r"\..+__v[0-9]+(?:__x[0-9]+)?\..+")


def triton_name(model: str, version: int, instances: int = 1) -> str:
    """The Triton model that serves registry version `model:version` with `instances`."""
    name = f"{model}__v{version}"
    return name if instances == 1 else f"{name}__x{instances}"


def parse_triton_name(name: str) -> tuple[str, int, int] | None:
    """(model, version, instances) of a Triton model this worker names, else None."""
    match = _OURS.fullmatch(name)
    if match is None:
        return None
    return match["model"], int(match["version"]), int(match["instances"] or 1)


class ModelRepository:
    """Model folders under `root`, the directory Triton serves."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, version: registry_pb2.ModelVersion, artifact: Path, *, instances: int) -> str:
        """Writes the model folder of a verified artifact; returns its Triton name.

        ArtifactRejected if the tar holds anything unsafe (nothing is written then).
        A folder already there (from an earlier run) is replaced.
        """
        name = triton_name(version.model, version.version, instances)
        parameters = {MODEL_PARAMETER: version.model, VERSION_PARAMETER: str(version.version)}
        try:
            config = render_config(
                version.config, triton_name=name, instances=instances, parameters=parameters
            )
        except DataLoss as exc:
            raise ArtifactRejected(f"{version_label(version)}: {exc}") from exc
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove(name)
        try:
            unpack(artifact, config, self.root / name, TRITON_VERSION)
        except (ModelFolderError, tarfile.TarError) as exc:
            raise ArtifactRejected(f"{version_label(version)}: unsafe artifact: {exc}") from exc
        return name

    def has(self, name: str) -> bool:
        return (self.root / name / CONFIG_FILE).is_file()

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def names(self) -> list[str]:
        """The Triton models this worker wrote (it leaves any other folder alone)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if parse_triton_name(p.name))

    def sweep(self, keep: set[str]) -> list[str]:
        """Removes this worker's folders not in `keep` and half-built ones; their names."""
        removed = [name for name in self.names() if name not in keep]
        for name in removed:
            self.remove(name)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if _STAGING.fullmatch(path.name) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        return removed
