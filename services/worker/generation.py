"""Generation requests to Triton and Triton's streamed responses back to chunks.

A generate model is a decoupled Triton model with the inputs `prompt`,
`max_tokens`, `temperature`, `top_p`, `top_k`, optional `seed` and `stop`, and
with the outputs `text`, `token_ids`, `finish_reason`, `prompt_tokens` and
`completion_tokens` in every response (models/README.md has the contract).
Requests are checked here first so a caller hears which field is wrong.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence

from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import encode_bytes
from tritonclient.grpc import service_pb2

from services.runtime.errors import InvalidArgument
from services.worker.catalog import LoadedModel

FINISH_REASONS = {
    b"length": inference_pb2.FINISH_REASON_LENGTH,
    b"stop": inference_pb2.FINISH_REASON_STOP,
    b"eos": inference_pb2.FINISH_REASON_EOS,
    b"cancelled": inference_pb2.FINISH_REASON_CANCELLED,
}


def count_prompt_tokens(model: LoadedModel, prompt: str) -> int:
    if model.tokenizer == "bytes":
        return len(prompt.encode("utf-8"))
    # Unknown tokenizer: characters bound the tokens of any byte or sub-word scheme
    # from below only, so leave the exact check to the model.
    return 0


def check_generate(model: LoadedModel, request: inference_pb2.GenerateRequest) -> None:
    """Raises InvalidArgument naming the first bad field."""
    if model.info.task != "generate" or not model.decoupled:
        raise InvalidArgument(
            "model",
            f"{model.label} is a {model.info.task!r} model; "
            "call Infer for it, Generate needs a generate model",
        )
    if not request.prompt:
        raise InvalidArgument("prompt", "must not be empty")
    context = model.info.context_length
    prompt_tokens = count_prompt_tokens(model, request.prompt)
    if context and prompt_tokens >= context:
        raise InvalidArgument(
            "prompt",
            f"is {prompt_tokens} tokens; {model.label} has a context "
            f"of {context} tokens, so at most {context - 1} fit",
        )
    room = context - prompt_tokens if context else None
    if request.max_tokens < 1 or (room is not None and request.max_tokens > room):
        limit = f"between 1 and {room}" if room is not None else "at least 1"
        why = (
            f" (context {context} minus {prompt_tokens} prompt tokens)" if room is not None else ""
        )
        raise InvalidArgument("max_tokens", f"must be {limit}{why}, got {request.max_tokens}")
    if request.HasField("temperature") and not (
        math.isfinite(request.temperature) and request.temperature >= 0
    ):
        raise InvalidArgument("temperature", f"must be >= 0, got {request.temperature}")
    if request.HasField("top_p") and not 0 < request.top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 turns it off), got {request.top_k}")
    if len(request.stop) > model.max_stop_sequences:
        raise InvalidArgument(
            "stop",
            f"{model.label} takes at most {model.max_stop_sequences} sequences, "
            f"got {len(request.stop)}",
        )
    for stop in request.stop:
        if not 0 < len(stop) <= model.max_stop_length:
            raise InvalidArgument(
                "stop", f"each sequence must be 1..{model.max_stop_length} characters"
            )


def _scalar(request: service_pb2.ModelInferRequest, name: str, datatype: str, raw: bytes) -> None:
    entry = request.inputs.add()
    entry.name, entry.datatype = name, datatype
    entry.shape.append(1)
    request.raw_input_contents.append(raw)


def to_triton_stream_request(
    model: LoadedModel, request: inference_pb2.GenerateRequest
) -> service_pb2.ModelInferRequest:
    triton = service_pb2.ModelInferRequest(
        model_name=model.triton_name, model_version=model.triton_version
    )
    _scalar(triton, "prompt", "BYTES", encode_bytes([request.prompt.encode("utf-8")]))
    _scalar(triton, "max_tokens", "INT32", struct.pack("<i", request.max_tokens))
    temperature = request.temperature if request.HasField("temperature") else 1.0
    _scalar(triton, "temperature", "FP32", struct.pack("<f", temperature))
    top_p = request.top_p if request.HasField("top_p") else 1.0
    _scalar(triton, "top_p", "FP32", struct.pack("<f", top_p))
    _scalar(triton, "top_k", "INT32", struct.pack("<i", request.top_k))
    if request.HasField("seed"):
        _scalar(triton, "seed", "UINT64", struct.pack("<Q", request.seed))
    if request.stop:
        triton.inputs.add(name="stop", datatype="BYTES", shape=[len(request.stop)])
        triton.raw_input_contents.append(encode_bytes(s.encode("utf-8") for s in request.stop))
    return triton


def to_chunk(
    label: str, responses: Sequence[service_pb2.ModelInferResponse]
) -> inference_pb2.GenerateChunk:
    """Triton responses (one or more tokens, in order) as one chunk; finish reason and
    usage only when the last of them carries them.

    Runs once per chunk, so it reads the raw outputs directly (no numpy, no dicts
    of every output): a BYTES scalar is a 4-byte length and its bytes.
    """
    chunk = inference_pb2.GenerateChunk(model=label)
    texts: list[bytes] = []
    token_ids = chunk.token_ids
    finish = b""
    prompt_tokens = completion_tokens = 0
    for response in responses:
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
            name = output.name
            if name == "text":
                texts.append(raw[4:])
            elif name == "token_ids":
                if raw:
                    token_ids.extend(array("i", raw) if _LITTLE_ENDIAN else _int32s(raw))
            elif name == "finish_reason":
                finish = raw[4:]
            elif name == "prompt_tokens":
                prompt_tokens = _INT32.unpack_from(raw)[0] if raw else 0
            elif name == "completion_tokens":
                completion_tokens = _INT32.unpack_from(raw)[0] if raw else 0
    text = b"".join(texts)
    if text:
        # Joined before decoding: a character may be split across two tokens.
        chunk.text = text.decode("utf-8", errors="replace")
    if finish:
        chunk.finish_reason = FINISH_REASONS.get(finish, inference_pb2.FINISH_REASON_UNSPECIFIED)
        chunk.usage.prompt_tokens = prompt_tokens
        chunk.usage.completion_tokens = completion_tokens
    return chunk


_INT32 = struct.Struct("<i")
_LITTLE_ENDIAN = sys.byteorder == "little"


def _int32s(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 4}i", raw))
