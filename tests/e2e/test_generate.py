"""Streamed generation through gateway -> worker -> real Triton."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tensorgate import AsyncGatewayClient
from tensorgate.inference.v1 import inference_pb2

PROMPT = "ROMEO:\nBut soft"
FINISHED = {
    inference_pb2.FINISH_REASON_LENGTH,
    inference_pb2.FINISH_REASON_STOP,
    inference_pb2.FINISH_REASON_EOS,
}


async def _collect(
    client: AsyncGatewayClient, prompt: str = PROMPT, **kwargs: object
) -> list[inference_pb2.GenerateChunk]:
    return [chunk async for chunk in client.generate("tinylm", prompt, **kwargs)]  # type: ignore[arg-type]


async def test_stream_usage_matches_what_was_streamed(client: AsyncGatewayClient) -> None:
    chunks = await _collect(client, max_tokens=48, temperature=0.8, seed=11)
    last = chunks[-1]
    assert last.finish_reason in FINISHED
    assert all(c.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert not any(c.HasField("usage") for c in chunks[:-1])
    streamed_tokens = sum(len(c.token_ids) for c in chunks)
    assert last.usage.completion_tokens == streamed_tokens
    assert last.usage.prompt_tokens == len(PROMPT.encode("utf-8"))
    if last.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
        assert streamed_tokens == 48
    else:
        assert streamed_tokens <= 48
    assert len(chunks) > 1, "tokens must stream one by one, not arrive in one message"
    assert {c.model for c in chunks} == {"tinylm:1"}


async def test_same_seed_same_text_other_seed_other_text(client: AsyncGatewayClient) -> None:
    def text(chunks: list[inference_pb2.GenerateChunk]) -> str:
        return "".join(c.text for c in chunks)

    first = text(await _collect(client, max_tokens=40, temperature=1.0, seed=123))
    again = text(await _collect(client, max_tokens=40, temperature=1.0, seed=123))
    other = text(await _collect(client, max_tokens=40, temperature=1.0, seed=124))
    assert first == again
    assert first != other


async def test_stop_sequence_ends_generation_without_the_stop_text(
    client: AsyncGatewayClient,
) -> None:
    greedy = await _collect(client, max_tokens=60, temperature=0.0)
    full = "".join(c.text for c in greedy)
    assert len(full) > 12
    stop = full[8:11]  # a stop string the greedy continuation is known to produce
    stopped = await _collect(client, max_tokens=60, temperature=0.0, stop=[stop])
    assert stopped[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert "".join(c.text for c in stopped) == full[: full.index(stop)]


async def test_explicit_version_and_sampling_filters(client: AsyncGatewayClient) -> None:
    chunks = [
        c
        async for c in client.generate(
            "tinylm:1", "First Citizen:", max_tokens=10, top_k=5, top_p=0.9, seed=1
        )
    ]
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert chunks[-1].model == "tinylm:1"


async def test_unary_infer_through_the_gateway(client: AsyncGatewayClient) -> None:
    rows = json.loads((Path(__file__).parents[2] / "models/examples/digits.json").read_text())
    outputs = await client.infer("digits", {"image": np.asarray(rows, dtype=np.float32)})
    assert outputs["label"].ravel().tolist() == [0, 1, 2, 3]


async def test_list_models_through_the_gateway(client: AsyncGatewayClient) -> None:
    names = {(m.name, m.version, m.task) for m in await client.list_models()}
    assert {("tinylm", 1, "generate"), ("digits", 1, "infer")} <= names
