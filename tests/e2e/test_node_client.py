"""A Node.js backend (@grpc/grpc-js, stubs loaded from protos/) streams through the gateway,
with no key (a gateway that allows anonymous calls) and with one (quotas apply); and a
Node.js caller of the KServe v2 protocol streams through its front door."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from gateway.server import Gateway
from tests.auth_helpers import admin_at, quota
from tests.conftest import AuthStack

NODE_CLIENT = Path(__file__).resolve().parents[1] / "node"


async def _node(script: str, *args: str, key: str | None = None) -> list[Any]:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test"
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "tests/node has no node_modules: `make test` installs them (npm ci)"
    )
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_CLIENT / script),
        *args,
        *(["TG_API_KEY"] if key is not None else []),
        env={**os.environ, "TG_API_KEY": key or ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def _node_generate(
    address: str, model: str, prompt: str, max_tokens: int, key: str | None = None
) -> list[Any]:
    return await _node("generate.mjs", address, model, prompt, str(max_tokens), key=key)


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


async def test_node_kserve_stream_gets_whole_responses(
    auth_stack: AuthStack, tmp_path: Path
) -> None:
    # protobufjs replaces a message field that occurs twice instead of merging it: a
    # response renamed by a second infer_response field reached Node with the names only.
    descriptors = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(descriptors.file.add())
    path = tmp_path / "grpc_service.desc"
    path.write_bytes(descriptors.SerializeToString())
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        key = (await admin.new_key(await admin.tenant("node-kserve"))).secret
    lines = await _node("kserve_stream.mjs", auth_stack.gateway.address, str(path), "4", key=key)
    assert lines[-1] == {"status": "OK"}
    responses = lines[:-1]
    assert responses and all(r["model_name"] == "tinylm" for r in responses)
    assert all(
        "token_ids" in r["outputs"] and "completion_tokens" in r["outputs"] for r in responses
    )
    assert [r["final"] for r in responses][-1] is True
