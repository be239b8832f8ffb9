"""GatewayClient: the blocking client, for scripts and code without an event loop."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

import grpc
import numpy as np
import numpy.typing as npt

from tensorgate._requests import (
    call_metadata,
    credentials,
    generate_request,
    infer_request,
)
from tensorgate.channel_options import CHANNEL_OPTIONS
from tensorgate.errors import from_rpc_error
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import from_tensor


class GatewayClient:
    """One channel to a gateway; use as `with GatewayClient(address) as client`.

    The same calls as `AsyncGatewayClient`, blocking. Failed calls raise `tensorgate.errors`.
    """

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = address
        creds = credentials(tls, root_certificates)
        self._channel = (
            grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
            if creds is not None
            else grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._stub = gateway_pb2_grpc.InferenceGatewayStub(self._channel)
        self._metadata = call_metadata(api_key)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
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
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Yields chunks as they arrive; closing the iterator early cancels the generation."""
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
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def infer(
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
            response = self._stub.Infer(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return {tensor.name: from_tensor(tensor) for tensor in response.outputs}

    def list_models(self, *, timeout: float | None = 10.0) -> list[inference_pb2.ModelInfo]:
        try:
            response = self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return list(response.models)
