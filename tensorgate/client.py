"""GatewayClient: the asyncio client for the gateway's Generate, Infer and ListModels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType

import grpc
import numpy as np
import numpy.typing as npt

from tensorgate._exceptions import from_rpc_error
from tensorgate._tensors import from_tensor, to_tensor
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


class GatewayClient:
    """One channel to a gateway; use as `async with GatewayClient(address) as client`."""

    def __init__(self, address: str, *, api_key: str | None = None) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.InferenceGatewayStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Yields chunks as they are produced; the last has finish_reason and usage."""
        request = inference_pb2.GenerateRequest(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            top_k=top_k,
            stop=list(stop),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if not call.done():
                call.cancel()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        outputs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """One unary call; returns the outputs by name as numpy arrays."""
        request = inference_pb2.InferRequest(
            model=model,
            inputs=[to_tensor(name, value) for name, value in inputs.items()],
            outputs=list(outputs),
        )
        try:
            response = await self._stub.Infer(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return {tensor.name: from_tensor(tensor) for tensor in response.outputs}

    async def list_models(self, *, timeout: float | None = 10.0) -> list[inference_pb2.ModelInfo]:
        try:
            response = await self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return list(response.models)
