"""The gRPC channel options every tensorgate channel uses, client or service.

One table for the SDK's channels to a gateway and the services' channels to each
other, so message limits and keepalive agree on every hop.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Big enough for image batches. Keepalive notices a dead peer on an idle channel
# and keeps long-lived connections open through middleboxes; tensorgate's servers
# permit pings at this rate, so neither side gets a GOAWAY for pinging.
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # grpc's default reconnect backoff grows to 120 s: a restarted peer would be
    # refused for up to two minutes after it is back. Seconds are enough here.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
