"""Triton Python-backend model `tinylm`: streams text from the TinyLM byte-level transformer.

Decoupled: every request gets one response per generated token, sent as soon as the token
exists; the last response carries the FINAL flag, the finish reason ("length", "stop",
"eos" or "cancelled") and the final usage. Invalid requests get a single FINAL response that
carries a TritonError naming the offending field. See `models/README.md` for the contract.

Requests run on a small thread pool (`max_concurrency` in config.pbtxt), so `execute`
returns at once and a long generation does not hold back the requests behind it.
"""

from __future__ import annotations

import codecs
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The Python backend puts this version folder on sys.path: the one architecture
# definition, shared with models/training, sits beside this file.
import tinylm_arch
import torch
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")
MIN_TEMPERATURE = 1e-4


class RequestError(ValueError):
    """A request the model refuses; the message names the field."""


@dataclass(frozen=True)
class Params:
    prompt: bytes
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


class StopMatcher:
    """Holds back text that may be the start of a stop string until it is known not to be."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string has been reached."""
        self.pending += text
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for k in range(min(len(self.pending), self.longest - 1), 0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                hold = k
                break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {values.size})")
    return values[0]


def _response(text: str, ids: list[int], finish: str, prompt: int, completion: int) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array(ids, dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion], dtype=np.int32)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.arch = tinylm_arch
        self.model = self.arch.load_checkpoint(version_dir / "tinylm.pt")
        self.context_length = int(params["context_length"])
        if self.context_length != self.model.cfg.context_length:
            raise ValueError(
                f"config.pbtxt says context_length {self.context_length}, "
                f"the checkpoint was trained with {self.model.cfg.context_length}"
            )
        self.eos = int(self.arch.EOS_ID)
        # The worker reads the same two parameters to check requests before they come here.
        self.max_stop_sequences = int(params["max_stop_sequences"])
        self.max_stop_length = int(params["max_stop_length"])
        torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(
            max_workers=int(params.get("max_concurrency", "2")),
            thread_name_prefix="tinylm",
            # Each thread sets its own intra-op thread count (OpenMP keeps it per thread).
            initializer=torch.set_num_threads,
            initargs=(1,),
        )

        # Concurrent metric updates from two threads crash Triton 2.51's python backend
        # (SIGSEGV in libtriton_python.so), so every metric call goes through this lock.
        self.metrics_lock = threading.Lock()
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.tokens_family = pb_utils.MetricFamily(
            name="tinylm_generated_tokens_total",
            description="Tokens generated by tinylm (prompt tokens not included)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tokens_metric = self.tokens_family.Metric(labels=labels)
        self.finished_family = pb_utils.MetricFamily(
            name="tinylm_requests_finished_total",
            description="tinylm requests finished, by finish_reason ('error': refused)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.finished = {
            r: self.finished_family.Metric(labels={**labels, "finish_reason": r})
            for r in FINISH_REASONS
        }

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def finalize(self) -> None:
        # Let running generations finish so that every request gets its final response.
        self.pool.shutdown(wait=True)
        # The backend wants each Metric deleted before its MetricFamily.
        del self.tokens_metric, self.finished
        del self.tokens_family, self.finished_family

    def _count(self, metric: Any, amount: int = 1) -> None:
        if amount:
            with self.metrics_lock:
                metric.increment(amount)

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            try:
                params = self._params(request)
            except RequestError as exc:
                self._count(self.finished["error"])
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                return
            self._generate(request, sender, params)
        except Exception as exc:  # any failure must still end the stream
            if request.is_cancelled():
                # A send can fail once the client has cancelled; that is a cancellation.
                self._count(self.finished["cancelled"])
                return
            pb_utils.Logger.log_error(f"tinylm: generation failed: {exc!r}")
            self._count(self.finished["error"])
            try:
                error = pb_utils.TritonError(f"tinylm: internal error: {exc}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            except Exception:  # the final flag may already be sent
                pass

    def _params(self, request: Any) -> Params:
        prompt = _scalar(request, "prompt")
        prompt = prompt if isinstance(prompt, bytes) else str(prompt).encode("utf-8")
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise RequestError("prompt must not be empty")
        if n_prompt >= self.context_length:
            raise RequestError(
                f"prompt must be shorter than the context of {self.context_length} tokens "
                f"(got {n_prompt} UTF-8 bytes)"
            )
        max_tokens = int(_scalar(request, "max_tokens"))
        limit = self.context_length - n_prompt
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
        seed = _scalar(request, "seed")
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        stops: list[str] = []
        if stop_tensor is not None:
            raw = stop_tensor.as_numpy().reshape(-1)
            if raw.size > self.max_stop_sequences:
                raise RequestError(
                    f"stop takes at most {self.max_stop_sequences} strings (got {raw.size})"
                )
            for item in raw:
                try:
                    text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
                except UnicodeDecodeError:
                    raise RequestError("stop strings must be valid UTF-8") from None
                if not 0 < len(text) <= self.max_stop_length:
                    raise RequestError(
                        f"each stop string must be 1..{self.max_stop_length} characters"
                    )
                stops.append(text)
        return Params(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=None if seed is None else int(seed),
            stop=tuple(stops),
        )

    def _sample(self, logits: torch.Tensor, p: Params, gen: torch.Generator) -> int:
        # Sampling tends to argmax as the temperature falls; below this, dividing by it
        # overflows float32 logits to inf, so it is greedy.
        if p.temperature < MIN_TEMPERATURE:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest head of the distribution whose mass reaches top_p.
            outside = torch.cumsum(sorted_probs, dim=0) - sorted_probs >= p.top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0))
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.inference_mode()
    def _generate(self, request: Any, sender: Any, p: Params) -> None:
        gen = torch.Generator()
        if p.seed is None:
            gen.seed()
        else:
            gen.manual_seed(p.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = StopMatcher(p.stop)
        n_prompt = len(p.prompt)
        tokens = torch.tensor([list(p.prompt)], dtype=torch.long)
        past = None
        generated, finish, text, last = 0, "", "", []
        try:
            for completion in range(1, p.max_tokens + 1):
                if request.is_cancelled():
                    finish, last = "cancelled", []
                    break
                logits, past = self.model(tokens, past)
                token = self._sample(logits[0, -1], p, gen)
                generated, last = completion, [token]
                if token == self.eos:
                    finish = "eos"
                    break
                text, stopped = matcher.push(decoder.decode(bytes([token])))
                if stopped:
                    finish = "stop"
                    break
                if completion == p.max_tokens:
                    finish = "length"
                    break
                sender.send(_response(text, last, "", n_prompt, completion))
                tokens = torch.tensor([[token]], dtype=torch.long)
        except BaseException:
            self._count(self.tokens_metric, generated)
            raise
        if finish in ("eos", "cancelled"):
            text = ""  # neither produced text of its own; only what was held back goes out
        if finish != "stop":
            text += matcher.flush() + decoder.decode(b"", final=True)
        # Tokens are counted once per request, not per token (each update is a round
        # trip to Triton, under a lock the generation threads share), and before the
        # finish, so whoever sees the finish counted also sees its tokens.
        self._count(self.tokens_metric, generated)
        self._count(self.finished[finish])
        final = _response(text, last, finish, n_prompt, generated)
        if finish != "cancelled":
            sender.send(final, flags=FINAL)
            return
        try:
            sender.send(final, flags=FINAL)
        except Exception as exc:  # the client is usually gone by now
            pb_utils.Logger.log_verbose(f"tinylm: final response after cancel not sent: {exc!r}")
