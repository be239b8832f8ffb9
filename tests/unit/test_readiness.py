"""The readiness poller: an answer, a timeout that names what and why, giving up early."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.runtime.readiness import poll_until


async def test_returns_the_first_answer_after_expected_errors_and_nones() -> None:
    answers: list[object] = [ConnectionRefusedError("refused"), None, "ready", "later"]

    async def check() -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, str) else None

    assert await poll_until(check, timeout=5, interval=0.01, what="the thing") == "ready"
    assert answers == ["later"]


async def test_timeout_names_what_and_the_last_error() -> None:
    async def check() -> None:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(TimeoutError) as raised:
        await poll_until(check, timeout=0.2, interval=0.05, what="port 1234")
    assert str(raised.value) == (
        "port 1234 not ready within 0.2s; last error: ConnectionRefusedError: connection refused"
    )


async def test_a_hanging_check_is_cut_off_at_the_deadline() -> None:
    async def check() -> None:
        await asyncio.sleep(60)

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still running at the deadline"):
        await poll_until(check, timeout=0.2, interval=0.05, what="a slow server")
    assert time.monotonic() - started < 2


async def test_gives_up_with_the_reason_without_waiting_out_the_timeout() -> None:
    attempts = 0

    async def check() -> None:
        nonlocal attempts
        attempts += 1

    def exited() -> str | None:
        return "worker exited with 1" if attempts >= 3 else None

    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        await poll_until(check, timeout=30, interval=0.01, what="the gateway", give_up=exited)
    assert str(raised.value) == "gave up waiting for the gateway: worker exited with 1"
    assert attempts == 3 and time.monotonic() - started < 5


async def test_an_unexpected_error_is_raised_at_once() -> None:
    async def check() -> None:
        raise ValueError("a bug, not a slow start")

    with pytest.raises(ValueError, match="a bug"):
        await poll_until(check, timeout=30, interval=0.01, what="anything")
