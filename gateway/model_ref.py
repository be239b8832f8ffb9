"""Model references as callers write them: "name", "name:3" or "name@alias"."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.runtime.errors import InvalidArgument, shown

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if not text:
            raise InvalidArgument("model", "is required: 'name', 'name:version' or 'name@alias'")
        name, at, alias = text.partition("@")
        name, colon, version = name.partition(":")
        if not _NAME.fullmatch(name):
            raise InvalidArgument("model", f"{shown(text)} does not start with a valid model name")
        if at:
            if colon or not _NAME.fullmatch(alias):
                raise InvalidArgument(
                    "model", f"{shown(text)}: write 'name@alias' with a valid alias"
                )
            return cls(name, alias=alias)
        if colon:
            if not _VERSION.fullmatch(version) or int(version) < 1:
                raise InvalidArgument("model", f"{shown(text)}: version must be a positive integer")
            return cls(name, version=int(version))
        return cls(name)

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name
