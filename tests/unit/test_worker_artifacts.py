"""Artifacts on their way into the Triton model repository: verified while they arrive,
unpacked only when safe, written as `<model>__v<version>` with the registry's config."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format
from tensorgate.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.worker.artifact_cache import ArtifactCache, ArtifactRejected
from services.worker.model_repository import ModelRepository, parse_triton_name, triton_name

CONFIG = """
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
parameters { key: "task" value: { string_value: "infer" } }
"""


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tar_bytes(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x = 1\n") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def good_tar() -> bytes:
    def add(tar: tarfile.TarFile) -> None:
        add_file(tar, "model.py", b"# the model\n")
        info = tarfile.TarInfo("weights")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        add_file(tar, "weights/w.bin", b"\x00\x01\x02")

    return tar_bytes(add)


def version_of(data: bytes, model: str = "m", version: int = 3) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model=model,
        version=version,
        artifact=registry_pb2.Artifact(
            sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), format="triton-python"
        ),
        config=registry_pb2.TritonConfig(backend="python", pbtxt=CONFIG),
    )


async def download(
    header: registry_pb2.ModelVersion, data: bytes, chunk: int = 7, error: Exception | None = None
) -> AsyncIterator[registry_pb2.DownloadVersionResponse]:
    yield registry_pb2.DownloadVersionResponse(version=header)
    for start in range(0, len(data), chunk):
        yield registry_pb2.DownloadVersionResponse(chunk=data[start : start + chunk])
    if error is not None:
        raise error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


async def test_verified_bytes_land_in_the_cache_under_their_sha256(tmp_path: Path) -> None:
    data = good_tar()
    version = version_of(data)
    cache = ArtifactCache(tmp_path / "cache")
    assert await cache.cached(version) is None
    path = await cache.store(version, download(version, data))
    assert path == tmp_path / "cache" / f"{version.artifact.sha256}.tar"
    assert path.read_bytes() == data
    assert await cache.cached(version) == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]


async def test_big_chunks_are_verified_the_same_way(tmp_path: Path) -> None:
    data = good_tar() + bytes(700 * 1024)  # trailing zero blocks: still a valid tar
    version = version_of(data)
    path = await ArtifactCache(tmp_path).store(version, download(version, data, chunk=300 * 1024))
    assert path.read_bytes() == data
    tampered = bytearray(data)
    tampered[-1] = 1
    with pytest.raises(ArtifactRejected, match="received"):
        await ArtifactCache(tmp_path / "b").store(
            version, download(version, bytes(tampered), chunk=300 * 1024)
        )


async def test_bytes_that_differ_are_rejected_naming_the_version_and_both_hashes(
    tmp_path: Path,
) -> None:
    data = good_tar()
    version = version_of(data)
    tampered = bytearray(data)
    tampered[600] ^= 0x01
    cache = ArtifactCache(tmp_path)
    with pytest.raises(ArtifactRejected) as rejected:
        await cache.store(version, download(version, bytes(tampered)))
    message = str(rejected.value)
    assert "m:3" in message
    assert version.artifact.sha256 in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert files_in(tmp_path) == []  # nothing kept, not even the partial file


async def test_too_many_bytes_or_a_different_header_are_rejected(tmp_path: Path) -> None:
    data = good_tar()
    version = version_of(data)
    cache = ArtifactCache(tmp_path)
    with pytest.raises(ArtifactRejected, match="more than"):
        await cache.store(version, download(version, data + b"extra"))
    other = version_of(data + b"!")
    with pytest.raises(ArtifactRejected, match="the download describes"):
        await cache.store(version, download(other, data))
    assert files_in(tmp_path) == []


async def test_data_loss_from_the_registry_is_a_rejection_other_errors_are_not(
    tmp_path: Path,
) -> None:
    data = good_tar()
    version = version_of(data)
    cache = ArtifactCache(tmp_path)
    data_loss = rpc_error(grpc.StatusCode.DATA_LOSS, "stored bytes differ")
    with pytest.raises(ArtifactRejected, match="refused its artifact"):
        await cache.store(version, download(version, data[:10], error=data_loss))
    unavailable = rpc_error(grpc.StatusCode.UNAVAILABLE, "down")
    with pytest.raises(grpc.aio.AioRpcError):
        await cache.store(version, download(version, data[:10], error=unavailable))
    assert files_in(tmp_path) == []


async def test_a_cached_file_changed_on_disk_is_not_used(tmp_path: Path) -> None:
    data = good_tar()
    version = version_of(data)
    cache = ArtifactCache(tmp_path)
    path = await cache.store(version, download(version, data))
    path.write_bytes(data[:-1] + b"\x01")
    assert await cache.cached(version) is None
    assert not path.exists()


def test_a_sha256_that_is_not_hex_never_becomes_a_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactRejected):
        ArtifactCache(tmp_path).path_of("../../etc/passwd")


def test_triton_names_round_trip() -> None:
    assert triton_name("digits", 3) == "digits__v3"
    assert triton_name("digits", 3, instances=2) == "digits__v3__x2"
    assert parse_triton_name("my.model-x__v12") == ("my.model-x", 12, 1)
    assert parse_triton_name("a__v2__v7") == ("a__v2", 7, 1)
    assert parse_triton_name("digits__v3__x2") == ("digits", 3, 2)
    assert parse_triton_name("digits") is None
    assert parse_triton_name("digits__vx") is None


async def test_a_model_folder_has_the_files_and_the_rendered_config(tmp_path: Path) -> None:
    data = good_tar()
    version = version_of(data)
    artifact = tmp_path / "a.tar"
    artifact.write_bytes(data)
    repository = ModelRepository(tmp_path / "repo")
    name = repository.write(version, artifact, instances=2)
    folder = tmp_path / "repo" / "m__v3__x2"
    assert name == "m__v3__x2" and repository.has(name)
    assert (folder / "1" / "model.py").read_bytes() == b"# the model\n"
    assert (folder / "1" / "weights" / "w.bin").read_bytes() == b"\x00\x01\x02"
    config = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "m__v3__x2"
    assert [g.count for g in config.instance_group] == [2]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"task": "infer", "tensorgate_model": "m", "tensorgate_version": "3"}
    assert repository.names() == ["m__v3__x2"]
    # Written again (a restart), it replaces the folder rather than failing.
    assert repository.write(version, artifact, instances=2) == name
    assert repository.write(version, artifact, instances=1) == "m__v3"
    assert repository.sweep(keep={"m__v3"}) == ["m__v3__x2"] and not folder.exists()


def _symlink(tar: tarfile.TarFile) -> None:
    add_file(tar, "model.py")
    info = tarfile.TarInfo("weights.bin")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar: tarfile.TarFile) -> None:
    add_file(tar, "model.py")
    info = tarfile.TarInfo("copy.py")
    info.type, info.linkname = tarfile.LNKTYPE, "model.py"
    tar.addfile(info)


def _device(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("null")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize(
    "add",
    [
        lambda tar: add_file(tar, "../escape.py"),
        lambda tar: add_file(tar, "weights/../../escape.py"),
        lambda tar: add_file(tar, "/etc/cron.d/evil"),
        _symlink,
        _hardlink,
        _device,
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
async def test_an_unsafe_artifact_writes_nothing(
    add: Callable[[tarfile.TarFile], None], tmp_path: Path
) -> None:
    data = tar_bytes(add)
    artifact = tmp_path / "a.tar"
    artifact.write_bytes(data)
    repository = ModelRepository(tmp_path / "deep" / "repo")
    with pytest.raises(ArtifactRejected, match="m:3: unsafe artifact"):
        repository.write(version_of(data), artifact, instances=1)
    assert list((tmp_path / "deep" / "repo").iterdir()) == []
    assert not (tmp_path / "escape.py").exists() and not (tmp_path / "deep" / "escape.py").exists()


def test_a_config_that_no_longer_parses_is_a_rejection(tmp_path: Path) -> None:
    data = good_tar()
    version = version_of(data)
    version.config.pbtxt = "input [ {"
    artifact = tmp_path / "a.tar"
    artifact.write_bytes(data)
    with pytest.raises(ArtifactRejected, match="m:3"):
        ModelRepository(tmp_path / "repo").write(version, artifact, instances=1)
