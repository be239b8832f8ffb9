"""The worker's settings (flags, or TENSORGATE_WORKER_* variables).

Two modes. Static (no --registry): load the `models` named here from
`model_repository`. Registry: serve what the registry's deployments say; the
worker then writes the Triton model repository itself, so it is a directory the
worker owns (`<data_dir>/model-repository` for the bundled Triton, or, for a
remote Triton, the directory shared with it, named by --model-repository).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import (
    CommaList,
    Duration,
    MetricsPort,
    OptionalHostPort,
    PositiveDuration,
    ServiceSettings,
    SettingsError,
    UpstreamAddress,
    duration_between,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_SERVICE = "tensorgate-registry"


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
        description="host:port of a running Triton's gRPC endpoint (started with "
        "--grpc-keepalive-permit-without-calls=1 --grpc-http2-min-recv-ping-interval-without-"
        "data=15000, or it answers the worker's 30 s keepalive pings with GOAWAY); empty "
        "launches the bundled CPU Triton",
    )
    registry: UpstreamAddress = Field(
        "",
        description="host:port of the model registry: serve what its deployments say; "
        f"`consul` finds a healthy {REGISTRY_SERVICE} through --consul (consul:NAME for "
        "another name); empty loads --models from --model-repository instead",
    )
    model_repository: Path = Field(
        REPO_ROOT / "models" / "repository",
        description="Triton model repository (explicit model control); with --registry and "
        "a remote Triton, the directory shared with that Triton, which the worker writes",
    )
    models: CommaList[Annotated[str, AfterValidator(_model_name)]] = Field(
        ("tinylm", "digits"), description="comma-separated models to load at start"
    )
    data_dir: Path = Field(
        Path(".data/worker"),
        description="where the bundled Triton keeps its backends and log, and, with "
        "--registry, the artifact cache and the bundled Triton's model repository",
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
    retire_seconds: Duration = Field(
        5.0,
        description="with --registry, a replaced version is let go once its replacement is "
        "ready and it has had no call for this long, so every gateway has switched first",
    )
    sync_wait_seconds: PositiveDuration = Field(
        300.0,
        description="with --registry, how long a starting worker waits for its deployments "
        "to load before it serves what did (the rest go on loading)",
    )
    rejected_retry_seconds: PositiveDuration = Field(
        300.0,
        description="with --registry, a version whose artifact failed its sha256 check is "
        "fetched again this often (its bytes may be repaired in the registry meanwhile)",
    )
    retire_max_seconds: Duration = Field(
        300.0,
        description="with --registry, a replaced version still called (by name:version, or "
        "by gateways waiting for a slower worker) is let go this long after it was replaced",
    )

    @field_validator("model_repository")
    @classmethod
    def _repository_exists(cls, path: Path, info: ValidationInfo) -> Path:
        registry, remote = bool(info.data.get("registry")), bool(info.data.get("triton_url"))
        # Static mode: only the bundled Triton reads it (a remote Triton has its own).
        # Registry mode with a remote Triton: it is the directory shared with that
        # Triton, so it must exist already (a mounted volume, not one made up here).
        read_here = (not registry and not remote) or (registry and remote)
        if read_here and not path.is_dir():
            raise SettingsError(f"{path} is not a directory")
        return path

    @model_validator(mode="after")
    def _registry_mode_owns_the_repository(self) -> WorkerSettings:
        if not self.registry:
            return self
        if "models" in self.model_fields_set:
            raise SettingsError(
                "--models and --registry: set one; with a registry its deployments say what to load"
            )
        if self.triton_url and "model_repository" not in self.model_fields_set:
            raise SettingsError(
                "--registry with --triton-url needs --model-repository: the directory that "
                "Triton serves from, shared with this worker"
            )
        if not self.triton_url and "model_repository" in self.model_fields_set:
            raise SettingsError(
                "--model-repository and --registry: with the bundled Triton the worker keeps "
                "its repository under --data-dir (model-repository); leave it unset"
            )
        return self

    @property
    def served_repository(self) -> Path:
        """The repository Triton serves: the worker's own one in registry mode."""
        if self.registry and not self.triton_url:
            return self.data_dir / "model-repository"
        return self.model_repository

    @property
    def artifact_cache(self) -> Path:
        """Where verified artifacts downloaded from the registry are kept."""
        return self.data_dir / "artifacts"
