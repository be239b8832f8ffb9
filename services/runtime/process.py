"""Child processes that do not outlive their parent, stopped as a group, with whole lines.

`ChildProcess` is the one supervisor: the launcher runs the gateway and the worker
with it, the worker runs the bundled Triton with it. A child gets its own session
(so a terminal's Ctrl-C reaches only the parent, which stops the children in order)
and dies with its parent even if the parent is killed without cleaning up.

A child whose output goes to a `LineSink` writes into a pipe of its own; the parent
reads it and writes only whole lines to the sink. Two children that share one
stdout (or one log file) would otherwise mix their lines whenever a line takes more
than one write() or is longer than PIPE_BUF.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TextIO

# Longer lines are cut into pieces this long, each ended with a newline of its own:
# the relay must not hold an unbounded line in memory, and a piece is still never
# mixed with another child's line. Far above any log line.
MAX_LINE = 1024 * 1024

# How long `stop` waits for a stopped child's output to reach its sink. Only a
# grandchild that kept the pipe open (in another process group) makes this expire.
RELAY_DRAIN_SECONDS = 5.0


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the kernel sends it SIGTERM if this process dies first.

    util-linux's setpriv sets PR_SET_PDEATHSIG and then execs the command, so no
    Python code runs in the forked child (a preexec_fn would, which is unsafe in a
    process that has gRPC's threads). Without setpriv the command runs unwrapped.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for children that need one on the command line)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def lasting_port(host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """A free port below the kernel's ephemeral range, for a service that may be restarted
    on the same port.

    A port from `free_port` lies in the ephemeral range, which the kernel hands out as
    the local port of any outgoing connection: while a service restarts, some client's
    connection can take its port, and the new process cannot listen there (seen in the
    failover tests). The kernel never picks a port below that range by itself.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    ports = range(10_000, max(10_001, low))
    for _ in range(attempts):
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


class LineSink:
    """Where relayed lines go: a binary stream that gets whole lines, a batch per write."""

    def __init__(self, stream: IO[bytes], *, text: TextIO | None = None) -> None:
        self._stream = stream
        self._text = text
        self._broken = False

    @classmethod
    def of_text(cls, text: TextIO) -> LineSink:
        """Lines written under `text` (sys.stdout, sys.stderr), which this process also uses."""
        return cls(text.buffer, text=text)

    def write(self, lines: bytes) -> None:
        if self._broken:
            return
        try:
            if self._text is not None:
                # Whatever this process wrote to the text layer (a banner, streamed
                # tokens) goes out first, so a relayed line never lands inside it.
                self._text.flush()
            write_all(self._stream, lines)
        except (OSError, ValueError):
            # A closed terminal or file: the relay keeps draining the child's pipe
            # (a child blocked on a full pipe would hang) and drops what it reads.
            self._broken = True


class _LineRelay(asyncio.Protocol):
    """Reads one child's pipe and passes on whole lines as they complete."""

    def __init__(self, sink: LineSink, max_line: int) -> None:
        self._sink = sink
        self._max_line = max_line
        self._partial = bytearray()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        if end:
            # Everything up to the last newline is whole lines: one write.
            lines = bytes(self._partial) + data[:end] if self._partial else data[:end]
            self._partial = bytearray(data[end:])
            if len(lines) > self._max_line:  # rare: only then can one line be too long
                lines = b"".join(_cut(line, self._max_line) for line in lines[:-1].split(b"\n"))
            self._sink.write(lines)
        else:
            self._partial += data
        while len(self._partial) > self._max_line:
            self._sink.write(bytes(self._partial[: self._max_line]) + b"\n")
            del self._partial[: self._max_line]

    def connection_lost(self, exc: Exception | None) -> None:
        # A last line without a newline (a child killed mid-write) still ends whole.
        if self._partial:
            self._sink.write(bytes(self._partial) + b"\n")
            self._partial.clear()
        if not self.finished.done():
            self.finished.set_result(None)


def _cut(line: bytes, max_line: int) -> bytes:
    """`line` (without its newline) as pieces of at most `max_line` bytes, each ended."""
    return b"".join(line[i : i + max_line] + b"\n" for i in range(0, len(line) or 1, max_line))


Output = LineSink | IO[bytes] | int | None
"""A child's stdout or stderr: a sink for whole lines, an open file, a descriptor,
asyncio.subprocess.DEVNULL / STDOUT, or None to inherit this process's."""


class ChildProcess:
    """One command in its own session and process group that dies with this process."""

    def __init__(
        self,
        name: str,
        process: asyncio.subprocess.Process,
        relays: list[tuple[asyncio.ReadTransport, _LineRelay]],
    ) -> None:
        self.name = name
        # Set once `stop` had to SIGKILL a child that outlasted its SIGTERM timeout.
        self.killed = False
        self._process = process
        self._relays = relays

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: Output = None,
        stderr: Output = None,
        max_line: int = MAX_LINE,
    ) -> ChildProcess:
        """Starts `argv` with stdin closed; output to a `LineSink` is relayed line by line."""
        loop = asyncio.get_running_loop()
        read_ends: list[tuple[int, LineSink]] = []
        write_ends: list[int] = []

        def prepare(output: Output) -> IO[bytes] | int | None:
            if not isinstance(output, LineSink):
                return output
            # A pipe of our own rather than asyncio's PIPE: asyncio's Process.wait()
            # waits for its pipes to close too, which a grandchild holding them delays.
            read_fd, write_fd = os.pipe()
            read_ends.append((read_fd, output))
            write_ends.append(write_fd)
            return write_fd

        try:
            process = await asyncio.create_subprocess_exec(
                *die_with_parent(argv),
                env=dict(env) if env is not None else None,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=prepare(stdout),
                stderr=prepare(stderr),
                start_new_session=True,
            )
        except BaseException:
            for fd, _ in read_ends:
                os.close(fd)
            raise
        finally:
            # The child has its copies; ours would keep the pipe from ever reaching EOF.
            for fd in write_ends:
                os.close(fd)
        relays: list[tuple[asyncio.ReadTransport, _LineRelay]] = []
        for fd, sink in read_ends:
            transport, relay = await loop.connect_read_pipe(
                functools.partial(_LineRelay, sink, max_line), os.fdopen(fd, "rb", buffering=0)
            )
            relays.append((transport, relay))
        return cls(name, process, relays)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: the signal that ended it)."""
        return self._process.returncode

    async def wait(self) -> int:
        """The exit code, once the child has exited for whatever reason."""
        return await self._process.wait()

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM to the group, SIGKILL to it after `timeout`, reaped; returns the exit code.

        Idempotent. `killed` tells afterwards whether SIGTERM was not enough.
        """
        if self._process.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                self.killed = True
        # Members that outlived the leader (Triton's backend stubs) go with the group
        # either way; a leader past its timeout goes with them.
        self.signal_group(signal.SIGKILL)
        code = await self._process.wait()
        await self._drain_relays()
        return code

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)

    async def _drain_relays(self) -> None:
        """Waits until the child's last lines reached their sinks (a bounded wait)."""
        if not self._relays:
            return
        finished = [relay.finished for _, relay in self._relays]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*finished)), RELAY_DRAIN_SECONDS)
        for transport, _ in self._relays:
            transport.close()  # flushes a partial last line through connection_lost
        await asyncio.gather(*finished)


def write_all(stream: IO[bytes], data: bytes) -> None:
    """Writes all of `data`: an unbuffered stream may take only part of it (a signal
    during a write to a full pipe), and the rest must follow, not be lost."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        view = view[written if written is not None else len(view) :]
    stream.flush()
