"""Model references as callers write them: "name", "name:3" or "name@alias".

The one grammar every part uses (SDK, gateway, worker, CLI). A malformed reference
raises `InvalidModelRef`, whose message says what to write instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorgate.key_shape import redact_keys

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[0-9]{1,18}")


class InvalidModelRef(ValueError):
    """The text is not a model reference; the message is for the caller."""


def _shown(text: str, limit: int = 64) -> str:
    """The text as an error quotes it: cut, repr'd, and never with a key's secret in it
    (a key pasted into the model field). Redacted before the cut, so that a cut inside
    a key cannot leave a piece of its secret too short to be recognised."""
    size = len(text)
    text = redact_keys(text[: limit + 80])
    return repr(text) if size <= limit else repr(text[:limit]) + f"... ({size} chars)"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if not text:
            raise InvalidModelRef("is required: 'name', 'name:version' or 'name@alias'")
        name, at, alias = text.partition("@")
        name, colon, version = name.partition(":")
        if not _NAME.fullmatch(name):
            raise InvalidModelRef(f"{_shown(text)} does not start with a valid model name")
        if at:
            if colon or not _NAME.fullmatch(alias):
                raise InvalidModelRef(f"{_shown(text)}: write 'name@alias' with a valid alias")
            return cls(name, alias=alias)
        if colon:
            if not _VERSION.fullmatch(version) or int(version) < 1:
                raise InvalidModelRef(f"{_shown(text)}: version must be a positive integer")
            return cls(name, version=int(version))
        return cls(name)

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name
