"""`tensorgate up`: the whole platform in the foreground until Ctrl-C, with one worker and
one gateway or several of each (`--workers`, `--gateways`) to see failover on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from launcher.local import MAX_GATEWAYS, MAX_WORKERS, LocalPlatform
from launcher.options import DataDir, UsageError


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

    Each service also takes its settings from TENSORGATE_<SERVICE>_* variables (see
    `python -m gateway --help`), e.g. TENSORGATE_GATEWAY_REDIS_URL=redis://127.0.0.1:6379/0
    for quota counters the gateways share through Redis.
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
    say_admin_key(platform)
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


def say_admin_key(platform: LocalPlatform) -> None:
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
