"""AsyncGatewayClient: the asyncio client for the gateway's Generate, Infer and ListModels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import numpy as np
import numpy.typing as npt

from tensorgate._channel import AsyncChannelClient
from tensorgate._requests import (
    call_metadata,
    credentials,
    generate_request,
    infer_request,
)
from tensorgate.errors import from_rpc_error
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import from_tensor


class AsyncGatewayClient(AsyncChannelClient):
    """One channel to a gateway; use as `async with AsyncGatewayClient(address) as client`.

    `api_key` travels as `authorization: Bearer ...`; `tls=True` (or a CA in
    `root_certificates`) connects over TLS. Failed calls raise `tensorgate.errors`.
    """

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        super().__init__(
            address,
            credentials=credentials(tls, root_certificates),
            metadata=call_metadata(api_key),
        )
        self._stub = gateway_pb2_grpc.InferenceGatewayStub(self._channel)

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
        """Yields chunks as they are produced; the last has finish_reason and usage.

        Leaving the loop early cancels the generation (on the model too).
        """
        request = generate_request(
            model,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
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
        request = infer_request(model, inputs, outputs)
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
