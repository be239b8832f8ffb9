"""A bare pass-through hop: the floor every Python hop is measured against.

`python -m bench.bare_hop --port P --upstream host:port` serves KServe v2's
`ModelInfer` and `ModelStreamInfer` with a grpc.aio generic handler that forwards
the raw request bytes to `upstream` over one long-lived channel and passes the
raw response bytes back. No interceptor, no parsing, no logging: what is left
is what grpc.aio itself costs, so a real hop's CPU and latency can be read
against it. It runs as its own process so the bench can read its CPU from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tensorgate.channel_options import MAX_MESSAGE_BYTES

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"

# The same limits the services use, so large tensors fail alike on every path;
# SO_REUSEPORT off so a taken port is an error rather than a shared one.
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = [*OPTIONS, ("grpc.so_reuseport", 0)]

Context = grpc.aio.ServicerContext[bytes, bytes]


def forwarding_handler(upstream: grpc.aio.Channel) -> grpc.GenericRpcHandler[bytes, bytes]:
    """Handlers that pass bytes through: no (de)serializer on either side."""
    infer = upstream.unary_unary(INFER, request_serializer=None, response_deserializer=None)
    stream_infer = upstream.stream_stream(
        STREAM_INFER, request_serializer=None, response_deserializer=None
    )

    async def model_infer(request: bytes, context: Context) -> bytes:
        try:
            response: bytes = await infer(request)
        except grpc.aio.AioRpcError as exc:
            # Only on failure: upstream's status goes back as it came, not as UNKNOWN.
            await context.abort(exc.code(), exc.details() or "")
        return response

    async def model_stream_infer(
        requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        # The caller's request stream is handed on as it is; cancelling this
        # handler cancels the upstream call with it.
        call: Any = stream_infer(requests)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                model_infer, request_deserializer=None, response_serializer=None
            ),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                model_stream_infer, request_deserializer=None, response_serializer=None
            ),
        },
    )


async def serve(port: int, upstream: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    async with grpc.aio.insecure_channel(upstream, options=OPTIONS) as channel:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((forwarding_handler(channel),))
        if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
            raise SystemExit(f"bare hop: cannot listen on 127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_hop", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
