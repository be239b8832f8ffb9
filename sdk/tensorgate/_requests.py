"""What the async and the sync client share: channel options, credentials, request building."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy.typing as npt

from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import to_tensor


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (the system's roots unless a CA is given), else None."""
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate_request(
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    stop: Sequence[str],
    seed: int | None,
) -> inference_pb2.GenerateRequest:
    if isinstance(stop, str):  # one stop sequence, not one per character
        stop = (stop,)
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        top_k=top_k,
        stop=list(stop),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def infer_request(
    model: str, inputs: Mapping[str, npt.ArrayLike], outputs: Sequence[str]
) -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(
        model=model,
        inputs=[to_tensor(name, value) for name, value in inputs.items()],
        outputs=list(outputs),
    )
