"""Who may call which AuthService RPC: the authentication stage of the service's pipeline.

- `Authenticate`, `RecordUsage` and `WatchKeys` need no key. They are for gateways, on
  the internal network: a gateway asks who a caller's key is before it has any key of
  its own to present, and reports usage on its callers' behalf. In production the auth
  service listens with mutual TLS (--tls-client-ca-file), so only holders of a client
  certificate (the gateways) reach them at all; the public gateway does not offer them.
- `ListPrices` needs no key either (a gateway's price book), but a key given is checked,
  and the servicer lists a non-admin key only the prices of models it may call.
- `GetUsage` needs any valid key; the servicer limits a non-admin key to its tenant.
- Every other RPC needs an admin key; one added later does too, unless listed here.

No key, or a key refused for any reason: UNAUTHENTICATED with the one KEY_REFUSED
message (it says how to send a key, never which it was); a valid key without admin on an
admin RPC: PERMISSION_DENIED. A key that passed is remembered for at most CACHE_SECONDS (never
past its expiry), so a burst of admin calls costs one lookup, and a revocation takes
effect here within that time. The cache holds the secret's hash, never the key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tensorgate.auth.v1 import auth_pb2 as pb

from services.auth.records import KeyRefused
from services.auth.store import AuthStore
from services.runtime.api_keys import (
    AUTHORIZATION,
    KEY_REFUSED,
    bearer_key,
    hash_secret,
    parse_key,
    principal_of,
    secret_matches,
)
from services.runtime.calls import Call, Principal
from services.runtime.errors import PermissionDenied, Unauthenticated

OPEN_METHODS = frozenset({"Authenticate", "RecordUsage", "WatchKeys"})
# Gateways price calls with ListPrices and call it without a key; a caller's key, when
# there is one (a call through the gateway), is checked and scopes the answer to the
# models it may call, so that prices name no model a tenant may not see.
KEY_IF_GIVEN_METHODS = frozenset({"ListPrices"})
ANY_KEY_METHODS = frozenset({"GetUsage", *KEY_IF_GIVEN_METHODS})
CACHE_SECONDS = 2.0
CACHE_ENTRIES = 1024
KEY_REQUIRED = KEY_REFUSED  # never says whether a key was missing or refused
ADMIN_REQUIRED = "this call needs an admin key"


@dataclass(frozen=True)
class _Passed:
    secret_sha256: str
    principal: Principal
    until: float


class AuthServiceAuthenticator:
    """The auth service's `services.runtime.access.Authenticator` (see the module doc)."""

    def __init__(
        self,
        store: AuthStore,
        *,
        cache_seconds: float = CACHE_SECONDS,
        cache_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache_entries = cache_entries
        self._clock = clock
        # By key id; insertion order is age, so the oldest entry is the first.
        self._passed: dict[str, _Passed] = {}

    async def authenticate(self, call: Call) -> Principal | None:
        method = call.method.rpartition("/")[2]
        if method in OPEN_METHODS:
            return None
        key = bearer_key(call.metadata)
        if key is None:
            if method in KEY_IF_GIVEN_METHODS and not any(
                name.lower() == AUTHORIZATION for name, _ in call.metadata
            ):
                return None
            raise Unauthenticated(KEY_REQUIRED)
        try:
            principal = await self._principal(key)
        except KeyRefused as refused:
            # Why, for the operator's log line; the caller hears KEY_REFUSED only.
            call.fields["auth_refused"] = refused.reason
            if refused.key_id:
                call.fields["key_id"] = refused.key_id
            raise
        if not principal.admin and method not in ANY_KEY_METHODS:
            call.fields["key_id"] = principal.key_id
            call.fields["tenant"] = principal.tenant
            raise PermissionDenied(ADMIN_REQUIRED)
        return principal

    async def _principal(self, key: str) -> Principal:
        parsed = parse_key(key)
        if parsed is None:
            raise KeyRefused("malformed")
        now = self._clock()
        passed = self._passed.get(parsed.key_id)
        if (
            passed is not None
            and now < passed.until
            and secret_matches(passed.secret_sha256, parsed.secret)
        ):
            return passed.principal
        principal = principal_of(await self._store.authenticate(key, with_spend=False))
        until = now + self._cache_seconds
        if principal.expires_at:
            until = min(until, principal.expires_at)
        self._remember(parsed.key_id, _Passed(hash_secret(parsed.secret), principal, until), now)
        return principal

    def forget(self, change: pb.KeyChanged) -> None:
        """Drops what is cached about a changed key (or all of a tenant's, or all)."""
        if not change.key_id and not change.tenant_id:
            self._passed.clear()
            return
        stale = [
            key_id
            for key_id, passed in self._passed.items()
            if key_id == change.key_id or passed.principal.tenant == change.tenant_id
        ]
        for key_id in stale:
            del self._passed[key_id]

    def _remember(self, key_id: str, passed: _Passed, now: float) -> None:
        self._passed.pop(key_id, None)
        if len(self._passed) >= self._cache_entries:
            for stale in [k for k, entry in self._passed.items() if entry.until <= now]:
                del self._passed[stale]
        while len(self._passed) >= self._cache_entries:
            del self._passed[next(iter(self._passed))]
        self._passed[key_id] = passed
