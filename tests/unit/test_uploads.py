"""UploadVersion and DownloadVersion streams over the local store, without a server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from tensorgate.registry.v1 import registry_pb2

from services.registry.artifacts import LocalArtifactStore
from services.registry.uploads import artifact_chunks, receive_artifact
from services.runtime.errors import DataLoss, DeadlineExceeded, InvalidArgument

Request = registry_pb2.UploadVersionRequest


def _tar_of(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# An artifact is a tar of the version folder; this one spans three 1 MiB chunks.
DATA = _tar_of(os.urandom(2 * 1024 * 1024 + 3))
SHA = hashlib.sha256(DATA).hexdigest()
LIMIT = 8 * 1024 * 1024


def header(**fields: object) -> Request.Header:
    values: dict[str, object] = {
        "model": "digits",
        "sha256": SHA,
        "size_bytes": len(DATA),
        "format": "triton-python",
    }
    values.update(fields)
    return Request.Header(**values)  # type: ignore[arg-type]


def chunks(data: bytes, size: int = 1 << 20) -> list[Request]:
    return [Request(chunk=data[i : i + size]) for i in range(0, len(data), size)]


async def stream(parts: Iterable[Request]) -> AsyncIterator[Request]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_upload_then_download_round_trip(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    artifact = await receive_artifact(header(), stream(chunks(DATA)), store, max_bytes=LIMIT)
    assert artifact == registry_pb2.Artifact(
        sha256=SHA, size_bytes=len(DATA), format="triton-python"
    )
    version = registry_pb2.ModelVersion(model="digits", version=2, artifact=artifact)
    parts = [p async for p in artifact_chunks(version, store, chunk_size=1 << 20)]
    assert parts[0].WhichOneof("part") == "version" and parts[0].version == version
    assert all(p.WhichOneof("part") == "chunk" for p in parts[1:])
    assert b"".join(p.chunk for p in parts[1:]) == DATA
    assert len(parts) == 1 + 3


@pytest.mark.parametrize("format", ["triton-python", "onnx", "torchscript"])
async def test_bytes_that_are_no_tar_are_refused_before_they_land(
    tmp_path: Path, format: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    for data in (b"", os.urandom(4096)):
        refused = header(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        refused.format = format
        with pytest.raises(InvalidArgument, match="not a usable tar") as caught:
            await receive_artifact(refused, stream(chunks(data)), store, max_bytes=LIMIT)
        assert caught.value.violations[0].field == "chunk" and "upload-" not in str(caught.value)
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"sha256": "abc"}, "sha256", "64 hex characters"),
        ({"sha256": "z" * 64}, "sha256", "64 hex characters"),
        ({"size_bytes": -1}, "size_bytes", "must be >= 0"),
        ({"size_bytes": LIMIT + 1}, "size_bytes", f"limit of {LIMIT} (its --max-artifact-bytes"),
        ({"format": "pickle"}, "format", "'pickle' is not one of triton-python, torchscript, onnx"),
    ],
)
async def test_a_bad_header_is_refused_before_anything_is_stored(
    tmp_path: Path, fields: dict[str, object], field: str, says: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(InvalidArgument) as refused:
        await receive_artifact(header(**fields), stream(chunks(DATA)), store, max_bytes=LIMIT)
    assert refused.value.violations[0].field == field
    assert says in refused.value.message
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("parts", "field", "says"),
    [
        ([], "chunk", f"the stream ended after 0 of {len(DATA)} bytes"),
        (chunks(DATA)[:2], "chunk", f"the stream ended after {2 << 20} of {len(DATA)} bytes"),
        (
            [*chunks(DATA), Request(chunk=b"!")],
            "size_bytes",
            f"declared {len(DATA)} bytes but more arrived ({len(DATA) + 1} so far)",
        ),
        ([chunks(DATA)[0], Request(header=header())], "header", "sent twice"),
        ([chunks(DATA)[0], Request()], "chunk", "carries neither header nor chunk"),
        (
            chunks(DATA[:-1] + b"?"),
            "sha256",
            f"declared {SHA} but the bytes hash to {hashlib.sha256(DATA[:-1] + b'?').hexdigest()}",
        ),
    ],
)
async def test_a_bad_stream_leaves_nothing_behind(
    tmp_path: Path, parts: list[Request], field: str, says: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(InvalidArgument) as refused:
        await receive_artifact(header(), stream(parts), store, max_bytes=LIMIT)
    assert refused.value.violations[0].field == field
    assert says in refused.value.message
    assert files(tmp_path) == []


async def test_a_client_that_goes_away_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    sent = asyncio.Event()

    async def stalled() -> AsyncIterator[Request]:
        for part in chunks(DATA)[:2]:
            yield part
        sent.set()
        await asyncio.Event().wait()  # the client stops sending, then hangs up
        yield Request()

    upload = asyncio.create_task(receive_artifact(header(), stalled(), store, max_bytes=LIMIT))
    await sent.wait()
    assert len(files(tmp_path / "tmp")) == 1
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert files(tmp_path) == []


async def test_a_failing_request_stream_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    async def broken() -> AsyncIterator[Request]:
        yield chunks(DATA)[0]
        raise ConnectionResetError("the transport failed")

    with pytest.raises(ConnectionResetError):
        await receive_artifact(header(), broken(), store, max_bytes=LIMIT)
    assert files(tmp_path) == []


async def test_a_corrupt_artifact_sends_no_header_and_names_the_version(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    artifact = await receive_artifact(header(), stream(chunks(DATA)), store, max_bytes=LIMIT)
    blob = tmp_path / "sha256" / SHA[:2] / SHA
    blob.write_bytes(DATA[:-1] + b"?")
    version = registry_pb2.ModelVersion(model="digits", version=2, artifact=artifact)

    sent: list[registry_pb2.DownloadVersionResponse] = []
    with pytest.raises(DataLoss) as lost:
        async for part in artifact_chunks(version, store, chunk_size=1 << 20):
            sent.append(part)
    assert sent == []
    assert lost.value.message.startswith(
        f"artifact of digits:2 is corrupt in the store: the bytes stored as sha256 {SHA} hash to "
    )


async def test_a_missing_artifact_is_data_loss_naming_the_version(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    version = registry_pb2.ModelVersion(
        model="digits", version=4, artifact=registry_pb2.Artifact(sha256=SHA)
    )
    with pytest.raises(DataLoss, match=f"artifact of digits:4 \\(sha256 {SHA}\\) is missing"):
        async for _ in artifact_chunks(version, store, chunk_size=1024):
            pass


async def test_an_upload_that_goes_quiet_is_abandoned_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    async def quiet() -> AsyncIterator[Request]:
        yield chunks(DATA)[0]
        await asyncio.Event().wait()  # connected, but never sends again
        yield Request()

    with pytest.raises(DeadlineExceeded, match=r"sent nothing for 0\.2s after byte"):
        await receive_artifact(header(), quiet(), store, max_bytes=LIMIT, idle_seconds=0.2)
    assert files(tmp_path) == []
