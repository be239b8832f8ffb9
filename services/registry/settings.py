"""The registry's settings (flags, or TENSORGATE_REGISTRY_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import (
    CommaList,
    MetricsPort,
    PositiveDuration,
    ServiceSettings,
    SettingsError,
    int_between,
)

# models/data of this checkout: the held-out sets the demo models ship.
_EVALUATION_DIR = Path(__file__).resolve().parents[2] / "models" / "data"


def _at_least_one(value: int) -> int:
    if value < 1:
        raise SettingsError(f"must be at least 1, got {value}")
    return value


class RegistrySettings(ServiceSettings):
    """Model registry: models, immutable versions and their artifacts, aliases, deployments."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_REGISTRY_")

    metrics_port: MetricsPort = Field(
        9402, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    data_dir: Path = Field(
        Path(".data/registry"),
        description="where the SQLite database (when no --database-url) and the artifacts live",
    )
    # A secret: a PostgreSQL URL carries its password.
    database_url: SecretStr = Field(
        SecretStr(""),
        description="postgresql://user:password@host:port/db; empty keeps the registry in "
        "SQLite under --data-dir",
    )
    artifact_dir: Path | None = Field(
        None, description="the content-addressed artifact store; default <data-dir>/artifacts"
    )
    max_artifact_bytes: Annotated[int, AfterValidator(_at_least_one)] = Field(
        4 << 30, description="largest artifact an upload may carry, in bytes"
    )
    max_uploads: Annotated[int, AfterValidator(_at_least_one)] = Field(
        8, description="uploads taken at once; more are refused at once (RESOURCE_EXHAUSTED)"
    )
    chunk_bytes: Annotated[int, AfterValidator(_at_least_one)] = Field(
        1 << 20, description="size of the chunks a download streams, in bytes"
    )
    upload_idle_seconds: PositiveDuration = Field(
        30.0,
        description="an upload that sends nothing for this long is abandoned "
        "(DEADLINE_EXCEEDED) and its slot freed, so stalled clients cannot hold every slot",
    )

    workers: CommaList[str] = Field(
        (),
        description="comma-separated host:port of workers that follow this registry, where "
        "optimization jobs measure latency (the first one; TLS per --upstream-*); empty: "
        "optimization jobs fail, saying so",
    )
    latency_calls: Annotated[int, int_between(1, 10000)] = Field(
        200,
        description="calls behind each latency figure of an optimization job (p50/p99 at "
        "concurrency 1 and 8, parent and derived), unless the job asks for another number",
    )
    load_timeout_seconds: PositiveDuration = Field(
        300.0,
        description="how long an optimization job waits for the worker to load the versions "
        "it measures",
    )
    evaluation_dir: Path = Field(
        _EVALUATION_DIR,
        description="the held-out evaluation sets of the models (digits_heldout.npz, corpus.txt)",
    )

    @property
    def artifacts_path(self) -> Path:
        return self.artifact_dir if self.artifact_dir is not None else self.data_dir / "artifacts"
