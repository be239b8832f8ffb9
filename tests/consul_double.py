"""An HTTP double of exactly the Consul agent endpoints tensorgate calls.

No Consul server can run on these machines (ENVIRONMENT.md), so tests talk to this:

- PUT /v1/agent/service/register (py-consul's payload: name, id, address, port, meta,
  checks; `replace-existing-checks`), PUT /v1/agent/service/deregister/<id>,
  GET /v1/agent/service/<id> (404 once the agent lost it);
- GET /v1/health/service/<name>?passing=1&index=N&wait=Ns: a blocking query that answers
  when that service's index passes N (or after the wait), with X-Consul-Index.

It runs the registered gRPC checks itself, as an agent does: every check interval it
calls grpc.health.v1 Check on the registered GRPC address (TLS when GRPCUseTLS, verified
against `tls_ca`, presenting `tls_client` (key, certificate chain) to services that ask
for one, as an agent with its own TLS configuration does), so "passing" is the
service's real health. It listens on 127.0.0.1 unless given another `host`. A check's initial
`Status` is honoured until the first probe. DeregisterCriticalServiceAfter is recorded
but not acted on: services here leave by deregistering, and the real agent's 1 minute
minimum is too long for a test.

`stop()` then `start()` on the same port is an agent that went away and came back
without its state: registrations are gone and the index starts again from 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds from a Go duration as Consul takes it ("200ms", "5s", "1m30s")."""
    parts = _GO_DURATION.findall(text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * _SCALE[u] for n, u in parts)


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): v for k, v in value.items()}
    return value


@dataclass
class Registration:
    service_id: str
    name: str
    address: str
    port: int
    meta: dict[str, str]
    check: dict[str, Any] | None
    status: str = "critical"
    probes: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class ConsulDouble:
    """A fake Consul agent on 127.0.0.1; `await start()`, `address`, `await stop()`."""

    def __init__(
        self,
        *,
        tls_ca: bytes | None = None,
        tls_client: tuple[bytes, bytes] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = 0
        self.host = host
        self._tls_ca = tls_ca
        self._tls_client = tls_client
        self._runner: web.AppRunner | None = None
        self._reset()
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests to look at
        # Answers the health endpoint gives instead of the real one while set, first to
        # last (an agent gone wrong: a bad index, a body of the wrong shape).
        self.garbage: list[web.Response] = []

    def _reset(self) -> None:
        self.services: dict[str, Registration] = {}
        self._closing = False
        self._counter = 1
        self._indexes: dict[str, int] = {}
        self._changed = asyncio.Condition()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_get("/v1/agent/service/{id}", self._service)
        app.router.add_get("/v1/health/service/{name}", self._health)
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # aiohttp has no public way to read the port it bound.
        server = site._server
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Goes away, losing every registration (a restart finds none)."""
        for registration in self.services.values():
            if registration.task is not None:
                registration.task.cancel()
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._reset()

    def index_of(self, name: str) -> int:
        return self._indexes.get(name, 1)

    async def _bump(self, name: str) -> None:
        self._counter += 1
        self._indexes[name] = self._counter
        async with self._changed:
            self._changed.notify_all()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        response: web.StreamResponse = await handler(request)
        return response

    async def _register(self, request: web.Request) -> web.Response:
        body = _lower_keys(json.loads(await request.text()))
        checks = [_lower_keys(c) for c in body.get("checks") or []]
        if body.get("check"):
            checks.append(_lower_keys(body["check"]))
        if not body.get("name"):
            return web.Response(status=400, text="Missing service name")
        for check in checks:
            try:
                go_duration(check.get("interval", ""))
                go_duration(check.get("deregistercriticalserviceafter", "0s"))
            except ValueError as exc:
                return web.Response(status=400, text=f"Invalid check: {exc}")
        service_id = body.get("id") or body["name"]
        old = self.services.pop(service_id, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        check = checks[0] if checks else None
        registration = Registration(
            service_id=service_id,
            name=body["name"],
            address=body.get("address", ""),
            port=int(body.get("port", 0)),
            meta=dict(body.get("meta") or {}),
            check=check,
            status=(check or {}).get("status", "critical") if check else "passing",
        )
        if check is not None and check.get("grpc"):
            registration.task = asyncio.create_task(self._probe_forever(registration))
        self.services[service_id] = registration
        await self._bump(registration.name)
        return web.Response(text="")

    async def _deregister(self, request: web.Request) -> web.Response:
        registration = self.services.pop(request.match_info["id"], None)
        if registration is None:
            return web.Response(status=404, text="Unknown service ID")
        if registration.task is not None:
            registration.task.cancel()
        await self._bump(registration.name)
        return web.Response(text="")

    async def _service(self, request: web.Request) -> web.Response:
        registration = self.services.get(request.match_info["id"])
        if registration is None:
            return web.Response(status=404, text="unknown service ID")
        return web.json_response(self._service_json(registration))

    def _service_json(self, r: Registration) -> dict[str, Any]:
        return {
            "ID": r.service_id,
            "Service": r.name,
            "Address": r.address,
            "Port": r.port,
            "Meta": r.meta,
        }

    async def _health(self, request: web.Request) -> web.Response:
        if self.garbage:
            return self.garbage.pop(0)
        name = request.match_info["name"]
        index = int(request.query.get("index", "0") or 0)
        if index > 0:
            wait = go_duration(request.query.get("wait", "5m"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait), self._changed:
                    await self._changed.wait_for(
                        lambda: self.index_of(name) > index or self._closing
                    )
        if self._closing:
            return web.Response(status=503, text="agent shutting down")
        passing = request.query.get("passing") not in (None, "0", "false")
        entries = [
            {
                "Node": {"Node": "double", "Address": "127.0.0.1"},
                "Service": self._service_json(r),
                "Checks": [{"Status": r.status, "ServiceID": r.service_id}],
            }
            for r in self.services.values()
            if r.name == name and (r.status == "passing" or not passing)
        ]
        return web.json_response(entries, headers={"X-Consul-Index": str(self.index_of(name))})

    async def _probe_forever(self, registration: Registration) -> None:
        check = registration.check or {}
        interval = go_duration(check["interval"])
        timeout = go_duration(check.get("timeout", "10s"))
        target, _, service = str(check["grpc"]).partition("/")
        if check.get("grpcusetls"):
            key, chain = self._tls_client or (None, None)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self._tls_ca, private_key=key, certificate_chain=chain
            )
            channel = grpc.aio.secure_channel(target, credentials)
        else:
            channel = grpc.aio.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=timeout
                    )
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    serving = False
                registration.probes += 1
                status = "passing" if serving else "critical"
                if status != registration.status:
                    registration.status = status
                    await self._bump(registration.name)
        finally:
            await channel.close(None)
