"""What the gateway's Generate bills for a stream cut off at a chunk: every token the
caller was handed, counted before the handler waits at its yield.

The servicer's generator is driven the way the pipeline drives it (services/runtime/
pipeline.py): chunks are taken one at a time, then the stream is closed at its yield
(what grpc does when the caller cancels while a chunk is being sent), and the quota
reservation is released with what the handler noted.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tensorgate.inference.v1 import inference_pb2

from gateway.local_counters import InProcessCounters
from gateway.metrics import GatewayMetrics
from gateway.quota import QuotaGate, UsageRecord
from gateway.servicer import InferenceGatewayServicer
from services.runtime import calls
from services.runtime.calls import Principal
from tests.helpers import generate_call


class _UpstreamCall:
    """A worker's Generate call that streams the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        for raw in self._chunks:
            yield raw

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Worker:
    address = "worker-under-test"

    def __init__(self, chunks: list[bytes]) -> None:
        self.outstanding = 0
        self.call = _UpstreamCall(chunks)

    def generate(self, request: Any, *, timeout: float, metadata: Any) -> _UpstreamCall:
        return self.call

    on_trial = False

    def answered(self) -> None:
        pass


class _Slots:
    def release(self, worker: _Worker) -> None:
        pass


class _Pool:
    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    async def route(self, ref: Any, *, exclude: Any = None) -> tuple[_Worker, Any, _Slots]:
        return self._worker, inference_pb2.ModelInfo(name="tinylm", version=1), _Slots()

    def failed(self, worker: _Worker, code: Any, *, own: bool) -> None:
        raise AssertionError("no failure here")


class _Ledger:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


def _chunk(*tokens: int, final: bool = False) -> bytes:
    chunk = inference_pb2.GenerateChunk(text="x" * len(tokens), token_ids=tokens)
    if final:
        chunk.finish_reason = inference_pb2.FinishReason.Value("FINISH_REASON_LENGTH")
        chunk.usage.prompt_tokens = 4
        chunk.usage.completion_tokens = 5
    return chunk.SerializeToString()


async def _read_then_cancel(read: int) -> tuple[list[UsageRecord], bool]:
    """Reads `read` chunks of a stream of three, closes it at its yield as grpc does on
    a cancel, and releases the call's reservation as the pipeline then does."""
    worker = _Worker([_chunk(1, 2), _chunk(3, 4), _chunk(5, final=True)])
    servicer = InferenceGatewayServicer(
        _Pool(worker),  # type: ignore[arg-type]  # routes like a WorkerPool
        GatewayMetrics(),
        upstream_timeout=10.0,
    )
    call = generate_call(Principal(key_id="k1", tenant="acme"))
    calls.enter(call)
    ledger = _Ledger()
    gate = QuotaGate(InProcessCounters(), usage=ledger)
    request = inference_pb2.GenerateRequest(model="tinylm", prompt="abcd", max_tokens=5)
    reservation = await gate.reserve(call, request)
    assert reservation is not None
    responses = servicer.Generate(request, None)  # type: ignore[arg-type]  # unused there
    assert isinstance(responses, AsyncGenerator)
    for _ in range(read):
        await anext(responses)
    await responses.aclose()
    await reservation.release()
    return ledger.records, worker.call.cancelled


async def test_a_stream_cancelled_after_its_first_chunk_bills_that_chunk() -> None:
    records, upstream_cancelled = await _read_then_cancel(1)
    assert [(r.prompt_tokens, r.completion_tokens, r.errors) for r in records] == [(4, 2, 1)]
    assert upstream_cancelled  # the worker's call ends too


async def test_a_stream_cancelled_later_bills_every_chunk_read() -> None:
    records, _ = await _read_then_cancel(2)
    assert [(r.prompt_tokens, r.completion_tokens) for r in records] == [(4, 4)]
