"""The auth/quota service's settings (flags, or TENSORGATE_AUTH_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import MetricsPort, ServiceSettings


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and value.strip() in ("", "none") else value


class AuthSettings(ServiceSettings):
    """Auth/quota service: tenants, API keys, quotas, prices and the usage ledger."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_AUTH_")

    metrics_port: MetricsPort = Field(
        9403, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    data_dir: Path = Field(
        Path(".data/auth"), description="where the SQLite database lives (when no --database-url)"
    )
    # A secret: a PostgreSQL URL carries its password.
    database_url: SecretStr = Field(
        SecretStr(""),
        description="postgresql://user:password@host:port/db (may be the registry's database: "
        "auth's tables are all named auth_*); empty keeps auth in SQLite under --data-dir",
    )
    bootstrap_admin_key_file: Annotated[Path | None, BeforeValidator(_blank_is_none)] = Field(
        None,
        description="on first start, when no key exists, create tenant `admin` with an admin "
        "key and write the key to this file (mode 0600); the key is never logged",
    )
