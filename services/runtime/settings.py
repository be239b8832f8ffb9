"""Typed service settings read from CLI flags and environment variables.

Each service declares one frozen dataclass of settings (subclassing
`ServiceSettings`); `load_settings` builds its flags from the fields, reads
`TENSORGATE_<SERVICE>_<FIELD>` from the environment, and refuses invalid values
at start with a message that names the setting. Flags beat the environment,
which beats the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from services.runtime.logging import LogFormat


class SettingsError(ValueError):
    """A setting has a value the service cannot start with."""


def setting(default: Any, help: str) -> Any:
    """A settings field with its help text (shown by --help)."""
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """What every service has: where it listens, how it logs, how it shuts down."""

    host: str = setting("127.0.0.1", "address the gRPC server binds")
    port: int = setting(0, "gRPC port; 0 picks a free one")
    metrics_port: int = setting(-1, "Prometheus /metrics port; 0 picks a free one, -1 turns it off")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: LogFormat = setting(
        "auto", "auto (console on a terminal, else json), console or json"
    )
    drain_seconds: float = setting(
        1.0, "on shutdown, seconds between reporting NOT_SERVING and refusing new calls"
    )
    grace_seconds: float = setting(10.0, "on shutdown, seconds in-flight calls get to finish")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise SettingsError(f"metrics_port must be -1..65535, got {self.metrics_port}")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise SettingsError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        if self.log_format not in {"auto", "console", "json"}:
            raise SettingsError(
                f"log_format must be auto, console or json, got {self.log_format!r}"
            )
        if self.drain_seconds < 0 or self.grace_seconds < 0:
            raise SettingsError("drain_seconds and grace_seconds must be >= 0")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


S = TypeVar("S", bound=ServiceSettings)


def load_settings(
    cls: type[S],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> S:
    """Parses flags and environment into `cls`; exits with status 2 and a message if invalid."""
    env = os.environ if env is None else env
    prefix = f"TENSORGATE_{_service_name(cls).upper()}_"
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        env_name = prefix + f.name.upper()
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (env {env_name})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, default=None, help=help_text, metavar=f.name.upper())
    namespace = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        env_name = prefix + f.name.upper()
        raw = getattr(namespace, f.name)
        if raw is None and env_name in env:
            raw = env[env_name]
        if raw is None:
            continue
        try:
            values[f.name] = _convert(raw, hints[f.name])
        except ValueError as exc:
            parser.error(f"--{f.name.replace('_', '-')}: {exc}")
    try:
        return cls(**values)
    except SettingsError as exc:
        parser.error(str(exc))


def _service_name(cls: type[ServiceSettings]) -> str:
    name = cls.__name__.removesuffix("Settings")
    return name or "service"


def _convert(raw: Any, kind: Any) -> Any:
    if isinstance(raw, bool) or kind is Any:
        return raw
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if raw in ("", "none") else _convert(raw, inner[0])
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        return tuple(_convert(part.strip(), item) for part in str(raw).split(",") if part.strip())
    if kind is bool:
        lowered = str(raw).lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no"}:
            raise ValueError(f"expected true or false, got {raw!r}")
        return lowered in {"1", "true", "yes"}
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"expected {kind.__name__}, got {raw!r}") from None
    if kind is Path:
        return Path(raw).expanduser()
    return str(raw)
