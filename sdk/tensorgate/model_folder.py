"""Triton model folders to registry artifacts and back.

A Triton model folder holds `config.pbtxt` and one numbered version folder (`1/`) with
the files Triton loads (model.py, weights, ...). The registry stores a version as the
config text plus an artifact: an uncompressed tar of the version folder's files.

    with pack("models/repository/digits") as packed:     # or pack("m.tar", config=...)
        packed.sha256, packed.size_bytes, packed.config_pbtxt, packed.path

The tar is deterministic, so the same folder always gives the same sha256: members in
sorted order, mtime 0, owner 0:0 without names, mode 0644 (0755 when executable, and for
folders). Caches (`__pycache__`, `*.pyc`) are left out. Only regular files and folders
go in; a symlink or any other special file is refused rather than followed, since what
it points at would not travel with the artifact. A ready tar is checked the same way
before it is uploaded, and again before a downloaded one is unpacked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

CONFIG_FILE = "config.pbtxt"
TRITON_PYTHON = "triton-python"
_HASH_BLOCK = 1 << 20


class ModelFolderError(ValueError):
    """A folder or tar that cannot become an artifact; the message says what is wrong."""


@dataclass(frozen=True)
class PackedModel:
    """An artifact ready to upload. Use as a context manager: a temporary tar is removed on
    exit (a ready tar the caller gave is left alone)."""

    path: Path
    config_pbtxt: str
    sha256: str
    size_bytes: int
    format: str = TRITON_PYTHON
    temporary: bool = False

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def close(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PackedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pack(
    path: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None
) -> PackedModel:
    """A model folder, a version folder (with `config`) or a ready tar (with `config`)."""
    source = Path(path)
    config_path = Path(config) if config is not None else None
    if source.is_file():
        if config_path is None:
            raise ModelFolderError(f"{source}: a tar file needs its config.pbtxt given separately")
        check_tar(source)
        return PackedModel(
            path=source,
            config_pbtxt=_read_config(config_path),
            sha256=file_sha256(source),
            size_bytes=source.stat().st_size,
        )
    if not source.is_dir():
        raise ModelFolderError(f"{source}: no such folder or file")
    version_dir = _version_folder(source, has_config=config_path is not None)
    config_text = _read_config(config_path or source / CONFIG_FILE)
    return _pack_folder(version_dir, config_text)


def _version_folder(folder: Path, *, has_config: bool) -> Path:
    numbered = sorted(p for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
    if len(numbered) == 1:
        return numbered[0]
    if len(numbered) > 1:
        names = ", ".join(p.name for p in numbered)
        raise ModelFolderError(
            f"{folder}: several version folders ({names}); give the one to upload "
            f"with --config {folder / CONFIG_FILE}"
        )
    if has_config:  # the version folder itself, its config given apart
        return folder
    raise ModelFolderError(f"{folder}: no numbered version folder (such as 1/) inside")


def _read_config(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: cannot read the config: {exc}") from None


def _members(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, archive name) of every file and folder under root, in sorted name order."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name == "__pycache__" or entry.name.endswith(".pyc"):
            continue
        mode = entry.lstat().st_mode
        relative = entry.relative_to(root).as_posix()
        if stat.S_ISLNK(mode):
            raise ModelFolderError(f"{entry}: a symlink; copy the file it points at instead")
        if stat.S_ISDIR(mode):
            yield entry, relative
            yield from ((p, f"{relative}/{name}") for p, name in _members(entry))
        elif stat.S_ISREG(mode):
            yield entry, relative
        else:
            raise ModelFolderError(f"{entry}: not a regular file or folder")


def _tar_info(path: Path, name: str) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
    return info


def _pack_folder(version_dir: Path, config_text: str) -> PackedModel:
    members = list(_members(version_dir))
    if not any(path.is_file() for path, _ in members):
        raise ModelFolderError(f"{version_dir}: no files to pack")
    handle, name = tempfile.mkstemp(prefix="tensorgate-", suffix=".tar")
    os.close(handle)
    target = Path(name)
    try:
        # PAX keeps long names without a length limit, and adds nothing time-dependent.
        with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, arcname in members:
                info = _tar_info(path, arcname)
                if info.isdir():
                    tar.addfile(info)
                else:
                    with path.open("rb") as data:
                        tar.addfile(info, data)
        return PackedModel(
            path=target,
            config_pbtxt=config_text,
            sha256=file_sha256(target),
            size_bytes=target.stat().st_size,
            temporary=True,
        )
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while block := data.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_tar(path: Path) -> None:
    """Refuses a tar that holds anything but relative regular files and folders, each
    path once, none both a file and a folder: what unpacks the same way everywhere."""
    try:
        with tarfile.open(path, "r:") as tar:
            _check_members(path, tar)
    except ModelFolderError:
        raise
    except (tarfile.TarError, ValueError, OSError, RecursionError) as exc:
        # tarfile raises more than TarError for a damaged header (ValueError for a bad
        # sparse map, for one): all of it means the same to the caller.
        raise ModelFolderError(f"{path}: not an uncompressed tar file ({exc})") from None


def _check_members(path: Path, tar: tarfile.TarFile) -> None:
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for member in tar:
        name = PurePosixPath(member.name)
        shown = repr(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise ModelFolderError(f"{path}: member {shown} leaves its folder")
        if not (member.isreg() or member.isdir()):
            raise ModelFolderError(f"{path}: member {shown} is not a regular file or folder")
        if not name.parts:  # "", "." or "./": the version folder itself
            if member.isreg():
                raise ModelFolderError(f"{path}: member {shown} is a file without a name")
            continue
        if name in files or (member.isreg() and name in folders):
            raise ModelFolderError(f"{path}: member {shown} is in the tar more than once")
        clash = next((parent for parent in name.parents if parent in files), None)
        if clash is not None:
            raise ModelFolderError(f"{path}: {str(clash)!r} is both a file and a folder")
        folders.update(name.parents)
        (files if member.isreg() else folders).add(name)


def unpack(artifact: Path, config_pbtxt: str, dest: Path, version: int) -> None:
    """Writes a model folder: dest/config.pbtxt and dest/<version>/ from the artifact.

    Built beside dest and renamed into place, so dest is either whole or absent.
    """
    if dest.exists():
        raise ModelFolderError(f"{dest}: already exists")
    check_tar(artifact)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (staging / CONFIG_FILE).write_text(config_pbtxt, encoding="utf-8")
        with tarfile.open(artifact, "r:") as tar:
            tar.extractall(staging / str(version), filter="data")
        staging.chmod(0o755)  # mkdtemp makes it private to its owner
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
