"""`tensorgate tenants | keys | quotas | prices | usage` end to end: the installed CLI, run
as a script would run it (stdout a pipe, so tab-separated rows), against a gateway that
requires keys, its auth service (both on port 0 in this process) and the session worker.

A tenant gets a scoped key that is shown once and never listed, quotas, a price; calls
made with its key show up in the usage table and CSV; rotation and revocation take
effect; a tenant's key is refused admin calls in one line. And `tensorgate up` prints
the admin key on its first start only.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.usage_commands import CSV_HEADER
from services.auth.server import start_auth
from services.auth.settings import AuthSettings
from services.runtime.process import free_port
from services.worker.server import Worker
from tests.conftest import start_auth_gateway

REPO = Path(__file__).resolve().parents[2]
TENSORGATE = Path(sys.executable).with_name("tensorgate")


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def rows(self) -> list[list[str]]:
        return [line.split("\t") for line in self.out.splitlines()]


@dataclass(frozen=True)
class Stack:
    address: str
    admin_key: str


@pytest.fixture(scope="module")
async def stack(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    data_dir = tmp_path_factory.mktemp("cli-auth")
    key_file = data_dir / "admin.key"
    auth = await start_auth(
        AuthSettings(
            data_dir=data_dir, metrics_port=-1, drain_seconds=0.0, bootstrap_admin_key_file=key_file
        )
    )
    try:
        # A short cache, so that a revocation reaches this gateway within the test.
        gateway = await start_auth_gateway(auth.address, worker, auth_cache_seconds=0.3)
        try:
            yield Stack(gateway.address, key_file.read_text().strip())
        finally:
            await gateway.stop()
    finally:
        await auth.stop()


async def tensorgate(stack: Stack, *args: str, key: str | None = None) -> Ran:
    # Awaited, never waited on: the services serve on this same event loop.
    process = await asyncio.create_subprocess_exec(
        TENSORGATE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=dict(
            os.environ, TENSORGATE_ADDRESS=stack.address, TENSORGATE_API_KEY=key or stack.admin_key
        ),
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


async def _created_key(stack: Stack, *args: str) -> tuple[str, str]:
    """(key, key id) from `keys create` or `keys rotate`: the key alone on stdout."""
    ran = await tensorgate(stack, "keys", *args)
    assert ran.code == 0, ran
    assert ran.out.count("\n") == 1 and ran.out.startswith("tg_"), ran
    key = ran.out.strip()
    key_id = key.split("_")[1]
    assert f"key id {key_id}" in ran.err and "shown only this once" in ran.err, ran.err
    assert key not in ran.err
    return key, key_id


async def _generate(stack: Stack, key: str, *args: str) -> Ran:
    return await tensorgate(
        stack, "generate", "ROMEO:", "--max-tokens", "8", "--seed", "3", *args, key=key
    )


async def test_tenant_keys_quotas_prices_and_usage(stack: Stack) -> None:
    ran = await tensorgate(stack, "tenants", "create", "acme", "--description", "the acme team")
    assert ran.code == 0 and ran.rows == [["acme"]], ran
    _failed(await tensorgate(stack, "tenants", "create", "acme"), 1, "ALREADY_EXISTS", "acme")
    ran = await tensorgate(stack, "tenants", "list")
    assert ran.code == 0 and [row[0] for row in ran.rows] == ["acme", "admin"], ran
    ran = await tensorgate(stack, "tenants", "show", "acme")
    assert ran.code == 0 and ran.rows[0][0] == "acme" and ran.rows[0][-1] == "the acme team"

    ran = await tensorgate(
        stack, "prices", "set", "tinylm", "--prompt-per-1k", "1", "--completion-per-1k", "2",
        "--compute-per-second", "0",
    )  # fmt: skip
    assert ran.code == 0 and ran.rows == [["tinylm", "1", "2", "0"]], ran
    ran = await tensorgate(stack, "prices", "list")
    assert ran.code == 0 and ["tinylm", "1", "2", "0"] in ran.rows, ran

    key, key_id = await _created_key(
        stack, "create", "acme", "--name", "ci", "--model", "tiny*", "--requests-per-minute", "100"
    )
    for listing in (("--tenant", "acme"), ()):
        ran = await tensorgate(stack, "keys", "list", *listing)
        assert ran.code == 0 and key not in ran.out and key.split("_")[2] not in ran.out, ran
    ran = await tensorgate(stack, "keys", "list", "--tenant", "acme")
    assert [row[:8] for row in ran.rows] == [
        [key_id, "acme", "ci", "tiny*", "no", "active", "", "requests/min=100"]
    ], ran

    ran = await tensorgate(stack, "quotas", "set", "--key", key_id, "--tokens-per-day", "100000")
    assert ran.code == 0 and ran.rows == [[f"key {key_id}", "100", "0", "100000", "0", ""]], ran
    ran = await tensorgate(stack, "quotas", "show", "--key", key_id)
    assert ran.rows == [[f"key {key_id}", "100", "0", "100000", "0", ""]], ran
    ran = await tensorgate(
        stack, "quotas", "set", "--tenant", "acme", "--concurrent-streams", "4",
        "--monthly-spend-cap", "10",
    )  # fmt: skip
    assert ran.code == 0 and ran.rows == [["tenant acme", "0", "0", "0", "4", "10"]], ran
    ran = await tensorgate(stack, "quotas", "show", "--tenant", "acme")
    assert ran.rows == [["tenant acme", "0", "0", "0", "4", "10"]], ran
    _failed(await tensorgate(stack, "quotas", "show", "--tenant", "acme", "--key", key_id), 2)

    # The price is read by the gateway every 0.2 s: calls after this are priced.
    await asyncio.sleep(0.5)
    for _ in range(3):
        ran = await _generate(stack, key)
        assert ran.code == 0, ran
    _failed(await _generate(stack, key, "--model", "digits"), 1, "PERMISSION_DENIED", "digits")

    rows: list[list[str]] = []
    for _ in range(100):  # the gateway sends what calls used once a second
        ran = await tensorgate(stack, "usage", "--tenant", "acme")
        assert ran.code == 0, ran
        rows = [row for row in ran.rows if row[3].startswith("tinylm")]
        if rows and sum(int(row[4]) for row in rows) >= 3:
            break
        await asyncio.sleep(0.2)
    assert len(rows) == 1, rows
    day, tenant, used_by, _, requests, errors, prompt, completion, _, cost = rows[0]
    assert (tenant, used_by, requests, errors) == ("acme", key_id, "3", "0"), rows
    assert int(prompt) > 0 and 0 < int(completion) <= 24 and float(cost) > 0, rows

    ran = await tensorgate(stack, "usage", "--tenant", "acme", "--from", day, "--to", day, "--csv")
    assert ran.code == 0, ran
    table = list(csv.reader(io.StringIO(ran.out)))
    assert table[0] == list(CSV_HEADER) and table[1][:5] == [day, "acme", key_id, rows[0][3], "3"]
    # A tenant's own key reads its tenant's usage, and only that.
    ran = await tensorgate(stack, "usage", "--csv", key=key)
    assert ran.code == 0 and {row[1] for row in csv.reader(io.StringIO(ran.out))} == {
        "tenant",
        "acme",
    }, ran
    _failed(await tensorgate(stack, "usage", "--from", "June"), 2, "YYYY-MM-DD")


async def test_a_tenant_key_is_refused_admin_calls(stack: Stack) -> None:
    await tensorgate(stack, "tenants", "create", "bravo")
    key, _ = await _created_key(stack, "create", "bravo")
    for args in (("tenants", "list"), ("keys", "list"), ("quotas", "show", "--tenant", "bravo")):
        _failed(await tensorgate(stack, *args, key=key), 1, "PERMISSION_DENIED", "admin")
    _failed(
        await tensorgate(stack, "tenants", "list", key="tg_aaaaaaaaaaaa_notakey"),
        1,
        "UNAUTHENTICATED",
    )


async def test_rotation_keeps_the_old_key_for_its_grace_and_revocation_ends_it(
    stack: Stack,
) -> None:
    await tensorgate(stack, "tenants", "create", "charlie")
    old, old_id = await _created_key(stack, "create", "charlie", "--model", "tinylm")
    new, new_id = await _created_key(stack, "rotate", old_id, "--grace", "1h")
    assert new != old
    for key in (old, new):
        ran = await _generate(stack, key)
        assert ran.code == 0, ran
    ran = await tensorgate(stack, "keys", "list", "--tenant", "charlie")
    by_id = {row[0]: row for row in ran.rows}
    assert by_id[old_id][5] == "active" and by_id[old_id][6], by_id  # it expires in 1h
    assert by_id[new_id][3] == "tinylm" and by_id[new_id][-1] == old_id, by_id

    ran = await tensorgate(stack, "keys", "revoke", old_id)
    assert ran.code == 0 and ran.rows[0][0] == old_id, ran
    ran = await tensorgate(stack, "keys", "list", "--tenant", "charlie")
    assert {row[0]: row[5] for row in ran.rows} == {old_id: "revoked", new_id: "active"}
    for _ in range(50):  # the gateway trusts what it was told for 0.3 s
        ran = await _generate(stack, old)
        if ran.code:
            break
        await asyncio.sleep(0.1)
    _failed(ran, 1, "UNAUTHENTICATED")
    assert old not in ran.err
    assert (await _generate(stack, new)).code == 0
    _failed(await tensorgate(stack, "keys", "revoke", old), 2, "key id")
    _failed(await tensorgate(stack, "keys", "rotate", new_id, "--grace", "soon"), 2, "--grace")


async def _up_banner(data_dir: Path) -> str:
    """`tensorgate up`'s stderr until it is up; then Ctrl-C, and it must stop cleanly."""
    up = await asyncio.create_subprocess_exec(
        TENSORGATE, "up", "--port", str(free_port()), "--data-dir", str(data_dir),
        "--metrics-port", "-1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert up.stderr is not None
    banner = ""
    try:
        while "tensorgate is up" not in banner:
            line = await asyncio.wait_for(up.stderr.readline(), timeout=240)
            assert line, f"`tensorgate up` ended before it was up: {banner}"
            banner += line.decode()
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(up.stderr.read(), timeout=90)
        assert await up.wait() == 0, banner + rest.decode()
    return banner


@pytest.mark.timeout(600)
async def test_up_prints_the_admin_key_on_its_first_start_only(tmp_path: Path) -> None:
    key_file = tmp_path / "auth" / "admin.key"
    first = await _up_banner(tmp_path)
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert f"admin API key (shown once; kept in {key_file}, mode 0600): {key}" in first, first
    assert first.count(key) == 1

    second = await _up_banner(tmp_path)
    assert key_file.read_text().strip() == key
    assert key not in second and key.split("_")[2] not in second, second
    assert f"admin API key: kept in {key_file}" in second, second
