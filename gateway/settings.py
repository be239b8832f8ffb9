"""The gateway's settings (flags, or TENSORGATE_GATEWAY_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import (
    CommaList,
    Duration,
    MetricsPort,
    PositiveDuration,
    ServiceSettings,
    SettingsError,
    UpstreamAddress,
    consul_service,
    duration_between,
    int_between,
)

WORKER_SERVICE = "tensorgate-worker"
REGISTRY_SERVICE = "tensorgate-registry"
AUTH_SERVICE = "tensorgate-auth"


class GatewaySettings(ServiceSettings):
    """Gateway: the public gRPC front door; routes each call to a worker with the model."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_GATEWAY_")

    metrics_port: MetricsPort = Field(
        9400, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off"
    )
    workers: CommaList[UpstreamAddress] = Field(
        (),
        description="comma-separated host:port of the inference workers; or `consul`: the "
        f"healthy instances of Consul service {WORKER_SERVICE} (consul:NAME for another "
        "name), followed as they come and go (needs --consul)",
    )
    registry: UpstreamAddress = Field(
        "",
        description="host:port of the model registry: resolves name@alias and is offered "
        f"to callers at this address; `consul` finds a healthy {REGISTRY_SERVICE} through "
        "--consul (consul:NAME for another name); empty serves only name and name:version",
    )
    auth: UpstreamAddress = Field(
        "",
        description="host:port of the auth/quota service: every call then needs an API key "
        "(authorization: Bearer tg_...), allowed that model and within its quotas; `consul` "
        f"finds a healthy {AUTH_SERVICE} through --consul (consul:NAME for another name)",
    )
    allow_anonymous: bool = Field(
        False,
        description="without --auth, serve callers without keys (development only); the "
        "gateway refuses to start with neither",
    )
    auth_cache_seconds: Annotated[Duration, duration_between(0, 60)] = Field(
        5.0,
        description="how long a key the auth service vouched for is trusted without asking "
        "again; the auth service pushes revocations and rotations, so this bounds them only "
        "while that push is down (expiry is checked on every call)",
    )
    auth_outage_seconds: Annotated[Duration, duration_between(0, 3600)] = Field(
        60.0,
        description="with the auth service unreachable, a key it vouched for this recently "
        "keeps working (a revocation it could not push meanwhile waits that long); 0 refuses "
        "every call whose key is not fresh in the cache (UNAVAILABLE)",
    )
    data_dir: Path = Field(
        Path(".data/gateway"),
        description="where usage the auth service has not taken yet is kept (usage-spool/), "
        "so a gateway stopped during an auth outage loses none; the next gateway to start "
        "over the same directory sends it. Several gateways may share one",
    )
    redis_url: SecretStr = Field(
        SecretStr(""),
        description="redis://host:port/db for quota counters shared by every gateway; "
        "empty keeps them in this process",
    )
    quota_fail_open: bool = Field(
        False,
        description="with Redis unreachable, admit calls and count them in this process "
        "instead of refusing them (UNAVAILABLE)",
    )
    price_refresh_seconds: Annotated[Duration, duration_between(0.1, 3600)] = Field(
        30.0, description="how often to re-read model prices from the auth service"
    )
    refresh_seconds: Annotated[Duration, duration_between(0.1, 3600)] = Field(
        5.0,
        description="how often to re-read a static --workers list (workers found through "
        "Consul are followed as they change instead)",
    )
    eject_seconds: Duration = Field(
        10.0,
        description="how long a failing worker first gets no calls; each ejection in a row "
        "doubles it (up to --eject-max-seconds), and when it ends one trial call decides "
        "whether the worker is back (served: the backoff resets) or out again. Failing: it "
        "cannot be reached (UNAVAILABLE not from the worker itself), or "
        "--eject-after-failures answers of its own in a row say it is broken",
    )
    eject_max_seconds: Annotated[Duration, duration_between(0, 86400)] = Field(
        300.0,
        description="the longest an ejection lasts, however many in a row (never less "
        "than --eject-seconds)",
    )
    eject_after_failures: Annotated[int, int_between(1, 1000)] = Field(
        5,
        description="a worker that answers this many calls in a row itself with "
        "UNAVAILABLE, INTERNAL or UNKNOWN (its Triton is gone or failing) is ejected",
    )
    max_outstanding_per_worker: Annotated[int, int_between(1, 100_000)] = Field(
        64,
        description="the most calls of one model version this gateway has in flight on one "
        "worker (a stream counts until it ends); more wait in that model's queue",
    )
    queue_size: Annotated[int, int_between(0, 1_000_000)] = Field(
        256,
        description="the most calls waiting per model version for a worker slot; beyond it "
        "a call is refused at once (RESOURCE_EXHAUSTED with a retry-after); 0 queues none",
    )
    queue_seconds: Annotated[Duration, duration_between(0, 600)] = Field(
        2.0,
        description="the longest a call waits in its model's queue (never past its own "
        "deadline) before it is refused (RESOURCE_EXHAUSTED, retry after this long)",
    )
    upstream_timeout: PositiveDuration = Field(
        300.0, description="deadline for a forwarded call when the caller set none"
    )

    @field_validator("workers")
    @classmethod
    def _at_least_one_worker(cls, workers: tuple[str, ...]) -> tuple[str, ...]:
        if not workers:
            raise SettingsError("at least one worker address is needed (host:port,...)")
        if len(workers) > 1 and any(consul_service(w, "") is not None for w in workers):
            raise SettingsError("`consul` finds every worker: give it alone, not in a list")
        return workers

    @property
    def worker_service(self) -> str | None:
        """The Consul service the workers are found as, or None for a static list."""
        return consul_service(self.workers[0], WORKER_SERVICE) if self.workers else None

    @model_validator(mode="after")
    def _callers_are_known(self) -> GatewaySettings:
        if self.worker_service is not None and not self.consul:
            raise SettingsError(
                f"--workers {self.workers[0]}: set --consul, the agent that finds them"
            )
        if not self.auth and not self.allow_anonymous:
            raise SettingsError(
                "--auth: set the auth service's host:port, or --allow-anonymous to serve "
                "callers without API keys (development only)"
            )
        if self.auth and self.allow_anonymous:
            raise SettingsError("--allow-anonymous: not with --auth (keys are then required)")
        return self
