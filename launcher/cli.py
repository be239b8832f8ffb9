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
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from tensorgate import AsyncGatewayClient
from tensorgate.errors import TensorgateClientError
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_folder import ModelFolderError
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.tensors import NUMPY_TYPES

from launcher.auth_commands import keys_app, tenants_app
from launcher.local import MAX_GATEWAYS, MAX_WORKERS, LocalPlatform
from launcher.options import DEFAULT_ADDRESS, Address, ApiKey, UsageError
from launcher.quota_commands import prices_app, quotas_app
from launcher.registry_commands import models_app
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
DataDir = Annotated[Path, typer.Option(help="where the services keep their state and logs")]


@app.command()
def up(
    port: Annotated[
        int, typer.Option(help="gateway port; more gateways take the ports after it")
    ] = 50051,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_WORKERS,
            help="workers, each with its own bundled Triton; every gateway routes to all",
        ),
    ] = 1,
    gateways: Annotated[
        int,
        typer.Option(min=1, max=MAX_GATEWAYS, help="gateways, on consecutive ports from --port"),
    ] = 1,
    data_dir: DataDir = Path(".data"),
    metrics_port: Annotated[
        int,
        typer.Option(
            help="the first gateway's /metrics port; the first worker's is +1, the "
            "registry's +2, auth's +3, then the other gateways', then the other workers'; "
            "-1: off"
        ),
    ] = 9400,
) -> None:
    """Start every service in the foreground; Ctrl-C stops them all.

    With --workers N and --gateways M, N workers (each with its own Triton and its own
    folder under the data dir) and M gateways on ports --port, --port+1, ... (one shared
    port is not offered: the services refuse a taken port on purpose). Every gateway
    routes to every worker, so stopping or killing one of them shows the others take over.
    """
    try:
        platform = LocalPlatform(
            gateway_port=port,
            workers=workers,
            gateways=gateways,
            data_dir=data_dir,
            metrics_port=metrics_port,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    code = asyncio.run(_up(platform))
    if code:
        raise typer.Exit(code)


def _plural(count: int, noun: str) -> str:
    return f"the {noun}" if count == 1 else f"{count} {noun}s"


async def _up(platform: LocalPlatform) -> int:
    workers, gateways = len(platform.worker_names), len(platform.gateway_names)
    print(
        f"starting the model registry, the auth service, {_plural(workers, 'worker')} "
        f"(bundled Triton{'s' if workers > 1 else ''}) and {_plural(gateways, 'gateway')}...",
        file=sys.stderr,
    )
    # Ctrl-C is ours from the start: while starting it stops what started, and once up
    # it stops everything; never a KeyboardInterrupt between the two.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (2, 15):  # SIGINT, SIGTERM
        loop.add_signal_handler(sig, stopping.set)
    signalled = asyncio.ensure_future(stopping.wait())
    starting = asyncio.ensure_future(platform.start())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # start() stops what it began on any exception
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        print("stopped before it was up", file=sys.stderr)
        return 0
    models = starting.result()
    _say_admin_key(platform)
    metrics = (
        " Metrics: "
        + ", ".join(
            f"http://127.0.0.1:{port}/metrics ({name})"
            for name, port in platform.metrics_ports().items()
        )
        + "."
        if platform.metrics_port > 0
        else ""
    )
    if gateways == 1 and workers == 1:
        where = f"gateway {platform.gateway_address}"
    else:
        # Names, addresses and pids: enough to `kill` one and watch the others serve.
        where = ", ".join(
            f"{name} {address} (pid {platform.child(name).pid})"
            for names, addresses in (
                (platform.gateway_names, platform.gateway_addresses),
                (platform.worker_names, platform.worker_addresses),
            )
            for name, address in zip(names, addresses, strict=True)
        )
    print(
        f"tensorgate is up: {where}, models {', '.join(models)}.{metrics} Ctrl-C stops everything.",
        file=sys.stderr,
    )
    code = await _supervise(platform, signalled)
    print("stopping...", file=sys.stderr)
    await platform.stop()
    print("stopped", file=sys.stderr)
    return code


async def _supervise(platform: LocalPlatform, signalled: asyncio.Future[Any]) -> int:
    """Until Ctrl-C (0) or a service exits for good (1). One of several workers or gateways
    that exits is started again while the others serve; any other exit stops everything."""
    while True:
        exited = asyncio.ensure_future(platform.wait())
        await asyncio.wait({exited, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            exited.cancel()
            return 0
        name = exited.result()
        returncode = platform.child(name).returncode
        if not platform.restartable(name):
            print(f"{name} exited with {returncode}; stopping the rest", file=sys.stderr)
            return 1
        print(
            f"{name} exited with {returncode}; starting it again (the others serve meanwhile)",
            file=sys.stderr,
        )
        await platform.respawn(name)
        print(f"{name} started again (pid {platform.child(name).pid})", file=sys.stderr)


def _say_admin_key(platform: LocalPlatform) -> None:
    """The admin key in full only on the start that made it; afterwards, where it is."""
    where = platform.admin_key_file
    if platform.admin_key_created:
        print(
            f"admin API key (shown once; kept in {where}, mode 0600): {platform.admin_key}\n"
            f"  export TENSORGATE_API_KEY=$(cat {where})",
            file=sys.stderr,
        )
    else:
        print(f"admin API key: kept in {where}", file=sys.stderr)


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
    _say_admin_key(platform)
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
