"""Hosts on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each `Host` is a namespace with its own loopback and one interface `eth0` on a /24
whose first address (.1) is the bridge, in this (the root) namespace: every host
reaches every other one, and this process reaches them all, through the bridge, as
machines on one switch. Cutting a host takes its veth down at the bridge: its packets
are dropped from then on, with no reset and no error, as when a machine loses its
network. Processes start inside a host with `ip netns exec`.

`Network.create()` needs root (CAP_NET_ADMIN) and the `ip` command; `close()` kills
every process left in the namespaces, then removes them and the bridge, and is safe
to call after a failure half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


class NetworkUnavailable(Exception):
    """Namespaces cannot be made here; the message says why."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One namespace: `name` (the namespace), `address` (its IP on the bridge)."""

    name: str
    address: str
    veth: str  # the root end, on the bridge
    is_cut: bool = False
    # Each process with the signal that stops it at the end.
    processes: list[tuple[asyncio.subprocess.Process, signal.Signals]] = field(default_factory=list)

    async def start(
        self,
        command: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        stdout: int | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> asyncio.subprocess.Process:
        """`command` run inside this host; its output (stdout unless piped) goes to `log`.
        `close()` stops it with `stop_signal` (SIGKILL after 5 s)."""
        prefix = ["ip", "netns", "exec", self.name]
        if user is not None:
            prefix += ["runuser", "-u", user, "--"]
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *prefix,
                *command,
                stdin=stdin,
                stdout=stdout if stdout is not None else out,
                stderr=out,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # its own process group, signalled as one
            )
        self.processes.append((process, stop_signal))
        return process

    def cut(self) -> None:
        """The host loses its network (its veth goes down at the bridge)."""
        _ip("link", "set", self.veth, "down")
        self.is_cut = True

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.name).split()]


class Network:
    """A bridge and the hosts on it; `await create(names)`, `host(name)`, `close()`."""

    def __init__(self) -> None:
        tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"tgbr{tag}"
        self._prefix = f"tg{tag}"
        self.subnet = _free_subnet()
        self.gateway_address = f"{self.subnet}.1"  # the bridge's address, in this namespace
        self.hosts: dict[str, Host] = {}

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root (CAP_NET_ADMIN); run as root to include it"
        return None

    def create(self, names: Sequence[str]) -> None:
        """The bridge and one host per name (NetworkUnavailable where the kernel or the
        container refuses; `close()` removes what was made before that)."""
        try:
            self._create(names)
        except RuntimeError as exc:
            raise NetworkUnavailable(f"cannot make network namespaces here: {exc}") from None

    def _create(self, names: Sequence[str]) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for number, name in enumerate(names, start=2):
            namespace, veth = f"{self._prefix}-{name}", f"{self._prefix}v{number}"
            host = Host(namespace, f"{self.subnet}.{number}", veth)
            self.hosts[name] = host  # before it exists: close() removes a half-made host
            _ip("netns", "add", namespace)
            peer = f"{veth}p"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", namespace)
            _ip("-n", namespace, "link", "set", peer, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")

    def host(self, name: str) -> Host:
        return self.hosts[name]

    async def close(self) -> None:
        """Stops every process in the hosts (its stop signal, then SIGKILL; at once on a
        host that was cut off, whose processes would wait out timeouts on what they can
        no longer reach), then removes it all."""
        for host in self.hosts.values():
            for process, stop in host.processes:
                if process.returncode is None:
                    _signal_group(process.pid, signal.SIGKILL if host.is_cut else stop)
        for host in self.hosts.values():
            for process, _ in host.processes:
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except TimeoutError:
                    _signal_group(process.pid, signal.SIGKILL)
                    await process.wait()
        for host in self.hosts.values():
            # Anything else still inside (a child that left its group) goes too.
            for pid in _quiet(host.pids) or []:
                _signal(pid, signal.SIGKILL)
            # Deleting the namespace alone leaves the root end of its veth behind while the
            # kernel still holds the namespace (sockets closing): delete the pair here.
            _quiet(partial(_ip, "link", "delete", host.veth))
            _quiet(partial(_ip, "netns", "delete", host.name))
        _quiet(partial(_ip, "link", "delete", self.bridge))
        self.hosts.clear()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Meanwhile SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the `finally` that
    closes a Network runs when a CI job is cancelled; Python's default ends the process
    at once, leaving the namespaces, the bridge and every process in them behind."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _free_subnet() -> str:
    """The first three octets of a /24 in 10.200-249.x.0 that no interface here uses."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    while True:
        subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        if f" {subnet}." not in used:
            return subnet


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _quiet(call: Callable[[], _T]) -> _T | None:
    """`call()`, or None where it fails: cleanup goes on past what is already gone."""
    try:
        return call()
    except RuntimeError:
        return None
