"""An artifact's way into the store (UploadVersion) and out of it (DownloadVersion).

The servicer reads an upload's first message (the header) itself, checks the model and
the config, and hands the rest of the stream here; what comes back is an artifact that
is stored whole and verified, or an error with nothing left behind. Downloads send
nothing, not even the header, until the stored bytes proved to be the registered ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tensorgate.model_folder import ModelFolderError, check_tar
from tensorgate.registry.v1 import registry_pb2

from services.registry.artifacts import ArtifactStore, check_sha256
from services.runtime.errors import DataLoss, DeadlineExceeded, InvalidArgument, NotFound, shown

ARTIFACT_FORMATS = ("triton-python", "torchscript", "onnx")


def check_header(header: registry_pb2.UploadVersionRequest.Header, *, max_bytes: int) -> None:
    """InvalidArgument naming the field, for an artifact header no upload could satisfy."""
    check_sha256(header.sha256)
    if header.size_bytes < 0:
        raise InvalidArgument("size_bytes", f"must be >= 0, not {header.size_bytes}")
    if header.size_bytes > max_bytes:
        raise InvalidArgument(
            "size_bytes",
            f"{header.size_bytes} bytes is more than the registry's limit of {max_bytes} "
            "(its --max-artifact-bytes setting)",
        )
    if header.format not in ARTIFACT_FORMATS:
        raise InvalidArgument(
            "format", f"{shown(header.format)} is not one of {', '.join(ARTIFACT_FORMATS)}"
        )


async def receive_artifact(
    header: registry_pb2.UploadVersionRequest.Header,
    parts: AsyncIterator[registry_pb2.UploadVersionRequest],
    store: ArtifactStore,
    *,
    max_bytes: int,
    idle_seconds: float = 30.0,
) -> registry_pb2.Artifact:
    """Stores the chunks that follow `header` and returns the verified artifact.

    On any failure, the caller going away (CancelledError) or going quiet for
    `idle_seconds` included, the partial upload is removed before the error propagates.
    """
    check_header(header, max_bytes=max_bytes)
    declared = header.size_bytes
    received = 0
    async with store.writer(max_bytes) as writer:
        while (part := await _next_part(parts, idle_seconds, received)) is not None:
            kind = part.WhichOneof("part")
            if kind == "header":
                raise InvalidArgument(
                    "header", "sent twice: only the first message of an upload carries it"
                )
            if kind is None:
                raise InvalidArgument(
                    "chunk", f"a message after byte {received} carries neither header nor chunk"
                )
            received += len(part.chunk)
            if received > declared:
                # Refused at once: the rest of an oversized stream is not worth storing.
                raise InvalidArgument(
                    "size_bytes", f"declared {declared} bytes but more arrived ({received} so far)"
                )
            await writer.write(part.chunk)
        if received < declared:
            raise InvalidArgument("chunk", f"the stream ended after {received} of {declared} bytes")
        return await writer.commit(header.sha256, declared, header.format, check=_check_archive)


def _check_archive(path: Path) -> None:
    """InvalidArgument unless the artifact is a tar of relative regular files and folders:
    every format is a Triton version folder that workers unpack the same way."""
    try:
        check_tar(path)
    except ModelFolderError as exc:
        # The message names a temp file inside the store: the caller needs only what.
        reason = str(exc).split(": ", 1)[-1]
        raise InvalidArgument("chunk", f"the artifact is not a usable tar: {reason}") from None


async def _next_part(
    parts: AsyncIterator[registry_pb2.UploadVersionRequest], idle_seconds: float, received: int
) -> registry_pb2.UploadVersionRequest | None:
    """The next message of an upload (None at its end); DeadlineExceeded after
    `idle_seconds` without one: a stalled client must not hold an upload slot."""
    try:
        async with asyncio.timeout(idle_seconds):
            return await anext(parts, None)
    except TimeoutError:
        raise DeadlineExceeded(
            f"the upload sent nothing for {idle_seconds:g}s after byte {received}: "
            "abandoned, nothing kept; send it again"
        ) from None


async def artifact_chunks(
    version: registry_pb2.ModelVersion, store: ArtifactStore, *, chunk_size: int
) -> AsyncIterator[registry_pb2.DownloadVersionResponse]:
    """The DownloadVersion stream: the version, then its artifact's bytes.

    The whole artifact is verified before the first message: a caller gets either the
    registered bytes or DATA_LOSS, never a header followed by an error.
    """
    label = f"{version.model}:{version.version}"
    sha256 = version.artifact.sha256
    async with contextlib.aclosing(store.read_verified(sha256, chunk_size)) as chunks:
        try:
            # The first step of read_verified is the whole check.
            first = await anext(chunks, None)
        except NotFound:
            # The version exists, so its missing bytes are data lost, not a bad request.
            raise DataLoss(
                f"artifact of {label} (sha256 {sha256}) is missing from the store"
            ) from None
        except DataLoss as exc:
            raise DataLoss(f"artifact of {label} is corrupt in the store: {exc.message}") from exc
        yield registry_pb2.DownloadVersionResponse(version=version)
        if first is None:
            return
        yield registry_pb2.DownloadVersionResponse(chunk=first)
        async for chunk in chunks:
            yield registry_pb2.DownloadVersionResponse(chunk=chunk)
