"""The worker's settings (flags, or TENSORGATE_WORKER_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import (
    CommaList,
    Duration,
    MetricsPort,
    OptionalHostPort,
    PositiveDuration,
    ServiceSettings,
    SettingsError,
    duration_between,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _model_name(name: str) -> str:
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SettingsError(f"{name!r} is not a valid model name")
    return name


class WorkerSettings(ServiceSettings):
    """Inference worker: forwards Generate and Infer to one NVIDIA Triton server."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_WORKER_")

    metrics_port: MetricsPort = Field(
        9401, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    triton_url: OptionalHostPort = Field(
        "",
        description="host:port of a running Triton's gRPC endpoint; empty launches the "
        "bundled CPU Triton",
    )
    model_repository: Path = Field(
        REPO_ROOT / "models" / "repository",
        description="Triton model repository (explicit model control)",
    )
    models: CommaList[Annotated[str, AfterValidator(_model_name)]] = Field(
        ("tinylm", "digits"), description="comma-separated models to load at start"
    )
    data_dir: Path = Field(
        Path(".data/worker"), description="where the bundled Triton keeps its backends and log"
    )
    triton_start_timeout: PositiveDuration = Field(
        120.0, description="how long to wait for the bundled Triton to be ready"
    )
    triton_threads: int = Field(
        0, ge=0, description="CPU threads for the bundled Triton's models; 0 = Triton's default"
    )
    stream_linger_seconds: Annotated[Duration, duration_between(0, 0.1)] = Field(
        0.005,
        description="a streamed token waits at most this long for the next ones to share "
        "its message, only while the model makes tokens faster than that; 0 sends each alone",
    )

    @field_validator("model_repository")
    @classmethod
    def _repository_exists(cls, path: Path, info: ValidationInfo) -> Path:
        # Only the bundled Triton reads it; a remote Triton has its own.
        if info.data.get("triton_url") == "" and not path.is_dir():
            raise SettingsError(f"{path} is not a directory")
        return path
