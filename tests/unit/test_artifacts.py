"""The local artifact store: blobs stored whole and verified, or not at all."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog

from services.registry.artifacts import LocalArtifactStore
from services.runtime.errors import DataLoss, InvalidArgument, NotFound

SMALL = b"model.py bytes " * 100
# Over the size done inline, so these chunks go through a worker thread.
LARGE = os.urandom(3 * 1024 * 1024 + 17)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def naming(*names: str) -> Callable[[], Awaitable[set[str]]]:
    """What the database would answer: the blobs versions name."""

    async def referenced() -> set[str]:
        return set(names)

    return referenced


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def store_bytes(store: LocalArtifactStore, data: bytes, chunk: int = 1 << 20) -> None:
    async with store.writer(max_bytes=1 << 30) as writer:
        for start in range(0, len(data), chunk):
            await writer.write(data[start : start + chunk])
        await writer.commit(sha(data), len(data), "triton-python")


async def read_all(store: LocalArtifactStore, sha256: str, chunk_size: int) -> bytes:
    return b"".join([chunk async for chunk in store.read_verified(sha256, chunk_size)])


@pytest.mark.parametrize(("data", "chunk"), [(SMALL, 64), (LARGE, 1 << 20), (b"", 1)])
async def test_round_trip(tmp_path: Path, data: bytes, chunk: int) -> None:
    store = LocalArtifactStore(tmp_path)
    async with store.writer(max_bytes=1 << 30) as writer:
        for start in range(0, len(data), chunk):
            await writer.write(data[start : start + chunk])
        artifact = await writer.commit(sha(data).upper(), len(data), "onnx")
    assert (artifact.sha256, artifact.size_bytes, artifact.format) == (sha(data), len(data), "onnx")
    assert files(tmp_path) == [f"sha256/{sha(data)[:2]}/{sha(data)}"]
    assert await read_all(store, sha(data), 1 << 20) == data
    chunks = [c async for c in store.read_verified(sha(data), 1000)]
    assert all(len(c) == 1000 for c in chunks[:-1])
    assert await store.verify(sha(data))


@pytest.mark.parametrize(
    ("declared_sha", "declared_size", "field", "says"),
    [
        (sha(b"other"), len(LARGE), "sha256", f"but the bytes hash to {sha(LARGE)}"),
        (sha(LARGE), len(LARGE) + 1, "size_bytes", f"declared {len(LARGE) + 1} bytes but"),
    ],
)
async def test_a_mismatch_leaves_nothing_behind(
    tmp_path: Path, declared_sha: str, declared_size: int, field: str, says: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(InvalidArgument) as refused:
        async with store.writer(max_bytes=1 << 30) as writer:
            await writer.write(LARGE)
            await writer.commit(declared_sha, declared_size, "onnx")
    assert refused.value.violations[0].field == field
    assert says in refused.value.message
    assert files(tmp_path) == []


async def test_over_the_limit_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(InvalidArgument, match=r"limit of 1000 bytes.*--max-artifact-bytes"):
        async with store.writer(max_bytes=1000) as writer:
            await writer.write(b"x" * 600)
            await writer.write(b"x" * 600)
    assert files(tmp_path) == []


async def test_abort_without_context_manager_removes_the_temp_file(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    writer = store.writer(max_bytes=1 << 30)
    await writer.write(SMALL)
    assert len(files(tmp_path / "tmp")) == 1
    await writer.abort()
    await writer.abort()
    assert files(tmp_path) == []
    with pytest.raises(RuntimeError, match="already committed or aborted"):
        await writer.write(SMALL)


async def test_cancelled_mid_write_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    started = asyncio.Event()

    async def upload() -> None:
        async with store.writer(max_bytes=1 << 30) as writer:
            await writer.write(SMALL)
            started.set()
            while True:  # a client that keeps sending until it goes away
                await writer.write(LARGE)

    task = asyncio.create_task(upload())
    await started.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files(tmp_path) == []


async def test_identical_blobs_are_stored_once(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    await store_bytes(store, LARGE)
    blob = tmp_path / "sha256" / sha(LARGE)[:2] / sha(LARGE)
    inode = blob.stat().st_ino
    await store_bytes(store, LARGE, chunk=4096)
    assert files(tmp_path) == [f"sha256/{sha(LARGE)[:2]}/{sha(LARGE)}"]
    assert blob.stat().st_ino == inode  # the stored one was kept


async def test_an_upload_of_the_same_bytes_heals_a_corrupt_blob(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    await store_bytes(store, SMALL)
    blob = tmp_path / "sha256" / sha(SMALL)[:2] / sha(SMALL)
    blob.write_bytes(b"rot")
    await store_bytes(store, SMALL)
    assert blob.read_bytes() == SMALL
    assert files(tmp_path) == [f"sha256/{sha(SMALL)[:2]}/{sha(SMALL)}"]


async def test_a_flipped_byte_is_data_loss_before_any_byte(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    await store_bytes(store, LARGE)
    blob = tmp_path / "sha256" / sha(LARGE)[:2] / sha(LARGE)
    rotten = bytearray(LARGE)
    rotten[len(LARGE) - 5] ^= 0x01
    blob.write_bytes(bytes(rotten))

    received: list[bytes] = []
    with pytest.raises(DataLoss) as lost:
        async for chunk in store.read_verified(sha(LARGE), 1024):
            received.append(chunk)
    assert received == []
    assert lost.value.message == (
        f"the bytes stored as sha256 {sha(LARGE)} hash to {sha(bytes(rotten))} now"
    )
    assert not await store.verify(sha(LARGE))


async def test_a_missing_blob_is_not_found(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(NotFound, match=sha(b"nothing")):
        await read_all(store, sha(b"nothing"), 1024)
    assert not await store.verify(sha(b"nothing"))


@pytest.mark.parametrize("name", ["../../etc/passwd", "ab" * 31, "g" * 64, ""])
async def test_a_name_that_is_no_sha256_never_reaches_the_file_system(
    tmp_path: Path, name: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(InvalidArgument, match="64 hex characters"):
        await read_all(store, name, 1024)
    with pytest.raises(InvalidArgument, match="64 hex characters"):
        await store.verify(name)


async def test_garbage_collection_keeps_only_referenced_blobs(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    await store_bytes(store, SMALL)
    await store_bytes(store, LARGE)
    await store_bytes(store, b"")
    abandoned = store.writer(max_bytes=1 << 30)
    await abandoned.write(SMALL)  # a crash mid-upload leaves this behind
    (tmp_path / "sha256" / "stray").write_bytes(b"?")
    # An optimization job's scratch folder that a killed registry left behind.
    left = tmp_path / "tmp" / "work-left"
    left.mkdir()
    (left / "model.pt").write_bytes(LARGE)

    removed = await store.collect_garbage(naming(sha(SMALL).upper()))
    assert removed == 5  # the temp file, two blobs, the stray file, the scratch folder
    assert files(tmp_path) == [
        "registry.lock",
        f"sha256/{sha(SMALL)[:2]}/{sha(SMALL)}",
        "sweep.lock",
    ]
    assert sorted(p.name for p in (tmp_path / "sha256").iterdir()) == [sha(SMALL)[:2]]
    assert await store.collect_garbage(naming(sha(SMALL))) == 0
    await abandoned.abort()
    store.close()


def test_a_job_s_scratch_folder_is_in_the_store_s_tmp_and_goes_after_it(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with store.work_dir() as work:
        assert Path(work).parent == tmp_path / "tmp"
        (Path(work) / "weights.pt").write_bytes(SMALL)
    assert list((tmp_path / "tmp").iterdir()) == []
    store.close()


async def test_beside_another_registry_only_old_leftovers_are_swept(tmp_path: Path) -> None:
    # The first registry on the store holds it; a second one starting must not take
    # the first's upload in progress (a temp file, or a blob not yet committed) for a
    # crash's leftovers, only what nobody touched for an hour.
    first = LocalArtifactStore(tmp_path)
    assert await first.collect_garbage(naming()) == 0
    uploading = first.writer(max_bytes=1 << 30)
    await uploading.write(SMALL)
    await store_bytes(first, LARGE)  # renamed into place, its version not committed yet
    await store_bytes(first, b"old")
    long_ago = time.time() - 2 * 3600
    old = sha(b"old")
    os.utime(first.blob_path(old), (long_ago, long_ago))
    # A job's scratch folder in use by the first, and one left long ago.
    working, stale = tmp_path / "tmp" / "work-now", tmp_path / "tmp" / "work-old"
    for folder in (working, stale):
        folder.mkdir()
        (folder / "weights.pt").write_bytes(SMALL)
    os.utime(stale, (long_ago, long_ago))

    second = LocalArtifactStore(tmp_path)
    assert await second.collect_garbage(naming()) == 2
    assert not first.blob_path(old).exists()
    assert not stale.exists()
    assert first.blob_path(sha(LARGE)).exists()
    upload, *scratch = sorted(p.name for p in (tmp_path / "tmp").iterdir())
    assert upload.startswith("upload-") and scratch == ["work-now"]
    await uploading.abort()
    shutil.rmtree(working)

    # Once both let go, the next registry is alone again and sweeps it all.
    first.close()
    second.close()
    third = LocalArtifactStore(tmp_path)
    assert await third.collect_garbage(naming()) == 1
    assert files(tmp_path) == ["registry.lock", "sweep.lock"]
    third.close()


async def test_a_refused_upload_s_blob_goes_only_while_no_other_registry_holds_the_store(
    tmp_path: Path,
) -> None:
    first = LocalArtifactStore(tmp_path)
    await first.collect_garbage(naming())
    await store_bytes(first, SMALL)
    await store_bytes(first, LARGE)
    assert not await first.remove_unused(sha(SMALL), lambda: False)  # in use after all
    assert first.blob_path(sha(SMALL)).exists()
    # Another registry on the store may be uploading the same bytes: the blob stays.
    second = LocalArtifactStore(tmp_path)
    await second.collect_garbage(naming(sha(SMALL), sha(LARGE)))
    assert not await first.remove_unused(sha(SMALL), lambda: True)
    assert first.blob_path(sha(SMALL)).exists()
    second.close()
    assert await first.remove_unused(sha(SMALL), lambda: True)
    assert not first.blob_path(sha(SMALL)).exists() and first.blob_path(sha(LARGE)).exists()
    # Still held (shared) after: a registry starting now is not alone.
    third = LocalArtifactStore(tmp_path)
    old = time.time() - 2 * 3600
    os.utime(first.blob_path(sha(LARGE)), (old, old))
    assert await third.collect_garbage(naming()) == 1  # only the old blob
    first.close()
    third.close()


async def test_registries_starting_together_sweep_one_after_the_other(tmp_path: Path) -> None:
    # While one sweeps all it finds, the other waits: it cannot start uploading (and
    # have its upload swept) before the first is done, nor also think itself alone.
    first, second = LocalArtifactStore(tmp_path), LocalArtifactStore(tmp_path)
    reading, go_on = asyncio.Event(), asyncio.Event()

    async def slow_database() -> set[str]:
        reading.set()
        await go_on.wait()
        return set()

    with structlog.testing.capture_logs() as logs:
        sweeping = asyncio.create_task(first.collect_garbage(slow_database))
        await reading.wait()
        starting = asyncio.create_task(second.collect_garbage(naming()))
        await asyncio.sleep(0.2)
        assert not starting.done()  # waits for the first's sweep
        go_on.set()
        await sweeping
        await starting
    # The first was alone; the second, coming after, was not.
    assert [line["event"] for line in logs] == [
        "another registry uses this artifact store; sweeping only old leftovers"
    ]
    first.close()
    second.close()
