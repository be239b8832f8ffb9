"""The worker's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.runtime.settings import ServiceSettings, SettingsError, setting

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ServiceSettings):
    """Inference worker: forwards Generate and Infer to one NVIDIA Triton server."""

    metrics_port: int = setting(
        9401, "Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    triton_url: str = setting(
        "", "host:port of a running Triton's gRPC endpoint; empty launches the bundled CPU Triton"
    )
    model_repository: Path = setting(
        REPO_ROOT / "models" / "repository", "Triton model repository (explicit model control)"
    )
    models: tuple[str, ...] = setting(
        ("tinylm", "digits"), "comma-separated models to load at start"
    )
    data_dir: Path = setting(
        Path(".data/worker"), "where the bundled Triton keeps its backends and log"
    )
    triton_start_timeout: float = setting(
        120.0, "seconds to wait for the bundled Triton to be ready"
    )
    triton_threads: int = setting(
        0, "CPU threads for the bundled Triton's models; 0 = Triton's default"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.triton_url and not self.model_repository.is_dir():
            raise SettingsError(f"model_repository {self.model_repository} is not a directory")
        if self.triton_start_timeout <= 0:
            raise SettingsError("triton_start_timeout must be > 0")
        for name in self.models:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise SettingsError(f"models: {name!r} is not a valid model name")
