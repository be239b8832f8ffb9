"""Model folders to artifacts (tensorgate.model_folder): the same files always give the
same bytes, caches stay out, and nothing that could point outside the folder gets in."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from tensorgate.model_folder import ModelFolderError, check_tar, pack, unpack

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "repository" / "digits"
CONFIG = 'name: "m"\nbackend: "python"\n'


def _model_folder(root: Path) -> Path:
    folder = root / "m"
    (folder / "1" / "weights").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "1" / "model.py").write_text("print('hi')\n")
    (folder / "1" / "weights" / "w.bin").write_bytes(bytes(range(256)) * 10)
    run = folder / "1" / "run.sh"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o700)
    return folder


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_the_same_files_give_the_same_artifact(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    with pack(folder) as first:
        # A copy made later: other mtimes, inode order, owner-only permissions.
        copy = tmp_path / "copy"
        shutil.copytree(folder, copy)
        os.utime(copy / "1" / "model.py", (1, 1))
        (copy / "1" / "model.py").chmod(0o600)
        with pack(copy) as second:
            assert second.sha256 == first.sha256
            assert second.read_bytes() == first.read_bytes()
        assert first.config_pbtxt == CONFIG
        assert first.format == "triton-python"
        assert first.size_bytes == first.path.stat().st_size
        assert first.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()


def test_members_are_sorted_and_carry_no_time_owner_or_private_modes(tmp_path: Path) -> None:
    with pack(_model_folder(tmp_path)) as packed:
        members = _members(packed.path)
    assert [m.name for m in members] == ["model.py", "run.sh", "weights", "weights/w.bin"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes == {"model.py": 0o644, "run.sh": 0o755, "weights": 0o755, "weights/w.bin": 0o644}


def test_caches_are_left_out(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    with pack(folder) as clean:
        cache = folder / "1" / "__pycache__"
        cache.mkdir()
        (cache / "model.cpython-311.pyc").write_bytes(b"\0")
        (folder / "1" / "weights" / "stray.pyc").write_bytes(b"\0")
        with pack(folder) as cached:
            assert cached.sha256 == clean.sha256


def test_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    (folder / "1" / "weights" / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ModelFolderError, match="symlink"):
        pack(folder)


def test_the_temporary_tar_goes_away_and_a_given_one_stays(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    with pack(folder) as packed:
        made = packed.path
        given = tmp_path / "given.tar"
        shutil.copy(made, given)
    assert not made.exists()
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    with pack(given, config=config) as ready:
        assert ready.config_pbtxt == CONFIG
        assert ready.sha256 == hashlib.sha256(given.read_bytes()).hexdigest()
    assert given.exists()


def _tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        info.size = len(data) if info.isreg() else 0
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "complaint"),
    [
        ("/etc/passwd", tarfile.REGTYPE, "leaves its folder"),
        ("../outside.py", tarfile.REGTYPE, "leaves its folder"),
        ("weights/../../outside.py", tarfile.REGTYPE, "leaves its folder"),
        ("link", tarfile.SYMTYPE, "not a regular file"),
        ("hard", tarfile.LNKTYPE, "not a regular file"),
        ("dev", tarfile.CHRTYPE, "not a regular file"),
    ],
)
def test_a_ready_tar_must_hold_only_relative_files_and_folders(
    tmp_path: Path, name: str, kind: bytes, complaint: str
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    artifact = _tar_with(tmp_path / "bad.tar", info, b"x")
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    with pytest.raises(ModelFolderError, match=complaint):
        pack(artifact, config=config)


def test_a_ready_tar_needs_its_config_and_must_be_a_tar(tmp_path: Path) -> None:
    artifact = _tar_with(tmp_path / "ok.tar", tarfile.TarInfo("model.py"), b"x")
    with pytest.raises(ModelFolderError, match="config"):
        pack(artifact)
    gzipped = tmp_path / "m.tar.gz"
    gzipped.write_bytes(b"\x1f\x8b not a plain tar")
    with pytest.raises(ModelFolderError, match="not an uncompressed tar"):
        check_tar(gzipped)


def test_the_folder_must_name_one_version(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    (folder / "2").mkdir()
    with pytest.raises(ModelFolderError, match="several version folders"):
        pack(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.pbtxt").write_text(CONFIG)
    with pytest.raises(ModelFolderError, match="no numbered version folder"):
        pack(empty)
    with pytest.raises(ModelFolderError, match="no such folder"):
        pack(tmp_path / "missing")


def test_a_version_folder_with_its_config_given_apart(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    with pack(folder) as whole, pack(folder / "1", config=folder / "config.pbtxt") as apart:
        assert apart.sha256 == whole.sha256


def test_unpack_gives_back_a_folder_that_packs_the_same(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    with pack(folder) as packed:
        dest = tmp_path / "back"
        unpack(packed.path, packed.config_pbtxt, dest, version=3)
        assert (dest / "config.pbtxt").read_text() == CONFIG
        assert (dest / "3" / "weights" / "w.bin").read_bytes() == bytes(range(256)) * 10
        with pack(dest) as again:
            assert again.sha256 == packed.sha256
        with pytest.raises(ModelFolderError, match="already exists"):
            unpack(packed.path, packed.config_pbtxt, dest, version=3)


def test_the_digits_example_packs() -> None:
    with pack(DIGITS) as packed:
        names = {m.name for m in _members(packed.path)}
        assert {"model.py", "digits.pt", "digits_arch.py"} <= names
        assert 'name: "digits"' in packed.config_pbtxt


def _tar_of(path: Path, *members: tuple[str, bytes | None]) -> Path:
    """A tar of (name, data) members in this order; data None makes a folder."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    ("members", "complaint"),
    [
        ([("", b"x")], "file without a name"),
        ([("./", b"x")], "file without a name"),
        ([("model.py", b"a"), ("model.py", b"b")], "more than once"),
        ([("w", None), ("w", b"x")], "more than once"),
        ([("w", b"x"), ("w", None)], "more than once"),
        ([("w", b"x"), ("w/a.bin", b"y")], "both a file and a folder"),
        ([("w/a.bin", b"y"), ("w", b"x")], "more than once"),
    ],
)
def test_a_tar_that_would_not_unpack_the_same_everywhere_is_refused(
    tmp_path: Path, members: list[tuple[str, bytes | None]], complaint: str
) -> None:
    with pytest.raises(ModelFolderError, match=complaint):
        check_tar(_tar_of(tmp_path / "bad.tar", *members))


def test_a_tar_made_with_its_folder_as_dot_is_accepted(tmp_path: Path) -> None:
    # `tar -cf m.tar -C 1 .` writes "./" first and "./model.py" after.
    check_tar(_tar_of(tmp_path / "ok.tar", ("./", None), ("./model.py", b"x"), ("./w", None)))


def test_a_damaged_header_is_refused_as_not_a_tar(tmp_path: Path) -> None:
    # A PAX sparse map that is not numbers: tarfile raises ValueError, not TarError.
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(damaged, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("model.py")
        info.size = 4
        info.pax_headers = {"GNU.sparse.map": "1,x"}
        tar.addfile(info, io.BytesIO(b"abcd"))
    with pytest.raises(ModelFolderError, match="not an uncompressed tar"):
        check_tar(damaged)
