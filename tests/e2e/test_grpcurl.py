"""grpcurl, with no .proto files, against the gateway: reflection and a JSON Generate."""

from __future__ import annotations

import asyncio
import json

from gateway.server import Gateway
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
