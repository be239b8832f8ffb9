"""API keys: their format, how a presented key is parsed, and how a secret is checked.

A key reads `tg_<key_id>_<secret>_<checksum>`:
- `key_id`: 12 characters of lowercase base32 (a-z, 2-7), public: safe to log and show;
- `secret`: 32 random bytes in base62, always 43 characters;
- `checksum`: CRC32 of `tg_<key_id>_<secret>` in base62, 6 characters.

The prefix and the checksum are what GitHub's tokens carry: a secret scanner recognises
a leaked key by its shape alone, and a mistyped key is refused here, without a database
lookup. The auth service stores only `hash_secret(secret)`; the gateway and the auth
service both read keys with this module, so both refuse exactly the same texts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Iterable
from typing import NamedTuple

from tensorgate.auth.v1 import auth_pb2

from services.runtime.calls import Limits, Principal

PREFIX = "tg_"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
SECRET_LENGTH = 43  # base62 digits of the largest 32-byte number
CHECKSUM_LENGTH = 6  # base62 digits of the largest CRC32
KEY_LENGTH = len(PREFIX) + KEY_ID_LENGTH + 1 + SECRET_LENGTH + 1 + CHECKSUM_LENGTH

_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_KEY = re.compile(
    rf"tg_([a-z2-7]{{{KEY_ID_LENGTH}}})_([0-9A-Za-z]{{{SECRET_LENGTH}}})"
    rf"_([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})"
)
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
AUTHORIZATION = "authorization"
# The one answer to every key that is refused (none, malformed, unknown, revoked,
# expired), at the gateway and the auth service alike: it never says which, but says
# what a caller must send.
KEY_REFUSED = "a valid API key is required: send metadata 'authorization: Bearer <api key>'"


class ParsedKey(NamedTuple):
    """A well-formed key with a correct checksum; the secret still has to be checked."""

    key_id: str
    secret: str

    def __repr__(self) -> str:
        # A ParsedKey in a traceback or a debug print must not show the secret.
        return f"ParsedKey(key_id={self.key_id!r}, secret=<hidden>)"


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    if len(digits) > width:
        raise ValueError(f"{width} base62 digits cannot hold the number")
    return "".join(reversed(digits)).rjust(width, _BASE62[0])


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def new_key() -> tuple[str, str]:
    """A fresh key: `(key_id, full_key)`. The full key is shown once and never stored."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = _base62(int.from_bytes(secrets.token_bytes(SECRET_BYTES)), SECRET_LENGTH)
    body = f"{PREFIX}{key_id}_{secret}"
    return key_id, f"{body}_{_checksum(body)}"


def parse_key(text: str) -> ParsedKey | None:
    """The key id and secret of `text`, or None if it is not a well-formed key with a
    correct checksum. It never says which: callers refuse every None the same way."""
    # The length first: whatever a caller sends, the work below is bounded by one key.
    if len(text) != KEY_LENGTH:
        return None
    match = _KEY.fullmatch(text)
    if match is None:
        return None
    key_id, secret, checksum = match.groups()
    # compare_digest: how far a guessed checksum matches must not show in the timing.
    if not hmac.compare_digest(_checksum(text[: -CHECKSUM_LENGTH - 1]), checksum):
        return None
    return ParsedKey(key_id, secret)


def hash_secret(secret: str) -> str:
    """What is stored of a secret: its SHA-256, in hex.

    A plain fast hash on purpose: slow KDFs (bcrypt, scrypt, argon2) protect low-entropy
    passwords from guessing, but a secret here is 256 random bits, which no amount of
    hashing speed makes guessable. A slow KDF would only cost CPU on every lookup.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(stored_hash: str, secret: str) -> bool:
    """Whether `secret` is the one `stored_hash` was made from (constant-time compare)."""
    return hmac.compare_digest(stored_hash.encode(), hash_secret(secret).encode())


def authorization(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The value of the first text `authorization` header, as sent (None: there is none)."""
    for name, value in metadata:
        # gRPC metadata names arrive lowercase; lower() only for one that does not.
        if (name == AUTHORIZATION or name.lower() == AUTHORIZATION) and isinstance(value, str):
            return value
    return None


def bearer_of(header: str) -> str | None:
    """The key in an `authorization` header's value `Bearer <key>` (the scheme in any
    case), or None. The key is returned as sent: `parse_key` judges it."""
    match = _BEARER.fullmatch(header)
    return match.group(1) if match is not None else None


def bearer_key(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key in `authorization: Bearer <key>` metadata, or None when there is no such
    header or it holds no bearer key."""
    header = authorization(metadata)
    return None if header is None else bearer_of(header)


def _limits(quota: auth_pb2.Quota) -> Limits:
    return Limits(
        requests_per_minute=quota.requests_per_minute,
        tokens_per_minute=quota.tokens_per_minute,
        tokens_per_day=quota.tokens_per_day,
        concurrent_streams=quota.concurrent_streams,
    )


def allows(principal: Principal, model: str) -> bool:
    """Whether the key's model patterns match the model name."""
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in principal.models)


def principal_of(message: auth_pb2.Principal) -> Principal:
    """An Authenticate answer as the pipeline's Principal (the auth service's own stage
    and the gateway's both build it from the same message)."""
    expires_at = (
        message.expire_time.ToMicroseconds() / 1e6 if message.HasField("expire_time") else 0.0
    )
    return Principal(
        key_id=message.key_id,
        tenant=message.tenant_id,
        models=tuple(message.models),
        admin=message.admin,
        key_limits=_limits(message.key_quota),
        tenant_limits=_limits(message.tenant_quota),
        monthly_spend_cap=message.monthly_spend_cap,
        month_spend=message.month_spend,
        spend_month=message.spend_month,
        expires_at=expires_at,
        lineage_id=message.lineage_id,
        lineage_day_tokens=message.lineage_day_tokens,
        tenant_day_tokens=message.tenant_day_tokens,
        usage_day=message.usage_day,
    )
