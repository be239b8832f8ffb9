"""What an API key looks like, for the one job both sides have: never echoing one.

A key reads `tg_<key id>_<secret>_<checksum>` (services/runtime/api_keys.py makes and
checks them). Anything that starts like a key, its public id then the start of a
secret, is what the SDK and the services cut from a caller's text before quoting it in
an error or a log line (a key pasted into a model name), and what the auth service
refuses to store as a name or a description.
"""

from __future__ import annotations

import re

# The key id, then at least 8 characters of a secret: the 8 rule out ordinary names
# that merely begin "tg_" and are long enough that what is cut was a guessable part.
_KEY_LIKE = re.compile(r"(tg_[a-z2-7]{12}_)[0-9A-Za-z]{8,}(?:_[0-9A-Za-z]*)?")

KEY_LIKE_REFUSED = "looks like an API key"


def looks_like_key(text: str) -> bool:
    """Whether `text` holds anything shaped like a key, anywhere in it."""
    return "tg_" in text and _KEY_LIKE.search(text) is not None


def redact_keys(text: str) -> str:
    """`text` with the secret of anything shaped like a key replaced: safe to log or quote."""
    return _KEY_LIKE.sub(r"\1<redacted>", text) if "tg_" in text else text
