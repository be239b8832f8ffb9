"""KServe v2 calls as the gateway reads them: model references, what a stream request
reserves and what its responses counted, the renaming of a response's bytes, and
statistics added up over workers."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-not-found]
from tritonclient.grpc import service_pb2

from gateway.kserve_quota import StreamMeter, generate_bound, response_usage
from gateway.kserve_statistics import merged
from gateway.local_counters import InProcessCounters
from gateway.quota import Price, QuotaGate, UsageRecord
from services.runtime.calls import Call, Limits, Principal, Usage
from services.runtime.errors import InvalidArgument
from services.runtime.kserve import ResponseNames, model_ref


@pytest.mark.parametrize(
    ("name", "version", "ref"),
    [
        ("digits", "", "digits"),
        ("digits", "3", "digits:3"),
        ("digits@production", "", "digits@production"),
    ],
)
def test_model_refs(name: str, version: str, ref: str) -> None:
    assert model_ref(name, version) == ref


@pytest.mark.parametrize(
    ("name", "version", "field"),
    [
        ("", "", "model_name"),
        ("digits", "0", "model_version"),
        ("digits", "x", "model_version"),
        ("digits", "-1", "model_version"),
        ("digits", "1" * 19, "model_version"),
        ("digits", "²", "model_version"),  # a digit to str.isdigit, not to int()
        ("digits", "٣", "model_version"),
        ("digits@production", "2", "model_version"),
        ("digits:2", "2", "model_version"),
    ],
)
def test_bad_model_refs(name: str, version: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        model_ref(name, version)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.violations[0].field == field


def _generate(prompt: bytes, max_tokens: int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="tinylm")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(prompt)) + prompt)
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    request.raw_input_contents.append(struct.pack("<i", max_tokens))
    return request


def test_a_generate_request_reserves_its_prompt_bytes_and_max_tokens() -> None:
    bound = generate_bound(_generate("héllo".encode(), 40), "tinylm@production")
    assert bound.model == "tinylm@production"
    assert len(bound.prompt.encode()) == len("héllo".encode())  # 6 bytes, 5 characters
    assert bound.max_tokens == 40


def test_typed_contents_are_read_too() -> None:
    request = service_pb2.ModelInferRequest(model_name="tinylm")
    prompt = request.inputs.add(name="prompt", datatype="BYTES", shape=[2])
    prompt.contents.bytes_contents.extend([b"abc", b"de"])
    limit = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    limit.contents.int_contents.append(7)
    bound = generate_bound(request, "tinylm")
    assert (len(bound.prompt), bound.max_tokens) == (5, 7)


def test_other_models_reserve_a_stream_and_no_tokens() -> None:
    request = service_pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(struct.pack("<f", 1.0))
    bound = generate_bound(request, "echo")
    assert (bound.prompt, bound.max_tokens) == ("", 0)


def test_negative_max_tokens_reserve_none() -> None:
    assert generate_bound(_generate(b"x", -5), "tinylm").max_tokens == 0


def test_usage_is_read_from_the_generate_outputs() -> None:
    response = service_pb2.ModelInferResponse()
    for name, value in (("token_ids", 9), ("prompt_tokens", 6), ("completion_tokens", 12)):
        response.outputs.add(name=name, datatype="INT32", shape=[1])
        response.raw_output_contents.append(struct.pack("<i", value))
    assert response_usage(response) == Usage(prompt_tokens=6, completion_tokens=12)
    assert response_usage(service_pb2.ModelInferResponse()) is None


async def test_a_generate_request_naming_its_outputs_is_given_the_usage_outputs() -> None:
    request = _generate(b"ROMEO:", 8)
    request.outputs.add(name="token_ids")
    request.outputs.add(name="prompt_tokens").parameters["classification"].int64_param = 1
    await StreamMeter(None, None).reserve(request, "tinylm")
    assert [o.name for o in request.outputs] == ["token_ids", "prompt_tokens", "completion_tokens"]
    assert not any(o.parameters for o in request.outputs)
    # Asking for every output (none named) stays as it was.
    every = _generate(b"ROMEO:", 8)
    await StreamMeter(None, None).reserve(every, "tinylm")
    assert not every.outputs


def test_usage_outputs_of_another_type_are_not_read() -> None:
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="completion_tokens", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(struct.pack("<I", 1) + b"1")
    assert response_usage(response) is None


def test_appended_names_replace_the_response_names() -> None:
    triton = service_pb2.ModelInferResponse(model_name="digits__v3", model_version="1", id="r1")
    triton.outputs.add(name="label", datatype="INT64", shape=[1])
    triton.raw_output_contents.append(struct.pack("<q", 7))
    names = ResponseNames("digits", "3")
    renamed = service_pb2.ModelInferResponse.FromString(triton.SerializeToString() + names.infer)
    assert (renamed.model_name, renamed.model_version, renamed.id) == ("digits", "3", "r1")
    assert renamed.raw_output_contents == triton.raw_output_contents


@pytest.mark.parametrize("error", ["", "tinylm: max_tokens must be between 1 and 250"])
def test_a_stream_response_is_renamed_inside_its_one_infer_response(error: str) -> None:
    triton = service_pb2.ModelInferResponse(model_name="tinylm__v1", model_version="1", id="r1")
    triton.parameters["triton_final_response"].bool_param = True
    triton.outputs.add(name="token_ids", datatype="INT32", shape=[300])
    triton.raw_output_contents.append(b"\x01" * 1200)  # a payload longer than 127 bytes
    streamed = service_pb2.ModelStreamInferResponse(error_message=error, infer_response=triton)
    renamed = ResponseNames("tinylm", "1").rename_stream(streamed.SerializeToString())

    # One infer_response field: a parser that replaces a repeated message field rather
    # than merging it (protobufjs) reads the same as one that merges.
    fields = UnknownFieldSet(empty_pb2.Empty.FromString(renamed))
    (field,) = [f for f in fields if f.field_number == 2]
    inner = service_pb2.ModelInferResponse.FromString(field.data)
    assert (inner.model_name, inner.model_version, inner.id) == ("tinylm", "1", "r1")
    assert inner.parameters["triton_final_response"].bool_param
    assert inner.raw_output_contents == triton.raw_output_contents
    assert service_pb2.ModelStreamInferResponse.FromString(renamed).error_message == error


def test_a_stream_error_with_no_infer_response_gets_the_names() -> None:
    streamed = service_pb2.ModelStreamInferResponse(error_message="refused")
    renamed = ResponseNames("tinylm", "1").rename_stream(streamed.SerializeToString())
    parsed = service_pb2.ModelStreamInferResponse.FromString(renamed)
    assert (parsed.error_message, parsed.infer_response.model_name) == ("refused", "tinylm")


def _stats(name: str, version: str, count: int, ns: int, last: int) -> service_pb2.ModelStatistics:
    stats = service_pb2.ModelStatistics(
        name=name, version=version, inference_count=count, execution_count=count
    )
    stats.last_inference = last
    stats.inference_stats.success.count = count
    stats.inference_stats.success.ns = ns
    batch = stats.batch_stats.add(batch_size=1)
    batch.compute_infer.count = count
    stats.response_stats["0"].success.count = count
    return stats


def test_statistics_add_up_over_workers() -> None:
    one = service_pb2.ModelStatisticsResponse(
        model_stats=[_stats("digits", "1", 3, 300, 10), _stats("tinylm", "1", 1, 5, 7)]
    )
    two = service_pb2.ModelStatisticsResponse(model_stats=[_stats("digits", "1", 2, 50, 4)])
    total = merged([one, two])
    by_name = {s.name: s for s in total.model_stats}
    digits = by_name["digits"]
    assert (digits.version, digits.inference_count, digits.execution_count) == ("1", 5, 5)
    assert (digits.inference_stats.success.count, digits.inference_stats.success.ns) == (5, 350)
    assert digits.last_inference == 10  # the latest, not a sum
    assert [(b.batch_size, b.compute_infer.count) for b in digits.batch_stats] == [(1, 5)]
    assert digits.response_stats["0"].success.count == 5
    assert by_name["tinylm"].inference_count == 1


def _streamed(request_id: str, *, final: bool, prompt: int, completion: int) -> Any:
    message = service_pb2.ModelStreamInferResponse()
    response = message.infer_response
    response.id = request_id
    response.parameters["triton_final_response"].bool_param = final
    for name, value in (("prompt_tokens", prompt), ("completion_tokens", completion)):
        response.outputs.add(name=name, datatype="INT32", shape=[1])
        response.raw_output_contents.append(struct.pack("<i", value))
    return message


async def test_a_stream_meter_counts_finished_and_cut_requests() -> None:
    meter = StreamMeter(None, None)
    for request_id in ("a", "b"):
        request = _generate(b"ROMEO:", 8)
        request.id = request_id
        await meter.reserve(request, "tinylm")
    # Responses name their request: b's first token, then a's last response.
    assert not await meter.responded(_streamed("b", final=False, prompt=6, completion=1))
    assert await meter.responded(_streamed("a", final=True, prompt=6, completion=8))
    assert (meter.prompt_tokens, meter.completion_tokens) == (6, 8)
    await meter.release()  # the stream was cut: b's one token counts
    assert (meter.prompt_tokens, meter.completion_tokens) == (12, 9)


class _Ledger:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


async def test_a_stream_request_is_billed_the_compute_from_its_own_start() -> None:
    # A stream open for 100 s whose request just came: billed its own moment, not 100 s.
    ledger = _Ledger()
    gate = QuotaGate(InProcessCounters(), usage=ledger, prices=lambda model: Price(0, 0, 1.0))
    who = Principal(key_id="k1", tenant="acme", key_limits=Limits(requests_per_minute=100))
    call = Call(
        method="/inference.GRPCInferenceService/ModelStreamInfer",
        request_id="r1",
        started=time.perf_counter() - 100,
        deadline=None,
        peer="test",
        metadata=(),
        principal=who,
        fields={"resolved": "tinylm:1"},
    )
    meter = StreamMeter(gate, call)
    await meter.reserve(_generate(b"ROMEO:", 8), "tinylm")
    assert await meter.responded(_streamed("", final=True, prompt=6, completion=8))
    (record,) = ledger.records
    assert (record.prompt_tokens, record.completion_tokens) == (6, 8)
    assert record.compute_seconds < 10
    assert record.cost < 10


class _SlowGate:
    """A counter store in another process: the reservation comes after a round trip."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.released = 0

    async def reserve(self, call: Call, request: object, *, started: float) -> Any:
        await self.answer.wait()
        gate = self

        class Reservation:
            async def release(self) -> None:
                gate.released += 1

        return Reservation()


async def test_a_reservation_granted_after_the_stream_was_cut_is_given_back() -> None:
    gate = _SlowGate()
    meter = StreamMeter(gate, object())  # type: ignore[arg-type]
    reserving = asyncio.ensure_future(meter.reserve(_generate(b"ROMEO:", 8), "tinylm"))
    await asyncio.sleep(0)
    reserving.cancel()  # the stream ended while the counters were asked
    with pytest.raises(asyncio.CancelledError):
        await reserving
    await meter.release()  # nothing pending yet
    gate.answer.set()  # ...and then they granted it
    for _ in range(5):
        await asyncio.sleep(0)
    assert gate.released == 1
