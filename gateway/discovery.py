"""Where the workers are. The static list is the embedded default; Consul comes later.

Both sit behind `Discovery`: the worker pool asks it for the current addresses
on each refresh.
"""

from __future__ import annotations

from typing import Protocol


class Discovery(Protocol):
    async def worker_addresses(self) -> list[str]: ...


class StaticDiscovery:
    """A fixed list of worker addresses (host:port)."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = list(addresses)

    async def worker_addresses(self) -> list[str]:
        return list(self._addresses)
