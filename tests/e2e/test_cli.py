"""The user's commands: `tensorgate up` in the foreground, `generate` and `infer` against it
with the admin key it made, its services' log lines on stdout whole, every service's
metrics on its port, and Ctrl-C leaving no process behind (Triton and its backend stubs
included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

from services.runtime.process import free_port
from tests.helpers import metric_value, process_alive, process_command, scrape

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid`, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _free_port_run(count: int) -> int:
    """A port whose next `count - 1` ports are free too (metrics: gateway, worker +1,
    registry +2, auth +3)."""
    while True:
        with contextlib.ExitStack() as bound:
            first = bound.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                for offset in range(1, count):
                    bound.enter_context(socket.socket()).bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port


async def _run(*args: str, api_key: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORGATE_API_KEY"}
    if api_key is not None:
        env["TENSORGATE_API_KEY"] = api_key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_up_generate_infer_then_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, metrics_port = free_port(), _free_port_run(4)
    up_stdout = tmp_path / "up.out"
    with up_stdout.open("wb") as stdout:
        up = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "launcher.cli",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path),
            "--metrics-port",
            str(metrics_port),
            stderr=asyncio.subprocess.PIPE,
            stdout=stdout,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    assert up.stderr is not None
    banner = ""
    try:
        while "tensorgate is up" not in banner:
            line = await asyncio.wait_for(up.stderr.readline(), timeout=240)
            assert line, f"`tensorgate up` ended before it was up: {banner}"
            banner += line.decode()
        descendants = _children(up.pid)
        names = {process_command(pid).split()[0] for pid in descendants if process_alive(pid)}
        assert "tritonserver" in names and "triton_python_backend_stub" in names

        admin_key = (tmp_path / "auth" / "admin.key").read_text().strip()
        assert admin_key.startswith("tg_") and admin_key in banner

        gateway = f"127.0.0.1:{port}"
        code, out, err = await _run(
            "generate", "JULIET:", "--max-tokens", "5", "--gateway", gateway
        )
        assert code == 1 and err.startswith("error: UNAUTHENTICATED"), err

        code, out, err = await _run(
            "generate", "JULIET:", "--max-tokens", "20", "--seed", "1", "--gateway", gateway,
            api_key=admin_key,
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() and "completion_tokens=" in err

        code, out, err = await _run(
            "infer",
            "digits",
            "--gateway",
            gateway,
            "--input",
            f"image=@{REPO / 'models/examples/digits.json'}",
            api_key=admin_key,
        )
        assert code == 0, err
        assert json.loads(out)["label"] == [[0], [1], [2], [3]]

        code, out, err = await _run(
            "generate", "x", "--model", "nosuch", "--gateway", gateway, api_key=admin_key
        )
        assert code == 1 and "NOT_FOUND" in err

        gateway_metrics = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        generate = "/tensorgate.gateway.v1.InferenceGateway/Generate"
        assert metric_value(gateway_metrics, "tensorgate_rpc_requests_total", method=generate) == 3
        worker_metrics = await scrape(f"http://127.0.0.1:{metrics_port + 1}/metrics")
        infer = "/tensorgate.worker.v1.InferenceWorker/Infer"
        assert metric_value(worker_metrics, "tensorgate_rpc_requests_total", method=infer) == 1
        registry_metrics = await scrape(f"http://127.0.0.1:{metrics_port + 2}/metrics")
        assert "tensorgate_rpc_requests_total" in registry_metrics
        auth_metrics = await scrape(f"http://127.0.0.1:{metrics_port + 3}/metrics")
        authenticate = "/tensorgate.auth.v1.AuthService/Authenticate"
        assert metric_value(auth_metrics, "tensorgate_rpc_requests_total", method=authenticate) >= 1
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        returncode = await asyncio.wait_for(up.wait(), timeout=90)

    assert returncode == 0
    for _ in range(50):
        if not any(process_alive(pid) for pid in descendants):
            break
        await asyncio.sleep(0.1)
    leftovers = {pid: process_command(pid) for pid in descendants if process_alive(pid)}
    assert not leftovers, f"processes left behind: {leftovers}"

    # The services logged to `up`'s stdout through it: whole JSON lines (the output
    # is no terminal), among them the canonical lines of the calls above.
    logged = up_stdout.read_text()
    assert admin_key not in logged, "an API key reached a log line"
    methods: set[str] = set()
    for text in logged.splitlines():
        entry = json.loads(text)
        methods.update(v for v in entry.values() if isinstance(v, str) and v.startswith("/"))
    assert {generate, infer} <= methods, methods
