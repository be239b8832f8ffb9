"""The embedded default platform on one machine: the model registry and the auth/quota
service (SQLite under the data directory), a worker (with the bundled Triton) and a
gateway that requires API keys, each in its own process, started and stopped together.
The demo models are registered through the registry (upload, alias `production`,
deploy), and the worker loads what it says.

On the first start the auth service creates tenant `admin` with an admin key and writes
it to <data dir>/auth/admin.key (mode 0600); `admin_key` holds it on every start and
`admin_key_created` says whether this start made it.

Used by `tensorgate up`, `tensorgate demo` and the end-to-end tests. Each child
runs in its own session so a terminal's Ctrl-C reaches only this process, which
then stops the gateway first, the worker (and so Triton) after it, then the auth
service, the registry last.

The children's output comes through this process: each child writes into pipes of
its own, and only whole lines reach this process's stdout and stderr (under `up`)
or the log file (under `demo`), so two services logging at once never mix a line.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import IO

from tensorgate import AsyncGatewayClient
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.errors import PermissionDeniedError, TensorgateClientError, UnauthenticatedError
from tensorgate.registry_client import AsyncRegistryClient

from launcher.demo_models import DEMO_MODELS, register_demo_models
from services.runtime.process import ChildProcess, LineSink, free_port
from services.runtime.readiness import poll_until


class LocalPlatform:
    """Registry + auth + worker + gateway as child processes of this one."""

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
        self.registry_port = free_port()
        self.auth_port = free_port()
        self.data_dir = data_dir
        self.admin_key_file = data_dir / "auth" / "admin.key"
        self.admin_key = ""
        self.admin_key_created = False
        self.log_file = log_file
        self.worker_args = worker_args
        # Gateway on `metrics_port`, worker +1, registry +2, auth +3; -1 turns them off.
        self.metrics_port = metrics_port
        self._children: list[ChildProcess] = []
        self._log: IO[bytes] | None = None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def registry_address(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    @property
    def auth_address(self) -> str:
        return f"127.0.0.1:{self.auth_port}"

    def _sinks(self) -> tuple[LineSink, LineSink]:
        """Where the children's stdout and stderr lines go."""
        if self.log_file is None:
            return LineSink.of_text(sys.stdout), LineSink.of_text(sys.stderr)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("ab")
        log = LineSink(self._log)
        return log, log

    def _log_format(self) -> str:
        # The children write into pipes, so they cannot see a terminal themselves.
        return "console" if self.log_file is None and sys.stdout.isatty() else "json"

    async def _spawn(self, name: str, sinks: tuple[LineSink, LineSink], *args: str) -> None:
        child = await ChildProcess.spawn(
            name,
            [sys.executable, "-m", *args, "--log-format", self._log_format()],
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=sinks[0],
            stderr=sinks[1],
        )
        self._children.append(child)

    async def start(self, timeout: float = 300.0) -> list[str]:
        """Starts the services and registers the demo models; returns the models the
        gateway serves once it serves all of them."""

        def metrics(offset: int) -> int:
            return self.metrics_port + offset if self.metrics_port > 0 else self.metrics_port

        # Read before the auth service starts: a key that differs afterwards is one it
        # made on this start (a first start, or a new database beside an old key file).
        try:
            key_before = self.admin_key_file.read_text().strip()
        except FileNotFoundError:
            key_before = ""
        try:
            sinks = self._sinks()
            await self._spawn(
                "registry",
                sinks,
                "services.registry",
                "--port",
                str(self.registry_port),
                "--metrics-port",
                str(metrics(2)),
                "--data-dir",
                str(self.data_dir / "registry"),
            )
            # Started beside the registry (it has its own migrations to run), so that the
            # two come up together; stopped after the gateway, which depends on it.
            await self._spawn(
                "auth",
                sinks,
                "services.auth",
                "--port",
                str(self.auth_port),
                "--metrics-port",
                str(metrics(3)),
                "--data-dir",
                str(self.data_dir / "auth"),
                "--bootstrap-admin-key-file",
                str(self.admin_key_file),
            )
            await self._wait_registry(timeout)
            await register_demo_models(self.registry_address)
            await self._spawn(
                "worker",
                sinks,
                "services.worker",
                "--port",
                str(self.worker_port),
                "--metrics-port",
                str(metrics(1)),
                "--data-dir",
                str(self.data_dir / "worker"),
                "--registry",
                self.registry_address,
                *self.worker_args,
            )
            self.admin_key = await self._wait_auth(timeout)
            self.admin_key_created = self.admin_key != key_before
            await self._spawn(
                "gateway",
                sinks,
                "gateway",
                "--port",
                str(self.gateway_port),
                "--metrics-port",
                str(self.metrics_port),
                "--workers",
                f"127.0.0.1:{self.worker_port}",
                "--registry",
                self.registry_address,
                "--auth",
                self.auth_address,
                "--data-dir",
                str(self.data_dir / "gateway"),
            )
            return await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_registry(self, timeout: float) -> None:
        async with AsyncRegistryClient(self.registry_address, timeout=2.0) as client:

            async def answering() -> bool | None:
                await client.list_deployments()
                return True

            await poll_until(
                answering,
                timeout=timeout,
                interval=0.2,
                what=f"the model registry at {self.registry_address}",
                expected=(TensorgateClientError,),
                give_up=self._exited_child,
            )

    async def _wait_auth(self, timeout: float) -> str:
        """The admin key, once the auth service answers (it writes the key file first)."""
        async with AsyncAuthClient(self.auth_address, api_key=None, timeout=2.0) as client:

            async def answering() -> bool | None:
                await client.list_prices()  # needs no key: the gateways price calls with it
                return True

            await poll_until(
                answering,
                timeout=timeout,
                interval=0.2,
                what=f"the auth service at {self.auth_address}",
                expected=(TensorgateClientError,),
                give_up=self._exited_child,
            )
        try:
            key = self.admin_key_file.read_text().strip()
        except FileNotFoundError:
            # The service writes the file only while it has no key at all.
            raise RuntimeError(
                f"no admin key: {self.admin_key_file} is missing, and the auth database under "
                f"{self.admin_key_file.parent} has keys already; put the admin key back in "
                "that file, or remove that folder to start over with a new one"
            ) from None
        return key

    def _exited_child(self) -> str | None:
        for child in self._children:
            if child.returncode is not None:
                where = f"; see {self.log_file}" if self.log_file else ""
                return f"{child.name} exited with {child.returncode}{where}"
        return None

    async def _wait_ready(self, timeout: float) -> list[str]:
        async with AsyncGatewayClient(self.gateway_address, api_key=self.admin_key) as client:

            async def serving() -> list[str] | None:
                try:
                    models = await client.list_models(timeout=2.0)
                except (UnauthenticatedError, PermissionDeniedError) as exc:
                    # Waiting would not change the answer: the key file holds a wrong key.
                    raise RuntimeError(
                        f"the gateway refused the admin key in {self.admin_key_file}: {exc}"
                    ) from None
                # Every demo model, not just the first the worker loaded.
                if not set(DEMO_MODELS) <= {m.name for m in models}:
                    return None
                return [f"{m.name}:{m.version}" for m in models]

            return await poll_until(
                serving,
                timeout=timeout,
                interval=0.5,
                what=f"models at the gateway {self.gateway_address}",
                expected=(TensorgateClientError,),
                give_up=self._exited_child,
            )

    async def wait(self) -> str:
        """Returns the name of the first child that exits."""
        waits = {asyncio.ensure_future(c.wait()): c.name for c in self._children}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, timeout: float = 30.0) -> None:
        """Gateway first (stops taking calls), then the worker (which stops Triton), then
        the auth service (after the gateway has sent it the last usage), the registry last.

        Returns once every child is reaped and its last lines are written.
        """
        for child in reversed(self._children):
            await child.stop(timeout)
            if child.killed:
                print(f"{child.name} did not stop within {timeout}s; killed it", file=sys.stderr)
        self._children.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
