"""The `tensorgate` command: run the platform locally and call it.

tensorgate up                      start worker + gateway; Ctrl-C stops all
tensorgate generate "ROMEO:"       stream a generation to the terminal
tensorgate infer digits --input image=@models/examples/digits.json
tensorgate models                  list what the gateway serves
tensorgate demo                    up, stream a prompt, one unary call, down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorgate import AsyncGatewayClient
from tensorgate.errors import TensorgateClientError
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.tensors import NUMPY_TYPES

from launcher.local import LocalPlatform

DEFAULT_GATEWAY = os.environ.get("TENSORGATE_GATEWAY", "127.0.0.1:50051")
DEMO_PROMPT = "ROMEO:\n"
EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"


async def _up(args: argparse.Namespace) -> int:
    platform = LocalPlatform(
        gateway_port=args.port, data_dir=args.data_dir, metrics_port=args.metrics_port
    )
    print("starting the worker (bundled Triton) and the gateway...", file=sys.stderr)
    models = await platform.start()
    metrics = (
        f" Metrics: http://127.0.0.1:{args.metrics_port}/metrics (gateway), "
        f"http://127.0.0.1:{args.metrics_port + 1}/metrics (worker)."
        if args.metrics_port > 0
        else ""
    )
    print(
        f"tensorgate is up: gateway {platform.gateway_address}, models {', '.join(models)}."
        f"{metrics} Ctrl-C stops everything.",
        file=sys.stderr,
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (2, 15):  # SIGINT, SIGTERM
        loop.add_signal_handler(sig, stopping.set)
    exited = asyncio.ensure_future(platform.wait())
    signalled = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({exited, signalled}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if exited.done():
        print(f"{exited.result()} exited; stopping the rest", file=sys.stderr)
        code = 1
    else:
        exited.cancel()
    print("stopping...", file=sys.stderr)
    await platform.stop()
    print("stopped", file=sys.stderr)
    return code


async def _stream(client: AsyncGatewayClient, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    first: float | None = None
    last = inference_pb2.GenerateChunk()
    async for chunk in client.generate(
        args.model,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        seed=args.seed,
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


async def _generate(args: argparse.Namespace) -> int:
    async with AsyncGatewayClient(args.gateway) as client:
        await _stream(client, args)
    return 0


class UsageError(Exception):
    """A command line the CLI cannot act on; the message says what to write instead."""


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


async def _infer(args: argparse.Namespace) -> int:
    values = _parse_inputs(args.input)  # a bad command line is said before connecting
    name_of_model = ModelRef.parse(args.model).name
    async with AsyncGatewayClient(args.gateway) as client:
        models = {m.name: m for m in await client.list_models()}
        info = models.get(name_of_model)
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
        outputs = await client.infer(args.model, arrays)
    print(json.dumps({name: value.tolist() for name, value in outputs.items()}))
    return 0


async def _models(args: argparse.Namespace) -> int:
    async with AsyncGatewayClient(args.gateway) as client:
        for m in await client.list_models():
            extra = f" context={m.context_length}" if m.context_length else ""
            print(f"{m.name}:{m.version}\t{m.task}{extra}\t{m.description}")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    log_file = args.data_dir / "logs" / "demo.log"
    platform = LocalPlatform(gateway_port=0, data_dir=args.data_dir, log_file=log_file)
    print(
        f"starting tensorgate (worker + bundled CPU Triton + gateway; logs in {log_file})...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    models = await platform.start()
    print(
        f"up in {time.perf_counter() - started:.1f}s at {platform.gateway_address}: "
        f"{', '.join(models)}\n",
        file=sys.stderr,
    )
    try:
        async with AsyncGatewayClient(platform.gateway_address) as client:
            print(
                f"$ tensorgate generate {args.prompt!r} --max-tokens {args.max_tokens}",
                file=sys.stderr,
            )
            sys.stdout.write(args.prompt)
            await _stream(client, args)
            rows = json.loads((EXAMPLES / "digits.json").read_text())
            outputs = await client.infer("digits", {"image": np.asarray(rows, dtype=np.float32)})
            print(
                f"\n$ tensorgate infer digits  (four handwritten digits, 0 to 3)\n"
                f"labels: {outputs['label'].ravel().tolist()}",
                file=sys.stderr,
            )
    finally:
        await platform.stop()
        print("platform stopped", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start every service in the foreground")
    up.add_argument("--port", type=int, default=50051, help="gateway port (default 50051)")
    up.add_argument("--data-dir", type=Path, default=Path(".data"))
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="gateway /metrics port; the worker's is the next one; -1 turns them off",
    )

    def generation_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tinylm")
        p.add_argument("--max-tokens", type=int, default=200)
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--stop", action="append", default=[])
        p.add_argument("--seed", type=int, default=None)

    generate = commands.add_parser("generate", help="stream a generation")
    generate.add_argument("prompt")
    generate.add_argument("--gateway", default=DEFAULT_GATEWAY)
    generation_flags(generate)

    infer = commands.add_parser("infer", help="one unary tensor call")
    infer.add_argument("model")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=JSON|@FILE",
        help="an input as a JSON (nested) list, or @file.json",
    )
    infer.add_argument("--gateway", default=DEFAULT_GATEWAY)

    models = commands.add_parser("models", help="list the models the gateway serves")
    models.add_argument("--gateway", default=DEFAULT_GATEWAY)

    demo = commands.add_parser("demo", help="start, stream a prompt, call digits, stop")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--data-dir", type=Path, default=Path(".data"))
    generation_flags(demo)
    demo.set_defaults(seed=4, temperature=0.8, max_tokens=200)
    return parser


COMMANDS = {"up": _up, "generate": _generate, "infer": _infer, "models": _models, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except TensorgateClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except InvalidModelRef as exc:
        print(f"error: model {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:  # the local platform would not start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
