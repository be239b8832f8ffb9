"""Launches the CPU Triton Inference Server bundled in the nvidia-pytriton wheel.

The wheel carries a real tritonserver binary, the Python backend and one
backend stub per Python version. This module assembles a backend directory for
the running interpreter, sets the library paths the binary and stub need (see
ENVIRONMENT.md), starts the server in its own process group on free ports, and
stops the whole group, stub processes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.runtime.process import die_with_parent, free_port

log = structlog.get_logger("tensorgate.triton")


@dataclass(frozen=True)
class TritonPaths:
    """Where the wheel keeps the server binary, the Python backend and the libraries."""

    server: Path
    python_backend: Path
    stub: Path
    libs: Path
    site_packages: Path

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
            site_packages=package.parent,
        )
        for path in (paths.server, paths.python_backend, paths.stub, paths.libs):
            if not path.exists():
                raise RuntimeError(f"bundled Triton is incomplete: {path} is missing")
        return paths


class BundledTriton:
    """One tritonserver process serving `model_repository` with explicit model control."""

    def __init__(self, model_repository: Path, data_dir: Path, *, threads: int = 0) -> None:
        self.model_repository = model_repository.resolve()
        self.data_dir = data_dir.resolve()
        self.threads = threads
        self.grpc_port = 0
        self.metrics_port = 0
        self.log_path = self.data_dir / "triton.log"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

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
        ]
        log_file = self.log_path.open("ab")
        try:
            # Dies with the worker even if the worker is killed without cleaning up.
            self._process = await asyncio.create_subprocess_exec(
                *die_with_parent(args),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                env=self._environment(paths),
                start_new_session=True,
            )
        finally:
            log_file.close()
        log.info(
            "triton starting",
            pid=self._process.pid,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            log=str(self.log_path),
        )
        await self._wait_listening(timeout)

    async def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.returncode is not None:
                raise RuntimeError(
                    f"bundled Triton exited with {self._process.returncode}; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.grpc_port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return
        await self.stop()
        raise RuntimeError(
            f"bundled Triton did not listen within {timeout}s; log tail:\n{self.log_tail()}"
        )

    async def wait_exited(self) -> int:
        """Triton's exit code, once it has exited (for whatever reason)."""
        process = self._process
        if process is None:
            raise RuntimeError("bundled Triton is not running")
        return await process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group (server and stubs), SIGKILL after `timeout`."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("triton did not stop in time; killing it", pid=process.pid)
        # Stubs that outlived the server are killed with the group either way.
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        log.info("triton stopped", pid=process.pid, returncode=process.returncode)


def _same_file(source: Path, target: Path) -> bool:
    if not target.exists():
        return False
    a, b = source.stat(), target.stat()
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
