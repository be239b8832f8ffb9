"""Page tokens and page bounds of the registry's list calls: a token names where the
previous page ended (opaque to callers), and a page is bounded in count and in bytes."""

from __future__ import annotations

import base64
import binascii
import json
import re

from services.runtime.errors import InvalidArgument, shown

_PAGE_SIZE, _MAX_PAGE_SIZE = 100, 1000
_MAX_TOKEN_CHARS = 1024
# Under the 4 MiB a gRPC client takes by default (grpcurl's too), counting a version
# as its config plus what its other fields take at most (descriptions, lineage, facts).
MAX_PAGE_BYTES = 3 << 20
VERSION_OVERHEAD = 32 << 10
VERSION_TOKEN = re.compile(r"[0-9]{1,18}")


def page_size(asked: int) -> int:
    """The page size a call asked for (0: the default), or InvalidArgument."""
    if not 0 <= asked <= _MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page_size", f"must be 0..{_MAX_PAGE_SIZE} (0 means {_PAGE_SIZE}), got {asked}"
        )
    return asked or _PAGE_SIZE


def page_token(after: str) -> str:
    """The token of the page after the one that ended at `after`."""
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


def token_after(token: str) -> str:
    """Where the page before ended, from its token; InvalidArgument for anything else."""
    after = None
    # A token this call made is short; anything long is not one, and is not decoded.
    if len(token) <= _MAX_TOKEN_CHARS:
        try:
            after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        except (binascii.Error, ValueError, KeyError, TypeError, RecursionError):
            after = None
    if not isinstance(after, str):
        raise InvalidArgument("page_token", f"{shown(token)} is not a token this call returned")
    return after
