"""tensorgate's Python SDK: an asyncio client for the gateway, plus the generated stubs.

    async with GatewayClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("tinylm", "ROMEO:", max_tokens=64):
            print(chunk.text, end="")

Stubs for other languages come from the same protos/ (package tensorgate.*.v1).
"""

from tensorgate._exceptions import TensorgateClientError
from tensorgate._tensors import from_tensor, to_tensor
from tensorgate.client import GatewayClient

__all__ = ["GatewayClient", "TensorgateClientError", "from_tensor", "to_tensor"]
