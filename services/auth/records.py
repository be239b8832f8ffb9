"""What the auth store's modules share: validation that names the field, rows turned into
auth_pb2 messages, times, and the one refusal every bad key gets.

Errors quote what a caller sent (`quoted`) except when it looks like an API key: a key
pasted into the wrong field must not come back in an error message or reach a log.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Row, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from tensorgate.auth.v1 import auth_pb2 as pb
from tensorgate.auth_limits import MAX_AMOUNT, MAX_COUNT
from tensorgate.key_shape import KEY_LIKE_REFUSED, looks_like_key

from services.runtime.api_keys import KEY_REFUSED
from services.runtime.errors import InvalidArgument, Unauthenticated, shown

INVALID_KEY = KEY_REFUSED  # the same words for every refused key, no key included
QUOTA_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "concurrent_streams")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 128"
# A model name where any run of characters may be '*'; no other wildcard is allowed, so
# fnmatch's '?' and '[...]' never have a meaning here.
_PATTERN = re.compile(r"[A-Za-z0-9*][A-Za-z0-9_.*-]{0,127}")
_KEY_ID = re.compile(r"[a-z2-7]{12}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_MAX_TEXT = 1024


class KeyRefused(Unauthenticated):
    """A presented key is refused. The caller hears only INVALID_KEY; `reason` is for
    this service's own log line (malformed, unknown, wrong secret, revoked, expired)."""

    def __init__(self, reason: str, key_id: str = "") -> None:
        super().__init__(INVALID_KEY)
        self.reason = reason
        self.key_id = key_id


def quoted(value: str) -> str:
    """A caller's value as an error quotes it, unless it holds something like a key."""
    if looks_like_key(value):
        return f"(a value that {KEY_LIKE_REFUSED}, not shown)"
    return shown(value)


# --- validation -----------------------------------------------------------------------------


def check_name(field: str, value: str) -> str:
    """Tenant ids and priced model names: the grammar of model names."""
    if not _NAME.fullmatch(value):
        raise InvalidArgument(field, f"{quoted(value)} is not a valid name: {_NAME_RULE}")
    return value


def check_new_name(field: str, value: str) -> str:
    """A tenant id being chosen: never the shape of a key (ids are logged, and a key
    pasted into one must not be stored or logged)."""
    refuse_key_shaped(field, value, "choose another name")
    return check_name(field, value)


def refuse_key_shaped(field: str, value: str, instead: str) -> None:
    """Refuses a value that holds a key (an admin's paste into the wrong field): what the
    store keeps is shown in every listing and log line, in plain text."""
    if looks_like_key(value):
        raise InvalidArgument(field, f"{KEY_LIKE_REFUSED}: {instead}")


def check_key_id(field: str, value: str) -> str:
    # Never quoted: a caller who pastes a whole key here must not see it echoed.
    if not _KEY_ID.fullmatch(value):
        raise InvalidArgument(
            field, "must be a key id: the 12 characters (a-z, 2-7) after 'tg_' in a key"
        )
    return value


def check_patterns(field: str, patterns: Iterable[str]) -> list[str]:
    """Model patterns: names in which '*' matches any run of characters (case-sensitive)."""
    checked = list(patterns)
    if len(checked) > MAX_PATTERNS:
        raise InvalidArgument(field, f"{len(checked)} patterns; at most {MAX_PATTERNS} are allowed")
    for pattern in checked:
        refuse_key_shaped(field, pattern, "a pattern names models, e.g. 'tiny*'")
        if not _PATTERN.fullmatch(pattern):
            raise InvalidArgument(
                field,
                f"{quoted(pattern)} is not a model pattern: a model name in which '*' "
                "matches any characters, e.g. 'digits', 'tiny*' or '*'",
            )
    return checked


def check_text(field: str, value: str) -> str:
    """Free text kept and shown as it is (a key's name, a tenant's description)."""
    if len(value) > _MAX_TEXT:
        raise InvalidArgument(field, f"must be at most {_MAX_TEXT} characters, got {len(value)}")
    # One line of text: a NUL is refused by PostgreSQL itself, and a newline or an escape
    # sequence would break (or forge) the rows of a listing it is shown in.
    control = _CONTROL.search(value)
    if control is not None:
        raise InvalidArgument(
            field,
            f"must be one line of printable text; it holds the control character "
            f"U+{ord(control.group()):04X}",
        )
    refuse_key_shaped(field, value, "leave keys out of it")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


MAX_PATTERNS = 100


def check_count(field: str, value: int) -> int:
    """A quota limit or a usage count: an integer 0..MAX_COUNT."""
    if not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(field, f"must be 0..{MAX_COUNT}, got {value}")
    return value


def check_amount(field: str, value: float) -> float:
    """A price, a cost or a spend cap: a finite number 0..MAX_AMOUNT."""
    if not math.isfinite(value) or not 0 <= value <= MAX_AMOUNT:
        raise InvalidArgument(field, f"must be a number 0..{MAX_AMOUNT:g}, got {value!r}")
    return value


def check_quota(field: str, quota: pb.Quota) -> pb.Quota:
    for name in QUOTA_FIELDS:
        check_count(f"{field}.{name}", getattr(quota, name))
    return quota


def check_day(field: str, value: str) -> str:
    """A UTC day, YYYY-MM-DD (a real date)."""
    try:
        valid = bool(_DAY.fullmatch(value)) and date.fromisoformat(value) is not None
    except ValueError:
        valid = False
    if not valid:
        raise InvalidArgument(field, f"{quoted(value)} is not a day: write YYYY-MM-DD")
    return value


@dataclass(frozen=True)
class QuotaUpdate:
    """New quota limits; a field left None keeps its current value."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent_streams: int | None = None

    def checked_values(self) -> dict[str, int]:
        """The fields that are set, each checked to be >= 0."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            name: check_count(name, value) for name, value in values.items() if value is not None
        }


# --- times ----------------------------------------------------------------------------------


def timestamp(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def utc_day(micros: int) -> date:
    return datetime.fromtimestamp(micros / 1e6, UTC).date()


def utc_month(micros: int) -> str:
    """The UTC month holding `micros`, "2024-06"."""
    return utc_day(micros).strftime("%Y-%m")


def month_range(micros: int) -> tuple[str, str]:
    """The first day of the UTC month holding `micros` and the first day of the next."""
    day = utc_day(micros)
    first = day.replace(day=1)
    after = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return first.isoformat(), after.isoformat()


# --- rows to messages -----------------------------------------------------------------------


def quota_of(row: Row[Any]) -> pb.Quota:
    """The quota columns of a tenant or key row."""
    return pb.Quota(**{name: getattr(row, name) for name in QUOTA_FIELDS})


def quota_values(quota: pb.Quota) -> dict[str, int]:
    return {name: getattr(quota, name) for name in QUOTA_FIELDS}


def tenant_message(row: Row[Any]) -> pb.Tenant:
    return pb.Tenant(
        id=row.id,
        description=row.description,
        quota=quota_of(row),
        monthly_spend_cap=row.monthly_spend_cap,
        create_time=timestamp(row.created_us),
    )


def key_message(row: Row[Any]) -> pb.ApiKey:
    key = pb.ApiKey(
        key_id=row.key_id,
        tenant_id=row.tenant_id,
        name=row.name,
        models=json.loads(row.models),
        admin=row.admin,
        quota=quota_of(row),
        create_time=timestamp(row.created_us),
        rotated_from=row.rotated_from,
    )
    if row.expire_us is not None:
        key.expire_time.CopyFrom(timestamp(row.expire_us))
    if row.revoke_us is not None:
        key.revoke_time.CopyFrom(timestamp(row.revoke_us))
    return key


def price_message(row: Row[Any]) -> pb.Price:
    return pb.Price(
        model=row.model,
        per_1k_prompt_tokens=row.per_1k_prompt_tokens,
        per_1k_completion_tokens=row.per_1k_completion_tokens,
        per_compute_second=row.per_compute_second,
    )


def usage_message(row: Row[Any]) -> pb.UsageRecord:
    return pb.UsageRecord(
        tenant_id=row.tenant_id,
        key_id=row.key_id,
        model=row.model,
        day=row.day,
        requests=row.requests,
        errors=row.errors,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        compute_micros=row.compute_micros,
        cost=row.cost,
    )


def upsert(connection: AsyncConnection, table: Table) -> Any:
    """An INSERT that takes ON CONFLICT clauses, in the connection's dialect (SQLite and
    PostgreSQL spell them the same; SQLAlchemy keeps them in per-dialect constructs)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)
