"""The gateway's own metrics beyond the per-RPC ones: what streams look like to callers,
and how its model queues fill (overload)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.runtime.metrics import ServiceMetrics

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("gateway")
        self.time_to_first_token = Histogram(
            "tensorgate_generate_time_to_first_token_seconds",
            "From the Generate call's arrival to its first chunk leaving the gateway",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "tensorgate_generate_completion_tokens_total",
            "Tokens streamed to callers",
            ["model"],
            registry=self.registry,
        )
        self.quota_give_backs_lost = Counter(
            "tensorgate_quota_give_backs_lost_total",
            "Quota settles and releases given up (the quota store failed every try, or "
            "too many waited): what they held stays reserved until its counters expire",
            registry=self.registry,
        )
        self.retries = Counter(
            "tensorgate_upstream_retries_total",
            "Calls retried on another worker after UNAVAILABLE",
            ["method"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tensorgate_gateway_queue_depth",
            "Calls waiting for a free worker slot, per model (every worker that has it is at "
            "--max-outstanding-per-worker)",
            ["model"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "tensorgate_gateway_queue_wait_seconds",
            "How long calls that had to wait for a worker slot waited before one was "
            "handed over (calls that found a free slot do not wait and are not counted)",
            ["model"],
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.overload_refusals = Counter(
            "tensorgate_gateway_overload_refusals_total",
            "Calls refused with RESOURCE_EXHAUSTED because every worker with the model was "
            "busy: reason queue_full (refused at once) or queue_timeout (waited "
            "--queue-seconds)",
            ["model", "reason"],
            registry=self.registry,
        )
