"""The multi-host test's network cleans up after itself when the run is cancelled: a CI
job stopped with SIGTERM must not leave namespaces, veths, a bridge or processes behind
(Python's default for SIGTERM ends the process without running any `finally`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multihost.network import Network

REPO = Path(__file__).resolve().parents[2]
# Made as the platform fixture makes it: a host, a process in it, `close()` in a
# `finally`, SIGTERM turned into KeyboardInterrupt meanwhile.
SCRIPT = """
import asyncio, sys
from pathlib import Path
from tests.multihost.network import Network, NetworkUnavailable, sigterm_interrupts

async def main() -> None:
    network = Network()
    try:
        try:
            network.create(["one"])
        except NetworkUnavailable as exc:
            print("unavailable:", exc, flush=True)
            return
        host = network.host("one")
        sleeper = await host.start(["sleep", "600"], log=Path(sys.argv[1]))
        print(host.name, host.veth, network.bridge, sleeper.pid, flush=True)
        await asyncio.sleep(600)
    finally:
        await network.close()

with sigterm_interrupts():
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(3)
"""


def _exists(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def test_a_sigterm_removes_the_network_and_its_processes(tmp_path: Path) -> None:
    why = Network.unavailable()
    if why is not None:
        pytest.skip(why)
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "sleep.log")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    ) as run:
        try:
            assert run.stdout is not None
            line = run.stdout.readline()
            if line.startswith("unavailable:"):
                pytest.skip(line.strip())
            namespace, veth, bridge, pid = line.split()
            assert _exists("ip", "netns", "pids", namespace)
            run.terminate()
            assert run.wait(timeout=30) == 3
        finally:
            run.kill()
    assert not _exists("ip", "netns", "pids", namespace)
    assert not _exists("ip", "link", "show", veth)
    assert not _exists("ip", "link", "show", bridge)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
