"""grpcurl, with no .proto files, against the gateway: reflection, a JSON Generate, and the
README's recipes (run as written, with a key)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from pathlib import Path

from gateway.server import Gateway
from tests.auth_helpers import admin_at
from tests.conftest import AuthStack
from tests.helpers import grpcurl_path

GENERATE = "tensorgate.gateway.v1.InferenceGateway/Generate"


async def _grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(grpcurl_path()),
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _json_stream(text: str) -> list[dict[str, object]]:
    decoder, items, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        item, index = decoder.raw_decode(text, index)
        items.append(item)
    return items


async def test_lists_services_through_reflection(gateway: Gateway) -> None:
    code, out, err = await _grpcurl(gateway.address, "list")
    assert code == 0, err
    services = set(out.split())
    assert {"tensorgate.gateway.v1.InferenceGateway", "grpc.health.v1.Health"} <= services


async def test_describes_the_request_message(gateway: Gateway) -> None:
    code, out, err = await _grpcurl(
        gateway.address, "describe", "tensorgate.inference.v1.GenerateRequest"
    )
    assert code == 0, err
    for field in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed"):
        assert field in out


async def test_generate_with_a_json_body(gateway: Gateway) -> None:
    body = json.dumps({"model": "tinylm", "prompt": "ROMEO:", "max_tokens": 12, "seed": "3"})
    code, out, err = await _grpcurl("-d", body, gateway.address, GENERATE)
    assert code == 0, err
    chunks = _json_stream(out)
    assert len(chunks) > 1
    last = chunks[-1]
    usage = last["usage"]
    assert isinstance(usage, dict)
    # grpcurl prints the proto field names.
    streamed = sum(len(c.get("token_ids", [])) for c in chunks)  # type: ignore[arg-type, misc]
    assert int(usage["completion_tokens"]) == streamed
    if last["finish_reason"] == "FINISH_REASON_LENGTH":
        assert streamed == 12


async def test_errors_come_back_readable(gateway: Gateway) -> None:
    body = json.dumps({"model": "nosuchmodel", "prompt": "x", "max_tokens": 1})
    code, _, err = await _grpcurl("-d", body, gateway.address, GENERATE)
    assert code != 0
    assert "NotFound" in err and "nosuchmodel" in err


README = Path(__file__).resolve().parents[2] / "README.md"
RECIPES_MARK = "<!-- grpcurl recipes: tests/e2e/test_grpcurl.py runs this block -->"


def readme_recipes() -> tuple[list[str], list[str]]:
    """The README's grpcurl block: its variable settings, and its commands (continuation
    lines joined), each as the shell gets it."""
    text = README.read_text()
    block = text.split(RECIPES_MARK, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    settings: list[str] = []
    commands: list[str] = []
    current = ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        # A command goes on after a trailing backslash, or while a quote is open.
        if line.endswith("\\") or current.count("'") % 2:
            continue
        first_word = current.split(maxsplit=1)[0]
        (settings if "=" in first_word else commands).append(current)
        current = ""
    return settings, commands


async def test_readme_recipes_run_with_a_key(auth_stack: AuthStack, tmp_path: Path) -> None:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        key = (await admin.new_key(await admin.tenant("grpcurl"))).secret
    settings, commands = readme_recipes()
    assert [c.split()[-1] for c in commands] == [
        "list",
        "tensorgate.gateway.v1.InferenceGateway/ListModels",
        "tensorgate.gateway.v1.InferenceGateway/Generate",
        "tensorgate.gateway.v1.InferenceGateway/Infer",
        "inference.GRPCInferenceService/ModelInfer",
    ]
    # The recipes find grpcurl on PATH behind a shim that keeps its arguments: the key must
    # never be one of them (it would show in ps and in the shell's history).
    shim, arguments = tmp_path / "bin" / "grpcurl", tmp_path / "arguments"
    shim.parent.mkdir()
    shim.write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" >> {arguments}\nexec {grpcurl_path()} "$@"\n'
    )
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "TENSORGATE_API_KEY": key,
    }
    # The README's address, as a user runs it, swapped for this test's gateway.
    preamble = "".join(settings).replace("127.0.0.1:50051", auth_stack.gateway.address)
    outputs = []
    for command in commands:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            preamble + command,
            cwd=README.parent,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, f"{command}\n{err.decode()}"
        outputs.append(out.decode())
    passed = arguments.read_text()
    assert passed.count("authorization: Bearer ${TENSORGATE_API_KEY}") == 4
    assert key not in passed
    services, listing, generation, infer, kserve = outputs
    assert {"inference.GRPCInferenceService", "tensorgate.gateway.v1.InferenceGateway"} <= set(
        services.split()
    )
    assert {m["name"] for m in json.loads(listing)["models"]} >= {"digits", "tinylm"}
    assert "usage" in _json_stream(generation)[-1]
    (label,) = [t for t in json.loads(infer)["outputs"] if t["name"] == "label"]
    assert base64.b64decode(label["raw_contents"]) == struct.pack("<q", 0)  # the digit 0
    answer = json.loads(kserve)
    assert (answer["model_name"], answer["model_version"]) == ("digits", "1")
    names = [o["name"] for o in answer["outputs"]]
    raw = dict(zip(names, answer["raw_output_contents"], strict=True))
    assert base64.b64decode(raw["label"]) == struct.pack("<q", 0)


async def test_recipes_are_refused_without_a_key(auth_stack: AuthStack) -> None:
    code, _, err = await _grpcurl(
        "-d",
        '{"model_name": "digits"}',
        auth_stack.gateway.address,
        "inference.GRPCInferenceService/ModelInfer",
    )
    assert code != 0 and "Unauthenticated" in err
