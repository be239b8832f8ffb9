"""Quota for the KServe v2 calls: metered as the platform's own Infer and Generate are.

The quota stage (gateway/quota.py) knows the platform's requests. A KServe ModelInfer
is metered as the Infer it stands for (one request, the key's model scope checked
first): the gate is told so (`metered_infer`), so that happens before the handler, as
for Infer, and the platform's own calls pay nothing for it. A ModelStreamInfer
stream's requests arrive after the stage ran (a client stream): its handler reserves
each one as it comes (`StreamMeter`), as the Generate it stands for: one request, a
stream slot, and for a model with the generate contract's inputs (`prompt`,
`max_tokens`: models/README.md) the same bound on its tokens; each is settled with what
its responses counted (the contract's `prompt_tokens` and `completion_tokens` outputs,
which such a request always asks for).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque

import structlog
from tensorgate.inference.v1 import inference_pb2
from tensorgate.key_shape import redact_keys
from tritonclient.grpc import service_pb2

from gateway.quota import QuotaGate, QuotaReservation
from services.runtime import calls
from services.runtime.calls import Call, Usage
from services.runtime.kserve import model_ref

log = structlog.get_logger("tensorgate.gateway.kserve")

_MODEL_INFER = service_pb2.ModelInferRequest
_INT32 = struct.Struct("<i")
_USAGE_OUTPUTS = ("prompt_tokens", "completion_tokens")


def note_model(name: str) -> None:
    """The model a KServe call names, on its log line: bounded and never a key's secret."""
    calls.note(model=redact_keys(name[:256])[:128])


def metered_infer(request: service_pb2.ModelInferRequest) -> inference_pb2.InferRequest:
    """The Infer a ModelInfer stands for, as the quota gate meters it (`QuotaGate.meter_as`);
    notes the model it names on the call's log line."""
    note_model(request.model_name)
    return inference_pb2.InferRequest(model=model_ref(request.model_name, request.model_version))


def _input(request: service_pb2.ModelInferRequest, name: str) -> tuple[int, bytes | None]:
    """The index of input `name` and its raw bytes (None: sent as typed contents)."""
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            raw = request.raw_input_contents
            return index, raw[index] if index < len(raw) else None
    return -1, None


def generate_bound(
    request: service_pb2.ModelInferRequest, ref: str
) -> inference_pb2.GenerateRequest:
    """The Generate a stream request stands for, as the quota gate bounds it: only the
    prompt's UTF-8 length counts there, so a stand-in of that length is given, not the
    prompt (which is not decoded). No generate inputs: a stream slot and no tokens."""
    bound = inference_pb2.GenerateRequest(model=ref)
    index, raw = _input(request, "prompt")
    if index >= 0:
        if raw is not None:
            # BYTES elements, each after its 4-byte length: the prompt's bytes.
            count = 1
            for size in request.inputs[index].shape:
                count *= max(size, 0)
            prompt_bytes = max(len(raw) - 4 * count, 0)
        else:
            prompt_bytes = sum(len(b) for b in request.inputs[index].contents.bytes_contents)
        bound.prompt = "x" * prompt_bytes
    index, raw = _input(request, "max_tokens")
    if index >= 0:
        if raw is not None and len(raw) >= 4:
            bound.max_tokens = max(_INT32.unpack_from(raw)[0], 0)
        elif raw is None and request.inputs[index].contents.int_contents:
            bound.max_tokens = max(request.inputs[index].contents.int_contents[0], 0)
    return bound


def ask_usage(request: service_pb2.ModelInferRequest) -> None:
    """A generate request that names the outputs it wants is also given the usage
    outputs, as they are (no parameters such as `classification`): its tokens are counted
    from them, so leaving them out must not leave the tokens uncounted."""
    if not request.outputs:
        return  # every output comes back
    for index in reversed(range(len(request.outputs))):
        if request.outputs[index].name in _USAGE_OUTPUTS:
            del request.outputs[index]
    for name in _USAGE_OUTPUTS:
        request.outputs.add(name=name)


def response_usage(response: service_pb2.ModelInferResponse) -> Usage | None:
    """The generate contract's token counts in a response, if it carries them."""
    usage: Usage | None = None
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        if output.name in _USAGE_OUTPUTS and output.datatype == "INT32" and len(raw) >= 4:
            usage = usage or Usage()
            setattr(usage, output.name, _INT32.unpack_from(raw)[0])
    return usage


class _Pending:
    __slots__ = ("id", "reservation", "usage")

    def __init__(self, request_id: str, reservation: QuotaReservation | None) -> None:
        self.id = request_id
        self.reservation = reservation
        self.usage: Usage | None = None


class StreamMeter:
    """The reservations of one stream's requests, each settled by its final response
    (matched by the request's `id`; with none, or an unknown one, the oldest)."""

    def __init__(self, gate: QuotaGate | None, call: Call | None) -> None:
        self._gate = gate
        self._call = call
        self._pending: deque[_Pending] = deque()
        self._giving_back: set[asyncio.Future[None]] = set()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def reserve(self, request: service_pb2.ModelInferRequest, ref: str) -> None:
        """Reserves what `request` may use; raises ResourceExhausted when over a quota.
        A generate request is made to ask for the usage outputs (`ask_usage`)."""
        if _input(request, "prompt")[0] >= 0:
            ask_usage(request)
        reservation = None
        if self._gate is not None and self._call is not None:
            # A request's compute runs from now, not from when the stream opened.
            reserving = asyncio.ensure_future(
                self._gate.reserve(
                    self._call, generate_bound(request, ref), started=time.perf_counter()
                )
            )
            try:
                # Shielded: a stream cut while a counter store in another process is asked
                # would otherwise lose what it reserved, held until it expires.
                reservation = await asyncio.shield(reserving)
            except asyncio.CancelledError:
                reserving.add_done_callback(self._give_back)
                raise
        self._pending.append(_Pending(request.id, reservation))

    def _give_back(self, reserving: asyncio.Future[QuotaReservation | None]) -> None:
        """Releases what a reservation the stream stopped waiting for got."""
        if reserving.cancelled() or reserving.exception() is not None:
            return
        reservation = reserving.result()
        if reservation is not None:
            releasing = asyncio.ensure_future(reservation.release())
            self._giving_back.add(releasing)
            releasing.add_done_callback(self._given_back)

    def _given_back(self, releasing: asyncio.Future[None]) -> None:
        self._giving_back.discard(releasing)
        if not releasing.cancelled() and releasing.exception() is not None:
            log.warning("quota release failed", error=repr(releasing.exception()))

    def _find(self, request_id: str) -> _Pending | None:
        for pending in self._pending:
            if pending.id == request_id:
                return pending
        return self._pending[0] if self._pending else None

    async def responded(self, response: service_pb2.ModelStreamInferResponse) -> bool:
        """Takes one streamed response; True when it was a request's final one."""
        infer = response.infer_response
        pending = self._find(infer.id)
        if pending is None:
            return False
        usage = response_usage(infer)
        if usage is not None:
            pending.usage = usage
        # A decoupled model flags its last response; any other answers each request once.
        flag = infer.parameters.get("triton_final_response")
        if flag is not None and not flag.bool_param and not response.error_message:
            return False
        self._pending.remove(pending)
        await self._settle(pending, pending.usage or Usage())
        return True

    async def _settle(self, pending: _Pending, used: Usage) -> None:
        self.prompt_tokens += used.prompt_tokens
        self.completion_tokens += used.completion_tokens
        if pending.reservation is not None:
            await pending.reservation.settle(used)

    async def release(self) -> None:
        """The stream ended: what its unanswered requests reserved is given back, and
        the tokens they had produced (a cancelled generation's) are counted."""
        while self._pending:
            pending = self._pending.popleft()
            if pending.usage is not None:
                await self._settle(pending, pending.usage)
            elif pending.reservation is not None:
                await pending.reservation.release()
