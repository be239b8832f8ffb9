"""The client host of the multi-host test: a process run inside its own namespace that
calls the gateways over TLS, as a user's backend would, driven line by line by the test.

    python -m tests.multihost.client GATEWAY1 GATEWAY2 CA_FILE ADMIN_KEY_FILE

Reads one command per line on stdin and answers each with one JSON line on stdout:
- `setup`: registers and deploys the demo models through gateway 1 (the registry API
  it forwards), makes a tenant and a key allowed QUOTA requests a minute;
- `ready`: waits until both gateways list the deployed models;
- `quota`: QUOTA + 2 Infer calls with that key, alternating between the gateways:
  the status of each;
- `load`: Generate loops and Infer loops through gateway 2 with the admin key, in the
  background; answers once every Generate loop is receiving tokens;
- `retry`: one Infer on gateway 1 with a short deadline and, when it fails, the retry
  on gateway 2: both statuses;
- `settle`: waits until every stream that was in flight when it came has ended, and a
  few Infer calls after that, stops the loops and answers what they saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorgate import AsyncGatewayClient, TensorgateClientError
from tensorgate.auth.v1 import auth_pb2
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.registry_client import AsyncRegistryClient

from launcher.demo_models import ALIAS, DEMO_MODELS, REPOSITORY, register_demo_model

QUOTA = 5
STREAMS, UNARY = 4, 2
MAX_TOKENS = 200
IMAGE = np.asarray(
    json.loads((REPOSITORY.parent / "examples" / "digits.json").read_text()), dtype=np.float32
)
# Long enough for a call stuck on a host that was cut off to outlive gRPC's keepalive
# (30 s ping, 10 s to answer) and then be retried on another worker by the gateway.
CALL_TIMEOUT_S = 120.0
RETRY_TIMEOUT_S = 3.0  # the deadline a client gives one gateway before trying the other


class Client:
    def __init__(self, gateways: list[str], ca: bytes, admin_key: str) -> None:
        self.gateways = gateways
        self.ca = ca
        self.admin = [
            AsyncGatewayClient(g, api_key=admin_key, root_certificates=ca) for g in gateways
        ]
        self.admin_key = admin_key
        self.quota_key = ""
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.tokens = [0] * STREAMS  # tokens of each loop's current stream
        self.serial = [0] * STREAMS  # which stream of its loop that is
        self.finished = self.unary_ok = 0
        self.cut: list[str] = []  # streams that ended with an error after tokens came
        self.other: list[str] = []  # any other failure of a stream or a unary call
        self.changed = asyncio.Event()  # set by the loops whenever a count above moves

    async def _until(self, check: Callable[[], bool]) -> None:
        while not check():
            self.changed.clear()
            await self.changed.wait()

    async def setup(self) -> dict[str, Any]:
        credentials = grpc.ssl_channel_credentials(self.ca)
        async with AsyncRegistryClient(
            self.gateways[0], api_key=self.admin_key, credentials=credentials, actor="multihost"
        ) as registry:
            for name in DEMO_MODELS:
                await register_demo_model(registry, REPOSITORY / name)
        async with AsyncAuthClient(
            self.gateways[0], api_key=self.admin_key, credentials=credentials
        ) as auth:
            tenant = f"multihost-{uuid.uuid4().hex[:8]}"
            await auth.create_tenant(tenant)
            _, self.quota_key = await auth.create_key(
                tenant, quota=auth_pb2.Quota(requests_per_minute=QUOTA)
            )
        return {"deployed": [f"{name}@{ALIAS}" for name in DEMO_MODELS], "quota": QUOTA}

    async def ready(self) -> dict[str, Any]:
        """Both gateways list the deployed models (they follow the workers in Consul)."""
        for client in self.admin:
            for _ in range(600):
                if set(DEMO_MODELS) <= {m.name for m in await client.list_models()}:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{client.address} does not list {DEMO_MODELS}")
        return {"ready": True}

    async def quota(self) -> dict[str, Any]:
        codes = []
        keyed = [
            AsyncGatewayClient(g, api_key=self.quota_key, root_certificates=self.ca)
            for g in self.gateways
        ]
        for call in range(QUOTA + 2):
            try:
                await keyed[call % 2].infer("digits", {"image": IMAGE}, timeout=30)
                codes.append("OK")
            except TensorgateClientError as exc:
                codes.append(exc.code.name)
        for client in keyed:
            await client.close()
        return {"codes": codes}

    async def load(self) -> dict[str, Any]:
        self.tasks = [asyncio.create_task(self._generate(i)) for i in range(STREAMS)]
        self.tasks += [asyncio.create_task(self._unary()) for _ in range(UNARY)]
        await self._until(lambda: min(self.tokens) > 0)
        return {"streaming": STREAMS}

    async def retry(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            await self.admin[0].infer("digits", {"image": IMAGE}, timeout=RETRY_TIMEOUT_S)
            first = "OK"
        except TensorgateClientError as exc:
            first = exc.code.name
        try:
            await self.admin[1].infer("digits", {"image": IMAGE}, timeout=30)
            second = "OK"
        except TensorgateClientError as exc:
            second = exc.code.name
        return {"first": first, "retry": second, "seconds": round(time.monotonic() - started, 1)}

    async def settle(self) -> dict[str, Any]:
        in_flight = {i: self.serial[i] for i in range(STREAMS) if self.tokens[i]}
        # Each of those has ended once its loop has moved on to its next stream.
        await self._until(lambda: all(self.serial[i] > s for i, s in in_flight.items()))
        after = self.unary_ok
        await self._until(lambda: self.unary_ok >= after + 4 or bool(self.other))
        self.stop.set()
        await asyncio.gather(*self.tasks)
        return {
            "finished": self.finished,
            "cut": self.cut,
            "other": self.other,
            "unary_ok": self.unary_ok,
            "in_flight": len(in_flight),
        }

    async def _generate(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                async for chunk in self.admin[1].generate(
                    "tinylm",
                    "ROMEO:\n",
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    timeout=CALL_TIMEOUT_S,
                ):
                    self.tokens[index] += len(chunk.token_ids)
                    self.changed.set()
                if self.tokens[index] == MAX_TOKENS:
                    self.finished += 1
                else:
                    self.other.append(f"stream ended OK after {self.tokens[index]} tokens")
            except TensorgateClientError as exc:
                (self.cut if self.tokens[index] else self.other).append(exc.code.name)
            finally:
                self.tokens[index] = 0
                self.serial[index] += 1
                self.changed.set()

    async def _unary(self) -> None:
        while not self.stop.is_set():
            try:
                await self.admin[1].infer("digits", {"image": IMAGE}, timeout=CALL_TIMEOUT_S)
                self.unary_ok += 1
            except TensorgateClientError as exc:
                self.other.append(f"Infer {exc.code.name}: {exc.message}")
            self.changed.set()
            await asyncio.sleep(0.05)


async def main(gateways: list[str], ca: bytes, admin_key: str) -> None:
    client = Client(gateways, ca, admin_key)
    commands = {
        "setup": client.setup,
        "ready": client.ready,
        "quota": client.quota,
        "load": client.load,
        "retry": client.retry,
        "settle": client.settle,
    }
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        try:
            answer = await commands[line]()
        except Exception as exc:  # the test shows it: a failure here is the test's failure
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    for each in client.admin:
        await each.close()


if __name__ == "__main__":
    gateway1, gateway2, ca_file, key_file = sys.argv[1:]
    ca_pem, key = Path(ca_file).read_bytes(), Path(key_file).read_text().strip()
    asyncio.run(main([gateway1, gateway2], ca_pem, key))
