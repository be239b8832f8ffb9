"""The `main()` every service shares: settings, logging, start, run until signalled, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from services.runtime.logging import configure_logging, flush_logs
from services.runtime.server import wait_for_signal
from services.runtime.settings import S, load_settings

log = structlog.get_logger("tensorgate.main")


class RunningService(Protocol):
    async def wait_failed(self) -> str:
        """Returns, with the reason, if the service can no longer serve."""
        ...

    async def stop(self) -> None: ...


def run_service(
    settings_type: type[S],
    start: Callable[[S], Awaitable[RunningService]],
    argv: Sequence[str] | None,
    *,
    prog: str,
) -> int:
    """Loads settings (exit 2 if invalid), serves until SIGINT/SIGTERM, then stops gracefully.

    Exits with 1 if the service fails on its own (its `wait_failed` returns).
    """
    settings = load_settings(settings_type, argv, prog=prog)
    configure_logging(
        level=settings.log_level,
        fmt=settings.log_format,
        flush_seconds=settings.log_flush_seconds,
    )
    # What this process runs with, in one line; secrets are masked by `loggable`.
    log.info("starting", service=prog, settings=settings.loggable())

    async def serve() -> int:
        # Signals are caught from the start: a SIGTERM while the service is still
        # starting (a worker waits for Triton) stops what was started, not the process.
        signalled = asyncio.ensure_future(wait_for_signal())
        starting = asyncio.ensure_future(start(settings))
        await asyncio.wait({signalled, starting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # start cleans up what it began on any exception
            with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
                await starting
            log.info("stopped while starting", service=prog)
            return 0
        try:
            running = starting.result()
        except (OSError, RuntimeError) as exc:  # a taken port, a Triton that will not start
            signalled.cancel()
            log.error("could not start", service=prog, reason=str(exc))
            return 1
        failed = asyncio.ensure_future(running.wait_failed())
        try:
            await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            failed.cancel()
            await running.stop()
        if failed.done() and not failed.cancelled():
            log.error("service failed; stopped it", service=prog, reason=failed.result())
            return 1
        return 0

    try:
        return asyncio.run(serve())
    finally:
        flush_logs()
