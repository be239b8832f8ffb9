"""Consul for every service: register with a gRPC health check, find healthy instances.

`ConsulAgent` is the local agent's HTTP API, through py-consul's asyncio client, with
a timeout on every call and the failures turned into two errors: `ConsulUnavailable`
(the agent is away or slow: retry) and `ConsulRefused` (it answered no: an ACL, a bad
request; retrying alone will not help, the message says what to fix).

`ConsulRegistration` keeps one instance of this service registered: it registers in
the background (retrying with backoff while the agent is away), asks the agent every
`resync_seconds` whether it still has the registration (an agent that restarted
without its state has lost it) and registers again if not, re-registers when the
service's Meta changes (a worker's loaded models), and deregisters on shutdown.

`follow_healthy` follows the instances of a service whose checks pass, with blocking
queries on /v1/health/service/<name>: it yields only when the set changes and keeps
the last set while the agent is away.

Consul is the production discovery (DESIGN.md); the embedded default runs without
it, so nothing here runs unless a service is given `--consul`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio
import consul.base
import structlog
from consul.callback import CB

log = structlog.get_logger("tensorgate.consul")

_T = TypeVar("_T")
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 10.0
# Blocking queries that come back with nothing new are asked again no sooner than
# this, as Consul's documentation asks of clients, so a flapping index cannot spin.
_MIN_QUERY_INTERVAL_S = 0.05


class ConsulError(Exception):
    """A call to the Consul agent failed; the message names the agent and the call."""


class ConsulUnavailable(ConsulError):
    """The agent did not answer (down, restarting, slow): worth retrying."""


class ConsulRefused(ConsulError):
    """The agent answered with an error (ACL token, bad request)."""


def parse_consul_address(text: str) -> tuple[str, str, int]:
    """(scheme, host, port) from `host:port` or `http(s)://host:port`."""
    raw = text.strip()
    parsed = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise ValueError(
            f"{text!r} is not a Consul agent address: write host:port or http(s)://host:port"
        )
    if parsed.path not in ("", "/") or parsed.query:
        raise ValueError(f"{text!r}: a Consul agent address has no path or query")
    return parsed.scheme, parsed.hostname, port


@dataclass(frozen=True)
class HealthyInstance:
    """One instance of a service whose checks pass: its id, its host:port and its Meta."""

    service_id: str
    address: str
    meta: Mapping[str, str] = field(default_factory=dict)


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class _HttpClient(consul.aio.HTTPClient):  # type: ignore[misc]  # py-consul is untyped
    """py-consul's aiohttp adapter without the connector arguments aiohttp deprecated
    (`verify_ssl`, `ssl_context`), which warn on every connection."""

    def __init__(self, host: str, port: int, scheme: str, verify: bool | str = True) -> None:
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify, None)
        ssl_option: ssl.SSLContext | bool = False
        if scheme == "https" and verify:
            ssl_option = ssl.create_default_context(
                cafile=verify if isinstance(verify, str) else None
            )
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_option))


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None
    ) -> _HttpClient:
        return _HttpClient(host, port, scheme, verify)


class ConsulAgent:
    """The local Consul agent's HTTP API: each call bounded by `timeout` seconds."""

    def __init__(self, address: str, *, token: str = "", timeout: float = 5.0) -> None:
        scheme, host, port = parse_consul_address(address)
        self.address = address
        self._timeout = timeout
        self._client = _Consul(host=host, port=port, scheme=scheme, token=token or None)

    async def _call(self, what: str, call: Awaitable[_T], timeout: float | None = None) -> _T:
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await call
        except TimeoutError:
            raise ConsulUnavailable(
                f"Consul agent at {self.address} did not answer {what} within {limit:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ConsulUnavailable(
                f"Consul agent at {self.address} is unreachable ({what}): {reason}"
            ) from None
        except consul.ACLPermissionDenied:
            raise ConsulRefused(
                f"Consul agent at {self.address} refused {what}: permission denied; give the "
                "ACL token (--consul-token) service:write on this service and service:read"
            ) from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            # A malformed answer (no X-Consul-Index, bad JSON): said without its text,
            # which may carry a Date header and would make every retry a new warning.
            raise ConsulRefused(
                f"Consul agent at {self.address} gave an answer to {what} that could not be "
                f"read ({type(exc).__name__})"
            ) from None
        except consul.ConsulException as exc:
            if str(exc)[:1] == "5":  # py-consul's "500 ...": the agent or its servers failed
                raise ConsulUnavailable(
                    f"Consul agent at {self.address} failed {what}: {str(exc)[:300]}"
                ) from None
            raise ConsulRefused(
                f"Consul agent at {self.address} refused {what}: {str(exc)[:300]}"
            ) from None

    async def register(self, payload: Mapping[str, Any]) -> None:
        """PUT /v1/agent/service/register, replacing the checks of an earlier registration."""
        check = payload.get("check")
        await self._call(
            f"registering {payload['service_id']}",
            self._client.agent.service.register(
                payload["name"],
                service_id=payload["service_id"],
                address=payload["address"],
                port=payload["port"],
                meta=dict(payload.get("meta") or {}),
                check=dict(check) if check else None,
                replace_existing_checks=True,
            ),
        )

    async def deregister(self, service_id: str) -> None:
        """PUT /v1/agent/service/deregister/<id>."""
        await self._call(
            f"deregistering {service_id}", self._client.agent.service.deregister(service_id)
        )

    async def is_registered(self, service_id: str) -> bool:
        """GET /v1/agent/service/<id>: whether the agent still has this registration."""
        # py-consul's agent.service_definition sends no ACL token: ask with ours.
        found = await self._call(
            f"looking up {service_id}",
            self._client.http.get(
                CB.json(),
                f"/v1/agent/service/{service_id}",
                headers=self._client.prepare_headers(None),
            ),
        )
        return found is not None

    async def healthy(
        self, service: str, *, index: int = 0, wait: float = 30.0
    ) -> tuple[int, list[HealthyInstance]]:
        """GET /v1/health/service/<name>?passing: blocks until the index passes `index`
        (or `wait` is over) when `index` > 0; returns the new index and the instances."""
        wait_s = max(1, round(wait))
        new_index, entries = await self._call(
            f"the healthy instances of {service}",
            self._client.health.service(
                service, passing=True, index=index or None, wait=f"{wait_s}s"
            ),
            # Consul adds up to wait/16 of jitter to a blocking query.
            timeout=self._timeout + wait_s * 1.1 if index else None,
        )
        what = f"the healthy instances of {service}"
        try:
            parsed_index = int(new_index or 0)
        except (TypeError, ValueError):
            raise ConsulRefused(
                f"Consul agent {self.address} answered {what} with index {str(new_index)[:40]!r}, "
                "not a number"
            ) from None
        if not isinstance(entries, list):
            raise ConsulRefused(
                f"Consul agent {self.address} answered {what} with a "
                f"{type(entries).__name__}, not a list"
            )
        instances = [i for i in map(_instance, entries) if i is not None]
        instances.sort(key=lambda i: (i.address, i.service_id))
        return parsed_index, instances

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()


def _instance(entry: object) -> HealthyInstance | None:
    """One entry of a health answer, or None for one without a usable address: an
    agent's odd answer about one instance must not hide the others."""
    if not isinstance(entry, dict):
        return None
    svc, node = entry.get("Service"), entry.get("Node")
    svc = svc if isinstance(svc, dict) else {}
    node = node if isinstance(node, dict) else {}
    host, port, meta = svc.get("Address") or node.get("Address"), svc.get("Port"), svc.get("Meta")
    if not isinstance(host, str) or not host or type(port) is not int or not 0 < port < 65536:
        return None
    return HealthyInstance(
        service_id=str(svc.get("ID", "")),
        address=_host_port(host, port),
        meta={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
    )


def service_id(name: str, address: str) -> str:
    """A stable, unique id for the instance of `name` at `address` (host:port)."""
    return f"{name}-{re.sub(r'[^A-Za-z0-9_.]+', '-', address).strip('-')}"


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulRegistration:
    """Keeps this service instance registered in Consul until `deregister`."""

    def __init__(
        self,
        agent: ConsulAgent,
        *,
        name: str,
        address: str,
        tls: bool,
        check_interval: float,
        deregister_after: float,
        serving: Callable[[], bool] = lambda: True,
        resync_seconds: float | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.agent = agent
        self.name = name
        self.address = address
        self.service_id = service_id(name, address)
        self._host, self._port = host.strip("[]"), int(port)
        self._tls = tls
        self._interval = check_interval
        self._deregister_after = deregister_after
        self._serving = serving
        self._resync = check_interval if resync_seconds is None else resync_seconds
        self._meta: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.registrations = 0  # how many times it was registered (tests, logs)

    def payload(self) -> dict[str, Any]:
        """What is registered: name, id, advertised address, Meta and the gRPC check."""
        check: dict[str, Any] = {
            "Name": f"{self.name} gRPC health",
            "GRPC": self.address,
            "GRPCUseTLS": self._tls,
            "Interval": _go_duration(self._interval),
            "Timeout": _go_duration(max(1.0, self._interval)),
            "DeregisterCriticalServiceAfter": _go_duration(self._deregister_after),
            # A registration made again after the agent lost it starts out as what the
            # service says now, so gateways do not drop a serving worker until the
            # agent's first probe; a new one that is not serving yet starts critical.
            "Status": "passing" if self._serving() else "critical",
        }
        return {
            "name": self.name,
            "service_id": self.service_id,
            "address": self._host,
            "port": self._port,
            "meta": dict(self._meta),
            "check": check,
        }

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._meta)

    def set_meta(self, **meta: str) -> None:
        """Changes the service's Meta; registered again at once (in the background)."""
        updated = {**self._meta, **meta}
        if updated != self._meta:
            self._meta = updated
            self._changed.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep_registered(), name=f"consul-{self.name}")

    async def _keep_registered(self) -> None:
        backoff, failure, dirty = _BACKOFF_MIN_S, "", True
        while True:
            try:
                self._changed.clear()
                if dirty or not await self.agent.is_registered(self.service_id):
                    await self.agent.register(self.payload())
                    self.registrations += 1
                    log.info(
                        "registered in Consul" if self.registrations == 1 else "registered again",
                        service=self.name,
                        id=self.service_id,
                        address=self.address,
                        agent=self.agent.address,
                    )
                dirty, backoff, failure = False, _BACKOFF_MIN_S, ""
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._resync)
                dirty = self._changed.is_set()
            except ConsulError as exc:
                if str(exc) != failure:  # logged when it starts or changes, not per retry
                    log.warning("Consul registration failed; retrying", error=str(exc))
                    failure = str(exc)
                await asyncio.sleep(backoff)
                backoff, dirty = min(backoff * 2, _BACKOFF_MAX_S), True

    async def deregister(self) -> None:
        """Stops re-registering and leaves Consul; an agent that is away is logged, not fatal
        (DeregisterCriticalServiceAfter removes the entry once its check fails)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.agent.deregister(self.service_id)
            log.info("deregistered from Consul", service=self.name, id=self.service_id)
        except ConsulError as exc:
            log.warning("could not deregister from Consul", id=self.service_id, error=str(exc))


async def follow_healthy(
    agent: ConsulAgent, service: str, *, wait: float = 30.0, settle: float = 15.0
) -> AsyncIterator[list[HealthyInstance]]:
    """The healthy instances of `service` at once, then again each time they change.

    Blocking queries: each asks for changes past the last index and is answered by the
    agent when there is one (or after `wait`). While the agent is away nothing is
    yielded (the last set stands) and queries are retried with backoff; after a failure
    the index starts again from 0, since an agent that restarted counts from scratch.
    For `settle` seconds after the agent answers again, instances are only added, not
    removed: an agent that restarted without its state knows none of them until they
    have registered again, and they are not gone meanwhile.
    """
    index, backoff, failure = 0, _BACKOFF_MIN_S, ""
    last: list[HealthyInstance] | None = None
    settling_until = 0.0
    while True:
        asked = time.monotonic()
        settling = settling_until - asked
        try:
            new_index, instances = await agent.healthy(
                service, index=index, wait=min(wait, settling) if settling > 0 else wait
            )
        except Exception as exc:  # anything the agent says must not end the following
            error = (
                str(exc) if isinstance(exc, ConsulError) else f"{type(exc).__name__}: {exc!s:.80}"
            )
            if error[:300] != failure:
                log.warning("Consul query failed; retrying", service=service, error=error[:300])
                failure = error[:300]
            await asyncio.sleep(backoff)
            index, backoff = 0, min(backoff * 2, _BACKOFF_MAX_S)
            continue
        if failure:
            log.info("Consul answers again", service=service, agent=agent.address)
            settling_until = time.monotonic() + settle if last else 0.0
        failure, backoff = "", _BACKOFF_MIN_S
        # An index that goes backwards (a restarted agent) is started over; 0 would
        # not block, so the lowest index waited on is 1.
        index = 0 if new_index < index else max(new_index, 1)
        if last and time.monotonic() < settling_until:
            present = {i.service_id for i in instances}
            instances = sorted(
                [*instances, *(i for i in last if i.service_id not in present)],
                key=lambda i: (i.address, i.service_id),
            )
        if instances != last:
            last = instances
            yield instances
        elif time.monotonic() - asked < _MIN_QUERY_INTERVAL_S:
            await asyncio.sleep(_MIN_QUERY_INTERVAL_S)
