"""Who must forget what they cached about a key, told as the change happens.

Gateways cache what Authenticate said about a key for a few seconds; so does this
service's own authenticator. When a key is revoked, rotated or its limits change (or a
tenant's), `KeyChanges.publish` tells every gateway watching (the WatchKeys stream) and
every local listener at once, so a revocation or the end of a rotation's grace is not
left to a cache's expiry. A watcher too slow to keep up is told to forget everything.
Changes made through another auth replica reach only that replica's watchers; there the
caches' short lifetime is the bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from tensorgate.auth.v1 import auth_pb2 as pb

# A gateway this far behind is told to drop its whole cache instead of each change.
_QUEUE = 256
FORGET_ALL = pb.KeyChanged()


class KeyChanges:
    def __init__(self) -> None:
        self._watchers: set[asyncio.Queue[pb.KeyChanged]] = set()
        self._listeners: list[Callable[[pb.KeyChanged], None]] = []

    def listen(self, listener: Callable[[pb.KeyChanged], None]) -> None:
        self._listeners.append(listener)

    def publish(self, *, key_id: str = "", tenant_id: str = "") -> None:
        change = pb.KeyChanged(key_id=key_id, tenant_id=tenant_id)
        for listener in self._listeners:
            listener(change)
        for queue in self._watchers:
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                # Dropping one change would leave a revoked key cached: forget it all.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(FORGET_ALL)

    def subscribe(self) -> asyncio.Queue[pb.KeyChanged]:
        """A queue of every change from now on (call before telling the watcher it is on)."""
        queue: asyncio.Queue[pb.KeyChanged] = asyncio.Queue(_QUEUE)
        self._watchers.add(queue)
        return queue

    async def follow(self, queue: asyncio.Queue[pb.KeyChanged]) -> AsyncIterator[pb.KeyChanged]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)
