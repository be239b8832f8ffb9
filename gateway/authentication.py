"""Who is calling the gateway: API keys checked by the auth service, cached briefly.

Every call through the pipeline presents `authorization: Bearer tg_...`. A key that is
missing or malformed (its checksum is wrong) is refused here without asking anyone;
otherwise the auth service says who the key is, and the answer is kept for
`cache_seconds` so the hot path pays a dict lookup, not a round trip. The auth service
pushes every key that changes (revoked, rotated, new limits) on its WatchKeys stream and
the cached answer is dropped at once; expiry is checked on every call from the cached
time. So a revocation or the end of a rotation's grace takes effect at once; only while
the push stream is down (the gateway drops its whole cache when it reconnects) or for a
change made through another auth replica is `cache_seconds` the bound.

With the auth service unreachable, a key it vouched for less than `outage_seconds` ago
keeps working (callers keep being served through a short outage of the auth service);
that is then the bound on a revocation it could not push. 0 turns this off.

Model scopes and admin-only calls are checked here too, once the request is known:
`check_model_scope` is the quota stage's `admits` (QuotaGate runs it before it reserves
anything), `require_admin` the proxied admin services'. Every refused key, a missing one
included, hears the same KEY_REFUSED: never why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc
from tensorgate.model_ref import InvalidModelRef, ModelRef

from services.runtime.api_keys import (
    KEY_LENGTH,
    KEY_REFUSED,
    allows,
    authorization,
    bearer_of,
    parse_key,
    principal_of,
)
from services.runtime.calls import Call, Principal
from services.runtime.errors import PermissionDenied, Unauthenticated, Unavailable, shown

log = structlog.get_logger("tensorgate.gateway.auth")

_CACHE_ENTRIES = 10_000
_REFUSED_ENTRIES = 1_000
# A key the auth service refused is remembered this long, so a client retrying a bad
# key in a loop costs the auth service one lookup per second, not one per call.
_REFUSED_SECONDS = 1.0
_LOOKUP_TIMEOUT_S = 2.0
_RESUBSCRIBE_S = 1.0
# `authorization: Bearer <key>` as nearly every client spells it.
_CANONICAL = "Bearer "
_CANONICAL_LENGTH = len(_CANONICAL) + KEY_LENGTH


@dataclass
class _Cached:
    principal: Principal | None  # None: the auth service refused the key
    fetched: float


class KeyAuthenticator:
    """The pipeline's authentication stage at the gateway."""

    def __init__(
        self, channel: grpc.aio.Channel, *, cache_seconds: float, outage_seconds: float = 60.0
    ) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._cache_seconds = cache_seconds
        self._outage_seconds = outage_seconds
        # By the key's sha256, never the key: a heap dump shows no usable key.
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._refused: OrderedDict[bytes, _Cached] = OrderedDict()
        self._lookups: dict[bytes, asyncio.Future[Principal | None]] = {}
        self._auth_down = False  # the last lookup found the auth service away
        self._background: set[asyncio.Future[_Cached]] = set()
        # Bumped whenever cached answers are dropped: a lookup that started before is
        # used for its own call but not cached (it may predate the change).
        self._generation = 0
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._follow_changes(), name="key-changes")

    async def _follow_changes(self) -> None:
        while True:
            stream = self._stub.WatchKeys(auth_pb2.WatchKeysRequest())
            try:
                await stream.initial_metadata()
                # Subscribed: whatever changed while not subscribed is unknown.
                self.forget(auth_pb2.KeyChanged())
                async for change in stream:
                    self.forget(change)
            except grpc.aio.AioRpcError:
                pass
            finally:
                stream.cancel()
            await asyncio.sleep(_RESUBSCRIBE_S)

    def forget(self, change: auth_pb2.KeyChanged) -> None:
        """Drops the cached answers about a changed key, a tenant's keys, or (empty) all."""
        self._generation += 1
        if not change.key_id and not change.tenant_id:
            self._cache.clear()
            self._refused.clear()
            return
        stale = [
            digest
            for digest, entry in self._cache.items()
            if entry.principal is not None
            and (
                entry.principal.key_id == change.key_id
                or entry.principal.tenant == change.tenant_id
            )
        ]
        for digest in stale:
            del self._cache[digest]

    async def authenticate(self, call: Call) -> Principal:
        header = authorization(call.metadata)
        if header is None:
            raise Unauthenticated(KEY_REFUSED)
        # The usual spelling is cut, not matched: the hot path runs no regex. Cached by
        # the key, not the header: spellings of one key (the scheme in any case, spaces)
        # share one entry, so one key cannot fill the cache and push others' keys out.
        if header.startswith(_CANONICAL) and len(header) == _CANONICAL_LENGTH:
            key: str | None = header[len(_CANONICAL) :]
        else:
            key = bearer_of(header)
        if key is None:
            raise Unauthenticated(KEY_REFUSED)
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(digest) or self._refused.get(digest)
        fresh_for = self._cache_seconds if cached and cached.principal else _REFUSED_SECONDS
        if cached is None or now - cached.fetched >= fresh_for:
            if (
                self._auth_down
                and cached is not None
                and cached.principal is not None
                and now - cached.fetched < self._outage_seconds
            ):
                # The auth service is away: the call goes on with what it said a moment
                # ago rather than wait out a lookup timeout; one lookup per key asks
                # again in the background.
                self._ask_later(digest, key, cached, now)
            else:
                # Only a key not cached is parsed: one in the cache was well formed.
                if parse_key(key) is None:
                    raise Unauthenticated(KEY_REFUSED)
                cached = await self._lookup(digest, key, cached, now)
        principal = cached.principal
        if principal is None or (principal.expires_at and time.time() >= principal.expires_at):
            raise Unauthenticated(KEY_REFUSED)
        return principal

    def _ask_later(self, digest: bytes, key: str, stale: _Cached, now: float) -> None:
        if digest in self._lookups:
            return
        task = asyncio.ensure_future(self._lookup(digest, key, stale, now))
        self._background.add(task)
        task.add_done_callback(self._asked)

    def _asked(self, task: asyncio.Future[_Cached]) -> None:
        self._background.discard(task)
        # Retrieved, not raised: a key the outage has outlasted is refused by its next
        # call, which asks again itself.
        if not task.cancelled():
            task.exception()

    async def _lookup(self, digest: bytes, key: str, stale: _Cached | None, now: float) -> _Cached:
        # Concurrent calls with the same key share one lookup.
        pending = self._lookups.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(key))
            self._lookups[digest] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(digest, None))
        generation = self._generation
        try:
            principal = await asyncio.shield(pending)
        except Unavailable:
            if (
                stale is not None
                and stale.principal is not None
                and (now - stale.fetched < self._outage_seconds)
            ):
                return stale  # the auth service vouched for it a moment ago
            raise
        entry = _Cached(principal, now)
        if generation != self._generation:
            return entry  # a change arrived meanwhile: this answer may predate it
        # Refused keys have a small share of their own: a flood of made-up keys (their
        # checksum is public) must not push the keys of real callers out of the cache.
        cache, limit = (
            (self._cache, _CACHE_ENTRIES)
            if principal is not None
            else (self._refused, _REFUSED_ENTRIES)
        )
        self._cache.pop(digest, None)
        self._refused.pop(digest, None)
        cache[digest] = entry
        while len(cache) > limit:
            cache.popitem(last=False)
        return entry

    async def _ask(self, key: str) -> Principal | None:
        try:
            message = await self._stub.Authenticate(
                auth_pb2.AuthenticateRequest(key=key), timeout=_LOOKUP_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            if not self._auth_down:
                log.warning("auth service unreachable", error=exc.code().name)
                self._auth_down = True
            raise Unavailable("API keys cannot be checked right now; retry shortly") from None
        if self._auth_down:
            log.info("auth service reachable again")
            self._auth_down = False
        return principal_of(message)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        pending_all: list[asyncio.Future[Any]] = [*self._lookups.values(), *self._background]
        for pending in pending_all:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Unavailable):
                await pending


def check_model_scope(principal: Principal, model_ref: str) -> None:
    """PERMISSION_DENIED unless the key's model patterns allow the model `model_ref` names."""
    try:
        name = ModelRef.parse(model_ref).name
    except InvalidModelRef:
        return  # the handler refuses it as INVALID_ARGUMENT, in its own words
    if not allows(principal, name):
        raise PermissionDenied(f"this API key may not call model {shown(name)}")


def require_admin(principal: Principal | None, what: str) -> None:
    if principal is None or not principal.admin:
        raise PermissionDenied(f"{what} needs an admin API key")
