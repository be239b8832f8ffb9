"""The SDK on its own, end to end: `pip install ./sdk` into a fresh virtual environment pulls
no torch, no Triton and no platform code, and from there its async and sync clients work
against the session's gateway -> worker -> Triton (sdk_client_script.py).

The install is real: pip resolves the SDK's dependencies from the package index or its cache.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.server import Gateway

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdk"
CLIENT_SCRIPT = Path(__file__).with_name("sdk_client_script.py")
DIGITS = REPO / "models" / "examples" / "digits.json"

PLATFORM_DISTRIBUTIONS = {"torch", "tritonclient", "nvidia-pytriton", "tensorgate-platform"}
PLATFORM_MODULES = {"services", "gateway", "launcher", "torch", "tritonclient", "pytriton"}
FINISHED = {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "FINISH_REASON_EOS"}

# Run isolated (-I) from an empty folder: which of the names in argv[1] can be imported.
IMPORT_PROBE = """
import importlib.util, json, sys
import tensorgate, tensorgate.aio, tensorgate.client
names = json.loads(sys.argv[1])
importable = [name for name in names if importlib.util.find_spec(name) is not None]
print(json.dumps({"sdk_file": tensorgate.__file__, "importable": importable}))
"""


@dataclass(frozen=True)
class SdkEnvironment:
    root: Path
    python: Path
    cwd: Path  # an empty folder, so that nothing of the repository is importable from there


async def _run(*args: str | Path, cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *map(str, args),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, f"{args} exited {process.returncode}:\n{stderr.decode()}"
    return stdout.decode()


@pytest.fixture(scope="session")
async def sdk_environment(tmp_path_factory: pytest.TempPathFactory) -> SdkEnvironment:
    # Subprocesses are awaited, never waited on: the session's gateway runs on this loop.
    root = tmp_path_factory.mktemp("sdk-install")
    # Built from a clean copy: a build in the checkout leaves sdk/build/, whose stale files
    # setuptools would pack into the next wheel, and concurrent runs would share it.
    source = root / "sdk"
    shutil.copytree(
        SDK, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
    )
    venv = root / "venv"
    await _run(sys.executable, "-m", "venv", venv, cwd=root)
    pip = venv / "bin" / "pip"
    await _run(pip, "install", "--disable-pip-version-check", "-q", source, cwd=root)
    empty = root / "cwd"
    empty.mkdir()
    return SdkEnvironment(root=venv, python=venv / "bin" / "python", cwd=empty)


async def test_sdk_installs_without_torch_triton_or_platform_code(
    sdk_environment: SdkEnvironment,
) -> None:
    listed = await _run(
        sdk_environment.root / "bin" / "pip",
        "list",
        "--format",
        "json",
        "--disable-pip-version-check",
        cwd=sdk_environment.cwd,
    )
    installed = {item["name"].lower().replace("_", "-") for item in json.loads(listed)}
    assert "tensorgate-sdk" in installed
    assert not installed & PLATFORM_DISTRIBUTIONS

    names = json.dumps(sorted(PLATFORM_MODULES))
    found = json.loads(
        await _run(sdk_environment.python, "-I", "-c", IMPORT_PROBE, names, cwd=sdk_environment.cwd)
    )
    assert found["importable"] == []
    assert Path(found["sdk_file"]).is_relative_to(sdk_environment.root), "not the installed SDK"


async def test_async_and_sync_clients_against_the_gateway(
    sdk_environment: SdkEnvironment, gateway: Gateway
) -> None:
    output = await _run(
        sdk_environment.python,
        "-I",
        CLIENT_SCRIPT,
        gateway.address,
        DIGITS,
        cwd=sdk_environment.cwd,
    )
    results: dict[str, Any] = json.loads(output)
    assert Path(results["sdk_file"]).is_relative_to(sdk_environment.root)
    assert not set(results["modules"]) & PLATFORM_MODULES

    for kind in ("async", "sync"):
        seen = results[kind]
        stream = seen["generate"]
        assert stream["finish_reason"] in FINISHED, kind
        assert 1 <= stream["tokens"] <= 12, kind
        assert stream["completion_tokens"] == stream["tokens"], kind
        assert stream["prompt_tokens"] == len(b"ROMEO:"), kind
        assert stream["chunks"] > 1, f"{kind}: tokens must stream, not arrive in one message"
        assert seen["labels"] == [0, 1, 2, 3], kind
        assert {"tinylm", "digits"} <= set(seen["models"]), kind

        unknown = seen["unknown_model"]
        assert unknown is not None, f"{kind}: an unknown model raised nothing"
        assert (unknown["type"], unknown["code"]) == ("NotFoundError", "NOT_FOUND"), kind
        assert unknown["request_id"], kind

        no_tokens = seen["max_tokens_0"]
        assert no_tokens is not None, f"{kind}: max_tokens=0 raised nothing"
        assert (no_tokens["type"], no_tokens["code"]) == (
            "InvalidArgumentError",
            "INVALID_ARGUMENT",
        ), kind
        assert [field for field, _ in no_tokens["violations"]] == ["max_tokens"], kind
        assert no_tokens["request_id"], kind

    # The same request from either client: the same seeded stream (chunk boundaries
    # may differ: tokens that arrive together can share a chunk).
    same = [
        {k: v for k, v in results[kind]["generate"].items() if k != "chunks"}
        for kind in ("async", "sync")
    ]
    assert same[0] == same[1]
