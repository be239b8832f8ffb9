"""Triton Python-backend model `nocompute`: streams tokens without computing any.

The bench's yardstick for streaming: with no model in the way, tokens/s and CPU per
token measure the serving path itself (Triton's Python backend, gRPC, each hop).
It keeps tinylm's contract (models/README.md), so the worker serves it through
Generate unchanged: the same inputs, validated the same way, and every response
carries text, token_ids, finish_reason, prompt_tokens and completion_tokens.

The "generated" text is the letters a-z and a space, over and over, one byte token
per response; the last response has the FINAL flag and the finish reason ("length",
"stop" or "cancelled"; never "eos"). Sampling inputs are checked but change nothing.
Stop strings work as in tinylm (neither the stop string nor anything after it is
sent); the text is known in advance, so the stop point is found before the first
token rather than by holding text back.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ALPHABET = b"abcdefghijklmnopqrstuvwxyz "
# Asking whether a request was cancelled is a round trip from the stub to Triton,
# dearer than sending a token; every 16th token bounds what a cancelled stream
# still sends while keeping the check out of the per-token cost.
CANCEL_CHECK_EVERY = 16


class RequestError(ValueError):
    """A request the model refuses; the message names the field."""


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {values.size})")
    return values[0]


def _array(value: Any, dtype: Any) -> Any:
    return np.array([value], dtype=dtype)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.context_length = int(params["context_length"])
        # The worker reads the same two parameters to check requests before they come here.
        self.max_stop_sequences = int(params["max_stop_sequences"])
        self.max_stop_length = int(params["max_stop_length"])
        self.pool = ThreadPoolExecutor(
            max_workers=int(params.get("max_concurrency", "16")), thread_name_prefix="nocompute"
        )
        # Every array a response can hold is built here once: a token then costs
        # only the response objects and the send.
        self.texts = [_array(bytes([b]), np.object_) for b in ALPHABET]
        self.ids = [_array(b, np.int32) for b in ALPHABET]
        self.no_text = _array(b"", np.object_)
        self.no_ids = np.zeros(0, dtype=np.int32)
        self.finish = {
            r: _array(r.encode(), np.object_) for r in ("", "length", "stop", "cancelled")
        }

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.pool.submit(self._serve, request)

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)

    def _response(
        self, token: int | None, shown: bool, finish: str, prompt: Any, completion: int
    ) -> Any:
        text = self.texts[token] if token is not None and shown else self.no_text
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("text", text),
                pb_utils.Tensor("token_ids", self.ids[token] if token is not None else self.no_ids),
                pb_utils.Tensor("finish_reason", self.finish[finish]),
                pb_utils.Tensor("prompt_tokens", prompt),
                pb_utils.Tensor("completion_tokens", _array(completion, np.int32)),
            ]
        )

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            try:
                prompt_tokens, max_tokens, stops = self._params(request)
            except RequestError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                return
            self._stream(request, sender, prompt_tokens, max_tokens, stops)
        except Exception as exc:  # any failure must still end the stream
            if request.is_cancelled():
                return  # a send fails once the client has gone: that is a cancellation
            pb_utils.Logger.log_error(f"nocompute: stream failed: {exc!r}")
            try:
                error = pb_utils.TritonError(f"nocompute: internal error: {exc}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            except Exception:  # the final flag may already be sent
                pass

    def _params(self, request: Any) -> tuple[int, int, list[bytes]]:
        prompt = _scalar(request, "prompt")
        prompt = prompt if isinstance(prompt, bytes) else str(prompt).encode("utf-8")
        if not prompt:
            raise RequestError("prompt must not be empty")
        if len(prompt) >= self.context_length:
            raise RequestError(
                f"prompt must be shorter than the context of {self.context_length} tokens "
                f"(got {len(prompt)} UTF-8 bytes)"
            )
        max_tokens = int(_scalar(request, "max_tokens"))
        limit = self.context_length - len(prompt)
        if not 1 <= max_tokens <= limit:
            raise RequestError(
                f"max_tokens must be between 1 and {self.context_length} - prompt_tokens "
                f"= {limit} (got {max_tokens})"
            )
        temperature = float(_scalar(request, "temperature"))
        if not temperature >= 0 or math.isinf(temperature):
            raise RequestError(f"temperature must be a finite number >= 0 (got {temperature})")
        top_p = float(_scalar(request, "top_p"))
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1] (got {top_p})")
        top_k = int(_scalar(request, "top_k"))
        if top_k < 0:
            raise RequestError(f"top_k must be >= 0, 0 turns it off (got {top_k})")
        stops: list[bytes] = []
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        if stop_tensor is not None:
            raw = stop_tensor.as_numpy().reshape(-1)
            if raw.size > self.max_stop_sequences:
                raise RequestError(
                    f"stop takes at most {self.max_stop_sequences} strings (got {raw.size})"
                )
            for item in raw:
                stop = item if isinstance(item, bytes) else str(item).encode("utf-8")
                try:
                    text = stop.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError("stop strings must be valid UTF-8") from None
                if not 0 < len(text) <= self.max_stop_length:
                    raise RequestError(
                        f"each stop string must be 1..{self.max_stop_length} characters"
                    )
                stops.append(stop)
        return len(prompt), max_tokens, stops

    def _plan(self, max_tokens: int, stops: list[bytes]) -> tuple[int, int, str]:
        """(tokens to generate, tokens whose text is sent, finish reason)."""
        if stops:
            text = (ALPHABET * (max_tokens // len(ALPHABET) + 1))[:max_tokens]
            ends = [(at, at + len(s)) for s in stops if (at := text.find(s)) >= 0]
            if ends:
                # The stop string that is complete first ends generation, and
                # neither it nor anything after it is sent. Text before it is known
                # not to start a stop string, so it goes out with its own token.
                start, end = min(ends, key=lambda e: (e[1], e[0]))
                return end, start, "stop"
        return max_tokens, max_tokens, "length"

    def _stream(
        self, request: Any, sender: Any, prompt_tokens: int, max_tokens: int, stops: list[bytes]
    ) -> None:
        total, visible, finish = self._plan(max_tokens, stops)
        prompt = _array(prompt_tokens, np.int32)
        letters = len(ALPHABET)
        for completion in range(1, total):
            if completion % CANCEL_CHECK_EVERY == 0 and request.is_cancelled():
                try:
                    final = self._response(None, False, "cancelled", prompt, completion - 1)
                    sender.send(final, flags=FINAL)
                except Exception:  # the client has usually gone
                    pass
                return
            token = (completion - 1) % letters
            sender.send(self._response(token, completion <= visible, "", prompt, completion))
        token = (total - 1) % letters
        sender.send(self._response(token, total <= visible, finish, prompt, total), flags=FINAL)
