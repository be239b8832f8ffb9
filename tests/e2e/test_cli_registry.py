"""`tensorgate models ...` end to end: the installed CLI, run as a script would run it
(stdout a pipe, so tab-separated rows), against a real registry on port 0 in this
process. One model goes through create, upload, versions, alias moves, history,
rollback, deployments and downloads; failures exit 1 with one `error:` line, bad
command lines exit 2."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tensorgate.errors import FailedPreconditionError
from tensorgate.model_folder import file_sha256, pack
from tensorgate.registry.v1.registry_pb2 import Alias
from tensorgate.registry_client import AsyncRegistryClient
from typer.testing import CliRunner

from launcher.cli import app
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "repository" / "digits"
TENSORGATE = Path(sys.executable).with_name("tensorgate")


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def rows(self) -> list[list[str]]:
        return [line.split("\t") for line in self.out.splitlines()]


@pytest.fixture(scope="module")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    settings = RegistrySettings(
        data_dir=tmp_path_factory.mktemp("cli-registry"), metrics_port=-1, drain_seconds=0.0
    )
    running = await start_registry(settings)
    yield running
    await running.stop()


async def tensorgate(registry: Registry, *args: str | Path, cwd: Path = REPO) -> Ran:
    # Awaited, never waited on: the registry serves on this same event loop.
    process = await asyncio.create_subprocess_exec(
        TENSORGATE,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=dict(os.environ, TENSORGATE_ADDRESS=registry.address),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    ran = Ran(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in ran.err and "\x1b[" not in ran.out, ran
    return ran


def _failed(ran: Ran, code: int, *words: str) -> None:
    assert ran.code == code, ran
    assert ran.err.count("\n") == 1 and ran.err.startswith("error: "), ran.err
    assert all(word in ran.err for word in words), ran.err


async def test_a_model_from_create_to_rollback(registry: Registry, tmp_path: Path) -> None:
    ran = await tensorgate(
        registry, "models", "create", "digits", "--task", "infer", "--label", "team=vision",
        "--description", "8x8 digits",
    )  # fmt: skip
    assert ran.code == 0 and ran.rows == [["digits", "infer"]], ran
    _failed(
        await tensorgate(registry, "models", "create", "digits", "--task", "infer"),
        1,
        "ALREADY_EXISTS",
    )

    with pack(DIGITS) as packed:
        expected_sha, expected_size = packed.sha256, packed.size_bytes
    ran = await tensorgate(registry, "models", "upload", "digits", DIGITS, "--description", "v1")
    assert ran.code == 0 and ran.rows == [["digits:1", expected_sha, str(expected_size)]], ran
    # A ready tar with its config given apart, recorded as derived from version 1.
    artifact = tmp_path / "digits.tar"
    assert (await tensorgate(registry, "models", "download", "digits:1", artifact)).code == 0
    assert file_sha256(artifact) == expected_sha
    ran = await tensorgate(
        registry, "models", "upload", "digits", artifact, "--config", DIGITS / "config.pbtxt",
        "--parent-version", "1", "--transformation", "copy",
    )  # fmt: skip
    assert ran.code == 0 and ran.rows[0][0] == "digits:2", ran

    ran = await tensorgate(registry, "models", "versions", "digits")
    assert ran.code == 0, ran
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in ran.rows] == [
        ("2", expected_sha, str(expected_size), "triton-python", "1 copy"),
        ("1", expected_sha, str(expected_size), "triton-python", ""),
    ]
    assert {r[7] for r in ran.rows} == {getpass.getuser()}

    ran = await tensorgate(registry, "models", "alias", "digits", "production", "1")
    assert ran.rows == [["digits@production", "1"]], ran
    await asyncio.sleep(1.1)  # so that a whole second lies between the two moves
    ran = await tensorgate(
        registry, "models", "alias", "digits", "production", "2", "--expect", "1",
        "--reason", "better",
    )  # fmt: skip
    assert ran.rows == [["digits@production", "2"]], ran
    _failed(
        await tensorgate(registry, "models", "alias", "digits", "production", "1", "--expect", "1"),
        1,
        "FAILED_PRECONDITION",
    )
    ran = await tensorgate(registry, "models", "versions", "digits")
    assert [r[1] for r in ran.rows] == ["production", ""], ran

    ran = await tensorgate(registry, "models", "history", "digits", "production")
    assert [(r[1], r[2], r[4], r[5]) for r in ran.rows] == [
        ("-", "1", "", ""),
        ("1", "2", "better", ""),
    ], ran
    first_move = datetime.fromisoformat(ran.rows[0][0])
    # Shown to the second: a second later is after the first move, before the second.
    at = (first_move + timedelta(seconds=1)).isoformat()
    ran = await tensorgate(registry, "models", "history", "digits", "production", "--at", at)
    assert [r[2] for r in ran.rows] == ["1"], ran
    _failed(
        await tensorgate(registry, "models", "history", "digits", "production", "--at", "soon"),
        2,
        "ISO 8601",
    )

    ran = await tensorgate(registry, "models", "rollback", "digits", "production", "--reason", "x")
    assert ran.rows == [["digits@production", "1"]], ran
    ran = await tensorgate(registry, "models", "history", "digits", "production")
    assert ran.rows[-1][1:3] == ["2", "1"] and ran.rows[-1][5] == "rollback", ran

    ran = await tensorgate(registry, "models", "list")
    assert [r[:4] for r in ran.rows] == [["digits", "infer", "2", "team=vision"]], ran
    _failed(await tensorgate(registry, "models", "versions", "nosuch"), 1, "NOT_FOUND")


async def test_deployments_and_downloads(registry: Registry, tmp_path: Path) -> None:
    assert (await tensorgate(registry, "models", "create", "tiny", "--task", "infer")).code == 0
    for _ in range(2):
        assert (await tensorgate(registry, "models", "upload", "tiny", DIGITS)).code == 0
    assert (await tensorgate(registry, "models", "alias", "tiny", "staging", "1")).code == 0

    ran = await tensorgate(registry, "models", "deploy", "tiny@staging", "--instances", "2")
    assert ran.rows == [["tiny@staging", "1", "2"]], ran
    ran = await tensorgate(registry, "models", "deploy", "tiny")  # a plain name: the newest
    assert ran.rows == [["tiny:2", "2", "1"]], ran
    ran = await tensorgate(registry, "models", "deployments")
    # No workers behind a bare registry: nothing deployed is served.
    assert sorted(r[:4] for r in ran.rows if r[0].startswith("tiny")) == [
        ["tiny:2", "2", "1", "no"],
        ["tiny@staging", "1", "2", "no"],
    ], ran
    _failed(await tensorgate(registry, "models", "undeploy", "tiny"), 2, "NAME:VERSION")
    assert (await tensorgate(registry, "models", "undeploy", "tiny:2")).code == 0
    ran = await tensorgate(registry, "models", "deployments")
    assert [r[0] for r in ran.rows if r[0].startswith("tiny")] == ["tiny@staging"], ran

    # Into a model folder that uploads back to the same artifact.
    folder = tmp_path / "tiny-copy"
    ran = await tensorgate(registry, "models", "download", "tiny@staging", folder)
    assert ran.code == 0 and ran.rows[0][:2] == ["tiny:1", str(folder)], ran
    # The config as the registry keeps it (normalized: no name, which workers set).
    assert 'backend: "python"' in (folder / "config.pbtxt").read_text()
    with pack(folder) as again, pack(DIGITS) as original:
        assert again.sha256 == original.sha256 == ran.rows[0][2]
    _failed(await tensorgate(registry, "models", "download", "tiny:1", folder), 2, "already exists")
    _failed(await tensorgate(registry, "models", "download", "tiny:9", tmp_path / "x"), 1)
    assert not (tmp_path / "x").exists()
    _failed(await tensorgate(registry, "models", "deploy", "tiny@"), 2, "alias")


async def test_a_rollback_is_pinned_to_where_the_alias_pointed_when_it_started(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another operator's rollback lands between the command reading the alias and
    # rolling it back: the command must be refused, not roll the other one back.
    async with AsyncRegistryClient(registry.address) as client:
        await client.create_model("pinned", task="infer")
        for _ in range(2):
            await client.upload("pinned", DIGITS)
        await client.set_alias("pinned", "production", 1)
        await client.set_alias("pinned", "production", 2)

    listed = AsyncRegistryClient.list_aliases

    async def list_then_race(self: AsyncRegistryClient, model: str = "") -> list[Alias]:
        seen = await listed(self, model)
        await self.rollback_alias("pinned", "production", reason="the other operator")
        return seen

    monkeypatch.setattr(AsyncRegistryClient, "list_aliases", list_then_race)
    args = ["models", "rollback", "pinned", "production", "--address", registry.address]
    # In a thread: the CLI runs its own event loop, and the registry serves on this one.
    ran = await asyncio.to_thread(CliRunner().invoke, app, args)
    # (launcher.cli.main turns this into its one `error:` line and exit 1.)
    assert isinstance(ran.exception, FailedPreconditionError), ran
    assert "points at version 1, not 2" in str(ran.exception)
    monkeypatch.undo()
    async with AsyncRegistryClient(registry.address) as client:
        history = await client.get_alias_history("pinned", "production")
    assert [(m.from_version, m.to_version) for m in history] == [(0, 1), (1, 2), (2, 1)]
