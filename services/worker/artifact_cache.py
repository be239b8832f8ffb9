"""Model artifacts downloaded from the registry, verified before anything uses them.

A download goes to a temporary file in the cache while its sha256 and size are
computed from the bytes as they arrive; only bytes that match the version's
recorded sha256 and size are renamed to `<cache>/<sha256>.tar`. A cached file is
hashed again before each use, so a file changed on disk is caught as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable
from pathlib import Path
from typing import IO

import grpc
from tensorgate.registry.v1 import registry_pb2

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20
# Hashing and writing a 1 MiB chunk inline holds the event loop for a few ms (the
# registry measured 1.6-4.7 ms here), which every call this worker forwards would wait
# out; bigger chunks go to a thread (hashlib and writes release the GIL), small ones
# stay inline where the thread hop would cost more than the work.
_INLINE_MAX_BYTES = 256 * 1024


class ArtifactRejected(Exception):
    """The bytes are not the version's artifact (or not a safe one): never load them.

    Retrying would fetch the same stored bytes, so the loader does not retry until
    the version wanted changes.
    """


def version_label(version: registry_pb2.ModelVersion) -> str:
    return f"{version.model}:{version.version}"


class ArtifactCache:
    """Verified artifacts under `directory`, named by their sha256."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, sha256: str) -> Path:
        # The name comes from the registry; only a hex digest may become a path.
        if not _SHA256.fullmatch(sha256):
            raise ArtifactRejected(f"{sha256!r} is not a hex sha256")
        return self.directory / f"{sha256}.tar"

    async def cached(self, version: registry_pb2.ModelVersion) -> Path | None:
        """The cached artifact of `version`, if one is there and still matches."""
        path = self.path_of(version.artifact.sha256)
        if not path.is_file():
            return None
        digest, size = await asyncio.to_thread(_file_digest, path)
        if (digest, size) == (version.artifact.sha256, version.artifact.size_bytes):
            return path
        path.unlink(missing_ok=True)
        return None

    async def store(
        self,
        version: registry_pb2.ModelVersion,
        download: AsyncIterable[registry_pb2.DownloadVersionResponse],
    ) -> Path:
        """Receives a DownloadVersion stream into the cache; ArtifactRejected if it differs.

        The header must describe the same artifact the feed did, and the bytes must
        hash to it. DATA_LOSS from the registry (its stored bytes went bad) is a
        rejection too; other RPC errors propagate for the caller to retry.
        """
        expected = version.artifact
        target = self.path_of(expected.sha256)
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".download-", suffix=".tar", dir=self.directory)
        partial = Path(name)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(handle, "wb") as out:
                async for message in download:
                    if message.WhichOneof("part") == "version":
                        _check_header(version, message.version)
                        continue
                    size += len(message.chunk)
                    if size > expected.size_bytes:
                        raise ArtifactRejected(
                            f"{version_label(version)}: the registry sent more than the "
                            f"{expected.size_bytes} bytes its artifact has"
                        )
                    if len(message.chunk) > _INLINE_MAX_BYTES:
                        await asyncio.to_thread(_absorb, digest, out, message.chunk)
                    else:
                        _absorb(digest, out, message.chunk)
            got = digest.hexdigest()
            if (got, size) != (expected.sha256, expected.size_bytes):
                raise ArtifactRejected(
                    f"{version_label(version)}: artifact sha256 {got} ({size} bytes) received, "
                    f"{expected.sha256} ({expected.size_bytes} bytes) registered"
                )
            await asyncio.to_thread(partial.replace, target)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                raise ArtifactRejected(
                    f"{version_label(version)}: the registry refused its artifact: {exc.details()}"
                ) from exc
            raise
        finally:
            # Gone already after the rename; this removes what a failure left.
            await asyncio.to_thread(partial.unlink, missing_ok=True)
        return target

    def discard(self, keep: set[str], *, downloads: bool = False) -> None:
        """Removes cached artifacts whose sha256 is not in `keep`, and with `downloads`
        unfinished downloads too (only when none can be in progress: at start)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.startswith(".download-"):
                if downloads:
                    path.unlink(missing_ok=True)
            elif path.stem not in keep:
                path.unlink(missing_ok=True)


def _check_header(version: registry_pb2.ModelVersion, header: registry_pb2.ModelVersion) -> None:
    if (header.model, header.version) != (version.model, version.version) or (
        header.artifact.sha256,
        header.artifact.size_bytes,
    ) != (version.artifact.sha256, version.artifact.size_bytes):
        raise ArtifactRejected(
            f"{version_label(version)}: the download describes {version_label(header)} with "
            f"sha256 {header.artifact.sha256} ({header.artifact.size_bytes} bytes), the feed "
            f"sha256 {version.artifact.sha256} ({version.artifact.size_bytes} bytes)"
        )


def _absorb(digest: hashlib._Hash, out: IO[bytes], chunk: bytes) -> None:
    digest.update(chunk)
    out.write(chunk)


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as data:
        while block := data.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
