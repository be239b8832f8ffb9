"""Typed service settings (pydantic-settings), read from CLI flags and the environment.

Each service declares one frozen `ServiceSettings` subclass whose fields carry a
type, a default and a help text. `load_settings` reads flags, then
`TENSORGATE_<SERVICE>_<FIELD>` variables (lists comma-separated), then the
defaults, in that order of precedence, and refuses an invalid value at start
with one exit-2 line naming the flag: `--port: must be 0..65535, got 70000`.

Why our own argparse flags rather than pydantic-settings' CLI source: the flags
are built from `model_fields` in a few lines, so `--help` shows exactly the help
text, the env var name and no default for a secret; a flag's value goes in as
the same string an env var would, through the same validators (one comma-list
parser, one duration parser); and validation errors, from either source, become
one argparse error that names the flag. The CLI source brings subcommands,
nested models and JSON arguments that flat service settings do not need, and
reads `os.environ` itself, where `load_settings` takes the environment as an
argument so tests never see the real one.

Constructing a settings class directly (`WorkerSettings(metrics_port=0, ...)`)
takes only its keyword arguments and the defaults, never the process
environment: code and tests get what they wrote. Only `load_settings` reads the
environment, from the mapping it is given (`os.environ` by default).

Secrets are `SecretStr` fields: masked in repr/str, in `loggable()`, in error
messages and in `--help`, which never shows their default.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from services.runtime.logging import LogFormat

LogLevel = Literal["debug", "info", "warning", "error"]
_T = TypeVar("_T")


class SettingsError(ValueError):
    """A setting has a value the service cannot start with (raised by the validators)."""


# --- reusable setting types -------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" before "s" and "m"


def parse_duration(value: object) -> float:
    """Seconds from 2.5, "2.5", "500ms", "30s", "5m" or "1h"; negative or non-finite refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingsError(f"must be a duration such as 2.5, 500ms, 30s, 5m or 1h, got {value!r}")
    seconds = float(value) if not isinstance(value, str) else _parse_duration_text(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise SettingsError(f"must be a finite duration >= 0, got {value!r}")
    return seconds


def _parse_duration_text(text: str) -> float:
    number, scale = text.strip().lower(), 1.0
    for unit, unit_scale in _UNITS.items():
        if number.endswith(unit):
            number, scale = number.removesuffix(unit), unit_scale
            break
    try:
        return float(number) * scale
    except ValueError:
        raise SettingsError(
            f"must be seconds (2.5) or a duration with a unit (500ms, 30s, 5m, 1h), got {text!r}"
        ) from None


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise SettingsError(f"must be > 0, got {seconds:g}s")
    return seconds


def int_between(low: int, high: int, note: str = "") -> AfterValidator:
    """A whole-number setting within low..high (both included)."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise SettingsError(f"must be {low}..{high}{note}, got {value}")
        return value

    return AfterValidator(check)


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def _check_host(host: str) -> str:
    """A hostname, an IPv4 address or a bracketed IPv6 address, as gRPC targets write them."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SettingsError(f"{host!r} is not an IPv6 address in brackets") from None
        return host
    if ":" in host:
        raise SettingsError(f"{host!r}: write an IPv6 address in brackets, e.g. [::1]")
    if not _HOSTNAME.fullmatch(host):
        raise SettingsError(f"{host!r} is not a host name or address")
    return host


def _check_host_port(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SettingsError(f"{text!r} is not host:port (port 1..65535; IPv6 as [::1]:50051)")
    return f"{_check_host(host)}:{int(port)}"


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and value.strip() in ("", "none") else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _readable_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise SettingsError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise SettingsError(f"{path} is not readable")
    return path


def _pem_file(path: Path) -> Path:
    # Read at start so a wrong file is refused naming its setting, rather than
    # failing later as "cannot listen" or on every call to an upstream.
    if b"-----BEGIN " not in path.read_bytes()[:65536]:
        raise SettingsError(f"{path} is not a PEM file (no -----BEGIN line)")
    return path


def duration_between(low: float, high: float) -> AfterValidator:
    """A bound on a `Duration`: outside it a service would spin or stall."""

    def check(value: float) -> float:
        if not low <= value <= high:
            raise SettingsError(f"must be between {low:g}s and {high:g}s, got {value:g}s")
        return value

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds as a float; set as 2.5, "500ms", "30s", "5m" or "1h"."""
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
Port = Annotated[int, int_between(0, 65535, " (0 picks a free one)")]
MetricsPort = Annotated[int, int_between(-1, 65535, " (-1 turns it off)")]
Host = Annotated[str, AfterValidator(_check_host)]
HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""`host:port`, with IPv6 hosts in brackets: `[::1]:50051`."""
OptionalHostPort = Annotated[str, AfterValidator(lambda text: text and _check_host_port(text))]
"""A `HostPort`, or empty for none."""


CONSUL_REF = "consul"
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def consul_service(value: str, default: str) -> str | None:
    """The Consul service an upstream setting names (`consul` -> `default`,
    `consul:NAME` -> NAME), or None when it is a plain host:port."""
    if value == CONSUL_REF:
        return default
    if value.startswith(f"{CONSUL_REF}:") and not value.partition(":")[2].isdigit():
        return value.partition(":")[2]
    return None


def _check_upstream(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    name = consul_service(text, CONSUL_REF)
    if name is None:
        return _check_host_port(text)
    if not _SERVICE_NAME.fullmatch(name):
        raise SettingsError(f"{text!r}: consul:NAME needs a Consul service name ([A-Za-z0-9_-])")
    return text


class _FoundThroughConsul:
    """Marks a setting that may say `consul` (checked against --consul by ServiceSettings)."""


UpstreamAddress = Annotated[str, AfterValidator(_check_upstream), _FoundThroughConsul()]
"""A `HostPort`, `consul` (the default service name, found through --consul),
`consul:NAME`, or empty for none."""


def _check_consul_address(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    if "://" not in text:
        return _check_host_port(text)
    if not re.fullmatch(r"https?://[^/?#]+/?", text):
        raise SettingsError(f"{text!r} is not host:port or http(s)://host:port")
    _check_host_port(text.split("://", 1)[1].rstrip("/"))
    return text.rstrip("/")


ConsulAddress = Annotated[str, AfterValidator(_check_consul_address)]
"""A Consul agent's `host:port` or `http(s)://host:port`, or empty for none."""
CommaList = Annotated[tuple[_T, ...], NoDecode, BeforeValidator(_split_commas)]
"""A tuple set as `a,b,c` (NoDecode: the environment gives it as text, not JSON)."""
ReadableFile = Annotated[Path, AfterValidator(_readable_file)]
OptionalFile = Annotated[ReadableFile | None, BeforeValidator(_blank_is_none)]
"""A readable file, or None when unset (an empty value or `none` unsets it)."""
OptionalPemFile = Annotated[
    Annotated[ReadableFile, AfterValidator(_pem_file)] | None, BeforeValidator(_blank_is_none)
]
"""A readable PEM file, or None when unset."""


# --- the settings every service has -----------------------------------------------------


class ServiceSettings(BaseSettings):
    """What every service has: where it listens, how it logs, how it shuts down, TLS."""

    model_config = SettingsConfigDict(
        env_prefix="TENSORGATE_SERVICE_", frozen=True, extra="forbid", validate_default=True
    )

    host: Host = Field("127.0.0.1", description="address the gRPC server binds")
    port: Port = Field(0, description="gRPC port; 0 picks a free one")
    metrics_port: MetricsPort = Field(
        -1, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = Field(
        "info", description="debug, info, warning or error"
    )
    log_format: LogFormat = Field(
        "auto", description="auto (console on a terminal, else json), console or json"
    )
    log_flush_seconds: Annotated[Duration, duration_between(0, 5)] = Field(
        0.1,
        description="JSON log lines wait at most this long to be written in batches "
        "(warnings and errors go out at once); 0 writes each line at once",
    )
    drain_seconds: Duration = Field(
        1.0, description="on shutdown, time between reporting NOT_SERVING and refusing new calls"
    )
    grace_seconds: Duration = Field(
        10.0, description="on shutdown, time in-flight calls get to finish"
    )
    tls_cert_file: OptionalPemFile = Field(
        None, description="PEM certificate chain; with --tls-key-file this server listens with TLS"
    )
    tls_key_file: OptionalPemFile = Field(None, description="PEM private key of --tls-cert-file")
    tls_client_ca_file: OptionalPemFile = Field(
        None,
        description="PEM CA; when set, this server requires client certificates it signed "
        "(mutual TLS)",
    )
    upstream_ca_file: OptionalPemFile = Field(
        None,
        description="PEM CA that verifies the tensorgate services this one calls; when set, "
        "channels to them use TLS",
    )
    upstream_cert_file: OptionalPemFile = Field(
        None,
        description="PEM client certificate this service presents to them (mutual TLS); "
        "with --upstream-key-file",
    )
    upstream_key_file: OptionalPemFile = Field(
        None, description="PEM private key of --upstream-cert-file"
    )
    consul: ConsulAddress = Field(
        "",
        description="the local Consul agent (host:port or http(s)://host:port): register "
        "this service there with a gRPC health check, and deregister on shutdown; empty "
        "uses no Consul",
    )
    consul_token: SecretStr = Field(
        SecretStr(""), description="Consul ACL token (service:write on this service)"
    )
    advertise_address: OptionalHostPort = Field(
        "",
        description="host:port registered in Consul, where others reach this service; "
        "empty advertises --host and the bound port",
    )
    consul_check_interval: Annotated[Duration, duration_between(0.1, 600)] = Field(
        5.0,
        description="how often Consul checks this service's gRPC health, and how often "
        "this service makes sure the agent still has its registration",
    )
    consul_deregister_after: Annotated[Duration, duration_between(60, 7 * 86400)] = Field(
        600.0,
        description="Consul removes this service once its check has failed this long "
        "(DeregisterCriticalServiceAfter; a crash leaves no entry behind for ever)",
    )
    consul_wait_seconds: PositiveDuration = Field(
        30.0,
        description="at start, how long to wait for a healthy instance of an upstream "
        "found through Consul (--registry consul, --auth consul) before giving up",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Direct construction is keyword arguments and defaults only; `load_settings`
        # is the one place that reads flags and environment.
        return (init_settings,)

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError("--tls-cert-file and --tls-key-file: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise SettingsError(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file: "
                "mutual TLS is TLS first"
            )
        if (self.upstream_cert_file is None) != (self.upstream_key_file is None):
            raise SettingsError("--upstream-cert-file and --upstream-key-file: set both or neither")
        if self.upstream_cert_file is not None and self.upstream_ca_file is None:
            raise SettingsError(
                "--upstream-cert-file needs --upstream-ca-file: mutual TLS is TLS first"
            )
        self._consul_settings_agree()
        return self

    def _consul_settings_agree(self) -> None:
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            refers = any(isinstance(m, _FoundThroughConsul) for m in field.metadata)
            found_through_consul = isinstance(value, str) and consul_service(value, "") is not None
            if refers and found_through_consul and not self.consul:
                raise SettingsError(
                    f"{_flag_name(name)} {value}: set --consul, the agent that finds it"
                )
        wildcard = self.host in ("0.0.0.0", "[::]")
        if self.consul and wildcard and not self.advertise_address:
            raise SettingsError(
                f"--advertise-address: with --consul and --host {self.host}, say where "
                "others reach this service (host:port)"
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def loggable(self) -> dict[str, object]:
        """Every setting, JSON-ready, with each secret shown as `**********`."""
        return self.model_dump(mode="json")


S = TypeVar("S", bound=ServiceSettings)


# --- flags and environment --------------------------------------------------------------


def load_settings(
    cls: type[S],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> S:
    """Flags, then `env` (default `os.environ`), then defaults, into `cls`.

    Exits with status 2 and one message naming the setting if a value is invalid.
    """
    parser = _parser(cls, prog)
    namespace = parser.parse_args(argv)
    from_flags = {name: value for name, value in vars(namespace).items() if value is not None}
    from_env = _MappingEnvSource(cls, os.environ if env is None else env)()
    try:
        return cls(**{**from_env, **from_flags})
    except ValidationError as exc:
        # The flags parsed; a value is wrong: the message, without the usage block.
        env_only = from_env.keys() - from_flags.keys()
        message = "; ".join(_describe(cls, error, env_only) for error in exc.errors())
        parser.exit(2, f"{parser.prog}: error: {message}\n")


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source (prefix, NoDecode) reading a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    # The one hook the source has for where variables come from (its .env-file source
    # overrides it too); names are matched case-insensitively, as the base source does.
    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._env.items()}


def _env_name(cls: type[ServiceSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parser(cls: type[ServiceSettings], prog: str | None) -> argparse.ArgumentParser:
    prefix = _env_name(cls, "")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=cls.__doc__,
        allow_abbrev=False,
        epilog=f"Flags beat {prefix}<FIELD> environment variables, which beat the defaults. "
        "Durations take seconds (2.5) or a unit (500ms, 30s, 5m, 1h); lists are "
        "comma-separated; an empty value unsets an optional file.",
    )
    for name, field in cls.model_fields.items():
        help_text = f"{field.description or ''} ({_shown_default(field)}env {_env_name(cls, name)})"
        kwargs: dict[str, Any] = {"default": None, "help": help_text.replace("%", "%%")}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument(_flag_name(name), **kwargs)
    return parser


def _shown_default(field: FieldInfo) -> str:
    if _is_secret(field) or field.is_required():
        return ""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"default {value if value not in ('', None) else 'unset'}; "


def _is_secret(field: FieldInfo) -> bool:
    def secret(kind: Any) -> bool:
        return kind in (SecretStr, SecretBytes) or any(secret(arg) for arg in get_args(kind))

    return secret(field.annotation)


# pydantic's wording for the errors its own types raise, shortened to ours.
_PHRASES = {
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "must be an integer"),
    **dict.fromkeys(("float_parsing", "float_type"), "must be a number"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "must be true or false"),
    "string_type": "must be text",
    "path_type": "must be a path",
    "extra_forbidden": "is not a setting",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _describe(cls: type[ServiceSettings], error: ErrorDetails, env_only: set[str]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    message = str(ctx["error"]) if kind == "value_error" else ""
    if not error["loc"]:  # a check across settings: its message names the flags
        return message
    name = str(error["loc"][0])
    where = _flag_name(name)
    if name in env_only:
        where += f" (from {_env_name(cls, name)})"
    if kind == "missing":
        return f"{where}: is required"
    if not message:
        if kind == "literal_error":
            message = f"must be {ctx['expected']}"
        elif kind in _BOUNDS:
            message = f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}"
        else:
            message = _PHRASES.get(kind, error["msg"].lower())
        field = cls.model_fields.get(name)
        if field is None or not _is_secret(field):
            message += f", got {error['input']!r}"
    return f"{where}: {message}"
