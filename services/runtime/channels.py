"""The one way services open gRPC channels: shared options, optional TLS, one per upstream.

A channel is long-lived and multiplexes every call to its upstream over one HTTP/2
connection; callers keep it for the life of the process rather than per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Big enough for image batches. Keepalive notices a dead peer on an idle channel
# and keeps long-lived connections open through middleboxes; the servers permit
# pings at this rate (server.py), so neither side gets a GOAWAY for pinging.
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to `address` (host:port): TLS when `credentials` are given, else plaintext."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=list(CHANNEL_OPTIONS))
    return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
