"""The gateway's settings (flags, or TENSORGATE_GATEWAY_* variables)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import (
    CommaList,
    Duration,
    HostPort,
    MetricsPort,
    OptionalHostPort,
    PositiveDuration,
    ServiceSettings,
    SettingsError,
    duration_between,
)


class GatewaySettings(ServiceSettings):
    """Gateway: the public gRPC front door; routes each call to a worker with the model."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_GATEWAY_")

    metrics_port: MetricsPort = Field(
        9400, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    workers: CommaList[HostPort] = Field(
        (), description="comma-separated host:port of the inference workers"
    )
    registry: OptionalHostPort = Field(
        "",
        description="host:port of the model registry: resolves name@alias and is offered "
        "to callers at this address; empty serves only name and name:version",
    )
    refresh_seconds: Annotated[Duration, duration_between(0.1, 3600)] = Field(
        5.0, description="how often to re-read the worker list from discovery"
    )
    eject_seconds: Duration = Field(10.0, description="how long a failing worker gets no calls")
    upstream_timeout: PositiveDuration = Field(
        300.0, description="deadline for a forwarded call when the caller set none"
    )

    @field_validator("workers")
    @classmethod
    def _at_least_one_worker(cls, workers: tuple[str, ...]) -> tuple[str, ...]:
        if not workers:
            raise SettingsError("at least one worker address is needed (host:port,...)")
        return workers
