"""A Node.js backend (@grpc/grpc-js, stubs loaded from protos/) streams through the gateway,
with no key (a gateway that allows anonymous calls) and with one (quotas apply)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from gateway.server import Gateway
from tests.auth_helpers import admin_at, quota
from tests.conftest import AuthStack

NODE_CLIENT = Path(__file__).resolve().parents[1] / "node"


async def _node_generate(
    address: str, model: str, prompt: str, max_tokens: int, key: str | None = None
) -> list[Any]:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test"
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "tests/node has no node_modules: `make test` installs them (npm ci)"
    )
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_CLIENT / "generate.mjs"),
        address,
        model,
        prompt,
        str(max_tokens),
        *(["TG_API_KEY"] if key is not None else []),
        env={**os.environ, "TG_API_KEY": key or ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_node_client_streams_a_generation(gateway: Gateway) -> None:
    lines = await _node_generate(gateway.address, "tinylm", "ROMEO:", 16)
    assert lines[-1] == {"status": "OK"}
    chunks = [line["chunk"] for line in lines[:-1]]
    assert len(chunks) > 1
    last = chunks[-1]
    streamed = sum(len(chunk["token_ids"]) for chunk in chunks)
    assert last["usage"]["completion_tokens"] == streamed
    assert last["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_EOS"}
    if last["finish_reason"] == "FINISH_REASON_LENGTH":
        assert streamed == 16


async def test_node_client_gets_the_error_contract(gateway: Gateway) -> None:
    lines = await _node_generate(gateway.address, "nosuchmodel", "ROMEO:", 4)
    assert lines == [
        {"status": "NOT_FOUND", "details": lines[0]["details"]},
    ]
    assert "nosuchmodel" in lines[0]["details"]


async def test_node_client_streams_with_a_key_until_its_quota_is_spent(
    auth_stack: AuthStack,
) -> None:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        tenant = await admin.tenant("node")
        key = (await admin.new_key(tenant, limits=quota(requests_per_minute=1))).secret
    address = auth_stack.gateway.address
    lines = await _node_generate(address, "tinylm", "ROMEO:", 6, key)
    assert lines[-1] == {"status": "OK"}
    chunks = [line["chunk"] for line in lines[:-1]]
    last = chunks[-1]
    assert last["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_EOS"}
    assert last["usage"]["prompt_tokens"] == len("ROMEO:")
    assert last["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in chunks)
    (refused,) = await _node_generate(address, "tinylm", "ROMEO:", 6, key)
    assert refused["status"] == "RESOURCE_EXHAUSTED"
    assert "requests per minute" in refused["details"]
    (anonymous,) = await _node_generate(address, "tinylm", "ROMEO:", 6)
    assert anonymous["status"] == "UNAUTHENTICATED"
