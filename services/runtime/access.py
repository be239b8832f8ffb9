"""The pipeline's authentication and quota stages: what a service plugs in, if anything.

A service that checks keys passes an `Authenticator`; one that meters usage passes a
`QuotaGate`. A service without them pays nothing for them: the pipeline skips
absent stages when it wraps the handlers, not on every call.

Quota is reserve-then-settle: before the handler runs, the gate reserves what the
call may use (a request, prompt plus max_tokens); when the call ends the reservation
is settled with what it really used, or released if it failed or was cancelled.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.runtime.calls import Call, Principal, Usage


class Authenticator(Protocol):
    async def authenticate(self, call: Call) -> Principal | None:
        """The caller of `call` (from its metadata); raises Unauthenticated when refused.

        None means the method needs no caller (health, public listings)."""
        ...


class QuotaReservation(Protocol):
    async def settle(self, usage: Usage | None) -> None:
        """The call ended normally; `usage` is what it used (None: nothing reported)."""
        ...

    async def release(self) -> None:
        """The call failed or was cancelled: give back what was reserved."""
        ...


class QuotaGate(Protocol):
    async def reserve(self, call: Call, request: Any) -> QuotaReservation | None:
        """Reserves what `request` may use; raises ResourceExhausted when over a quota.

        `request` is the decoded request, or None for client-streaming calls (their
        requests arrive later). None means nothing to meter for this call."""
        ...
