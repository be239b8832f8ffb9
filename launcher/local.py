"""The embedded default platform on one machine: the model registry and the auth/quota
service (SQLite under the data directory), one or more workers (each with its own
bundled Triton) and one or more gateways that require API keys, each in its own
process, started and stopped together. The demo models are registered through the
registry (upload, alias `production`, deploy), and every worker loads what it says.

On the first start the auth service creates tenant `admin` with an admin key and writes
it to <data dir>/auth/admin.key (mode 0600); `admin_key` holds it on every start and
`admin_key_created` says whether this start made it.

Used by `tensorgate up`, `tensorgate demo` and the end-to-end tests. Each child
runs in its own session so a terminal's Ctrl-C reaches only this process, which
then stops the gateways first, the workers (and so their Tritons) after them, then
the auth service, the registry last. Tests stop or kill one worker or gateway
(`child(name)`) and start it again (`respawn`) to see the others keep serving.

The children's output comes through this process: each child writes into pipes of
its own, and only whole lines reach this process's stdout and stderr (under `up`)
or the log file (under `demo`), so two services logging at once never mix a line.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorgate import AsyncGatewayClient
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.errors import PermissionDeniedError, TensorgateClientError, UnauthenticatedError
from tensorgate.registry_client import AsyncRegistryClient

from launcher.demo_models import DEMO_MODELS, register_demo_models
from services.runtime.process import ChildProcess, LineSink, lasting_port
from services.runtime.readiness import poll_until

MAX_WORKERS = 8
MAX_GATEWAYS = 8
# A worker or gateway that exits sooner than this after its start is not started again:
# it would most likely only exit again (a Triton that cannot start, a taken port).
STEADY_SECONDS = 10.0


def instance_name(kind: str, index: int, count: int) -> str:
    """`worker` when there is one, else `worker-1`, `worker-2`, ... (`index` from 0)."""
    return kind if count == 1 else f"{kind}-{index + 1}"


def instance_dir(kind: str, index: int) -> str:
    """The first instance keeps the plain folder (`worker`, `gateway`), so a data directory
    used with one of each keeps its state (a gateway's usage spool) with more."""
    return kind if index == 0 else f"{kind}-{index + 1}"


class LocalPlatform:
    """Registry + auth + N workers + M gateways as child processes of this one.

    Every worker has its own bundled Triton and data folder; every gateway knows every
    worker (static discovery). The gateways listen on consecutive ports from
    `gateway_port` (0: each on a free port). Metrics ports, from `metrics_port`: the
    first gateway +0, the first worker +1, the registry +2, auth +3, then the other
    gateways from +4, then the other workers; -1 turns them all off, 0 picks free ones.
    """

    def __init__(
        self,
        *,
        gateway_port: int = 50051,
        workers: int = 1,
        gateways: int = 1,
        data_dir: Path = Path(".data"),
        log_file: Path | None = None,
        metrics_port: int = -1,
        worker_args: tuple[str, ...] = (),
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: must be 1..{MAX_WORKERS}, got {workers}")
        if not 1 <= gateways <= MAX_GATEWAYS:
            raise ValueError(f"gateways: must be 1..{MAX_GATEWAYS}, got {gateways}")
        if gateway_port and gateway_port + gateways - 1 > 65535:
            raise ValueError(
                f"gateways: {gateways} consecutive ports from {gateway_port} pass 65535"
            )
        self.gateway_ports = [
            gateway_port + i if gateway_port else lasting_port() for i in range(gateways)
        ]
        # Below the ephemeral range: a restarted service gets its port back (lasting_port).
        self.worker_ports = [lasting_port() for _ in range(workers)]
        self.registry_port = lasting_port()
        self.auth_port = lasting_port()
        self.data_dir = data_dir
        self.admin_key_file = data_dir / "auth" / "admin.key"
        self.admin_key = ""
        self.admin_key_created = False
        self.log_file = log_file
        self.worker_args = worker_args
        self.metrics_port = metrics_port
        self.gateway_names = [instance_name("gateway", i, gateways) for i in range(gateways)]
        self.worker_names = [instance_name("worker", i, workers) for i in range(workers)]
        # Each service's command line, kept so that `respawn` can start it again.
        self._commands: dict[str, list[str]] = {}
        # In start order; `stop` goes through them by tier instead.
        self._children: dict[str, ChildProcess] = {}
        self._started_at: dict[str, float] = {}
        self._sink_pair: tuple[LineSink, LineSink] | None = None
        self._log: IO[bytes] | None = None

    @property
    def gateway_port(self) -> int:
        return self.gateway_ports[0]

    @property
    def gateway_address(self) -> str:
        """The first gateway's address."""
        return self.gateway_addresses[0]

    @property
    def gateway_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.gateway_ports]

    @property
    def worker_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.worker_ports]

    @property
    def registry_address(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    @property
    def auth_address(self) -> str:
        return f"127.0.0.1:{self.auth_port}"

    def metrics_ports(self) -> dict[str, int]:
        """Each service's /metrics port (-1: off, 0: a free one the service picks)."""
        names = [
            self.gateway_names[0],
            self.worker_names[0],
            "registry",
            "auth",
            *self.gateway_names[1:],
            *self.worker_names[1:],
        ]
        if self.metrics_port <= 0:
            return dict.fromkeys(names, self.metrics_port)
        return {name: self.metrics_port + offset for offset, name in enumerate(names)}

    def child(self, name: str) -> ChildProcess:
        """The running process of a service (`worker-2`, `gateway`, ...)."""
        return self._children[name]

    def _sinks(self) -> tuple[LineSink, LineSink]:
        """Where the children's stdout and stderr lines go."""
        if self._sink_pair is not None:
            return self._sink_pair
        if self.log_file is None:
            self._sink_pair = LineSink.of_text(sys.stdout), LineSink.of_text(sys.stderr)
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
            log = LineSink(self._log)
            self._sink_pair = log, log
        return self._sink_pair

    def _log_format(self) -> str:
        # The children write into pipes, so they cannot see a terminal themselves.
        return "console" if self.log_file is None and sys.stdout.isatty() else "json"

    async def _spawn(self, name: str, *args: str) -> None:
        argv = [sys.executable, "-m", *args, "--log-format", self._log_format()]
        self._commands[name] = argv
        await self._start_child(name)

    async def _start_child(self, name: str) -> None:
        stdout, stderr = self._sinks()
        self._children[name] = await ChildProcess.spawn(
            name,
            self._commands[name],
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=stdout,
            stderr=stderr,
        )
        self._started_at[name] = time.monotonic()

    def restartable(self, name: str) -> bool:
        """Whether `up` starts service `name` again after it exited: a worker or gateway
        that others of its kind stood in for, and that had been running a while."""
        redundant = any(name in names and len(names) > 1 for names in self._replicas())
        return redundant and time.monotonic() - self._started_at[name] >= STEADY_SECONDS

    def _replicas(self) -> tuple[list[str], list[str]]:
        return self.worker_names, self.gateway_names

    async def respawn(self, name: str) -> None:
        """Starts a service that has exited (stopped or killed) again, as it was started:
        same port, same data folder. Returns once the process runs, not once it serves."""
        if self._children[name].returncode is None:
            raise RuntimeError(f"{name} is still running")
        await self._children[name].stop()  # reaps it and drains its last lines
        await self._start_child(name)

    async def start(self, timeout: float = 300.0) -> list[str]:
        """Starts the services and registers the demo models; returns the models the
        gateways serve once every worker is serving and every gateway serves them all."""
        metrics = self.metrics_ports()
        # Read before the auth service starts: a key that differs afterwards is one it
        # made on this start (a first start, or a new database beside an old key file).
        try:
            key_before = self.admin_key_file.read_text().strip()
        except FileNotFoundError:
            key_before = ""
        try:
            await self._spawn(
                "registry",
                "services.registry",
                "--port",
                str(self.registry_port),
                "--metrics-port",
                str(metrics["registry"]),
                "--data-dir",
                str(self.data_dir / "registry"),
                # Where optimization jobs measure latency: the workers' ports are chosen
                # already, and the jobs wait for a worker to serve what they deploy.
                "--workers",
                ",".join(self.worker_addresses),
            )
            # Started beside the registry (it has its own migrations to run), so that the
            # two come up together; stopped after the gateways, which depend on it.
            await self._spawn(
                "auth",
                "services.auth",
                "--port",
                str(self.auth_port),
                "--metrics-port",
                str(metrics["auth"]),
                "--data-dir",
                str(self.data_dir / "auth"),
                "--bootstrap-admin-key-file",
                str(self.admin_key_file),
            )
            await self._wait_registry(timeout)
            await register_demo_models(self.registry_address)
            for index, (name, port) in enumerate(
                zip(self.worker_names, self.worker_ports, strict=True)
            ):
                await self._spawn(
                    name,
                    "services.worker",
                    "--port",
                    str(port),
                    "--metrics-port",
                    str(metrics[name]),
                    "--data-dir",
                    str(self.data_dir / instance_dir("worker", index)),
                    "--registry",
                    self.registry_address,
                    *self.worker_args,
                )
            self.admin_key = await self._wait_auth(timeout)
            self.admin_key_created = self.admin_key != key_before
            for index, (name, port) in enumerate(
                zip(self.gateway_names, self.gateway_ports, strict=True)
            ):
                await self._spawn(
                    name,
                    "gateway",
                    "--port",
                    str(port),
                    "--metrics-port",
                    str(metrics[name]),
                    "--workers",
                    ",".join(self.worker_addresses),
                    "--registry",
                    self.registry_address,
                    "--auth",
                    self.auth_address,
                    "--data-dir",
                    str(self.data_dir / instance_dir("gateway", index)),
                )
            for address in self.worker_addresses:
                await self.wait_worker_serving(address, timeout)
            models: list[str] = []
            for address in self.gateway_addresses:
                models = await self.wait_gateway_serving(address, timeout)
            return models
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
        for child in self._children.values():
            if child.returncode is not None:
                where = f"; see {self.log_file}" if self.log_file else ""
                return f"{child.name} exited with {child.returncode}{where}"
        return None

    async def wait_worker_serving(self, address: str, timeout: float) -> None:
        """Returns once the worker at `address` says SERVING (it has caught up with the
        registry and loaded what is deployed)."""
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool | None:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                return True if answer.status == health_pb2.HealthCheckResponse.SERVING else None

            await poll_until(
                serving,
                timeout=timeout,
                interval=0.2,
                what=f"the worker at {address}",
                expected=(grpc.aio.AioRpcError,),
                give_up=self._exited_child,
            )

    async def wait_gateway_serving(self, address: str, timeout: float) -> list[str]:
        """The models the gateway at `address` serves, once it serves every demo model."""
        async with AsyncGatewayClient(address, api_key=self.admin_key) as client:

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
                what=f"models at the gateway {address}",
                expected=(TensorgateClientError,),
                give_up=self._exited_child,
            )

    async def wait(self) -> str:
        """Returns the name of the first child that exits."""
        waits = {asyncio.ensure_future(c.wait()): c.name for c in self._children.values()}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, timeout: float = 30.0) -> None:
        """The gateways first (they stop taking calls), then the workers (each stops its
        Triton), then the auth service (after the gateways have sent it the last usage),
        the registry last; the services of one kind stop together.

        Returns once every child is reaped and its last lines are written.
        """
        tiers = [self.gateway_names, self.worker_names, ["auth"], ["registry"]]
        for tier in tiers:
            children = [self._children[name] for name in tier if name in self._children]
            await asyncio.gather(*(child.stop(timeout) for child in children))
            for child in children:
                if child.killed:
                    print(
                        f"{child.name} did not stop within {timeout}s; killed it", file=sys.stderr
                    )
        self._children.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._sink_pair = None
