"""The leases on the stream slots a gateway holds in Redis, renewed while the streams run.

A stream slot (a member of a scope's `...:c` sorted set, redis_scripts.py) is taken for
a short lease, not for the whole call, so a gateway that dies (kill -9, out of memory,
node lost) holds its slots only until their leases run out. While it lives, this renews
every slot it holds each third of a lease, in one round trip per round: one RENEW script
per tenant (its keys share a hash slot), all in one pipeline. A renewal never takes a
lease past its call's end, and never brings back a slot already given back or lapsed.

A hold leaves the renewal set when its call ends, before its settle is sent. A round that
fails (Redis unreachable) is logged through the counters' down/up switch and tried again
next round; a lease that lapses meanwhile frees its slot, while new calls are refused or
counted locally anyway. Nothing here raises into a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from gateway.redis_scripts import RENEW

log = structlog.get_logger("tensorgate.quota")


class StreamLease(NamedTuple):
    """One call's stream slots: its tenant, the zsets it holds a slot in, and the end of
    its call in Redis's clock (ms), past which its lease is never renewed."""

    tenant: str
    zsets: tuple[str, ...]
    end_ms: int


class StreamLeases:
    """The stream slots one gateway holds, by reservation id, and the task renewing them."""

    def __init__(
        self,
        redis: Redis,
        *,
        lease_s: float,
        went_down: Callable[[BaseException], None],
        answered: Callable[[], None],
        pool_exhausted: Callable[[BaseException], bool],
    ) -> None:
        self._redis = redis
        self._renew = redis.register_script(RENEW)
        self.lease_ms = max(int(lease_s * 1000), 1)
        self._every_s = lease_s / 3
        self._went_down = went_down
        self._answered = answered
        self._pool_exhausted = pool_exhausted
        self._held: dict[str, StreamLease] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, rid: str, lease: StreamLease) -> None:
        self._held[rid] = lease
        if self._task is None and not self._stopped:
            # Started with the first stream rather than in __init__: the counters may be
            # made before the event loop runs.
            self._task = asyncio.ensure_future(self._run())

    def drop(self, rid: str) -> None:
        self._held.pop(rid, None)

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the renewals, nor the gateway
                log.exception("stream lease renewal failed")

    async def renew(self) -> None:
        """One round: every slot held now, in one round trip."""
        if not self._held:
            return
        by_tenant: dict[str, tuple[dict[str, int], list[Any]]] = {}
        for rid, lease in self._held.items():
            index, args = by_tenant.setdefault(lease.tenant, ({}, [self.lease_ms]))
            for zset in lease.zsets:
                args.extend((index.setdefault(zset, len(index) + 1), rid, lease.end_ms))
        try:
            replies = await self._send(by_tenant)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                # Redis restarted since the script was loaded: load it, and send again.
                self._renew.sha = await self._redis.script_load(RENEW)
                replies = await self._send(by_tenant)
        except (RedisError, OSError) as exc:
            if not self._pool_exhausted(exc):
                self._went_down(exc)
            return
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            log.warning("stream lease renewal refused", error=str(failed)[:200])
        else:
            self._answered()
        for reply in replies:
            if not isinstance(reply, Exception):
                for rid in reply:
                    self.drop(rid.decode() if isinstance(rid, bytes) else str(rid))

    async def _send(self, by_tenant: dict[str, tuple[dict[str, int], list[Any]]]) -> list[Any]:
        # EVALSHA queued by hand: a Script run through a pipeline asks SCRIPT EXISTS
        # first, a second round trip on every round.
        pipe = self._redis.pipeline(transaction=False)
        for index, args in by_tenant.values():
            pipe.evalsha(self._renew.sha, len(index), *index, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
