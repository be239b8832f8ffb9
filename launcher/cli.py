"""The `tensorgate` command: run the platform locally, call it, and manage its models.

\b
tensorgate up                      start registry, auth, worker, gateway; Ctrl-C stops all
tensorgate up --workers 2 --gateways 2    several of each, to see failover on one machine
tensorgate generate "ROMEO:"       stream a generation to the terminal
tensorgate infer digits --input image=@models/examples/digits.json
tensorgate demo                    up, stream a prompt, one unary call, down
tensorgate models ...              the model registry (list, upload, alias, deploy, ...)
tensorgate tenants | keys ...      tenants and their API keys (admin key needed)
tensorgate quotas | prices ...     limits per tenant and key, prices per model
tensorgate usage [--csv]           the usage ledger: requests, tokens, compute, cost

Client commands take the key from --api-key or TENSORGATE_API_KEY; `tensorgate up`
writes the admin key to <data dir>/auth/admin.key on its first start.

Exit codes: 0 done, 1 the call or the platform failed (one `error: ...` line on
stderr), 2 the command line cannot be acted on, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from tensorgate import AsyncGatewayClient
from tensorgate.errors import TensorgateClientError, UnauthenticatedError
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_folder import ModelFolderError
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.tensors import NUMPY_TYPES

from launcher.auth_commands import keys_app, tenants_app
from launcher.local import LocalPlatform
from launcher.options import DEFAULT_ADDRESS, Address, ApiKey, DataDir, UsageError
from launcher.quota_commands import prices_app, quotas_app
from launcher.registry_commands import models_app
from launcher.up_command import say_admin_key, up
from launcher.usage_commands import usage

DEMO_PROMPT = "ROMEO:\n"
EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"

app = typer.Typer(
    name="tensorgate",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    # A failure is one `error:` line (main below), never a traceback.
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(models_app, name="models")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(quotas_app, name="quotas")
app.add_typer(prices_app, name="prices")


@dataclass(frozen=True)
class Generation:
    """What `generate` and `demo` ask the model for."""

    model: str
    prompt: str
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int
    stop: Sequence[str]
    seed: int | None


Model = Annotated[str, typer.Option(help="the model reference: name, name:3 or name@alias")]
MaxTokens = Annotated[int, typer.Option(help="at most this many tokens")]
Temperature = Annotated[float | None, typer.Option(help="sampling temperature")]
TopP = Annotated[float | None, typer.Option(help="nucleus sampling mass")]
TopK = Annotated[int, typer.Option(help="sample among the k likeliest tokens; 0: all")]
Stop = Annotated[list[str] | None, typer.Option(help="stop at this text (repeatable)")]
Seed = Annotated[int | None, typer.Option(help="sampling seed, for repeatable output")]


# First, so that --help lists it first.
app.command()(up)


async def _stream(client: AsyncGatewayClient, ask: Generation) -> None:
    started = time.perf_counter()
    first: float | None = None
    last = inference_pb2.GenerateChunk()
    async for chunk in client.generate(
        ask.model,
        ask.prompt,
        max_tokens=ask.max_tokens,
        temperature=ask.temperature,
        top_p=ask.top_p,
        top_k=ask.top_k,
        stop=ask.stop,
        seed=ask.seed,
    ):
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    elapsed = time.perf_counter() - started
    tokens = last.usage.completion_tokens
    ttft = ((first or started) - started) * 1000
    print(
        f"\n[{last.model} finish={inference_pb2.FinishReason.Name(last.finish_reason)} "
        f"prompt_tokens={last.usage.prompt_tokens} completion_tokens={tokens} "
        f"ttft={ttft:.1f}ms {tokens / elapsed:.0f} tokens/s]",
        file=sys.stderr,
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="the text to continue")],
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
    model: Model = "tinylm",
    max_tokens: MaxTokens = 200,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = 0,
    stop: Stop = None,
    seed: Seed = None,
) -> None:
    """Stream a generation to stdout; timing and usage go to stderr."""
    ask = Generation(model, prompt, max_tokens, temperature, top_p, top_k, stop or (), seed)

    async def run() -> None:
        async with AsyncGatewayClient(address, api_key=api_key) as client:
            await _stream(client, ask)

    asyncio.run(run())


def _parse_inputs(specs: Sequence[str]) -> dict[str, object]:
    inputs: dict[str, object] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise UsageError(f"--input {spec!r}: write NAME=JSON or NAME=@file.json")
        try:
            text = Path(value[1:]).read_text() if value.startswith("@") else value
            inputs[name] = json.loads(text)
        except OSError as exc:
            raise UsageError(f"--input {name}: cannot read {value[1:]}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--input {name}: not JSON: {exc}") from None
    return inputs


@app.command()
def infer(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="name, name:3 or name@alias")],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            metavar="NAME=JSON|@FILE",
            help="an input as a JSON (nested) list, or @file.json (repeatable)",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """One unary tensor call; prints the outputs as JSON."""
    values = _parse_inputs(inputs or ())  # a bad command line is said before connecting
    name_of_model = ModelRef.parse(model).name

    async def run() -> dict[str, list[object]]:
        async with AsyncGatewayClient(address, api_key=api_key) as client:
            # The served inputs' dtypes, so that JSON numbers become the right arrays.
            info = {m.name: m for m in await client.list_models()}.get(name_of_model)
            arrays = {}
            for name, value in values.items():
                spec = next((s for s in info.inputs if s.name == name), None) if info else None
                dtype = NUMPY_TYPES.get(spec.datatype) if spec else None
                try:
                    arrays[name] = np.asarray(value, dtype=dtype)
                except (TypeError, ValueError) as exc:
                    raise UsageError(
                        f"--input {name}: not a {dtype or 'numeric'} array: {exc}"
                    ) from None
            outputs = await client.infer(model, arrays)
        return {name: value.tolist() for name, value in outputs.items()}

    print(json.dumps(asyncio.run(run())))


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="the prompt to stream")] = DEMO_PROMPT,
    data_dir: DataDir = Path(".data"),
    model: Model = "tinylm@production",
    max_tokens: MaxTokens = 200,
    temperature: Temperature = 0.8,
    top_p: TopP = None,
    top_k: TopK = 0,
    stop: Stop = None,
    seed: Seed = 4,
) -> None:
    """Start the platform, stream a prompt, classify four digits, stop."""
    ask = Generation(model, prompt, max_tokens, temperature, top_p, top_k, stop or (), seed)
    asyncio.run(_demo(ask, data_dir))


async def _demo(ask: Generation, data_dir: Path) -> None:
    log_file = data_dir / "logs" / "demo.log"
    platform = LocalPlatform(gateway_port=0, data_dir=data_dir, log_file=log_file)
    print(
        "starting tensorgate (model registry + auth service + worker with the bundled CPU "
        f"Triton + gateway; logs in {log_file}); the demo models are registered through the "
        "registry...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    models = await platform.start()
    print(
        f"up in {time.perf_counter() - started:.1f}s at {platform.gateway_address}: "
        f"{', '.join(models)}",
        file=sys.stderr,
    )
    say_admin_key(platform)
    print(
        "the calls below present the admin API key (authorization: Bearer ...)\n",
        file=sys.stderr,
    )
    try:
        async with AsyncGatewayClient(
            platform.gateway_address, api_key=platform.admin_key
        ) as client:
            print(
                f"$ tensorgate generate {ask.prompt!r} --model {ask.model} "
                f"--max-tokens {ask.max_tokens}",
                file=sys.stderr,
            )
            sys.stdout.write(ask.prompt)
            await _stream(client, ask)
            rows = json.loads((EXAMPLES / "digits.json").read_text())
            image = np.asarray(rows, dtype=np.float32)
            outputs = await client.infer("digits@production", {"image": image})
            print(
                f"\n$ tensorgate infer digits@production  (four handwritten digits, 0 to 3)\n"
                f"labels: {outputs['label'].ravel().tolist()}",
                file=sys.stderr,
            )
    finally:
        await platform.stop()
        print("platform stopped", file=sys.stderr)


# Registered here, after the platform's own commands, so that --help lists it after them.
app.command()(usage)


def _error(message: object, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    # Typer's standalone mode answers bad usage (exit 2), --help and Ctrl-C (130) with
    # SystemExit; what a command raises comes through here and becomes one `error:`
    # line, never a traceback.
    try:
        app(args=list(argv) if argv is not None else None, prog_name="tensorgate")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except UnauthenticatedError as exc:
        # The server says how a key travels; a user of the CLI needs where it takes one.
        return _error(
            f"{exc}; the CLI sends the key given with --api-key or in TENSORGATE_API_KEY", 1
        )
    except TensorgateClientError as exc:
        return _error(exc, 1)
    except InvalidModelRef as exc:
        return _error(f"model {exc}", 2)
    except UsageError as exc:
        return _error(exc, 2)
    except ModelFolderError as exc:
        return _error(exc, 1)
    except OSError as exc:  # a file the command reads or writes
        return _error(exc, 1)
    except (RuntimeError, TimeoutError) as exc:  # the local platform would not start
        return _error(exc, 1)
    except Exception as exc:  # a bug: still one line, named so that it can be reported
        return _error(f"unexpected {type(exc).__name__}: {exc}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
