"""The processes under test, each started by the bench so it knows their PIDs.

One bundled CPU Triton serving a repository made for the run (the demo models
plus the bench's own no-compute model, linked in), a worker and a gateway as in
production, and two bare hops: `hop-b` forwards to Triton, `hop-a` to `hop-b`,
so the same two processes give "one bare hop" (client -> hop-b) and "two bare
hops in a chain" (client -> hop-a -> hop-b). Every service logs to its own file
under the work directory; nothing reaches the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from services.runtime.process import die_with_parent, free_port
from services.worker.triton_process import BundledTriton

REPO = Path(__file__).resolve().parent.parent
DEMO_MODELS = REPO / "models" / "repository"
BENCH_MODELS = Path(__file__).resolve().parent / "models"
NOCOMPUTE = "nocompute"
MODELS = ("digits", "tinylm", NOCOMPUTE)


def model_repository(root: Path) -> Path:
    """A Triton repository of links to the demo models and the bench's own."""
    repository = root / "repository"
    repository.mkdir(parents=True, exist_ok=True)
    sources = {"digits": DEMO_MODELS, "tinylm": DEMO_MODELS, NOCOMPUTE: BENCH_MODELS}
    for name, parent in sources.items():
        (repository / name).symlink_to(parent / name, target_is_directory=True)
    return repository


class BenchStack:
    """Triton, worker, gateway and two bare hops; `start` returns once all serve."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.triton = BundledTriton(model_repository(work_dir), work_dir / "triton")
        names = ("worker", "gateway", "gateway-keys", "auth", "hop-a", "hop-b")
        self.ports = {name: free_port() for name in names}
        self.admin_key_file = work_dir / "auth" / "admin.key"
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def triton_pid(self) -> int:
        if self.triton.pid is None:
            raise RuntimeError("Triton is not running")
        return self.triton.pid

    def log_path(self, name: str) -> Path:
        return self.work_dir / f"{name}.log"

    async def _spawn(self, name: str, *args: str) -> None:
        with self.log_path(name).open("ab") as log:
            # Each child gets its own session, so a Ctrl-C on the terminal reaches
            # only the bench, which then stops them in order; setpriv's death
            # signal stops them if the bench is killed outright.
            self.processes[name] = await asyncio.create_subprocess_exec(
                *die_with_parent([sys.executable, "-m", *args]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                cwd=REPO,
                start_new_session=True,
            )

    async def start(self, timeout: float = 300.0) -> None:
        await self.triton.start(timeout)
        hop_b = _flags(port=self.ports["hop-b"], upstream=self.triton.grpc_url)
        await self._spawn("hop-b", "bench.bare_hop", *hop_b)
        await self._spawn(
            "hop-a",
            "bench.bare_hop",
            *_flags(port=self.ports["hop-a"], upstream=self.address("hop-b")),
        )
        worker = _flags(
            port=self.ports["worker"],
            metrics_port=-1,
            triton_url=self.triton.grpc_url,
            models=",".join(MODELS),
            model_repository=self.triton.model_repository,
            data_dir=self.work_dir / "worker",
            log_format="json",
        )
        await self._spawn("worker", "services.worker", *worker)
        gateway = _flags(
            port=self.ports["gateway"],
            metrics_port=-1,
            workers=self.address("worker"),
            allow_anonymous=True,
            log_format="json",
        )
        await self._spawn("gateway", "gateway", *gateway)
        auth = _flags(
            port=self.ports["auth"],
            metrics_port=-1,
            data_dir=self.work_dir / "auth",
            bootstrap_admin_key_file=self.admin_key_file,
            log_format="json",
        )
        await self._spawn("auth", "services.auth", *auth)
        keyed = _flags(
            port=self.ports["gateway-keys"],
            metrics_port=-1,
            workers=self.address("worker"),
            auth=self.address("auth"),
            log_format="json",
        )
        await self._spawn("gateway-keys", "gateway", *keyed)
        await self._wait_ready(timeout)

    def _check_alive(self) -> None:
        if self.triton.pid is None:
            raise RuntimeError("Triton is not running")
        for name, process in self.processes.items():
            if process.returncode is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode} during start; "
                    f"see {self.log_path(name)}"
                )

    async def _wait_ready(self, timeout: float) -> None:
        """Until both gateways list every model (the worker has loaded them all and each
        gateway has its view of it; a gateway that started before the worker listened
        may wait out its channel's reconnect backoff) and both hops listen."""
        deadline = time.monotonic() + timeout
        listed: dict[str, set[str]] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            for name in ("gateway", "gateway-keys"):
                listed[name] = await self._listed(name)
            if all(models >= set(MODELS) for models in listed.values()) and (
                await self._hops_listen()
            ):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(
            f"not ready within {timeout}s (gateways list {listed}); logs in {self.work_dir}"
        )

    async def _listed(self, name: str) -> set[str]:
        metadata: tuple[tuple[str, str], ...] = ()
        if name == "gateway-keys":
            if not self.admin_key_file.is_file():
                return set()
            metadata = (("authorization", f"Bearer {self.admin_key_file.read_text().strip()}"),)
        async with grpc.aio.insecure_channel(self.address(name)) as channel:
            stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
            try:
                response = await stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=2, metadata=metadata
                )
            except grpc.aio.AioRpcError:
                return set()
        return {m.name for m in response.models}

    async def _hops_listen(self) -> bool:
        for name in ("hop-a", "hop-b"):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.ports[name])
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
        return True

    async def stop(self, timeout: float = 20.0) -> None:
        """Front to back: gateways, auth, worker, hops, then Triton."""
        for name in ("gateway", "gateway-keys", "auth", "worker", "hop-a", "hop-b"):
            process = self.processes.pop(name, None)
            if process is None:
                continue
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
        await self.triton.stop()


def _flags(**values: object) -> list[str]:
    """`--name value` pairs in the services' flag spelling (dashes); True is a bare `--name`."""
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags
