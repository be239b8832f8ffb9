"""The state of one RPC while it runs: request id, who called, what the handler noted.

The pipeline (pipeline.py) opens a `Call` for every RPC and makes it current for the
handler's task. Handlers add to the call's canonical log line with `note(...)`, read
the request id with `current().request_id` (to pass it on upstream), and report the
tokens a call used with `note_usage(...)` so the quota stage can settle them.
A plain dict and one ContextVar: cheaper per call than structlog's contextvars.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tensorgate.errors import REQUEST_ID_KEY, metadata_value


@dataclass(frozen=True)
class Limits:
    """Quota limits of a key or a tenant; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_streams: int = 0


@dataclass(frozen=True)
class Principal:
    """Who is calling, as the authentication stage established it (never the key itself),
    with what the quota stage needs to meter the call."""

    key_id: str
    tenant: str
    # Model-name patterns the key may call ("digits", "tiny*", "*").
    models: tuple[str, ...] = ()
    admin: bool = False
    key_limits: Limits = Limits()
    tenant_limits: Limits = Limits()
    # Monthly spend cap of the tenant (0: none), and what the ledger says it spent in
    # the UTC month `spend_month` ("2024-06"; "": unknown, no spend to start from).
    monthly_spend_cap: float = 0.0
    month_spend: float = 0.0
    spend_month: str = ""
    # Unix time the key stops working (expiry or end of a rotation grace); 0: never.
    expires_at: float = 0.0
    # The key whose per-key counters this key counts in (a rotated key's first
    # predecessor; "": its own), and what the ledger counted today ("2024-06-30") for
    # those keys and for the tenant, where day counters that start empty start from.
    lineage_id: str = ""
    lineage_day_tokens: int = 0
    tenant_day_tokens: int = 0
    usage_day: str = ""


@dataclass
class Usage:
    """What a call consumed, reported by the handler and settled by the quota stage."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Call:
    """One RPC in flight. `fields` become the canonical log line's fields."""

    method: str
    request_id: str
    started: float
    deadline: float | None
    peer: str
    # Never in a repr (a traceback's locals, a debug print): it holds the caller's key.
    metadata: tuple[tuple[str, str | bytes], ...] = field(repr=False)
    fields: dict[str, Any] = field(default_factory=dict)
    principal: Principal | None = None
    usage: Usage | None = None

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None: the caller set none)."""
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def metadata_value(self, key: str) -> str | bytes | None:
        return metadata_value(self.metadata, key)


_current: ContextVar[Call | None] = ContextVar("tensorgate_call", default=None)


def current() -> Call | None:
    """The call the running task serves, if any."""
    return _current.get()


def principal() -> Principal | None:
    """Who the current call's key is (None: no call, or a call without a key)."""
    call = _current.get()
    return call.principal if call is not None else None


def enter(call: Call) -> None:
    _current.set(call)


def note(**fields: Any) -> None:
    """Adds fields to the current call's canonical log line (no-op outside a call)."""
    call = _current.get()
    if call is not None:
        call.fields.update(fields)


def note_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Records the tokens the current call used, for the log line and quota settlement."""
    call = _current.get()
    if call is not None:
        call.usage = Usage(prompt_tokens, completion_tokens)
        call.fields["prompt_tokens"] = prompt_tokens
        call.fields["completion_tokens"] = completion_tokens


def remaining() -> float | None:
    """Seconds left of the current call's deadline (None: no call, or no deadline).

    Read from the call, not the grpc context: handlers pass it on upstream."""
    call = _current.get()
    return call.remaining() if call is not None else None


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id to the next hop."""
    call = _current.get()
    return ((REQUEST_ID_KEY, call.request_id),) if call is not None else ()
