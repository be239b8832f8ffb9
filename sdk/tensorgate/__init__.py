"""tensorgate's Python SDK: gateway clients (asyncio and blocking), the model registry's
and the auth service's clients, typed errors, tensors.

    async with AsyncGatewayClient("127.0.0.1:50051", api_key=key) as client:
        async for chunk in client.generate("tinylm", "ROMEO:", max_tokens=64):
            print(chunk.text, end="")

It depends only on the generated contract (tensorgate.<service>.v1, from protos/)
and on grpcio, protobuf and numpy. Stubs for other languages come from the same protos.
"""

from typing import TYPE_CHECKING, Any

from tensorgate.errors import (
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorgateClientError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.tensors import from_tensor, to_tensor

if TYPE_CHECKING:
    from tensorgate.aio import AsyncGatewayClient
    from tensorgate.auth_client import AsyncAuthClient
    from tensorgate.client import GatewayClient
    from tensorgate.registry_client import AsyncRegistryClient


def __getattr__(name: str) -> Any:
    # The clients load on first use: the services import the contract helpers
    # (tensorgate.errors, .tensors, .model_ref), which runs this file, and must
    # not carry the client code along.
    if name == "AsyncGatewayClient":
        from tensorgate.aio import AsyncGatewayClient

        return AsyncGatewayClient
    if name == "GatewayClient":
        from tensorgate.client import GatewayClient

        return GatewayClient
    if name == "AsyncRegistryClient":
        from tensorgate.registry_client import AsyncRegistryClient

        return AsyncRegistryClient
    if name == "AsyncAuthClient":
        from tensorgate.auth_client import AsyncAuthClient

        return AsyncAuthClient
    raise AttributeError(f"module 'tensorgate' has no attribute {name!r}")


__all__ = [
    "AlreadyExistsError",
    "AsyncAuthClient",
    "AsyncGatewayClient",
    "AsyncRegistryClient",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GatewayClient",
    "InternalError",
    "InvalidArgumentError",
    "InvalidModelRef",
    "ModelRef",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TensorgateClientError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_tensor",
    "to_tensor",
]
