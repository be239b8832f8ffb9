"""The child-process supervisor: process groups stopped whole, SIGKILL after a timeout,
and output relayed as whole lines, with small `sh` children."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import time

from services.runtime.process import ChildProcess, LineSink
from services.runtime.readiness import poll_until
from tests.helpers import process_alive


async def _first_line(output: io.BytesIO) -> bytes:
    async def written() -> bytes | None:
        return output.getvalue().partition(b"\n")[0] or None

    return await poll_until(written, timeout=5, interval=0.02, what="a first line")


async def _gone(pid: int) -> bool:
    # A killed grandchild is reaped by init a moment later; a zombie counts as gone.
    for _ in range(100):
        if not process_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_stop_kills_the_whole_group_even_members_that_ignore_sigterm() -> None:
    output = io.BytesIO()
    # The grandchild ignores SIGTERM and outlives the shell, as Triton's stubs may.
    child = await ChildProcess.spawn(
        "tree",
        ["sh", "-c", "(trap '' TERM; exec sleep 60) & echo $!; wait"],
        stdout=LineSink(output),
    )
    grandchild = int(await _first_line(output))
    assert process_alive(grandchild)

    code = await child.stop(timeout=5)

    assert code == -signal.SIGTERM and not child.killed
    assert await _gone(grandchild)
    assert await child.stop() == code  # idempotent


async def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    child = await ChildProcess.spawn("stubborn", ["sh", "-c", "trap '' TERM; sleep 60"])
    await asyncio.sleep(0.2)  # the trap is set before SIGTERM arrives
    started = time.monotonic()

    code = await child.stop(timeout=0.5)

    assert code == -signal.SIGKILL and child.killed
    assert 0.4 < time.monotonic() - started < 5
    assert not process_alive(child.pid)


async def test_env_is_given_and_stdin_is_closed() -> None:
    sink = io.BytesIO()
    # `cat` ends at once: its stdin is /dev/null, not this process's.
    child = await ChildProcess.spawn(
        "env", ["sh", "-c", 'cat; echo "$GREETING"'], env={"GREETING": "hi"}, stdout=LineSink(sink)
    )
    assert await asyncio.wait_for(child.wait(), 5) == 0
    await child.stop()
    assert sink.getvalue() == b"hi\n"


async def test_lines_of_two_children_are_never_mixed() -> None:
    sink = io.BytesIO()
    shared = LineSink(sink)
    # Each line is longer than PIPE_BUF and written in two pieces, as print() does.
    script = (
        "import os, sys\n"
        "mark = sys.argv[1].encode()\n"
        "for _ in range(300):\n"
        "    os.write(1, mark * 6000)\n"
        "    os.write(1, mark * 6000 + b'\\n')\n"
    )
    children = [
        await ChildProcess.spawn(mark, [sys.executable, "-c", script, mark], stdout=shared)
        for mark in "ab"
    ]
    for child in children:
        assert await asyncio.wait_for(child.wait(), 30) == 0
        await child.stop()

    lines = sink.getvalue().split(b"\n")
    assert lines.pop() == b""
    assert sorted(set(lines)) == [b"a" * 12000, b"b" * 12000]
    assert len(lines) == 600


async def test_an_overlong_line_is_split_on_purpose_and_a_last_line_is_ended() -> None:
    sink = io.BytesIO()
    child = await ChildProcess.spawn(
        "long", ["sh", "-c", "printf '%2500s\\nend' x"], stdout=LineSink(sink), max_line=1000
    )
    await child.wait()
    await child.stop()
    lines = sink.getvalue().split(b"\n")
    assert [len(line) for line in lines] == [1000, 1000, 500, 3, 0]
    assert lines[3] == b"end"


async def test_wait_returns_when_the_child_exits_though_a_grandchild_holds_its_output() -> None:
    sink = io.BytesIO()
    child = await ChildProcess.spawn(
        "parent", ["sh", "-c", "echo first; sleep 60 & exit 3"], stdout=LineSink(sink)
    )
    assert await asyncio.wait_for(child.wait(), 5) == 3
    # stop() still ends the sleeping grandchild (same group), so the relay ends too.
    assert await asyncio.wait_for(child.stop(timeout=1), 10) == 3
    assert sink.getvalue() == b"first\n"


async def test_output_to_a_closed_sink_is_drained_not_blocking_the_child() -> None:
    sink = io.BytesIO()
    sink.close()
    # 1 MiB is far more than a pipe holds: the child finishes only if it is read.
    child = await ChildProcess.spawn(
        "chatty", ["sh", "-c", "head -c 1048576 /dev/zero"], stdout=LineSink(sink)
    )
    assert await asyncio.wait_for(child.wait(), 10) == 0
    await child.stop()
