"""Usage batches the auth service has not taken yet, kept on disk so that a gateway that
stops (or dies) while the auth service is away loses no record of a call it served.

Each gateway writes its own file, `<dir>/<random>.spool`, and holds an exclusive flock
on it while it runs. A file nobody holds belongs to a gateway that has stopped: the next
gateway to start over the same directory adopts it (copies its batches into its own
file, then deletes it) and sends them before anything else. A batch keeps its id on
disk, and the auth service counts an id once, so a batch sent but not yet crossed off
here (a crash between the two) is counted once when it is sent again; the same holds
for a file two starting gateways both read.

One line per batch: a serialized RecordUsageRequest in base64. A line cut short by a
crash mid-append is skipped (its batch was still in that gateway's memory only).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import structlog
from google.protobuf.message import DecodeError
from tensorgate.auth.v1 import auth_pb2

log = structlog.get_logger("tensorgate.gateway.usage_spool")

_SUFFIX = ".spool"


def _fsync_dir(directory: Path) -> None:
    # A created or deleted file is durable only once its directory entry is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(handle: BinaryIO, path: Path) -> list[auth_pb2.RecordUsageRequest]:
    handle.seek(0)
    batches = []
    for line in handle.read().split(b"\n")[:-1]:  # the last piece is empty or cut short
        try:
            batches.append(auth_pb2.RecordUsageRequest.FromString(base64.b64decode(line)))
        except (binascii.Error, DecodeError):
            log.error("unreadable usage batch in the spool; skipped", file=str(path))
    return batches


class UsageSpool:
    """This gateway's spool file. Blocking file I/O: call it from a worker thread.

    Its methods hold a lock, so a send that was cancelled while its thread still writes
    cannot interleave lines with the one that follows it.
    """

    def __init__(self, directory: Path, handle: BinaryIO) -> None:
        self._directory = directory
        self._handle = handle
        self._path = Path(handle.name)
        self._kept: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path) -> tuple[UsageSpool, list[auth_pb2.RecordUsageRequest]]:
        """This gateway's spool, and the batches left by gateways that stopped (now kept
        in it), oldest file first."""
        directory.mkdir(parents=True, exist_ok=True)
        handle = (directory / f"{uuid.uuid4().hex}{_SUFFIX}").open("w+b")
        fcntl.flock(handle, fcntl.LOCK_EX)
        spool = cls(directory, handle)
        left: list[auth_pb2.RecordUsageRequest] = []
        try:
            others = sorted(
                (p for p in directory.glob(f"*{_SUFFIX}") if p != spool._path),
                key=lambda p: p.stat().st_mtime_ns,
            )
            for path in others:
                left.extend(spool._adopt(path))
        except BaseException:
            spool.close()
            raise
        if left:
            log.info("usage batches left by a stopped gateway will be sent", batches=len(left))
        return spool, left

    def _adopt(self, path: Path) -> list[auth_pb2.RecordUsageRequest]:
        try:
            other = path.open("rb")
        except FileNotFoundError:  # another gateway adopted it first
            return []
        with other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its gateway is running
                return []
            batches = _read(other, path)
            # Kept here before the file goes: a crash in between leaves both copies, and
            # the auth service counts the twice-sent ids once.
            self.keep(batches)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _fsync_dir(self._directory)
        return batches

    @property
    def holds_batches(self) -> bool:
        return bool(self._kept)

    def keep(self, batches: Iterable[auth_pb2.RecordUsageRequest]) -> None:
        """Appends the batches not kept already, durably."""
        with self._lock:
            new = [b for b in batches if b.batch_id not in self._kept]
            if not new:
                return
            self._handle.seek(0, os.SEEK_END)
            lines = (base64.b64encode(b.SerializeToString()) + b"\n" for b in new)
            self._handle.write(b"".join(lines))
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._kept.update(b.batch_id for b in new)

    def clear(self) -> None:
        """Forgets every batch: the auth service has them all."""
        with self._lock:
            if not self._kept:
                return
            self._handle.truncate(0)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._kept.clear()

    def close(self) -> None:
        """Lets the file go; deleted when empty, else left for the next gateway."""
        with self._lock:
            if self._handle.closed:
                return
            if not self._kept:
                # Deleted while still locked, so no starting gateway adopts it meanwhile.
                self._path.unlink(missing_ok=True)
            self._handle.close()
