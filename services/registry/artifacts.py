"""The registry's artifact store: content-addressed blobs, written whole or not at all.

`ArtifactStore` is the interface the registry uses, so that an S3-compatible store can
stand beside `LocalArtifactStore`, which keeps blobs as files under a root folder:

    root/tmp/upload-*.part        uploads in progress (removed on abort and at start)
    root/tmp/work-*/              scratch folders of optimization jobs (likewise)
    root/sha256/ab/ab12...ef      committed blobs, named by the sha256 of their bytes
    root/registry.lock            held (flock, shared) by every registry using the store
    root/sweep.lock               held (flock) while a registry starts or removes a blob

A blob appears under sha256/ only by an atomic rename after its size, hash and the
caller's check were passed and its bytes fsynced, so a reader never sees a partial or
unverified blob.
Reads verify the whole blob again before the first byte goes out: disks rot, and a
worker must never load bytes that are not the ones registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

import structlog
from tensorgate.registry.v1 import registry_pb2

from services.runtime.errors import DataLoss, InvalidArgument, NotFound

log = structlog.get_logger("tensorgate.registry")

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Measured on this project's dev box (2 shared cores, SHA-NI) writing and hashing into a
# temp file: a 1 MiB chunk done inline holds the event loop for ~1.6-4.7 ms (p99), which
# every other call on the registry (Watch streams, lookups) waits out; through
# asyncio.to_thread it costs ~25 % more CPU but the loop stalls ~0.02 ms (hashlib and file
# writes release the GIL). At 64 KiB the thread hop costs 3-4x the work itself and inline
# stalls only ~0.1-0.3 ms, so chunks up to this size are done inline.
_INLINE_MAX_BYTES = 256 * 1024
_READ_BLOCK = 1024 * 1024
# With another registry on the same store, a temp file or an unreferenced blob may be
# its upload in progress (between the blob's rename and the version's commit), so only
# what nobody touched for this long is taken for a crash's leftovers.
_ORPHAN_AGE_S = 3600.0


class ArtifactWriter(Protocol):
    """One upload in progress. `async with` aborts it unless it was committed."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(
        self,
        expected_sha256: str,
        expected_size: int,
        format: str,
        *,
        check: Callable[[Path], None] | None = None,
    ) -> registry_pb2.Artifact:
        """Stores the blob if its size and sha256 are the expected ones and `check`
        (run on the received file, in a thread) raises nothing; else nothing is stored."""
        ...

    async def abort(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ArtifactStore(Protocol):
    """Where artifacts live, addressed by the hex sha256 of their bytes."""

    def writer(self, max_bytes: int) -> ArtifactWriter: ...

    def read_verified(self, sha256: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        """The blob's bytes in chunks, after its whole hash was checked.

        NotFound if there is no such blob, DataLoss if its bytes hash to something else.
        A generator, so that a reader that stops early can close it (aclose) at once.
        """
        ...

    async def verify(self, sha256: str) -> bool: ...

    async def collect_garbage(self, referenced: Callable[[], Awaitable[set[str]]]) -> int:
        """Removes unfinished uploads and blobs `referenced()` does not name; returns how
        many."""
        ...

    async def remove_unused(self, sha256: str, still_unused: Callable[[], bool]) -> bool:
        """Deletes a blob no version references (an upload refused after its bytes
        landed) if no other registry uses the store and `still_unused()`, asked just
        before, says so; True if it went. (Beside another registry it stays for the
        start-up sweep: that registry may be uploading the same bytes.)"""
        ...

    def close(self) -> None:
        """Lets go of what this registry holds on the store (after the last call)."""
        ...


def check_sha256(sha256: str) -> str:
    """`sha256` as the store names blobs (64 lowercase hex), or InvalidArgument("sha256")."""
    normalized = sha256.lower()
    if not _SHA256.fullmatch(normalized):
        raise InvalidArgument("sha256", "must be 64 hex characters (the sha256 of the artifact)")
    return normalized


class LocalArtifactStore:
    """Blobs as files under `root` (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._blobs = root / "sha256"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._hold: IO[bytes] | None = None

    def work_dir(self) -> tempfile.TemporaryDirectory[str]:
        """A scratch folder to build an artifact in (an optimization job's), removed when
        the block ends. Inside tmp/: one a killed registry left is swept at the next start
        like an abandoned upload, and its files are on the blobs' file system."""
        return tempfile.TemporaryDirectory(prefix="work-", dir=self._tmp)

    def blob_path(self, sha256: str) -> Path:
        name = check_sha256(sha256)
        return self._blobs / name[:2] / name

    def writer(self, max_bytes: int) -> LocalArtifactWriter:
        return LocalArtifactWriter(self, max_bytes)

    async def read_verified(self, sha256: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        path = self.blob_path(sha256)
        try:
            blob = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFound(f"no artifact with sha256 {sha256} in the store") from None
        # One open file for the check and the stream: a blob replaced or collected
        # meanwhile cannot slip unverified bytes in between.
        try:
            actual = await asyncio.to_thread(_hash_file, blob)
            if actual != path.name:
                raise DataLoss(f"the bytes stored as sha256 {path.name} hash to {actual} now")
            blob.seek(0)
            inline = chunk_size <= _INLINE_MAX_BYTES
            while chunk := (blob.read(chunk_size) if inline else await _read(blob, chunk_size)):
                yield chunk
        finally:
            blob.close()

    async def verify(self, sha256: str) -> bool:
        path = self.blob_path(sha256)
        return await asyncio.to_thread(_blob_is_intact, path)

    async def remove_unused(self, sha256: str, still_unused: Callable[[], bool]) -> bool:
        if not self._blobs.is_dir():
            return False
        async with self._sole_holder() as alone:
            # Checked here, on the event loop, with nothing awaited before the unlink: an
            # upload that began meanwhile may be about to use the blob.
            if not (alone and still_unused()):
                return False
            self.blob_path(sha256).unlink(missing_ok=True)
            return True

    async def collect_garbage(self, referenced: Callable[[], Awaitable[set[str]]]) -> int:
        """Call once at start, before serving; it also takes this registry's hold on the
        store, kept until `close`. Alone on the store, every temp file and unreferenced
        blob goes; beside another registry, only those untouched for an hour."""
        async with self._sole_holder() as alone:
            if not alone:
                log.info("another registry uses this artifact store; sweeping only old leftovers")
            # Read under the lock: no other registry can commit a version meanwhile.
            keep = {name.lower() for name in await referenced()}
            return await asyncio.to_thread(self._sweep, keep, alone)

    def close(self) -> None:
        """Lets go of this registry's hold on the store."""
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    @contextlib.asynccontextmanager
    async def _sole_holder(self) -> AsyncIterator[bool]:
        """Says whether this registry is the only one holding the store; while it is, no
        other can start, and the hold is exclusive until the block ends.

        Every registry holds registry.lock shared while it runs. Asking whether it is
        alone means trying to make that hold exclusive, which flock does not do
        atomically (it lets go first), so every such try, and every start, happens
        under sweep.lock: no other registry can take the store in between.
        """
        sweep = await asyncio.to_thread(_locked, self.root / "sweep.lock")
        try:
            if self._hold is None:
                self._hold = (self.root / "registry.lock").open("a+b")
            try:
                fcntl.flock(self._hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            try:
                yield alone
            finally:
                # Shared again (waiting for nobody: only shared holders can be there).
                await asyncio.to_thread(fcntl.flock, self._hold, fcntl.LOCK_SH)
        finally:
            sweep.close()

    def _sweep(self, keep: set[str], alone: bool) -> int:
        cutoff = time.time() - _ORPHAN_AGE_S if not alone else None
        removed = 0
        for leftover in self._tmp.iterdir():
            removed += _remove_if_older(leftover, cutoff)
        for shard in self._blobs.iterdir():
            if not shard.is_dir():
                removed += _remove_if_older(shard, cutoff)
                continue
            for blob in shard.iterdir():
                if blob.name not in keep:
                    removed += _remove_if_older(blob, cutoff)
            # Beside another registry an empty shard stays: it may be installing into it.
            if alone and not any(shard.iterdir()):
                shard.rmdir()
        return removed

    def _install(self, temp: Path, sha256: str) -> None:
        """Moves a checked, fsynced temp file to its blob path (blocking)."""
        target = self.blob_path(sha256)
        shard_is_new = not target.parent.exists()
        target.parent.mkdir(exist_ok=True)
        if target.exists() and _blob_is_intact(target):
            # Same name, same bytes: keep the stored one, touched, so that another
            # registry's sweep does not take it for an old leftover before our commit.
            temp.unlink()
            os.utime(target)
            return
        if target.exists():
            # A re-upload of the same bytes heals a blob that went bad in the store.
            log.warning("replacing a corrupt artifact with an upload of its bytes", sha256=sha256)
        os.replace(temp, target)
        _fsync_dir(target.parent)
        if shard_is_new:
            _fsync_dir(self._blobs)


class LocalArtifactWriter:
    """An upload into a LocalArtifactStore: a temp file, its running sha256 and size."""

    def __init__(self, store: LocalArtifactStore, max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._size = 0
        self._path: Path | None = None
        self._file: IO[bytes] | None = None
        self._done = False
        # The step running in a thread, if any: abort waits for it before it closes the
        # file, since a cancelled await leaves the thread running.
        self._step: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.abort()

    async def write(self, chunk: bytes) -> None:
        self._check_open()
        if self._size + len(chunk) > self._max_bytes:
            raise InvalidArgument(
                "size_bytes",
                f"the artifact is larger than the registry's limit of {self._max_bytes} bytes "
                "(its --max-artifact-bytes setting)",
            )
        self._size += len(chunk)
        await self._in_step(self._append, chunk, inline=len(chunk) <= _INLINE_MAX_BYTES)

    async def commit(
        self,
        expected_sha256: str,
        expected_size: int,
        format: str,
        *,
        check: Callable[[Path], None] | None = None,
    ) -> registry_pb2.Artifact:
        """Checks size, hash and `check`, then stores the blob; the writer is finished
        after. Refused bytes never reach the store."""
        self._check_open()
        expected = check_sha256(expected_sha256)
        if self._size != expected_size:
            raise InvalidArgument(
                "size_bytes", f"declared {expected_size} bytes but {self._size} arrived"
            )
        computed = self._hash.hexdigest()
        if computed != expected:
            raise InvalidArgument("sha256", f"declared {expected} but the bytes hash to {computed}")
        await self._in_step(self._install, expected, check, inline=False)
        self._done = True
        return registry_pb2.Artifact(sha256=expected, size_bytes=self._size, format=format)

    async def abort(self) -> None:
        """Removes the temp file; a no-op once committed or aborted."""
        if self._done:
            return
        self._done = True
        # Unlinked here rather than in a thread: a cheap metadata call, and done before
        # any await, so even a cleanup cancelled again leaves no file behind.
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        if self._step is not None and not self._step.done():
            await asyncio.wait([self._step])
        if self._file is not None:
            self._file.close()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this artifact writer was already committed or aborted")
        if self._step is not None and not self._step.done():
            raise RuntimeError("an earlier write of this artifact writer is still running")

    async def _in_step(self, function: Callable[..., None], *args: object, inline: bool) -> None:
        if inline:
            function(*args)
            return
        self._step = asyncio.ensure_future(asyncio.to_thread(function, *args))
        await asyncio.shield(self._step)

    def _opened(self) -> IO[bytes]:
        if self._file is None:
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self._store._tmp)
            self._path = Path(name)
            self._file = os.fdopen(fd, "wb")
        return self._file

    def _append(self, chunk: bytes) -> None:
        self._opened().write(chunk)
        self._hash.update(chunk)

    def _install(self, sha256: str, check: Callable[[Path], None] | None) -> None:
        blob = self._opened()
        blob.flush()
        os.fsync(blob.fileno())
        blob.close()
        assert self._path is not None
        if check is not None:
            check(self._path)
        self._store._install(self._path, sha256)


async def _read(blob: IO[bytes], size: int) -> bytes:
    return await asyncio.to_thread(blob.read, size)


def _hash_file(blob: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while block := blob.read(_READ_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def _blob_is_intact(path: Path) -> bool:
    try:
        with path.open("rb") as blob:
            return _hash_file(blob) == path.name
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked(path: Path) -> IO[bytes]:
    """`path` opened and locked exclusively, waiting for it (blocking); close to unlock."""
    handle = path.open("a+b")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _remove_if_older(path: Path, cutoff: float | None) -> int:
    """Removes `path` (a file, or a job's scratch folder) if it was last written before
    `cutoff` (None: in any case)."""
    try:
        if cutoff is not None and path.stat().st_mtime >= cutoff:
            return 0
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return 0
    return 1
