"""Launches the CPU Triton Inference Server bundled in the nvidia-pytriton wheel.

The wheel carries a real tritonserver binary, the Python backend and one
backend stub per Python version. This module assembles a backend directory for
the running interpreter, sets the library paths the binary and stub need (the
running interpreter's libpython first, then the wheel's libraries), starts the
server as a supervised child on free ports, and stops its whole process group,
backend stubs included.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import structlog
from tensorgate.channel_options import CHANNEL_OPTIONS

from services.runtime.process import ChildProcess, free_port
from services.runtime.readiness import poll_until

log = structlog.get_logger("tensorgate.triton")

# How often the worker's channel to Triton (channels.py) pings it, idle or not.
WORKER_PING_MS = int(dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"])


def keepalive_flags(ping_interval_ms: int = WORKER_PING_MS) -> list[str]:
    """Triton flags that accept the worker's keepalive pings.

    The pings are how the worker notices a dead Triton connection, busy or idle. Triton's
    defaults take a ping on a connection without calls once per 2 hours (and one with
    calls but no data once per 5 minutes), and answer the third early one with GOAWAY
    too_many_pings. Pings up to twice as often as the worker sends them are allowed, so
    timer jitter never counts as abuse. A Triton the worker does not launch needs the same.
    """
    return [
        "--grpc-keepalive-permit-without-calls=1",
        f"--grpc-http2-min-recv-ping-interval-without-data={ping_interval_ms // 2}",
    ]


@dataclass(frozen=True)
class TritonPaths:
    """Where the wheel keeps the server binary, the Python backend and the libraries."""

    server: Path
    python_backend: Path
    stub: Path
    libs: Path

    @classmethod
    def from_wheel(cls) -> TritonPaths:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("nvidia-pytriton is not installed; it carries the bundled Triton")
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        paths = cls(
            server=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=package.parent / "nvidia_pytriton.libs",
        )
        for path in (paths.server, paths.python_backend, paths.stub, paths.libs):
            if not path.exists():
                raise RuntimeError(f"bundled Triton is incomplete: {path} is missing")
        return paths


class BundledTriton:
    """One tritonserver process serving `model_repository` with explicit model control."""

    def __init__(
        self,
        model_repository: Path,
        data_dir: Path,
        *,
        threads: int = 0,
        ping_interval_ms: int = WORKER_PING_MS,
    ) -> None:
        self.model_repository = model_repository.resolve()
        self.data_dir = data_dir.resolve()
        self.threads = threads
        self.ping_interval_ms = ping_interval_ms
        self.grpc_port = 0
        self.metrics_port = 0
        self.log_path = self.data_dir / "triton.log"
        self._child: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _backend_dir(self, paths: TritonPaths) -> Path:
        backends = self.data_dir / "backends"
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in [*paths.python_backend.iterdir(), paths.stub]:
            target = python / source.name
            # Copied again when the wheel (or the Python version) changed under a kept data dir.
            if source.is_file() and not _same_file(source, target):
                shutil.copy2(source, target)
        return backends

    def _environment(self, paths: TritonPaths) -> dict[str, str]:
        env = dict(os.environ)
        # The stub must load this interpreter's libpython, not the system one.
        libdir = str(sysconfig.get_config_var("LIBDIR"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(paths.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # Python-backend models import torch and numpy from this environment. The
        # stub's embedded interpreter ignores PYTHONPATH; it finds its prefix (and
        # so site-packages) through the first `python3` on PATH, via the venv's
        # pyvenv.cfg, so this interpreter's directory goes first.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        if self.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    async def start(self, timeout: float) -> None:
        paths = TritonPaths.from_wheel()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.metrics_port = free_port(), free_port()
        args = [
            str(paths.server),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir(paths)}",
            "--model-control-mode=explicit",
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-port={self.metrics_port}",
            "--metrics-address=127.0.0.1",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            *keepalive_flags(self.ping_interval_ms),
        ]
        with self.log_path.open("ab") as log_file:
            # Dies with the worker even if the worker is killed without cleaning up.
            # Triton is the only writer of its log, so it writes the file directly.
            self._child = await ChildProcess.spawn(
                "triton",
                args,
                env=self._environment(paths),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        log.info(
            "triton starting",
            pid=self._child.pid,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            log=str(self.log_path),
        )
        try:
            await self._wait_listening(timeout)
        except (TimeoutError, RuntimeError) as exc:
            await self.stop()
            raise RuntimeError(
                f"bundled Triton did not start: {exc}; log tail:\n{self.log_tail()}"
            ) from exc
        except BaseException:
            await self.stop()
            raise

    async def _wait_listening(self, timeout: float) -> None:
        async def listening() -> bool:
            _, writer = await asyncio.open_connection("127.0.0.1", self.grpc_port)
            writer.close()
            await writer.wait_closed()
            return True

        def exited() -> str | None:
            code = self._child.returncode if self._child is not None else None
            return f"it exited with {code}" if code is not None else None

        await poll_until(
            listening,
            timeout=timeout,
            interval=0.1,
            what=f"bundled Triton's gRPC port {self.grpc_port}",
            give_up=exited,
        )

    async def wait_exited(self) -> int:
        """Triton's exit code, once it has exited (for whatever reason)."""
        child = self._child
        if child is None:
            raise RuntimeError("bundled Triton is not running")
        return await child.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group (server and stubs), SIGKILL after `timeout`."""
        child, self._child = self._child, None
        if child is None:
            return
        code = await child.stop(timeout)
        if child.killed:
            log.warning("triton did not stop in time; killed it", pid=child.pid)
        log.info("triton stopped", pid=child.pid, returncode=code)


def _same_file(source: Path, target: Path) -> bool:
    if not target.exists():
        return False
    a, b = source.stat(), target.stat()
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
