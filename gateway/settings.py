"""The gateway's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.settings import ServiceSettings, SettingsError, setting


@dataclass(frozen=True, kw_only=True)
class GatewaySettings(ServiceSettings):
    """Gateway: the public gRPC front door; routes each call to a worker with the model."""

    metrics_port: int = setting(
        9400, "Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    workers: tuple[str, ...] = setting((), "comma-separated host:port of the inference workers")
    refresh_seconds: float = setting(5.0, "how often to re-read what each worker has loaded")
    eject_seconds: float = setting(10.0, "how long a failing worker gets no calls")
    upstream_timeout: float = setting(
        300.0, "deadline for a forwarded call when the caller set none (seconds)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.workers:
            raise SettingsError("workers: at least one worker address is needed (host:port)")
        for address in self.workers:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"workers: {address!r} is not host:port")
        if self.refresh_seconds <= 0 or self.eject_seconds < 0 or self.upstream_timeout <= 0:
            raise SettingsError(
                "refresh_seconds and upstream_timeout must be > 0, eject_seconds >= 0"
            )
