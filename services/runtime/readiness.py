"""Waiting for something to come up: the one poll-until-ready loop.

A child's port, a Triton's readiness, a platform that serves models: each is a
check polled until it answers, a deadline passes, or waiting has become pointless
(the child that should answer has exited). Failures name what was awaited and
the last error seen, so a start that fails says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _never() -> str | None:
    return None


async def poll_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    interval: float,
    what: str,
    expected: tuple[type[Exception], ...] = (OSError,),
    give_up: Callable[[], str | None] = _never,
) -> T:
    """The first answer of `check` that is not None.

    `check` raising one of `expected` means "not yet", as does None. Each attempt
    is cut off at the deadline, so `timeout` holds even for a check that hangs.
    `give_up` returns a reason to stop early (e.g. "worker exited with 1"), else None.

    Raises TimeoutError after `timeout` seconds and RuntimeError when `give_up`
    gives a reason; both name `what`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = "no attempt finished"
    while True:
        reason = give_up()
        if reason is not None:
            raise RuntimeError(f"gave up waiting for {what}: {reason}")
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        attempt = asyncio.timeout(remaining)
        try:
            async with attempt:
                answer = await check()
        except Exception as exc:
            if attempt.expired():
                # The deadline cut a hanging attempt short: not the check's own error.
                last_error = "the last attempt was still running at the deadline"
            elif isinstance(exc, expected):
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                raise
        else:
            if answer is not None:
                return answer
            last_error = "answered, not ready yet"
        await asyncio.sleep(max(0.0, min(interval, deadline - loop.time())))
    raise TimeoutError(f"{what} not ready within {timeout:g}s; last error: {last_error}")
