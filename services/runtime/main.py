"""The `main()` every service shares: settings, logging, start, run until signalled, stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from services.runtime.logging import configure_logging
from services.runtime.server import wait_for_signal
from services.runtime.settings import S, load_settings


class RunningService(Protocol):
    async def stop(self) -> None: ...


def run_service(
    settings_type: type[S],
    start: Callable[[S], Awaitable[RunningService]],
    argv: Sequence[str] | None,
    *,
    prog: str,
) -> int:
    """Loads settings (exit 2 if invalid), serves until SIGINT/SIGTERM, then stops gracefully."""
    settings = load_settings(settings_type, argv, prog=prog)
    configure_logging(level=settings.log_level, fmt=settings.log_format)

    async def serve() -> None:
        running = await start(settings)
        try:
            await wait_for_signal()
        finally:
            await running.stop()

    asyncio.run(serve())
    return 0
