"""The embedded default platform on one machine: a worker (with the bundled Triton) and
a gateway, each in its own process, started and stopped together.

Used by `tensorgate up`, `tensorgate demo` and the end-to-end tests. Each child
runs in its own session so a terminal's Ctrl-C reaches only this process, which
then stops the gateway first and the worker (and so Triton) after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

from tensorgate import AsyncGatewayClient
from tensorgate.errors import TensorgateClientError

from services.runtime.process import die_with_parent, free_port


class LocalPlatform:
    """Worker + gateway as child processes of this one."""

    def __init__(
        self,
        *,
        gateway_port: int = 50051,
        data_dir: Path = Path(".data"),
        log_file: Path | None = None,
        metrics_port: int = -1,
        worker_args: tuple[str, ...] = (),
    ) -> None:
        self.gateway_port = gateway_port or free_port()
        self.worker_port = free_port()
        self.data_dir = data_dir
        self.log_file = log_file
        self.worker_args = worker_args
        # Gateway on `metrics_port`, worker on the next one; -1 turns them off.
        self.metrics_port = metrics_port
        self._processes: list[tuple[str, asyncio.subprocess.Process]] = []
        self._log: IO[bytes] | None = None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    async def _spawn(self, name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        output: IO[bytes] | None = self._log
        process = await asyncio.create_subprocess_exec(
            *die_with_parent([sys.executable, "-m", *args]),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
        self._processes.append((name, process))

    async def start(self, timeout: float = 300.0) -> list[str]:
        """Starts both services; returns the models the gateway serves once it serves any."""
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
        log_format = ("--log-format", "json") if self._log is not None else ()
        worker_metrics = self.metrics_port + 1 if self.metrics_port > 0 else self.metrics_port
        await self._spawn(
            "worker",
            "services.worker",
            "--port",
            str(self.worker_port),
            "--metrics-port",
            str(worker_metrics),
            "--data-dir",
            str(self.data_dir / "worker"),
            *log_format,
            *self.worker_args,
        )
        await self._spawn(
            "gateway",
            "gateway",
            "--port",
            str(self.gateway_port),
            "--metrics-port",
            str(self.metrics_port),
            "--workers",
            f"127.0.0.1:{self.worker_port}",
            *log_format,
        )
        try:
            return await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        async with AsyncGatewayClient(self.gateway_address) as client:
            while time.monotonic() < deadline:
                for name, process in self._processes:
                    if process.returncode is not None:
                        raise RuntimeError(
                            f"{name} exited with {process.returncode} during start"
                            + (f"; see {self.log_file}" if self.log_file else "")
                        )
                with contextlib.suppress(TensorgateClientError):
                    models = await client.list_models(timeout=2.0)
                    if models:
                        return [f"{m.name}:{m.version}" for m in models]
                await asyncio.sleep(0.5)
        raise TimeoutError(f"platform not ready within {timeout}s")

    async def wait(self) -> str:
        """Returns the name of the first child that exits."""
        waits = {asyncio.ensure_future(p.wait()): name for name, p in self._processes}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, timeout: float = 30.0) -> None:
        """Gateway first (stops taking calls), then the worker (which stops Triton)."""
        for name, process in reversed(self._processes):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout)
                except TimeoutError:
                    print(f"{name} did not stop within {timeout}s; killing it", file=sys.stderr)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        self._processes.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
