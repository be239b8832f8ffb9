"""The one way services open gRPC channels: shared options, optional TLS, one per upstream.

A channel is long-lived and multiplexes every call to its upstream over one HTTP/2
connection; callers keep it for the life of the process rather than per call.
"""

from __future__ import annotations

import grpc
from tensorgate.channel_options import CHANNEL_OPTIONS


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to `address` (host:port): TLS when `credentials` are given, else plaintext."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=list(CHANNEL_OPTIONS))
    return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
