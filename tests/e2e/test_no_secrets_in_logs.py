"""No API key, prompt or generated text in any log line of the whole local platform
(registry, auth service, worker, gateway, each a process writing into one log file, and
the worker's Triton, which writes a log of its own), after calls with good keys, refused
keys, keys pasted into the wrong fields, admin calls, generations and unary calls. Key
ids and tenant ids, which are public, are on the canonical lines: the scan reads the
lines where a leak would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from tensorgate import AsyncGatewayClient
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.errors import TensorgateClientError
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from launcher.local import LocalPlatform
from services.runtime.api_keys import new_key, parse_key
from tests.auth_helpers import Admin, admin_at, bearer, digits_image, rpc_failure

GATEWAY = "/tensorgate.gateway.v1.InferenceGateway"
AUTH = "/tensorgate.auth.v1.AuthService"


def _admin_key(platform: LocalPlatform, data_dir: Path) -> str:
    key: str = getattr(platform, "admin_key", "")
    return key or (data_dir / "auth" / "admin.key").read_text().strip()


async def _generated(address: str, key: str | None, prompt: str) -> str:
    """The text of a whole generation."""
    text = ""
    async with AsyncGatewayClient(address, api_key=key) as client:
        async for chunk in client.generate("tinylm", prompt, max_tokens=48, seed=1):
            text += chunk.text
    return text


async def _refused(address: str, key: str | None, prompt: str) -> bool:
    """Whether a generation with `key` is refused."""
    try:
        await _generated(address, key, prompt)
    except TensorgateClientError:
        return True
    return False


async def _inferred(address: str, key: str | None) -> bool:
    try:
        async with AsyncGatewayClient(address, api_key=key) as client:
            await client.infer("digits", {"image": digits_image()})
    except TensorgateClientError:
        return False
    return True


async def _exercise(
    admin: Admin, address: str, secrets: list[str], texts: list[str]
) -> dict[str, str]:
    """Calls of every kind; the secrets and texts none of them may log go into the lists.
    Returns the public ids that the canonical lines should carry."""
    tenant = await admin.tenant("logs")
    good = await admin.new_key(tenant)
    revoked = await admin.new_key(tenant)
    only_digits = await admin.new_key(tenant, models=("digits",))
    rotated_from = await admin.new_key(tenant)
    rotated = await admin.rotate(rotated_from.key.key_id, grace_seconds=0)
    await admin.revoke(revoked.key.key_id)
    _, unknown = new_key()
    wrong_checksum = good.secret[:-1] + ("A" if good.secret[-1] != "A" else "B")
    secrets += [good.secret, revoked.secret, only_digits.secret, rotated_from.secret]
    secrets += [rotated.secret, unknown, wrong_checksum]

    generated = []
    for n in range(3):
        prompt = f"ZEBRA-PROMPT-{uuid.uuid4().hex}\nROMEO:"
        texts.append(prompt)
        generated.append(await _generated(address, good.secret, prompt))
        assert await _inferred(address, good.secret if n else only_digits.secret)
    # (A generation may end at once, with no text; three in a row do not.)
    assert any(generated), "the generations streamed no text to look for"
    texts += generated
    # Refused, each with a prompt of its own: a refusal must not log the prompt either.
    for key in (None, "tg_nonsense", unknown, wrong_checksum, revoked.secret):
        prompt = f"ZEBRA-PROMPT-{uuid.uuid4().hex}"
        texts.append(prompt)
        assert await _refused(address, key, prompt)
        assert not await _inferred(address, key)
    prompt = f"ZEBRA-PROMPT-{uuid.uuid4().hex}"
    texts.append(prompt)
    assert await _refused(address, only_digits.secret, prompt)  # out of scope
    assert await _refused(address, rotated_from.secret, prompt)  # grace 0
    texts.append(await _generated(address, rotated.secret, f"ZEBRA-PROMPT-{uuid.uuid4().hex}"))

    # Keys pasted where ids belong (an admin's slip): whatever the answer, it must not
    # echo the key, and no log line may carry it.
    stub = admin.stub
    misuses: list[Awaitable[object]] = [
        stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=good.secret), metadata=admin.metadata),
        stub.CreateTenant(
            pb.CreateTenantRequest(tenant=pb.Tenant(id=only_digits.secret)),
            metadata=admin.metadata,
        ),
        stub.UpdateTenant(
            pb.UpdateTenantRequest(id=good.secret, requests_per_minute=1), metadata=admin.metadata
        ),
        stub.GetUsage(pb.GetUsageRequest(tenant_id=good.secret), metadata=admin.metadata),
        stub.SetPrice(
            pb.SetPriceRequest(price=pb.Price(model=good.secret)), metadata=admin.metadata
        ),
    ]
    for misuse in misuses:
        try:
            await misuse
        except grpc.aio.AioRpcError as refused:
            assert good.secret not in (refused.details() or "")
            assert only_digits.secret not in (refused.details() or "")
    # A price under a key-shaped name would be listed to anyone (ListPrices needs no key).
    listed = await stub.ListPrices(pb.ListPricesRequest(), metadata=admin.metadata)
    assert all(good.secret not in price.model for price in listed.prices)
    # A key pasted as the model of an inference call: refused, never echoed or logged,
    # whether the model grammar takes it (not found) or refuses it (malformed).
    key = good.secret
    pasted = (key, f"x@{key}", f"{key}:1", f"!{key}", f"tinylm:{key}", f"tinylm {key}")
    async with AsyncGatewayClient(address, api_key=good.secret) as client:
        for model in (*pasted, f"tinylm\x00{key}"):
            try:
                await client.infer(model, {"image": digits_image()})
            except TensorgateClientError as refused:
                assert good.secret not in str(refused)
                assert good.secret.split("_")[2] not in str(refused)  # nor its secret part
    # One cut where a log line's bound falls (128 characters): 5 characters of its secret
    # would not look like a key any more, and must not be written either.
    secret_part = good.secret.split("_")[2]
    model = "x" * 107 + good.secret
    secrets.append(f"{good.secret[:16]}{secret_part[:5]}")
    # And a key sent as the caller's request id.
    async with grpc.aio.insecure_channel(address) as channel:
        gateway = gateway_pb2_grpc.InferenceGatewayStub(channel)
        for request_model, request_id in ((model, "req-1"), ("tinylm", good.secret)):
            stream = gateway.Generate(
                inference_pb2.GenerateRequest(model=request_model, prompt="a", max_tokens=2),
                metadata=(*bearer(good.secret), ("x-request-id", request_id)),
                timeout=30,
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for _ in stream:
                    pass
            trailers = await stream.trailing_metadata()
            assert all(good.secret not in str(value) for _, value in trailers or ())
    # A tenant key on an admin call.
    denied = await rpc_failure(
        stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(good.secret))
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(good.secret), timeout=10)
    return {"tenant": tenant, "key_id": good.key.key_id}


def _hidden(key: str) -> list[str]:
    """What of a key must never be written: the key, and its secret part."""
    parsed = parse_key(key)
    return [key] if parsed is None else [key, parsed.secret]


async def test_no_key_prompt_or_generated_text_in_any_log_line(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "platform.log"
    platform = LocalPlatform(gateway_port=0, data_dir=tmp_path, log_file=log_file)
    secrets: list[str] = []
    texts: list[str] = []
    await platform.start(timeout=240)
    try:
        admin_key = _admin_key(platform, tmp_path)
        secrets.append(admin_key)
        async with admin_at(platform.gateway_address, admin_key) as admin:
            ids = await _exercise(admin, platform.gateway_address, secrets, texts)
    finally:
        await platform.stop()

    # The services' log, and every log they keep beside it (the worker's Triton writes
    # its own, under the worker's folder): the logs of every process the test started.
    log_files = await asyncio.to_thread(lambda: sorted(tmp_path.rglob("*.log")))
    assert log_file in log_files
    assert tmp_path / "worker" / "triton.log" in log_files, log_files
    scanned = [
        f"{path.relative_to(tmp_path)}: {line}"
        for path in log_files
        for line in path.read_text(errors="replace").splitlines()
    ]
    lines = log_file.read_text(errors="replace").splitlines()
    assert lines, "the platform wrote no log"
    forbidden = [part for key in secrets for part in _hidden(key)]
    # Generated text is checked whole: a short piece of it may be common words.
    forbidden += [text for text in texts if len(text) >= 16]
    forbidden.append("ZEBRA-PROMPT")
    # Reported with what leaked cut out: the failure message must not spread it either.
    leaks = [
        f"line {number}: {line.replace(what, '<LEAKED>')[:400]}"
        for number, line in enumerate(scanned, 1)
        for what in forbidden
        if what in line
    ]
    assert not leaks, "\n".join(leaks[:20])

    entries: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    generate_lines = [
        e for e in entries if e.get("method") == f"{GATEWAY}/Generate" and e.get("status") == "OK"
    ]
    assert any(
        e.get("key_id") == ids["key_id"] and e.get("tenant") == ids["tenant"]
        for e in generate_lines
    ), generate_lines[:5]
    refused = [
        e
        for e in entries
        if e.get("method", "").startswith(GATEWAY) and e.get("status") == "UNAUTHENTICATED"
    ]
    assert len(refused) >= 10, refused[:5]
    created = [e for e in entries if e.get("method") == f"{AUTH}/CreateApiKey"]
    assert any(e.get("created_key_id") == ids["key_id"] for e in created), created[:5]
    # The worker served the calls too, so its lines were scanned with the rest.
    assert any(str(e.get("method", "")).startswith("/tensorgate.worker.") for e in entries)
