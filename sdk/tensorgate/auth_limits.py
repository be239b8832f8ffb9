"""The bounds of the numbers the auth service keeps, part of its API's contract.

The service refuses a value outside them (INVALID_ARGUMENT); clients such as the CLI
refuse it before sending, with the same bound, rather than failing to encode a number
that does not fit the wire's int64.
"""

from __future__ import annotations

# Far above any real limit or price, and far below where a gateway's arithmetic on them
# (micro-units in 64-bit counters) could overflow.
MAX_COUNT = 10**15  # a quota limit or a usage count
MAX_AMOUNT = 1e9  # a price, a cost or a spend cap
MAX_GRACE_SECONDS = 366 * 24 * 3600  # how long a rotated key keeps working
