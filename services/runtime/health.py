"""The gRPC health service every server offers: Check and Watch, and their part in shutdown.

grpcio's asyncio `HealthServicer` has two faults this one mends:
- its Watch removes a service's condition when any one watcher leaves, so every other
  watcher of that service stops hearing changes: with two gateways watching a worker,
  a gateway that restarts leaves the other deaf to the worker's NOT_SERVING when it
  drains. Here a service's watchers share one condition until the last one leaves.
- its Watch streams never end, so a server's graceful stop waited out its whole grace
  period for them even with no real call in flight. `end_watches` ends them once the
  watchers have heard NOT_SERVING (the drain is over); the server then stops as soon
  as the real calls are done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class HealthService(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """`grpc.health.v1.Health` whose watchers all hear every change, and can be ended."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: dict[str, int] = {}
        self._ended = False

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        service = request.service
        condition: asyncio.Condition = self._server_watchers[service]
        self._watchers[service] = self._watchers.get(service, 0) + 1
        last: int | None = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._ended:
                        return
                    await condition.wait()
        finally:
            self._watchers[service] -= 1
            if not self._watchers[service]:
                # The last watcher of a name: a caller may watch any name, so none is kept.
                del self._watchers[service]
                self._server_watchers.pop(service, None)

    async def end_watches(self) -> None:
        """Ends every Watch stream after it has sent the current status (on shutdown)."""
        self._ended = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()
