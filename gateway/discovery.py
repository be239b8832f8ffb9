"""Where the workers are: a static list (the embedded default) or Consul.

Both sit behind `Discovery`. The worker pool reads `worker_addresses()` at start and
then either follows `changes()`, for a discovery that pushes (Consul: blocking
queries, so a worker that leaves or joins is seen at once), or re-reads it on a
timer when `changes()` is None (the static list).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import structlog

from services.runtime.consul import ConsulAgent, follow_healthy

log = structlog.get_logger("tensorgate.gateway.discovery")


class Discovery(Protocol):
    async def worker_addresses(self) -> list[str]: ...

    def changes(self) -> AsyncIterator[None] | None:
        """Yields each time the addresses may have changed; None: re-read on a timer."""
        ...


class StaticDiscovery:
    """A fixed list of worker addresses (host:port)."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = list(addresses)

    async def worker_addresses(self) -> list[str]:
        return list(self._addresses)

    def changes(self) -> None:
        return None


class ConsulDiscovery:
    """The workers whose Consul checks pass (service `tensorgate-worker` by default).

    `start` follows the service with blocking queries and waits, at most `first_wait`
    seconds, for the first answer; with the agent away it starts with no workers and
    keeps asking. While the agent is away the last known workers stay.
    """

    def __init__(
        self, agent: ConsulAgent, service: str, *, wait: float = 30.0, settle: float = 15.0
    ) -> None:
        self.agent = agent
        self.service = service
        self._wait, self._settle = wait, settle
        self._addresses: list[str] = []
        self._changed = asyncio.Event()
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, first_wait: float) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"consul-follow-{self.service}")
        try:
            await asyncio.wait_for(self._first.wait(), first_wait)
        except TimeoutError:
            log.warning(
                "no answer from Consul yet; starting with no workers",
                agent=self.agent.address,
                service=self.service,
                waited_s=first_wait,
            )

    async def _follow(self) -> None:
        async for instances in follow_healthy(
            self.agent, self.service, wait=self._wait, settle=self._settle
        ):
            addresses = sorted({i.address for i in instances})
            if addresses != self._addresses:
                log.info("workers in Consul", service=self.service, workers=addresses)
            self._addresses = addresses
            self._first.set()
            self._changed.set()

    async def worker_addresses(self) -> list[str]:
        return list(self._addresses)

    async def _changes(self) -> AsyncIterator[None]:
        while True:
            await self._changed.wait()
            self._changed.clear()
            yield None

    def changes(self) -> AsyncIterator[None]:
        return self._changes()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.agent.close()
