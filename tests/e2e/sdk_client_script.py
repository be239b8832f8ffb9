"""Both SDK clients against a running gateway, as a user who installed only the SDK runs them.

test_sdk_install.py runs this with the python of a fresh virtual environment holding
nothing but `pip install ./sdk`, isolated (`-I`) so that the repository is not on sys.path:

    python -I sdk_client_script.py GATEWAY_ADDRESS IMAGES_JSON

It prints one JSON object: what each client saw (stream, labels, models, typed errors).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorgate
from tensorgate import AsyncGatewayClient, GatewayClient, TensorgateClientError
from tensorgate.inference.v1 import inference_pb2

PROMPT = "ROMEO:"
MAX_TOKENS = 12
UNKNOWN_MODEL = "no-such-model"


def stream_summary(chunks: Iterable[inference_pb2.GenerateChunk]) -> dict[str, Any]:
    received = list(chunks)
    last = received[-1]
    return {
        "chunks": len(received),
        "tokens": sum(len(chunk.token_ids) for chunk in received),
        "finish_reason": inference_pb2.FinishReason.Name(last.finish_reason),
        "prompt_tokens": last.usage.prompt_tokens,
        "completion_tokens": last.usage.completion_tokens,
    }


def error_summary(exc: TensorgateClientError) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "code": exc.code.name,
        "request_id": exc.request_id,
        "violations": [list(pair) for pair in getattr(exc, "violations", ())],
    }


async def async_error(call: Awaitable[object]) -> dict[str, Any] | None:
    try:
        await call
    except TensorgateClientError as exc:
        return error_summary(exc)
    return None


def sync_error(call: Callable[[], object]) -> dict[str, Any] | None:
    try:
        call()
    except TensorgateClientError as exc:
        return error_summary(exc)
    return None


async def drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def with_async_client(address: str, images: npt.NDArray[np.float32]) -> dict[str, Any]:
    async with AsyncGatewayClient(address) as client:
        stream = stream_summary(
            [c async for c in client.generate("tinylm", PROMPT, max_tokens=MAX_TOKENS, seed=1)]
        )
        labels = (await client.infer("digits", {"image": images}))["label"]
        models = await client.list_models()
        unknown = await async_error(client.infer(UNKNOWN_MODEL, {"image": images}))
        no_tokens = await async_error(drain(client.generate("tinylm", PROMPT, max_tokens=0)))
    return {
        "generate": stream,
        "labels": labels.ravel().tolist(),
        "models": sorted(model.name for model in models),
        "unknown_model": unknown,
        "max_tokens_0": no_tokens,
    }


def with_sync_client(address: str, images: npt.NDArray[np.float32]) -> dict[str, Any]:
    with GatewayClient(address) as client:
        stream = stream_summary(client.generate("tinylm", PROMPT, max_tokens=MAX_TOKENS, seed=1))
        labels = client.infer("digits", {"image": images})["label"]
        models = client.list_models()
        unknown = sync_error(lambda: client.infer(UNKNOWN_MODEL, {"image": images}))
        no_tokens = sync_error(lambda: list(client.generate("tinylm", PROMPT, max_tokens=0)))
    return {
        "generate": stream,
        "labels": labels.ravel().tolist(),
        "models": sorted(model.name for model in models),
        "unknown_model": unknown,
        "max_tokens_0": no_tokens,
    }


def main() -> None:
    address, images_json = sys.argv[1:]
    images = np.asarray(json.loads(Path(images_json).read_text()), dtype=np.float32)
    results = {
        "sdk_file": tensorgate.__file__,
        "async": asyncio.run(with_async_client(address, images)),
        "sync": with_sync_client(address, images),
        "modules": sorted({name.partition(".")[0] for name in sys.modules}),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
