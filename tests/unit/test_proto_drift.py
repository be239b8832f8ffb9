"""The committed generated code must be exactly what the protos produce."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdk"
sys.path.insert(0, str(REPO / "tools"))

import gen_protos  # noqa: E402


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    files = gen_protos.generate(tmp_path)
    assert files, "no protos found"
    stale = [
        str(rel)
        for rel in files
        if not (SDK / rel).exists() or (SDK / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale; run `make protos`: {stale}"


def test_every_committed_module_has_a_proto() -> None:
    expected = {str(rel) for rel in gen_protos.generated_files(SDK)}
    committed = {str(p.relative_to(SDK)) for p in (SDK / "tensorgate").rglob("*_pb2*.py*")}
    orphans = committed - expected
    assert not orphans, f"generated modules without a proto (delete them): {sorted(orphans)}"


@pytest.mark.parametrize("package", ["inference", "gateway", "worker", "registry", "auth"])
def test_packages_are_versioned(package: str) -> None:
    text = (REPO / "protos" / "tensorgate" / package / "v1" / f"{package}.proto").read_text()
    assert f"package tensorgate.{package}.v1;" in text
